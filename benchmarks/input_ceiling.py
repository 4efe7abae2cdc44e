"""The input ceiling: ``extract`` with a model that computes nothing, against bare decode on the same cores.

Two measurements, paired and alternated in one run so a shared machine disturbs both alike:

* **bare decode** — the decode processes' own work (read the file, :func:`decode_with_size` with
  JPEG draft, resize + center crop to 224, into a preallocated array) in ``--cores`` plain
  processes (``multiprocessing.Pool``), no pipeline;
* **extract (stand-in model)** — the real ``vgg-pipeline extract`` path (plan, Ray actor, fetch
  threads, decode processes, batching, normalisation, Parquet writes, commits) with its mapper
  replaced by :class:`NullMapper`, which consumes each batch and returns zeros.  The stand-in is
  installed in the actor through Ray's ``worker_process_setup_hook`` (benchmark code, not an
  option of the CLI).  Throughput = images / (last shard commit - first batch handed to the model),
  so Ray start-up, actor start and model load are outside it.

Both report img/s and CPU seconds per image (every process of the job: driver, Ray, actor, decode
processes; psutil).  On a shared machine the CPU figure is the steadier one: the pipeline's many
threads and processes get a different share of contended cores than N bare processes do, while
CPU per image counts the work whatever share it got.  "x bare (CPU)" = bare CPU/img over
extract CPU/img: what the throughput ratio is once the cores are saturated and not shared.

Image sets: ``web`` (500x375 and 375x500, ~0.2 Mpixel) and ``photos`` (3, 6 and 12 Mpixel), each a
few distinct JPEGs listed many times (a CSV manifest with unique ids) so a large job needs little
disk.  ``--shard-sizes 64 4000`` runs the same job at both shard sizes instead (the cost of shard
boundaries)::

    python benchmarks/input_ceiling.py                                  # web + photos, shard 1000
    python benchmarks/input_ceiling.py --sets web --images 4000 --shard-sizes 64 4000
"""

from __future__ import annotations

import csv
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

if TYPE_CHECKING:
    from pipeline.config import Config

SETS = {
    "web": {"sizes": [(500, 375), (375, 500)], "distinct": 64, "images": 3000},
    "photos": {"sizes": [(2048, 1536), (3000, 2000), (4000, 3000)], "distinct": 12, "images": 300},
}
LIMITS = dict(max_pixels=100_000_000, max_bytes=100_000_000)
FIRST_BATCH_ENV = "VGG_BENCH_FIRST_BATCH_FILE"


# -- the stand-in model (runs in the Ray actor) ----------------------------------------------------


class NullMapper:
    """The mapper contract with no model: each batch is consumed and answered with zeros."""

    needs_image = False
    min_side = 256
    compiled_images = 0

    def __init__(self, cfg: Config) -> None:
        import torch

        from pipeline.model.extractor import Extractor
        from pipeline.model.weights import WeightsInfo
        self.device, self.precision = torch.device("cpu"), "fp32"
        self.weights = WeightsInfo(cfg.model.weights, cfg.model.weights, None, True)
        self.columns = Extractor.columns
        self._first = os.environ.get(FIRST_BATCH_ENV)

    def embed(self, batch) -> dict[str, np.ndarray]:
        if self._first and not os.path.exists(self._first):
            Path(self._first).write_text(repr(time.time()))
        float(batch.pixels[:, 0, 0, 0].sum())  # touch the batch: it must really have been made
        n = len(batch)
        return {c.name: np.zeros((n, c.type.list_size), np.float32) for c in self.columns}


def install_null_mapper() -> None:
    """Ray ``worker_process_setup_hook``: every worker builds a :class:`NullMapper`."""
    import pipeline.run.worker as worker
    worker.make_mapper = lambda cfg, storage_options, num_threads: NullMapper(cfg)


# -- the image sets ---------------------------------------------------------------------------------


def image_set(name: str, images: int, root: Path) -> tuple[Path, list[Path]]:
    """``images`` manifest rows over a few distinct JPEGs of the set; returns (manifest, files)."""
    spec = SETS[name]
    files = common.make_jpeg_set(root / name, spec["distinct"], sizes=spec["sizes"])
    manifest = root / f"{name}-{images}.csv"
    if not manifest.exists():
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "uri"])
            for i in range(images):
                w.writerow([f"{i:07d}", str(files[i % len(files)])])
    return manifest, [files[i % len(files)] for i in range(images)]


# -- bare decode ------------------------------------------------------------------------------------


def _bare_one(path: str) -> int:
    from pipeline.decode.cpu import decode_with_size
    from pipeline.decode.pool import resize_crop
    out = _bare_one.buf  # type: ignore[attr-defined]
    with open(path, "rb") as f:
        data = f.read()
    img, _ = decode_with_size(data, min_side=256, **LIMITS)
    out[...] = np.asarray(resize_crop(img, 256, 224)).transpose(2, 0, 1)
    return 1


def _bare_init() -> None:
    _bare_one.buf = np.empty((3, 224, 224), np.uint8)  # type: ignore[attr-defined]


def bare_decode(paths: list[Path], cores: int) -> dict:
    with mp.get_context("spawn").Pool(cores, initializer=_bare_init) as pool:
        pool.map(_bare_one, [str(p) for p in paths[:cores * 4]])  # warm: imports, page cache
        with common.TreeSampler(os.getpid()) as sampler:
            t0 = time.time()
            n = sum(pool.imap_unordered(_bare_one, [str(p) for p in paths], chunksize=4))
            t1 = time.time()
            sampler.sample()
    return {"img_per_s": n / (t1 - t0), "cpu_s_per_img": sampler.cpu_between(t0, t1)[1] / n}


# -- extract with the stand-in ----------------------------------------------------------------------


def extract_null(manifest: Path, workdir: Path, shard_size: int, cores: int, images: int) -> dict:
    import ray

    import pipeline
    out = workdir / f"out-{shard_size}-{time.monotonic_ns()}"
    first = out.with_suffix(".first")
    env = {FIRST_BATCH_ENV: str(first),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), str(common.REPO),
                                          os.environ.get("PYTHONPATH", "")])}
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False,
             configure_logging=False,
             runtime_env={"worker_process_setup_hook": "input_ceiling.install_null_mapper", "env_vars": env})
    try:
        with common.TreeSampler(os.getpid()) as sampler:  # the driver, Ray, the actor, its decoders
            summary = pipeline.extract(str(manifest), str(out), weights="random:0", progress=False,
                                       model={"arch": "vgg11"},
                                       runtime={"device": "cpu", "cpus_per_actor": cores},
                                       input={"shard_size": shard_size})
    finally:
        ray.shutdown()
    commits = sorted(p.stat().st_mtime for p in (out / "embeddings").glob("part-*.parquet"))
    start = float(first.read_text())
    assert summary["counts"]["embedded"] == images, summary["counts"]
    return {"img_per_s": images / (commits[-1] - start), "shards": len(commits),
            "cpu_s_per_img": sampler.cpu_between(start, commits[-1])[1] / images,
            "stage_seconds": summary["run"].get("stage_seconds", {})}


def main(argv: Optional[list[str]] = None) -> int:
    p = common.arg_parser(__doc__)
    p.add_argument("--sets", nargs="+", choices=sorted(SETS), default=["web", "photos"])
    p.add_argument("--images", type=int, default=None, help="images per set (default: per set)")
    p.add_argument("--shard-sizes", type=int, nargs="+", default=[1000])
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "vgg-bench-ceiling")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results = []
    with tempfile.TemporaryDirectory(prefix="vgg-ceiling-") as tmp:
        for name in args.sets:
            images = args.images or SETS[name]["images"]
            manifest, paths = image_set(name, images, args.data)
            bare, runs = [], {s: [] for s in args.shard_sizes}
            for _ in range(args.repeat):  # alternate: bare, then each shard size
                bare.append(bare_decode(paths, args.cores))
                for s in args.shard_sizes:
                    runs[s].append(extract_null(manifest, Path(tmp), s, args.cores, images))
            mpix = sum(common.jpeg_pixels(q.read_bytes()) for q in paths[:50]) / min(50, len(paths)) / 1e6
            results.append({"set": name, "images": images, "mpix": mpix, "bare": bare, "runs": runs})

    def render() -> str:
        rows = []
        for r in results:
            b = {k: common.summary([x[k] for x in r["bare"]])["median"] for k in ("img_per_s", "cpu_s_per_img")}
            rows.append((f"{r['set']} ({r['mpix']:.1f} Mpixel)", r["images"], "bare decode",
                         common.spread([x["img_per_s"] for x in r["bare"]]), "1.00",
                         f"{b['cpu_s_per_img'] * 1e3:.1f}", "1.00"))
            for s, v in r["runs"].items():
                ips = [x["img_per_s"] for x in v]
                cpu = common.summary([x["cpu_s_per_img"] for x in v])["median"]
                rows.append(("", "", f"extract, shard_size {s}", common.spread(ips),
                             f"{common.summary(ips)['median'] / b['img_per_s']:.2f}", f"{cpu * 1e3:.1f}",
                             f"{b['cpu_s_per_img'] / cpu:.2f}"))
        return common.table(["set", "images", "what", "img/s median (min-max)", "x bare", "CPU ms/img",
                             "x bare (CPU)"], rows)

    note = (f"\n{args.cores} cores for both (bare: {args.cores} processes; extract: one actor with "
            f"{args.cores} CPUs, its decode processes and a stand-in model that computes nothing). "
            "Runs alternate bare / extract; ratios are of medians from the same run.\n")
    common.report(args, common.machine(), {"results": results}, render, "Input ceiling (stand-in model)", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
