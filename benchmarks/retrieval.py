"""Retrieval quality of fc7 vs the dense multi-scale descriptor, and what the descriptor costs.

``DATASET_DIR`` holds one folder per class (images anywhere below it; hidden entries skipped).
Every image is a query against all the others, ranked by cosine similarity; an image is
relevant when it has the query's class.  Reported: mean average precision (mAP) of the standard
fc7 column and of the ``descriptor`` column, and throughput of each mapper as the pipeline runs
it -- :class:`pipeline.model.extractor.Extractor` and :class:`pipeline.model.descriptor.DenseExtractor`,
timed in-process on the same decoded batches (decoding is not timed; the descriptor's
per-scale resizing is, since it happens inside its ``embed``).  The dense mapper also writes
fc7 and logits, so its time is the whole cost of ``model.descriptor: dense-multiscale``.

    python benchmarks/retrieval.py DATASET_DIR --weights imagenet --arch vgg16 \\
        --scales 256,384,512 [--aggregation mean|stack] [--json]

``--weights`` takes what ``--weights`` of ``vgg-pipeline extract`` takes (``imagenet``, a
path, ``random:N``); with random weights the mAP figures are meaningless, only the cost is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.decode.cpu import IMAGE_EXTENSIONS, decode_image  # noqa: E402
from pipeline.model.descriptor import MIN_SCALE, DenseExtractor  # noqa: E402
from pipeline.errors import ItemError, UsageError  # noqa: E402
from pipeline.model.extractor import Extractor  # noqa: E402
from pipeline.decode.preprocess import RESIZE, preprocess_pil  # noqa: E402
from pipeline.decode.preprocess import Decoded  # noqa: E402

from common import cpu_model  # noqa: E402  (benchmarks/common.py)

log = logging.getLogger("retrieval")
MAX_PIXELS = MAX_BYTES = 100_000_000


def average_precision(relevant: Sequence[bool]) -> float:
    """AP of one ranked list: the mean, over relevant positions k (1-based), of precision@k.

    ``nan`` when nothing in the list is relevant (the query has no other image of its class).
    """
    hits, total = 0, 0.0
    for k, rel in enumerate(relevant, start=1):
        if rel:
            hits += 1
            total += hits / k
    return total / hits if hits else float("nan")


def mean_average_precision(vectors: np.ndarray, labels: Sequence) -> tuple[float, int]:
    """(mAP, number of queries): each row queries all other rows by cosine similarity.

    Ties keep dataset order (stable sort).  Queries without another image of their class are
    left out of the mean.
    """
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = x @ x.T
    labels = np.asarray(labels)
    aps = []
    for q in range(len(x)):
        order = np.argsort(-sims[q], kind="stable")
        order = order[order != q]
        ap = average_precision(labels[order] == labels[q])
        if not np.isnan(ap):
            aps.append(ap)
    return (float(np.mean(aps)) if aps else float("nan")), len(aps)


def list_dataset(root: Path) -> tuple[list[Path], list[str]]:
    """Image paths and their class (the top-level folder name), sorted."""
    if not root.is_dir():
        raise UsageError(f"not a folder: {root}")
    paths, labels = [], []
    for cls in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(cls.rglob("*")):
            rel = path.relative_to(cls).parts
            if (path.is_file() and not any(part.startswith(".") for part in rel)
                    and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS):
                paths.append(path)
                labels.append(cls.name)
    if not paths:
        raise UsageError(f"no images in class folders under {root}")
    return paths, labels


def decode_all(paths: list[Path], labels: list[str], min_side: int
               ) -> tuple[list[Decoded], list[str]]:
    """Decode and preprocess like the pipeline's reader, keeping the image for the descriptor.

    Files that do not decode are skipped with a warning; returns the items and their labels.
    """
    items, kept = [], []
    for path, label in zip(paths, labels):
        try:
            img = decode_image(path.read_bytes(), max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES,
                               min_side=min_side)
        except ItemError as e:
            log.warning("skipping %s: %s", path, e)
            continue
        items.append(Decoded(len(items), preprocess_pil(img), img.width, img.height, img))
        kept.append(label)
    if not items:
        raise UsageError("no image of the dataset could be decoded")
    return items, kept


def parse_scales(text: str) -> list[int]:
    try:
        scales = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        scales = []
    if not scales or min(scales) < MIN_SCALE:
        raise UsageError(f"--scales must be comma-separated integers >= {MIN_SCALE}, got {text!r}")
    return scales


def timed_embed(mapper: Extractor, items: list[Decoded], column: str, batch_size: int
                ) -> tuple[np.ndarray, float]:
    """``column`` for every item in batches, and images per second (after a 1-image warm-up)."""
    mapper.embed(items[:1])  # first call pays one-off allocator / kernel selection costs
    if mapper.device.type == "cuda":
        torch.cuda.synchronize()
    out, t0 = [], time.perf_counter()
    for start in range(0, len(items), batch_size):
        out.append(mapper.embed(items[start:start + batch_size])[column])
    seconds = time.perf_counter() - t0  # embed returns numpy: the device work is done
    return np.concatenate(out), len(items) / seconds


def run(args: argparse.Namespace) -> dict:
    scales = parse_scales(args.scales)
    paths, labels = list_dataset(Path(args.dataset))
    items, labels = decode_all(paths, labels, min_side=max([RESIZE, *scales]))
    log.info("%d images in %d classes", len(items), len(set(labels)))
    common = dict(device=args.device, num_threads=args.threads)
    fc7_mapper = Extractor(args.arch, args.weights, **common)
    fc7, fc7_rate = timed_embed(fc7_mapper, items, "fc7", args.batch_size)
    device, weights = str(fc7_mapper.device), fc7_mapper.weights
    del fc7_mapper
    dense_mapper = DenseExtractor(args.arch, args.weights, scales=scales,
                                  aggregation=args.aggregation, **common)
    desc, dense_rate = timed_embed(dense_mapper, items, "descriptor", args.batch_size)
    fc7_map, queries = mean_average_precision(fc7, labels)
    desc_map, _ = mean_average_precision(desc, labels)
    if args.save_vectors:
        np.savez(args.save_vectors, fc7=fc7, descriptor=desc, labels=np.asarray(labels))
    return {
        "dataset": str(args.dataset), "images": len(items), "classes": len(set(labels)),
        "queries": queries, "arch": args.arch, "weights": weights.name,
        "random_weights": weights.is_random, "scales": scales, "aggregation": args.aggregation,
        "descriptor_dim": int(desc.shape[1]), "batch_size": args.batch_size, "device": device,
        "threads": torch.get_num_threads(), "machine": (torch.cuda.get_device_name() if device.startswith("cuda")
                    else f"{cpu_model()} ({os.cpu_count()} cores)"),
        "map": {"fc7": fc7_map, "descriptor": desc_map},
        "img_per_s": {"fc7": fc7_rate, "descriptor": dense_rate},
        "relative_cost": fc7_rate / dense_rate,
    }


def report(r: dict) -> str:
    lines = [
        f"dataset {r['dataset']}: {r['images']} images, {r['classes']} classes, "
        f"{r['queries']} queries",
        f"model {r['arch']}, weights {r['weights']}, device {r['device']} "
        f"({r['threads']} threads), batch {r['batch_size']}, machine {r['machine']}",
        f"descriptor: scales {','.join(map(str, r['scales']))}, {r['aggregation']} "
        f"({r['descriptor_dim']}-d)",
    ]
    if r["random_weights"]:
        lines.append("RANDOM weights: the mAP figures are meaningless; only the cost is")
    lines += [f"{'column':<12}{'mAP':>8}{'img/s':>10}{'cost':>8}",
              f"{'fc7':<12}{r['map']['fc7']:>8.4f}{r['img_per_s']['fc7']:>10.3g}{1:>7.2f}x",
              f"{'descriptor':<12}{r['map']['descriptor']:>8.4f}"
              f"{r['img_per_s']['descriptor']:>10.3g}{r['relative_cost']:>7.2f}x"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", metavar="DATASET_DIR", help="one folder per class")
    p.add_argument("--weights", default="imagenet", help="imagenet | PATH | random:N")
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--scales", default="256,384,512", help="comma-separated Q values (>= 224)")
    p.add_argument("--aggregation", default="mean", choices=["mean", "stack"])
    p.add_argument("--batch-size", type=int, default=8, help="images per embed call (CPU default 8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--save-vectors", metavar="NPZ", help="also save fc7, descriptor and labels")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
