"""On-disk size of one shard with ``output.fc7_dtype`` float32 vs float16, as the writer writes it.

Rows are synthetic but shaped like VGG fc7 (relu7): non-negative, a given fraction exactly zero,
the rest half-normal; logits are normal float32, as in a real shard.  Each (zero fraction, dtype)
is written with the pipeline's own ``write_shard`` (zstd, no statistics on vectors) and the file
size read back, so the figures are the real size of a part file, not an estimate.

Usage::

    .venv/bin/python benchmarks/fc7_size.py                      # 1000 rows, zeros 50/75/90 %
    .venv/bin/python benchmarks/fc7_size.py --rows 1000 --zeros 0.5,0.75,0.9 --doc
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq

import common
from pipeline.model.archs import FC7_DIM, NUM_CLASSES
from pipeline.input import layout
from pipeline.output.writer import ShardRows, embeddings_schema, embeddings_table, errors_table, write_shard


def synthetic_rows(n: int, zero_fraction: float, seed: int = 0) -> ShardRows:
    """``n`` fc7-like rows: ``zero_fraction`` of the entries 0, the rest |N(0, 1)| (post-ReLU)."""
    rng = np.random.default_rng(seed)
    fc7 = np.abs(rng.standard_normal((n, FC7_DIM), dtype=np.float32))
    fc7[rng.random((n, FC7_DIM)) < zero_fraction] = 0.0
    logits = rng.standard_normal((n, NUM_CLASSES), dtype=np.float32) * 3
    ids = [f"images/{i // 1000:04d}/{i:07d}.jpg" for i in range(n)]
    rows = ShardRows()
    rows.add(ids, [f"s3://bucket/{i}" for i in ids], [640] * n, [480] * n, {"fc7": fc7, "logits": logits})
    return rows


def shard_bytes(rows: ShardRows, fc7_dtype: str, root: str) -> tuple[int, int]:
    """(file bytes, fc7 column chunk bytes) of the part file written for ``rows``."""
    table = embeddings_table(rows, embeddings_schema(fc7_dtype), {"benchmark": "fc7_size"})
    write_shard(root, 0, table, errors_table([], {}))
    path = os.path.join(root, layout.embeddings_part(0))
    meta = pq.ParquetFile(path).metadata
    fc7 = sum(meta.row_group(g).column(c).total_compressed_size
              for g in range(meta.num_row_groups) for c in range(meta.num_columns)
              if meta.row_group(g).column(c).path_in_schema.startswith("fc7"))
    return os.path.getsize(path), fc7


def main(argv: list[str] | None = None) -> int:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--zeros", default="0.5,0.75,0.9", help="comma-separated zero fractions of fc7")
    args = ap.parse_args(argv)
    m = common.machine()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for z in (float(x) for x in args.zeros.split(",")):
            data = synthetic_rows(args.rows, z)
            sizes = {dtype: shard_bytes(data, dtype, os.path.join(tmp, f"{dtype}-{z}"))
                     for dtype in ("float32", "float16")}
            results.append({"zero_fraction": z, "rows": args.rows,
                            **{f"{d}_file_bytes": f for d, (f, _) in sizes.items()},
                            **{f"{d}_fc7_bytes": c for d, (_, c) in sizes.items()}})

    def render() -> str:
        per_row = lambda r, key: r[key] / r["rows"] / 1000  # noqa: E731 - KB per row
        return common.table(
            ["fc7 zeros", "float32 KB/row (fc7 column)", "float16 KB/row (fc7 column)", "float16 / float32 file"],
            [[f"{r['zero_fraction']:.0%}",
              f"{per_row(r, 'float32_file_bytes'):.2f} ({per_row(r, 'float32_fc7_bytes'):.2f})",
              f"{per_row(r, 'float16_file_bytes'):.2f} ({per_row(r, 'float16_fc7_bytes'):.2f})",
              f"{r['float16_file_bytes'] / r['float32_file_bytes']:.2f}"] for r in results])

    note = (f"{args.rows} synthetic relu7-like rows per file (the given fraction of fc7 exactly 0, the rest "
            "|N(0,1)|), normal float32 logits, ids like `images/0000/0000000.jpg`; one part file as "
            "`write_shard` writes it (zstd). KB = 1000 bytes.")
    common.report(args, m, {"results": results}, render, "fc7 dtype: part-file size", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
