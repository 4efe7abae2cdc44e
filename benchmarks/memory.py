"""Peak memory of the driver and the actors of ``vgg-pipeline extract`` at 1k vs 100k images.

What is measured, exactly: a real ``vgg-pipeline extract`` process on a ``.txt`` manifest of N
lines that name files which do not exist.  Everything per-image that does not depend on pixels
runs for real — listing, the out-of-core duplicate check, the plan parts, the driver's streaming
of shards to the actor pool, one read attempt per image, one error row per image, one errors +
one (empty) embeddings Parquet file per shard, ``_SUCCESS.json`` with per-shard counts — while
decoding and the model never run (every read fails), so 100k images take seconds.  The actor
still loads the model once (``--arch``, random weights), which sets the actor's floor.

Sampled every ``--interval`` s with psutil, and read from the kernel's high-water mark
(``VmHWM`` in ``/proc/PID/status``, so a spike between samples is not missed):

* **driver** — the ``vgg-pipeline`` process (planning, scheduling, progress, summary);
* **actor** — the largest ``ray::ShardWorker`` process;
* **Ray system** — raylet, GCS and the rest of the local Ray started by the driver (sum of peaks).

"Flat" means driver and actor peaks at 100k within ``--tolerance`` (default 10 %) of 1k:
the driver holds a bounded window of shards, never the whole listing.

Usage::

    python benchmarks/memory.py                       # 1000 and 100000 images
    python benchmarks/memory.py --sizes 1000,100000,1000000 --doc
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import end_to_end  # noqa: E402
from pipeline.input import layout  # noqa: E402

log = logging.getLogger("memory")


def write_missing_manifest(path: Path, n: int) -> None:
    """``n`` absolute paths of files that do not exist, one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n, 100_000):
            f.write("".join(f"/nonexistent-vgg-bench/{i // 1000:04d}/{i:07d}.jpg\n"
                            for i in range(start, min(n, start + 100_000))))


def run_once(n: int, args: argparse.Namespace, workdir: Path) -> dict:
    manifest = workdir / f"missing-{n}.txt"
    write_missing_manifest(manifest, n)
    out = workdir / f"out-{n}"
    if out.exists():
        shutil.rmtree(out)
    cmd = end_to_end.cli() + ["extract", str(manifest), str(out), "--weights", "random:0",
                              "--set", f"model.arch={args.arch}", "--set", f"input.shard_size={args.shard_size}",
                              "--set", "runtime.device=cpu"]
    for s in args.set:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with common.TreeSampler(proc.pid, interval=args.interval) as sampler:
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"extract failed ({proc.returncode}): {err[-2000:]}")
    success = json.loads((out / layout.SUCCESS).read_text())
    return {"images": n, "error_rows": success["counts"]["errors"], "shards": success["counts"]["shards"],
            "wall_s": wall, "samples": sampler.samples, "driver_peak_mib": sampler.peak("driver"),
            "actor_peak_mib": sampler.peak("actor"), "ray_system_peak_mib": sampler.peak("ray", "sum")}


def render(results: list[dict], tolerance: float) -> tuple[str, bool]:
    rows = [(r["images"], r["shards"], r["error_rows"], f"{r['wall_s']:.1f}", f"{r['driver_peak_mib']:.0f}",
             f"{r['actor_peak_mib']:.0f}", f"{r['ray_system_peak_mib']:.0f}") for r in results]
    body = common.table(["images", "shards", "error rows", "wall s", "driver peak MiB", "actor peak MiB",
                         "Ray system MiB (sum of peaks)"], rows)
    first, last = results[0], results[-1]
    flat = True
    lines = []
    for key in ("driver_peak_mib", "actor_peak_mib"):
        growth = last[key] / first[key] - 1
        ok = growth <= tolerance
        flat &= ok
        lines.append(f"{key.split('_')[0]} peak {first['images']} -> {last['images']} images: "
                     f"{growth:+.1%} ({'flat' if ok else 'GROWS'}, tolerance {tolerance:.0%})")
    return body + "\n\n" + "\n".join(f"- {ln}" for ln in lines), flat


def parse_args(argv=None) -> argparse.Namespace:
    p = common.arg_parser(__doc__)
    p.add_argument("--sizes", default="1000,100000", help="comma list of image counts")
    p.add_argument("--arch", default="vgg11", help="the actor's model (loaded once; sets its floor)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--interval", type=float, default=0.2, help="sampling period, seconds")
    p.add_argument("--tolerance", type=float, default=0.10)
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    m = common.machine()
    with tempfile.TemporaryDirectory(prefix="vgg-bench-mem-") as tmp:
        results = [run_once(n, args, Path(tmp)) for n in args.sizes]
    body, flat = render(results, args.tolerance)
    if args.json:
        print(json.dumps({"machine": m, "results": results, "flat": flat}))
    else:
        print(body)
    if args.doc:
        common.append_doc("Peak memory vs number of images", body, m)
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
