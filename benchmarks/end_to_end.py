"""End-to-end throughput of the real ``vgg-pipeline extract`` on a generated JPEG set.

Each run is a fresh ``vgg-pipeline extract`` process (its own local Ray, actor start, model
load, plan, read, decode, model, Parquet writes).  Reported per run:

* **steady img/s** — the figure to compare with model-only: images of every shard but the first
  to finish, divided by the time between the first and the last shard commit (the mtimes of
  ``embeddings/part-*.parquet``, the pipeline's commit markers).  Ray start-up, actor start,
  model load and the first shard's pipeline fill are outside it;
* **process wall s** and **run img/s** (``_SUCCESS.json`` ``run.img_per_s``: images / the
  scheduling loop's wall time, which includes actor start and model load);
* **start-up s** — process wall minus the steady-state time of all images;
* **CPU s/img** in the same window — of the actor process, and of the whole job (driver, Ray's
  own processes, actor), sampled with psutil: on a shared machine the steadier figure, since it
  counts work per image whatever share of the cores the job got;
* the actors' per-stage seconds (``_SUCCESS.json`` ``run.stage_seconds``: read, decode, model,
  write, summed over shards; read and decode run on the prefetch threads, overlapped with the
  model, so they are CPU cost rather than wall time).

``--compare-model-only`` also runs ``benchmarks/model_only.py`` (same arch, device, precision,
batch size and thread count as the pipeline's actor), alternating with the pipeline runs, and
prints both medians and their ratio — the CPU-efficiency figure (target >= 0.9) — and the same
ratio in CPU seconds per image (model-only / pipeline), which a busy machine disturbs less.
Model-only runs in the CPU actor's environment (``pipeline.run.ray_pool.CPU_ACTOR_ENV``).

``--compare-torchvision`` also runs the plain loop a user would write (``model_only.py
--torchvision``: torchvision's VGG in eager fp32, same batch and threads, the plain environment),
alternating too, and prints the pipeline's speed-up over it -- end to end (read, decode, write
included) against a loop that only runs the model.  ``make bench-cpu`` runs both comparisons::

    python benchmarks/end_to_end.py --compare-model-only --compare-torchvision   # cpu, vgg16, 64 images
    python benchmarks/end_to_end.py --device cuda --precision bf16 --batch-size 256 --images 20000 \\
        --shard-size 2000 --compare-model-only --doc
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
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from pipeline.input import layout  # noqa: E402

log = logging.getLogger("end_to_end")


def cli() -> list[str]:
    exe = shutil.which("vgg-pipeline", path=str(Path(sys.executable).parent)) or shutil.which("vgg-pipeline")
    return [exe] if exe else [sys.executable, "-m", "pipeline.cli"]


def pipeline_overrides(args: argparse.Namespace) -> list[str]:
    sets = [f"model.arch={args.arch}", f"runtime.device={args.device}", f"input.shard_size={args.shard_size}"]
    if args.precision:
        sets.append(f"runtime.precision={args.precision}")
    if args.batch_size:
        sets.append(f"runtime.batch_size={args.batch_size}")
    if args.decode_threads:
        sets.append(f"runtime.decode_threads={args.decode_threads}")
    return sets + list(args.set)


def commit_times(output: Path) -> list[tuple[float, int]]:
    """(commit wall time, shard index) of every written shard, oldest first."""
    return sorted((os.stat(p).st_mtime_ns / 1e9, layout.part_number(p.name))
                  for p in output.glob(layout.embeddings_glob()))


def steady_state(output: Path, per_shard: list[dict]) -> tuple[float, float]:
    """(img/s between the first and last shard commit, seconds per image) from part mtimes."""
    rows = {s["shard"]: s["rows"] + s["errors"] for s in per_shard}
    stamps = commit_times(output)
    if len(stamps) < 2:
        return float("nan"), float("nan")
    span = stamps[-1][0] - stamps[0][0]
    images = sum(rows.get(idx, 0) for _, idx in stamps[1:])
    rate = images / span if span > 0 else float("nan")
    return rate, (1 / rate if rate == rate and rate > 0 else float("nan"))


def run_pipeline(data: Path, args: argparse.Namespace, workdir: Path, env: Optional[dict] = None) -> dict:
    """One ``vgg-pipeline extract`` process; its figures (see the module docstring)."""
    out = workdir / "out"
    if out.exists():
        shutil.rmtree(out)
    cmd = cli() + ["extract", str(data), str(out), "--weights", args.weights]
    for s in pipeline_overrides(args):
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    with common.TreeSampler(proc.pid, interval=0.2) as sampler:
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"extract failed ({proc.returncode}): {err[-2000:]}")
    success = json.loads((out / layout.SUCCESS).read_text())
    run = success["run"]
    rate, per_image = steady_state(out, success["shards"])
    images = success["counts"]["images"]
    stamps = commit_times(out)
    steady_images = rate * (stamps[-1][0] - stamps[0][0]) if rate == rate else float("nan")
    actor_cpu, tree_cpu = sampler.cpu_between(stamps[0][0], stamps[-1][0]) if len(stamps) > 1 else (0.0, 0.0)
    return {"images": images, "errors": success["counts"]["errors"], "wall_s": wall,
            "run_wall_s": run.get("wall_s"), "run_img_per_s": run.get("img_per_s"),
            "steady_img_per_s": rate, "startup_s": wall - images * per_image if per_image == per_image else None,
            "actor_cpu_s_per_img": actor_cpu / steady_images if steady_images else float("nan"),
            "job_cpu_s_per_img": tree_cpu / steady_images if steady_images else float("nan"),
            "stage_seconds": run.get("stage_seconds", {}), "decode_engines": run.get("decode_engines", {}),
            "command": " ".join(cmd)}


def child_env(args: argparse.Namespace) -> Optional[dict]:
    """This process' environment plus ``--env`` (None when there is nothing to add)."""
    if not args.env:
        return None
    env = dict(os.environ)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def actor_env(args: argparse.Namespace) -> dict:
    """The environment a CPU actor of the pipeline runs in (its malloc settings), plus ``--env``."""
    from pipeline.run.ray_pool import CPU_ACTOR_ENV
    env = child_env(args) or dict(os.environ)
    return {**env, **CPU_ACTOR_ENV} if args.device == "cpu" else env


def run_model_only(args: argparse.Namespace, threads: Optional[int], torchvision: bool = False) -> dict:
    """One ``model_only.py`` run: the pipeline's model as its actor runs it, or (``torchvision``)
    the plain torchvision fp32 loop in this process' own environment."""
    script = Path(__file__).resolve().parent / "model_only.py"
    cmd = [sys.executable, str(script), "--device", args.device, "--arch", args.arch, "--weights", args.weights,
           "--batch-size", str(args.batch_size or (8 if args.device == "cpu" else 64)),
           "--images", str(args.model_images or args.images), "--repeat", "1", "--json"]
    if torchvision:
        cmd.append("--torchvision")
    elif args.precision:
        cmd += ["--precision", args.precision]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=None if torchvision else actor_env(args))
    if proc.returncode != 0:
        raise RuntimeError(f"model_only failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["results"][0]


def actor_threads(args: argparse.Namespace) -> Optional[int]:
    """torch threads of the pipeline's CPU actor: the CPUs it reserves (one actor per node)."""
    if args.device != "cpu":
        return None
    for s in args.set:
        if s.startswith("runtime.cpus_per_actor="):
            return int(float(s.split("=", 1)[1]))
    return len(os.sched_getaffinity(0))


def render(runs: list[dict], model: list[dict], plain: Optional[list[dict]] = None) -> str:
    steady = [r["steady_img_per_s"] for r in runs]
    rows = [("pipeline steady img/s", common.spread(steady)),
            ("pipeline run img/s (incl. actor start + model load)", common.spread([r["run_img_per_s"] for r in runs])),
            ("pipeline process wall s", common.spread([r["wall_s"] for r in runs], 1)),
            ("pipeline start-up s (wall - images / steady)", common.spread([r["startup_s"] for r in runs
                                                                            if r["startup_s"] is not None], 1)),
            ("pipeline actor CPU s/img (steady)", common.spread([r["actor_cpu_s_per_img"] for r in runs], 3)),
            ("pipeline whole job CPU s/img (steady; + driver, Ray)",
             common.spread([r["job_cpu_s_per_img"] for r in runs], 3))]
    stages: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r["stage_seconds"].items():
            stages.setdefault(k, []).append(v)
    images = runs[0]["images"]
    for k, vals in stages.items():
        rows.append((f"actor {k.removesuffix('_s')} s (sum over shards; ms/img)",
                     f"{common.spread(vals, 1)}; {1000 * common.summary(vals)['median'] / images:.0f}"))
    for name in runs[0].get("decode_engines", {}):  # GPU decode engines: share and rate per busy second
        got = [r["decode_engines"].get(name, {}) for r in runs]
        rows.append((f"decode engine {name}: images; img/s per busy s",
                     f"{common.spread([g.get('images', 0) for g in got], 0)}; "
                     f"{common.spread([g.get('img_per_s') or float('nan') for g in got], 0)}"))
    if model:
        rates = [m["img_per_s"] for m in model]
        cpu = [m["cpu_s_per_img"] for m in model]
        ratio = common.summary(steady)["median"] / common.summary(rates)["median"]
        pairs = [s / m for s, m in zip(steady, rates)]
        cpu_eff = common.summary(cpu)["median"] / common.summary([r["actor_cpu_s_per_img"] for r in runs])["median"]
        job_eff = common.summary(cpu)["median"] / common.summary([r["job_cpu_s_per_img"] for r in runs])["median"]
        rows += [("model-only img/s (same arch, batch, threads)", common.spread(rates)),
                 ("model-only CPU s/img", common.spread(cpu, 3)),
                 ("**ratio steady / model-only img/s** (medians)", f"**{ratio:.3f}**"),
                 ("ratio per alternating pair", ", ".join(f"{p:.3f}" for p in pairs)),
                 ("CPU efficiency: model-only CPU s/img / actor CPU s/img", f"{cpu_eff:.3f}"),
                 ("CPU efficiency incl. driver and Ray processes", f"{job_eff:.3f}")]
    if plain:
        rates = [m["img_per_s"] for m in plain]
        speedup = common.summary(steady)["median"] / common.summary(rates)["median"]
        rows += [("plain torchvision eager fp32 loop img/s (model only, same batch, threads)",
                  common.spread(rates)),
                 ("**speed-up: pipeline steady / plain torchvision fp32** (medians)", f"**{speedup:.3f}**"),
                 ("speed-up per alternating pair", ", ".join(f"{s / p:.3f}" for s, p in zip(steady, rates))),
                 ("plain torchvision CPU s/img", common.spread([m["cpu_s_per_img"] for m in plain], 3)),
                 ("CPU-cost speed-up: plain CPU s/img / pipeline whole-job CPU s/img (steadier when shared)",
                  f"{common.summary([m['cpu_s_per_img'] for m in plain])['median'] / common.summary([r['job_cpu_s_per_img'] for r in runs])['median']:.3f}")]
    return common.table(["measure", "value (median (min-max, n))"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = common.arg_parser(__doc__)
    common.add_model_args(p)
    p.add_argument("--precision", default=None, help="runtime.precision (default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=None, help="runtime.batch_size (default: the pipeline's)")
    p.add_argument("--decode-threads", type=int, default=None, help="runtime.decode_threads")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=None,
                   help="input.shard_size (default: images / 4, so 3 shards are steady state)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more extract --set overrides")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--compare-model-only", action="store_true",
                   help="alternate with model_only.py runs and print the ratio")
    p.add_argument("--compare-torchvision", action="store_true",
                   help="alternate with the plain torchvision eager fp32 loop and print the speed-up")
    p.add_argument("--model-images", type=int, default=None, help="images per model-only run (default --images)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the pipeline and model-only processes (and so the Ray "
                        "workers they start), e.g. MALLOC_MMAP_MAX_=0; repeatable")
    p.add_argument("--data", type=Path, default=None, help="JPEG folder (default: generated in the temp dir)")
    args = p.parse_args(argv)
    args.shard_size = args.shard_size or max(1, args.images // 4)
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    m = common.machine()
    data = args.data or Path(tempfile.gettempdir()) / f"vgg-bench-jpegs-{args.images}"
    if args.data is None:
        common.make_jpeg_set(data, args.images)
    runs, model, plain = [], [], []
    with tempfile.TemporaryDirectory(prefix="vgg-bench-e2e-") as tmp:
        for i in range(args.repeat):
            if args.compare_torchvision:
                plain.append(run_model_only(args, actor_threads(args), torchvision=True))
            if args.compare_model_only:
                model.append(run_model_only(args, actor_threads(args)))
            runs.append(run_pipeline(data, args, Path(tmp), env=child_env(args)))
            log.warning("run %d/%d: %s", i + 1, args.repeat,
                        {k: v for k, v in runs[-1].items() if k != "command"})
    note = (f"\n{args.images} JPEGs ({', '.join(f'{w}x{h}' for w, h in common.DEFAULT_SIZES)} cycled), "
            f"shard size {args.shard_size}; pipeline command: `{runs[0]['command']}`\n")
    common.report(args, m, {"runs": runs, "model_only": model, "torchvision": plain},
                  lambda: render(runs, model, plain),
                  f"End to end, {args.arch} on {args.device}", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
