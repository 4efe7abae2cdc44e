"""``vgg-pipeline``: the command line (docs/design.md §7).  Only the CLI parses arguments and prints;
the library modules it calls log.

One module per command group, each adding its subcommands with ``add_commands(sub)`` (every
subcommand sets ``handler``):

* :mod:`pipeline.cli.extract`: ``extract``, ``verify``;
* :mod:`pipeline.cli.retrieval`: ``index``, ``search``;
* :mod:`pipeline.cli.cluster`: ``submit``, ``status``, ``logs``.

They are imported here by name: a module that cannot be imported fails the CLI loudly instead
of silently taking its commands away.  Heavy libraries (torch, Ray) are imported by the handlers
only, so ``vgg-pipeline --help`` stays fast.

Exit codes: 0 done (per-image errors are reported, not fatal); 1 the job failed, or ``verify``
found the output broken; 2 a usage or config error, reported on one line without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .. import __version__
from ..errors import JobFailed, UsageError
from . import cluster, extract, retrieval
from .common import Parser

COMMAND_GROUPS = (extract, retrieval, cluster)

EPILOG = """examples:
  vgg-pipeline extract ./photos ./out --weights imagenet
  vgg-pipeline extract s3://bucket/images/ s3://bucket/features/ --conf conf/gpu.yaml
  vgg-pipeline extract manifest.csv ./out --set model.arch=vgg19 --set runtime.batch_size=128
  vgg-pipeline extract s3://bucket/images/ s3://bucket/features/ --update   # add only new images
  vgg-pipeline verify ./out
  vgg-pipeline index ./out --kind hnsw && vgg-pipeline search ./out query.jpg --k 5

rerun the same extract command to resume an interrupted job: finished shards are skipped."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vgg-pipeline", description="VGG16 fc7 embeddings + ImageNet logits for large "
                    "image collections, on Ray, into Parquet.", epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vgg-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


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
        return args.handler(args)
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
    except Exception as exc:  # noqa: BLE001 - a storage fault outside the retried calls: one line, exit 1
        from ..input.storage import describe_fault, is_transient, missing_credentials, redact_message
        if missing_credentials(exc):  # like a refusal: fixable by the user
            print(f"vgg-pipeline: error: no credentials for the storage ({type(exc).__name__}: "
                  f"{redact_message(str(exc).splitlines()[0] if str(exc) else '')}); set them in the "
                  "environment, a profile or --storage-option", file=sys.stderr)
            return 2
        if not is_transient(exc):
            raise
        print(f"vgg-pipeline: job failed: storage unavailable ({describe_fault(exc)}); finished work is "
              "kept, rerun the same command to resume", file=sys.stderr)
        return 1
