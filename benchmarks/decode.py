"""Decode throughput alone: the JPEG set (bytes already in memory) to 224x224 uint8 crops.

Two decoders, the ones the pipeline uses:

* ``gpu`` — :class:`pipeline.decode.gpu.GpuBatchDecoder` (nvJPEG batches, resize/crop on the device), one
  batch at a time, synchronised, so the figure is the decoder alone, without the model;
* ``cpu`` — :func:`pipeline.decode.gpu.cpu_decode_uint8` (PIL with JPEG draft + the recipe's resize) on a
  thread pool of ``--threads``, the CPU reader's work per image.

Compared with ``model_only.py`` at the same batch size it says which stage bounds the pipeline::

    python benchmarks/decode.py --images 2048 --threads 2                  # cpu only, no CUDA
    python benchmarks/decode.py --device cuda --images 8192 --batch-size 256 --threads 16 --doc
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

LIMITS = dict(max_pixels=100_000_000, max_bytes=100_000_000)


def gpu_rates(datas: list[bytes], batch_size: int, repeat: int, threads: int) -> list[float]:
    import torch

    from pipeline.decode.gpu import GpuBatchDecoder
    dec = GpuBatchDecoder("cuda", cpu_threads=threads, **LIMITS)
    batches = [list(enumerate(datas[i:i + batch_size])) for i in range(0, len(datas), batch_size)]
    try:
        dec.decode(batches[0])  # nvJPEG handles, kernels, allocator: outside the timing
        rates = []
        for _ in range(repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for b in batches:
                assert len(dec.decode(b).positions) == len(b)
            rates.append(len(datas) / (time.perf_counter() - t0))
        return rates
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: measure both decoders")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--cpu-images", type=int, default=None, help="images for the cpu decoder (default --images)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="CPU decode threads (also the GPU decoder's fallback)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--doc", action="store_true", help="append to docs/benchmarks.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = args.data or Path(tempfile.gettempdir()) / f"vgg-bench-jpegs-{args.images}"
    paths = common.make_jpeg_set(data, args.images) if args.data is None else sorted(data.glob("*.jpg"))
    datas = [q.read_bytes() for q in paths]
    mpix = sum(common.jpeg_pixels(d) for d in datas) / len(datas) / 1e6
    results = []
    if args.device == "cuda":
        results.append({"decoder": f"gpu (nvJPEG, batch {args.batch_size})",
                        "runs": gpu_rates(datas, args.batch_size, args.repeat, args.threads)})
    cpu_datas = datas[:args.cpu_images or len(datas)]
    results.append({"decoder": f"cpu (PIL, {args.threads} threads)", "runs": cpu_rates(cpu_datas, args.repeat,
                                                                                      args.threads)})
    def render() -> str:
        return common.table(["decoder", "img/s median (min-max)", "Mpixel/s"],
                            [(r["decoder"], common.spread(r["runs"]),
                              f"{common.summary(r['runs'])['median'] * mpix:.0f}") for r in results])

    note = f"\n{len(datas)} JPEGs, mean {mpix:.2f} Mpixel, bytes in memory; decode + resize + crop to 224.\n"
    common.report(args, common.machine(), {"mean_mpix": mpix, "results": results}, render,
                  "Decode throughput (no model)", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
