"""Per-image Python of a shard's bookkeeping: model outputs -> Parquet table, before and after batching it.

* **per image** (the worker before issue 12): each batch's outputs sliced per row into a dict
  (``{k: v[j]}``), kept per position, then one ``append(out["fc7"][None])`` per row and a
  concatenate of N one-row arrays per column;
* **per batch** (now): :meth:`pipeline.output.writer.ShardRows.add` once per batch, one
  concatenate per column of N/b arrays.

Both end in the same :func:`pipeline.output.writer.embeddings_table` (asserted equal), so the
difference is the bookkeeping alone.  No model, no I/O::

    python benchmarks/rows_overhead.py --images 4000 --batch-sizes 8 256
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from pipeline.model.archs import FC7_DIM, NUM_CLASSES  # noqa: E402
from pipeline.output.writer import ShardRows, embeddings_schema, embeddings_table  # noqa: E402


def model_outputs(n: int, batch: int) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    rng = np.random.default_rng(0)
    return [(list(range(s, min(n, s + batch))),
             {"fc7": rng.random((min(batch, n - s), FC7_DIM), np.float32),
              "logits": rng.random((min(batch, n - s), NUM_CLASSES), np.float32)})
            for s in range(0, n, batch)]


def per_image(batches, ids, uris, schema):
    """The pre-change worker: per-row dicts and per-row appends."""
    results = {}
    for positions, out in batches:
        for j, pos in enumerate(positions):
            results[pos] = ((320, 240), {k: v[j] for k, v in out.items()})
    rows = ShardRows()
    fc7, logits = [], []
    for pos in range(len(ids)):
        (w, h), out = results[pos]
        rows.ids.append(ids[pos])
        rows.uris.append(uris[pos])
        rows.widths.append(w)
        rows.heights.append(h)
        fc7.append(out["fc7"][None])
        logits.append(out["logits"][None])
    rows.outputs = {"fc7": fc7, "logits": logits}
    return embeddings_table(rows, schema, {})


def per_batch(batches, ids, uris, schema):
    rows = ShardRows()
    for positions, out in batches:
        rows.add([ids[p] for p in positions], [uris[p] for p in positions], [320] * len(positions),
                 [240] * len(positions), out)
    return embeddings_table(rows, schema, {})


def main(argv=None) -> int:
    p = common.arg_parser(__doc__)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 256])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    schema = embeddings_schema("float16")
    ids = [f"{i:08d}.jpg" for i in range(args.images)]
    uris = [f"s3://bucket/images/{i}" for i in ids]
    results = []
    for b in args.batch_sizes:
        batches = model_outputs(args.images, b)
        assert per_image(batches, ids, uris, schema).equals(per_batch(batches, ids, uris, schema))
        times = {"per image": [], "per batch": []}
        for _ in range(args.repeat):  # alternate, so load on the machine hits both alike
            for name, fn in (("per image", per_image), ("per batch", per_batch)):
                t0 = time.perf_counter()
                fn(batches, ids, uris, schema)
                times[name].append((time.perf_counter() - t0) / args.images * 1e6)
        results.append({"batch": b, "us_per_image": times})

    def render() -> str:
        rows = []
        for r in results:
            t = r["us_per_image"]
            ratio = common.summary(t["per image"])["median"] / common.summary(t["per batch"])["median"]
            rows.append((r["batch"], common.spread(t["per image"]), common.spread(t["per batch"]), f"{ratio:.1f}x"))
        return common.table(["batch", "per image: us/img", "per batch: us/img", "speed-up"], rows)

    note = (f"\n{args.images} images per shard, fc7 stored as float16; outputs to finished table "
            "(Parquet encoding not included: it is the same for both).\n")
    common.report(args, common.machine(), {"results": results}, render, "Shard bookkeeping per image", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
