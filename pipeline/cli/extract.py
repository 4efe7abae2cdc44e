"""``vgg-pipeline extract`` and ``vgg-pipeline verify``: make an output, and check it."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..config import load_config, parse_storage_options
from .common import storage_option_argument


def extract_arguments(p: argparse.ArgumentParser) -> None:
    """``extract``'s arguments; ``submit`` parses the job it ships with the same ones."""
    p.add_argument("input", metavar="INPUT")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("--weights", help="imagenet (default; downloaded once to TORCH_HOME), a path or URL "
                   "to a state dict (.pth/.safetensors), or random[:SEED] for tests")
    p.add_argument("--conf", help="YAML config (e.g. conf/gpu.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set runtime.batch_size=32; repeatable")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a private local one)")
    p.add_argument("--overwrite", action="store_true", help="replace an OUTPUT made by a different job")
    p.add_argument("--update", action="store_true",
                   help="re-list INPUT and add the images OUTPUT does not hold yet as new shards "
                        "(finished shards are kept; removed images keep their rows)")
    p.add_argument("--dry-run", action="store_true", help="list and plan only: write _plan/, print counts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    storage_option_argument(p)


EXTRACT_DESCRIPTION = ("Embed every image of INPUT (folder, bucket, glob, manifest .txt/.csv/.parquet, or "
                       ".tar shards; any fsspec URL) into OUTPUT/embeddings/*.parquet (fc7 + logits); "
                       "unreadable images become rows of OUTPUT/errors/.")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="embed every image of INPUT into Parquet files under OUTPUT",
                       description=EXTRACT_DESCRIPTION)
    extract_arguments(p)
    p.set_defaults(handler=cmd_extract)

    p = sub.add_parser("verify", help="check that every planned image is in OUTPUT exactly once")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    storage_option_argument(p)
    p.set_defaults(handler=cmd_verify)


def cmd_extract(args: argparse.Namespace) -> int:
    from ..run.driver import run_extract
    cfg = load_config(args.conf, args.set, {"model.weights": args.weights} if args.weights else None)
    storage = parse_storage_options(args.storage_option)
    show_bar = not args.no_progress and sys.stderr.isatty()
    if not show_bar and not args.no_progress:  # e.g. inside a Ray job: periodic progress lines instead
        logging.getLogger("pipeline.run.driver").setLevel(logging.INFO)
    summary = run_extract(args.input, args.output, cfg, storage_options=storage, address=args.address,
                          overwrite=args.overwrite, dry_run=args.dry_run,
                          progress=show_bar, update=args.update)
    if args.dry_run:
        print(json.dumps(summary))
        return 0
    c, r = summary["counts"], summary["run"]
    if args.update:
        last = summary["runs"][-1]
        print(f"update: {last['new_images']} new images in {last['new_shards']} new shards"
              if last["new_images"] else "update: nothing new in the input")
    print(f"done: {c['images']} images in {c['shards']} shards -> {c['embedded']} embedded, "
          f"{c['errors']} errors; this run {r['images_this_run']} images in {r['wall_s']}s "
          f"({r['img_per_s']} img/s), {r['shards_resumed']} shards resumed, {r['retries']} retries")
    if summary["weights"]["random"]:
        print(f"WARNING: weights are random ({summary['weights']['name']}): the features are meaningless")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..output.verify import verify
    report = verify(args.output, parse_storage_options(args.storage_option))
    if args.json:
        print(json.dumps({"ok": report.ok, "images": report.images, "embedded": report.embedded,
                          "errors": report.errors, "shards": report.shards, "problems": report.problems}))
    else:
        print(report.text())
    return 0 if report.ok else 1
