"""Where the model's time goes: each convolution and linear layer of a VGG timed alone at one batch
size, with its FLOPs, achieved TFLOP/s and share of the device's peak.

The peak is ``--peak`` (TFLOP/s, e.g. a datasheet figure) or else measured in the same run: a large
matrix product in the model's precision (``--matmul-size``), the best this device does on dense
math.  Each layer runs on a ready input in the pipeline's dtype and layout (``channels_last`` for
the reduced formats), ``--warmup`` calls and then ``--repeat`` timed ones (CUDA events on a GPU,
``perf_counter`` on the CPU).  The "full forward" row is the whole model (ReLUs, pools and
layout changes included); "sum of layers" is what the rows above add up to.

Usage::

    python benchmarks/layer_profile.py --device cpu --arch vgg16 --batch-size 2 --repeat 2
    python benchmarks/layer_profile.py --device cuda --arch vgg16 --precision bf16 --batch-size 256 --doc
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

log = logging.getLogger("layer_profile")


def time_call(fn: Callable[[], object], device, warmup: int, repeat: int) -> float:
    """Seconds per call of ``fn`` (mean of ``repeat`` after ``warmup``)."""
    import torch
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def matmul_peak(device, dtype, n: int, warmup: int, repeat: int) -> float:
    """TFLOP/s of an ``n`` x ``n`` by ``n`` x ``n`` product in ``dtype``: the dense-math peak."""
    import torch
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    s = time_call(lambda: a @ b, device, warmup, repeat)
    return 2 * n ** 3 / s / 1e12


def profile(args: argparse.Namespace) -> dict:
    import torch

    from pipeline.model.extractor import Extractor
    from pipeline.model.precision import uses_channels_last

    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    ex = Extractor(args.arch, "random:0", device=args.device, precision=args.precision, num_threads=args.threads)
    device, dtype, bs = ex.device, ex.dtype, args.batch_size
    fmt = torch.channels_last if uses_channels_last(ex.precision, device) else torch.contiguous_format
    modules = dict(ex.model.named_modules())
    peak = args.peak or matmul_peak(device, dtype, args.matmul_size, args.warmup, args.repeat)
    rows = []
    with torch.inference_mode():
        for layer in common.vgg_layers(args.arch):
            x = torch.randn(bs, *layer["input"], device=device).to(dtype)
            if x.dim() == 4:
                x = x.contiguous(memory_format=fmt)
            module = modules[layer["name"]]
            s = time_call(lambda: module(x), device, args.warmup, args.repeat)
            tflops = layer["flops"] * bs / s / 1e12
            rows.append({**layer, "input": list(layer["input"]), "ms": s * 1e3, "tflops": tflops,
                         "peak_share": tflops / peak})
            log.info("%s", rows[-1])
        x = ex.prepare(torch.randn(bs, 3, 224, 224))
        full = time_call(lambda: ex.model(x), device, args.warmup, args.repeat)
    flops = common.flops_per_image(args.arch) * bs
    return {"device": args.device, "arch": args.arch, "precision": ex.precision, "batch_size": bs,
            "peak_tflops": peak, "peak_source": "given" if args.peak else f"matmul {args.matmul_size}",
            "layers": rows, "sum_ms": sum(r["ms"] for r in rows), "full_ms": full * 1e3,
            "full_tflops": flops / full / 1e12, "img_per_s": bs / full}


def render(res: dict) -> str:
    peak = res["peak_tflops"]
    rows = [(r["name"], r["kind"], r["shape"], f"{r['flops'] / 1e9:.2f}", f"{r['ms']:.3f}", f"{r['tflops']:.3g}",
             f"{100 * r['peak_share']:.0f} %") for r in res["layers"]]
    layer_flops = sum(r["flops"] for r in res["layers"]) * res["batch_size"]
    rows.append(("sum of layers", "", "", "", f"{res['sum_ms']:.3f}",
                 f"{layer_flops / (res['sum_ms'] / 1e3) / 1e12:.3g}", ""))
    rows.append(("full forward", "", f"{res['img_per_s']:.0f} img/s", "", f"{res['full_ms']:.3f}",
                 f"{res['full_tflops']:.3g}", f"{100 * res['full_tflops'] / peak:.0f} %"))
    head = (f"{res['arch']} {res['precision']} on {res['device']}, batch {res['batch_size']}; "
            f"peak {peak:.3g} TFLOP/s ({res['peak_source']}).\n\n")
    return head + common.table(["layer", "kind", "shape", "GFLOP/img", "ms/batch", "TFLOP/s", "of peak"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = common.arg_parser(__doc__)
    common.add_model_args(p, weights=False)
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16, fp16 (as runtime.precision)")
    p.add_argument("--batch-size", type=int, default=None, help="default 2 on cpu, 256 on cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads on cpu (default: torch's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per layer (default 1 cpu, 5 cuda)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per layer (default 2 cpu, 20 cuda)")
    p.add_argument("--peak", type=float, default=None, help="peak TFLOP/s to compare with (default: measured)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the peak matmul (default 2048 cpu, 8192 cuda)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.repeat = args.repeat or (20 if cuda else 2)
    args.matmul_size = args.matmul_size or (8192 if cuda else 2048)
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("layer_profile.py: --device cuda but no CUDA device is visible")
    m = common.machine()
    res = profile(args)
    common.report(args, m, res, lambda: render(res), f"Layer profile, {args.arch} on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
