"""Decode throughput alone: the JPEG set (bytes already in memory) to 224x224 uint8 crops.

The decoders the pipeline uses:

* ``--engines``: :class:`pipeline.decode.gpu.GpuBatchDecoder` with the given decode engines, each
  configuration measured on its own -- ``cuda`` (nvJPEG batches, resize/crop on the device),
  ``hw`` (the card's hardware JPEG decoder, needs the ``[gpu]`` extra), ``cpu`` (the decode
  processes, ``--processes``), ``all`` (every engine the node has, balanced by measured rate) or a
  ``+``-joined mix (``hw+cuda``); one batch at a time, synchronised, so the figure is the decoder
  alone, without the model.  Each row also says what share each engine took and its rate per busy
  second.  ``cpu`` also runs without CUDA (``--device cpu``: crops stay on the host);
* ``threads`` -- :func:`pipeline.decode.gpu.cpu_decode_uint8` (PIL with JPEG draft + the recipe's
  resize) on a thread pool of ``--threads``, the CPU reader's work per image.

Compared with ``model_only.py`` at the same batch size it says which stage bounds the pipeline::

    python benchmarks/decode.py --images 2048 --threads 2 --engines cpu --processes 2   # no CUDA
    python benchmarks/decode.py --device cuda --images 8192 --batch-size 256 --threads 16 \
        --engines cuda,hw,cpu,all --processes 16 --doc
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

LIMITS = dict(max_pixels=100_000_000, max_bytes=100_000_000)


def engine_rates(datas: list[bytes], device: str, spec: str, batch_size: int, repeat: int, threads: int,
                 processes: int) -> Optional[tuple[list[float], dict]]:
    """img/s of ``repeat`` passes through a decoder with engines ``spec``, and its engines' figures
    (None: this node lacks one of them)."""
    import torch

    from pipeline.decode.engines import PoolEngine
    from pipeline.decode.gpu import GpuBatchDecoder
    from pipeline.decode.pool import DecodePool
    from pipeline.decode.preprocess import RESIZE
    if device == "cuda":
        dec = GpuBatchDecoder("cuda", cpu_threads=threads, engines=None if spec == "all" else spec.split("+"),
                              cpu_processes=processes, cpu_slots=batch_size, **LIMITS)
    elif spec == "cpu":  # the decode processes without CUDA: crops stay on the host
        pool = DecodePool(processes, batch_size, resize=RESIZE, crop=224, min_side=RESIZE, **LIMITS)
        dec = GpuBatchDecoder("cpu", cpu_threads=threads, engines=[PoolEngine(torch.device("cpu"), pool)], **LIMITS)
    else:
        raise SystemExit(f"--engines {spec} needs --device cuda")
    batches = [list(enumerate(datas[i:i + batch_size])) for i in range(0, len(datas), batch_size)]
    try:
        if spec != "all" and sorted(dec.engine_names) != sorted(spec.split("+")):
            print(f"engines {spec}: only {'+'.join(dec.engine_names)} on this node; not measured", file=sys.stderr)
            return None
        dec.decode(batches[0])  # nvJPEG handles, kernels, allocator, the first rates: outside the timing
        before = dec.engine_stats()
        rates = []
        for _ in range(repeat):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for b in batches:
                assert len(dec.decode(b).positions) == len(b)
            rates.append(len(datas) / (time.perf_counter() - t0))
        after = dec.engine_stats()
        engines = {e: {"images": s["images"] - before[e]["images"], "busy_s": s["busy_s"] - before[e]["busy_s"],
                       "rate": s["img_per_s"]} for e, s in after.items()}
        return rates, engines
    finally:
        dec.close()


def cpu_rates(datas: list[bytes], repeat: int, threads: int) -> list[float]:
    from pipeline.decode.gpu import cpu_decode_uint8
    rates = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda d: cpu_decode_uint8(d, **LIMITS), datas[:threads]))  # warm-up
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in pool.map(lambda d: cpu_decode_uint8(d, **LIMITS), datas):
                pass
            rates.append(len(datas) / (time.perf_counter() - t0))
    return rates


def _shares(engines: Optional[dict]) -> str:
    if not engines:
        return "-"
    total = sum(e["images"] for e in engines.values()) or 1
    return ", ".join(f"{name} {100 * e['images'] / total:.0f}% {e['rate'] or float('nan'):.0f}"
                     for name, e in engines.items())


def main(argv=None) -> int:
    p = common.arg_parser(__doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the GPU engines too")
    p.add_argument("--engines", default="",
                   help="comma list of engine configurations: cuda, hw, cpu, all, or a mix such as hw+cuda")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--cpu-images", type=int, default=None, help="images for the PIL threads (default --images)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="PIL decode threads (also the GPU decoder's fallback)")
    p.add_argument("--processes", type=int, default=2, help="decode processes of the cpu engine")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--data", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = args.data or Path(tempfile.gettempdir()) / f"vgg-bench-jpegs-{args.images}"
    paths = common.make_jpeg_set(data, args.images) if args.data is None else sorted(data.glob("*.jpg"))
    datas = [q.read_bytes() for q in paths]
    mpix = sum(common.jpeg_pixels(d) for d in datas) / len(datas) / 1e6
    results = []
    specs = [s.strip() for s in args.engines.split(",") if s.strip()]
    if args.device == "cuda" and not specs:
        specs = ["cuda"]
    for spec in specs:
        got = engine_rates(datas, args.device, spec, args.batch_size, args.repeat, args.threads, args.processes)
        if got is None:
            continue
        runs, engines = got
        results.append({"decoder": f"engines {spec} (batch {args.batch_size})", "runs": runs, "engines": engines})
    cpu_datas = datas[:args.cpu_images or len(datas)]
    results.append({"decoder": f"PIL threads ({args.threads})", "runs": cpu_rates(cpu_datas, args.repeat,
                                                                                  args.threads)})

    def render() -> str:
        return common.table(["decoder", "img/s median (min-max)", "Mpixel/s", "engines: share, img/s per busy s"],
                            [(r["decoder"], common.spread(r["runs"]),
                              f"{common.summary(r['runs'])['median'] * mpix:.0f}", _shares(r.get("engines")))
                             for r in results])

    note = f"\n{len(datas)} JPEGs, mean {mpix:.2f} Mpixel, bytes in memory; decode + resize + crop to 224.\n"
    common.report(args, common.machine(), {"mean_mpix": mpix, "results": results}, render,
                  "Decode throughput (no model)", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
