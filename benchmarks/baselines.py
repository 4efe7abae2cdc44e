"""The same job three ways, same data, same node, same model, same batch size, one run after another:

* ``pipeline``   — ``vgg-pipeline extract`` (``benchmarks/end_to_end.py``'s run);
* ``raydata``    — Ray Data: ``read_binary_files`` -> ``map_batches(decode)`` (tasks) ->
  ``map_batches(Embed, compute=ActorPoolStrategy(size=1))`` -> ``write_parquet``; the decode is the
  pipeline's own (``decode_with_size`` + ``preprocess_pil``), so only the orchestration differs;
* ``dataloader`` — a plain ``torch.utils.data.DataLoader`` loop (``--num-workers`` decode
  processes, same decode) feeding the same :class:`~pipeline.model.extractor.Extractor`, one Parquet file.

Every run is a fresh process.  Reported: process wall time (start-up, model load and writing
included) and the steady rate — images after the first output batch (shard for the pipeline)
divided by the time from that first output to the last, which leaves start-up out for all three.
The baselines skip undecodable images instead of writing error rows and do not resume: they do
less than the pipeline.

Usage::

    python benchmarks/baselines.py --arch vgg16 --images 64 --repeat 3
    python benchmarks/baselines.py --device cuda --precision bf16 --batch-size 256 --images 20000 --doc
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import end_to_end  # noqa: E402

log = logging.getLogger("baselines")
MODES = ("pipeline", "raydata", "dataloader")
LIMITS = dict(max_pixels=100_000_000, max_bytes=100_000_000)


def _decode(data: bytes):
    """The pipeline's CPU decode: bytes -> normalised float32 (3, 224, 224) numpy array."""
    from pipeline.decode.cpu import decode_with_size
    from pipeline.decode.preprocess import RESIZE, preprocess_pil
    img, _ = decode_with_size(data, min_side=RESIZE, **LIMITS)
    return preprocess_pil(img).numpy()


def _steady(stamps: list[float], counts: list[int]) -> float:
    """Images after the first output, over the time from the first output to the last."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan")
    return sum(counts[1:]) / (stamps[-1] - stamps[0])


# -- Ray Data -------------------------------------------------------------------------------------


def decode_batch(batch: dict) -> dict:
    import numpy as np
    keep, pixels = [], []
    for i, data in enumerate(batch["bytes"]):
        try:
            pixels.append(_decode(bytes(data)))
            keep.append(i)
        except Exception as exc:  # noqa: BLE001 - a baseline without error rows: skip the image
            log.warning("skipping %s: %s", batch["path"][i], exc)
    return {"path": np.asarray(batch["path"])[keep], "pixels": np.stack(pixels) if pixels
            else np.zeros((0, 3, 224, 224), np.float32)}


class Embed:
    def __init__(self, arch: str, weights: str, device: str, precision: str, threads: int | None) -> None:
        from pipeline.model.extractor import Extractor
        self.ex = Extractor(arch, weights, device=device, precision=precision, num_threads=threads)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch
        fc7, logits = self.ex(torch.from_numpy(batch["pixels"]))
        return {"path": batch["path"], "fc7": fc7.astype(np.float16), "logits": logits,
                "t_done": np.full(len(fc7), time.time())}


def run_raydata(paths: list[Path], args: argparse.Namespace, out: Path) -> dict:
    import pyarrow.parquet as pq
    import ray
    t0 = time.time()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    cuda = args.device == "cuda"
    ds = ray.data.read_binary_files([str(p) for p in paths], include_paths=True)
    ds = ds.map_batches(decode_batch, batch_size=args.batch_size, batch_format="numpy")
    ds = ds.map_batches(Embed, fn_constructor_args=(args.arch, args.weights, args.device, args.precision or "auto",
                                                    None if cuda else args.threads),
                        compute=ray.data.ActorPoolStrategy(size=1), batch_size=args.batch_size,
                        batch_format="numpy", num_gpus=1 if cuda else 0,
                        # on CPU the actor takes one CPU slot and leaves the rest to decode tasks;
                        # torch still runs --threads threads, as the pipeline's actor does
                        num_cpus=1)
    ds.write_parquet(str(out))
    wall = time.time() - t0
    ray.shutdown()
    t_done = pq.read_table(str(out), columns=["t_done"]).column("t_done").to_pylist()
    stamps = sorted(set(t_done))
    counts = [t_done.count(s) for s in stamps]
    return {"images": len(t_done), "inner_wall_s": wall, "steady_img_per_s": _steady(stamps, counts)}


# -- DataLoader -----------------------------------------------------------------------------------


class _Files:
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch
        return str(self.paths[i]), torch.from_numpy(_decode(self.paths[i].read_bytes()))


def run_dataloader(paths: list[Path], args: argparse.Namespace, out: Path) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torch.utils.data import DataLoader

    from pipeline.model.extractor import Extractor
    t0 = time.time()
    cuda = args.device == "cuda"
    ex = Extractor(args.arch, args.weights, device=args.device, precision=args.precision or "auto",
                   num_threads=None if cuda else args.threads)
    loader = DataLoader(_Files(paths), batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=cuda, prefetch_factor=2 if args.num_workers else None)
    names, fc7s, logits_, stamps, counts = [], [], [], [], []
    for batch_names, x in loader:
        fc7, logits = ex(x)
        names += list(batch_names)
        fc7s.append(fc7.astype(np.float16))
        logits_.append(logits)
        stamps.append(time.time())
        counts.append(len(fc7))
    out.mkdir(parents=True, exist_ok=True)
    fc7 = np.concatenate(fc7s)
    logits = np.concatenate(logits_)
    table = pa.table({"path": names,
                      "fc7": pa.FixedSizeListArray.from_arrays(pa.array(fc7.reshape(-1)), fc7.shape[1]),
                      "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), logits.shape[1])})
    pq.write_table(table, out / "part-0.parquet")
    return {"images": len(names), "inner_wall_s": time.time() - t0, "steady_img_per_s": _steady(stamps, counts)}


# -- driver -----------------------------------------------------------------------------------------


def run_mode(mode: str, data: Path, args: argparse.Namespace, workdir: Path) -> dict:
    if mode == "pipeline":
        r = end_to_end.run_pipeline(data, args, workdir)
        return {"mode": mode, "images": r["images"], "wall_s": r["wall_s"], "steady_img_per_s": r["steady_img_per_s"]}
    out = workdir / f"out-{mode}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", mode, "--data", str(data), "--out", str(out),
           "--device", args.device, "--arch", args.arch, "--weights", args.weights, "--batch-size",
           str(args.batch_size), "--threads", str(args.threads), "--num-workers", str(args.num_workers)]
    if args.precision:
        cmd += ["--precision", args.precision]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed: {proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"mode": mode, "images": r["images"], "wall_s": wall, "steady_img_per_s": r["steady_img_per_s"]}


def render(results: list[dict]) -> str:
    by_mode: dict[str, list[dict]] = {}
    for r in results:
        by_mode.setdefault(r["mode"], []).append(r)
    base = common.summary(r["steady_img_per_s"] for r in by_mode.get("pipeline", []))["median"]
    rows = []
    for mode, rs in by_mode.items():
        steady = [r["steady_img_per_s"] for r in rs]
        med = common.summary(steady)["median"]
        rows.append((mode, rs[0]["images"], common.spread([r["wall_s"] for r in rs], 1), common.spread(steady),
                     f"{med / base:.2f}" if base == base and base else "-"))
    return common.table(["job", "images", "process wall s", "steady img/s", "steady vs pipeline"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = common.arg_parser(__doc__)
    common.add_model_args(p)
    p.add_argument("--precision", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="default: the pipeline's (8 cpu, 64 cuda)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads on cpu")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: cores, max 8)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=None, help="pipeline input.shard_size (default images / 4)")
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--run-one", choices=MODES[1:], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.device == "cpu" else 64)
    args.shard_size = args.shard_size or max(1, args.images // 4)
    if args.num_workers is None:
        args.num_workers = min(8, len(os.sched_getaffinity(0)))
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.run_one:
        paths = sorted(args.data.glob("*.jpg"))
        fn = run_raydata if args.run_one == "raydata" else run_dataloader
        print(json.dumps(fn(paths, args, args.out)))
        return 0
    m = common.machine()
    data = args.data or Path(tempfile.gettempdir()) / f"vgg-bench-jpegs-{args.images}"
    if args.data is None:
        common.make_jpeg_set(data, args.images)
    results = []
    with tempfile.TemporaryDirectory(prefix="vgg-bench-baselines-") as tmp:
        for i in range(args.repeat):
            for mode in args.modes.split(","):
                results.append(run_mode(mode, data, args, Path(tmp)))
                log.warning("run %d/%d: %s", i + 1, args.repeat, results[-1])
    note = (f"\n{args.images} JPEGs, batch {args.batch_size}, torch threads {args.threads} (cpu), "
            f"DataLoader workers {args.num_workers}, pipeline shard size {args.shard_size}.\n")
    common.report(args, m, {"results": results}, lambda: render(results),
                  f"Baselines, {args.arch} on {args.device}", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
