"""``vgg-pipeline``: the command line (DESIGN §7).

Exit codes: 0 done (per-image errors are reported, not fatal); 1 the job failed, or ``verify``
found the output broken; 2 a usage or config error, reported on one line without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Optional

from . import __version__
from .config import load_config, parse_storage_options
from .errors import JobFailed, UsageError

log = logging.getLogger("vgg-pipeline")

EPILOG = """examples:
  vgg-pipeline extract ./photos ./out --weights imagenet
  vgg-pipeline extract s3://bucket/images/ s3://bucket/features/ --conf conf/gpu.yaml
  vgg-pipeline extract manifest.csv ./out --set model.arch=vgg19 --set runtime.batch_size=128
  vgg-pipeline extract s3://bucket/images/ s3://bucket/features/ --update   # add only new images
  vgg-pipeline verify ./out
  vgg-pipeline index ./out --kind hnsw && vgg-pipeline search ./out query.jpg --k 5

rerun the same extract command to resume an interrupted job: finished shards are skipped."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + message)
        raise UsageError(message)


def _common_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option (e.g. endpoint_url=..., anon=true); repeatable. "
                        "Credentials are better left to the environment or a profile.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vgg-pipeline", description="VGG16 fc7 embeddings + ImageNet logits for large "
                     "image collections, on Ray, into Parquet.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vgg-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("extract", help="embed every image of INPUT into Parquet files under OUTPUT",
                       description="Embed every image of INPUT (folder, bucket, glob, manifest .txt/.csv/"
                       ".parquet, or .tar shards; any fsspec URL) into OUTPUT/embeddings/*.parquet "
                       "(fc7 + logits); unreadable images become rows of OUTPUT/errors/.")
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
    _common_storage(p)

    p = sub.add_parser("verify", help="check that every planned image is in OUTPUT exactly once")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common_storage(p)

    for name, fn in _extra_commands().items():
        fn(sub)
    return parser


def _extra_commands() -> dict[str, Callable[[argparse._SubParsersAction], None]]:
    """Subcommands living in their own modules (search, cluster submission), added if present."""
    found = {}
    for module, attr in (("pipeline.retrieval.search", "add_commands"), ("pipeline.submit", "add_commands")):
        try:
            mod = __import__(module, fromlist=[attr])
        except ImportError:
            continue
        found[module] = getattr(mod, attr)
    return found


def cmd_extract(args: argparse.Namespace) -> int:
    from .run.driver import run_extract
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
    from .output.verify import verify
    report = verify(args.output, parse_storage_options(args.storage_option))
    if args.json:
        print(json.dumps({"ok": report.ok, "images": report.images, "embedded": report.embedded,
                          "errors": report.errors, "shards": report.shards, "problems": report.problems}))
    else:
        print(report.text())
    return 0 if report.ok else 1


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"extract": cmd_extract, "verify": cmd_verify}


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.verbose:
            logging.getLogger().setLevel(logging.DEBUG)
        if not args.command:
            parser.print_help()
            return 2
        handler = COMMANDS.get(args.command) or args.handler
        return handler(args)
    except UsageError as exc:
        print(f"vgg-pipeline: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # storage refused our credentials: fixable by the user
        print(f"vgg-pipeline: error: access denied: {str(exc).splitlines()[0] if str(exc) else exc!r}",
              file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"vgg-pipeline: job failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vgg-pipeline: interrupted; finished shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
