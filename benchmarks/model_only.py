"""Model-only throughput: the pipeline's mapper (:class:`pipeline.model.extractor.Extractor`) on a
ready-made normalised batch, no reading, no decoding, no writing.

The ceiling the end-to-end run is compared with (``benchmarks/end_to_end.py --compare-model-only``).
``--torchvision`` measures the plain loop a user would write instead: ``torchvision.models.<arch>``
in eager fp32 under ``torch.inference_mode()``, torchvision's layout, same batch and threads
(``end_to_end.py --compare-torchvision``: what the pipeline gains over it).
On CUDA the batch is already on the device (no H2D); fc7 and logits are copied back to the host as
in the pipeline.  Each (precision, batch size) pair: ``--warmup`` batches, then ``--repeat``
measurements of ``--images`` images each; the median is the figure, min and max the noise.
TFLOP/s is img/s times the model's FLOPs per image (``common.flops_per_image``, VGG16 ~31 GFLOP).

``--compile-mode`` (or ``--compile``: the pipeline's mode) adds rows for ``torch.compile`` built
as the pipeline builds it (:class:`pipeline.model.compiled.BackgroundCompiler`: a thread compiles
and warms it up at the batch size, the model swaps it in); "compile s" is that build, cache
included (a second run on the machine reads Inductor's cache).  ``reduce-overhead`` is CUDA
graphs, ``max-autotune-no-cudagraphs`` Inductor's autotuned kernels.

Usage::

    python benchmarks/model_only.py --device cpu --arch vgg16 --batch-size 8 --threads 2 --images 32
    python benchmarks/model_only.py --device cpu --precision fp32,bf16 --batch-size 8 --images 32
    python benchmarks/model_only.py --device cpu --torchvision --batch-size 8 --images 32  # plain loop
    python benchmarks/model_only.py --device cuda --arch vgg16 --precision bf16,fp16,fp32 \\
        --batch-size 64,128,256 --images 4096 --repeat 5 --doc
    python benchmarks/model_only.py --device cuda --precision bf16 --batch-size 256 --compile  # + torch.compile rows
    python benchmarks/model_only.py --device cuda --precision bf16 --batch-size 256 \
        --compile-mode default,max-autotune-no-cudagraphs,reduce-overhead
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

log = logging.getLogger("model_only")


def measure(extractor, batch_size: int, images: int, warmup: int, repeat: int) -> tuple[list[float], list[float]]:
    """img/s and process CPU seconds per image of ``repeat`` timed runs of ``ceil(images / batch_size)``
    batches each.  CPU time counts every thread of this process (on a shared machine it is the
    steadier figure: work per image, whatever share of the cores the process got)."""
    import torch
    device = extractor.device
    x = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(warmup):
        extractor(x)
    steps = max(1, -(-images // batch_size))
    rates, cpu = [], []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            extractor(x)  # returns host numpy arrays: the device is synchronised by the copy
        rates.append(steps * batch_size / (time.perf_counter() - t0))
        cpu.append((time.process_time() - c0) / (steps * batch_size))
    return rates, cpu


class PlainTorchvision:
    """The baseline loop: torchvision's own VGG, eager fp32, torchvision's layout, host numpy out."""

    precision = "torchvision fp32"

    def __init__(self, arch: str, device: str, num_threads) -> None:
        import torch
        import torchvision
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.model = getattr(torchvision.models, arch)(weights=None).eval().to(self.device)

    def __call__(self, x):
        import torch
        with torch.inference_mode():
            return self.model(x).cpu().numpy()


def compile_model(ex, mode: str, batch_size: int) -> float:
    """Swap ``ex``'s model for ``torch.compile(model, mode)`` the way the pipeline does; the build
    time in seconds (NaN if it failed: the row then measures eager)."""
    import torch

    from pipeline.model.compiled import BackgroundCompiler
    from pipeline.model.precision import uses_channels_last
    fmt = torch.channels_last if uses_channels_last(ex.precision, ex.device) else torch.contiguous_format
    ex.compiler = BackgroundCompiler(ex.model, "on", ex.device, memory_format=fmt, mode=mode)
    ex(torch.zeros(batch_size, 3, 224, 224).to(ex.device))   # starts the build at this batch size
    ex.compiler.wait()
    if ex.compiler.state != "ready":
        log.warning("torch.compile mode %s failed; the row is eager", mode)
        return float("nan")
    return ex.compiler.compile_s


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from pipeline.model.extractor import Extractor

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("model_only.py: --device cuda but no CUDA device is visible")
    results = []
    flops = common.flops_per_image(args.arch)
    for precision in args.precision:
        for mode in [None, *args.compile_mode]:
            for bs in args.batch_size:
                if args.torchvision:
                    ex = PlainTorchvision(args.arch, args.device, args.threads)
                else:  # a fresh model per row: a compiled one is built for its one batch size
                    ex = Extractor(args.arch, args.weights, device=args.device, precision=precision,
                                   num_threads=args.threads)
                compile_s = compile_model(ex, mode, bs) if mode else None
                rates, cpu = measure(ex, bs, args.images, args.warmup, args.repeat)
                s = common.summary(rates)
                results.append({"device": args.device, "arch": args.arch, "precision": ex.precision,
                                "compile": mode or False, "compile_s": compile_s, "batch_size": bs,
                                "threads": torch.get_num_threads(),
                                "img_per_s": s["median"], "min": s["min"], "max": s["max"], "runs": rates,
                                "tflops": s["median"] * flops / 1e12,
                                "cpu_s_per_img": common.summary(cpu)["median"]})
                log.info("%s", results[-1])
                del ex
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    return results


def render(results: list[dict]) -> str:
    rows = [(r["device"], r["arch"], r["precision"] + (f" +compile {r['compile']}" if r["compile"] else ""),
             r["batch_size"], r["threads"], common.spread(r["runs"], 2), f"{r['tflops']:.3g}",
             f"{r['cpu_s_per_img']:.3f}", "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}")
            for r in results]
    return common.table(["device", "arch", "precision", "batch", "torch threads", "img/s median (min-max)",
                         "TFLOP/s", "CPU s/img", "compile s"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = common.arg_parser(__doc__)
    common.add_model_args(p)
    p.add_argument("--precision", default="auto",
                   help="comma list of auto,fp32,bf16,fp16 (default auto, as the pipeline)")
    p.add_argument("--torchvision", action="store_true",
                   help="measure torchvision's VGG in eager fp32 (the plain baseline loop) instead")
    p.add_argument("--batch-size", default=None, help="comma list (default: 8 on cpu, 64,128,256 on cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads on cpu (default: all cores, as a CPU actor uses)")
    p.add_argument("--images", type=int, default=None, help="images per timed run (default 32 cpu, 2048 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 1 cpu, 10 cuda)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compile", action="store_true",
                   help="also measure torch.compile in the pipeline's mode (pipeline.model.compiled.COMPILE_MODE)")
    p.add_argument("--compile-mode", default="",
                   help="comma list of torch.compile modes to measure as well: default, "
                        "max-autotune-no-cudagraphs, reduce-overhead (CUDA graphs), max-autotune")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.precision = ["fp32"] if args.torchvision else args.precision.split(",")
    from pipeline.model.compiled import COMPILE_MODE
    modes = [m for m in args.compile_mode.split(",") if m.strip()] or ([COMPILE_MODE] if args.compile else [])
    if modes and args.torchvision:
        p.error("--compile/--compile-mode measure the pipeline's model, not --torchvision")
    args.compile_mode = [m.strip() for m in modes]
    args.batch_size = [int(b) for b in (args.batch_size or ("64,128,256" if cuda else "8")).split(",")]
    args.images = args.images or (2048 if cuda else 32)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    if args.threads is None and not cuda:
        import os
        args.threads = len(os.sched_getaffinity(0))
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    m = common.machine()
    results = run(args)
    common.report(args, m, {"results": results}, lambda: render(results), f"Model only, {args.arch} on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
