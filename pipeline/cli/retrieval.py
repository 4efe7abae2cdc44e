"""``vgg-pipeline index`` and ``vgg-pipeline search``: similarity search over an output.

The work is :mod:`pipeline.retrieval`'s; this module parses the arguments and prints the results.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

from ..config import parse_storage_options
from ..input import layout
from ..retrieval.index import KINDS
from ..retrieval.search import COLUMNS
from .common import storage_option_argument


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help=f"build a FAISS index of OUTPUT's embeddings under OUTPUT/{layout.INDEX_DIR}/")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("--kind", choices=("auto", *KINDS), default="auto",
                   help="auto: flat up to 100k rows, ivf-pq beyond")
    p.add_argument("--column", choices=COLUMNS, default="fc7")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    storage_option_argument(p)
    p.set_defaults(handler=cmd_index)

    p = sub.add_parser("search", help="nearest neighbours of images or ids in OUTPUT")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("query", metavar="QUERY", nargs="+", help="an image path/URI, or an id in OUTPUT")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per query")
    p.add_argument("--column", choices=COLUMNS, default="fc7")
    p.add_argument("--kind", choices=KINDS, help="which index (default: the best built)")
    p.add_argument("--weights", help="weights to embed query images with (default: those recorded in OUTPUT)")
    p.add_argument("--build-index", action="store_true", help="build a flat index first if OUTPUT has none")
    storage_option_argument(p)
    p.set_defaults(handler=cmd_search)


def cmd_index(args: argparse.Namespace) -> int:
    from ..output.embeddings import count_rows
    from ..retrieval.index import build_index
    from ..retrieval.search import default_kind
    so = parse_storage_options(args.storage_option)
    kind = args.kind if args.kind != "auto" else default_kind(count_rows(args.output, so))
    p = build_index(args.output, kind, args.column, storage_options=so, progress=not args.quiet)
    where = f"{args.output.rstrip('/')}/{layout.INDEX_DIR}/"
    size = f"{p['rows']} x {p['dim']} ({args.column})"
    if p["action"] == "unchanged":
        print(f"{kind} index of {size} under {where} is up to date: no new part files")
    elif p["action"] == "added":
        print(f"added {p['rows_added']} rows to the {kind} index, now {size}, in {p['build_seconds']}s "
              f"under {where}")
    else:  # built, or rebuilt (then with the reason an add would not do)
        why = f" ({p['reason']})" if p["action"] == "rebuilt" else ""
        print(f"{p['action']} {kind} index of {size} in {p['build_seconds']}s under {where}{why}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..retrieval.search import ensure_index, search
    so = parse_storage_options(args.storage_option)
    if args.build_index:
        ensure_index(args.output, args.column, so)
    results = search(args.output, args.query, k=args.k, column=args.column, kind=args.kind,
                     weights=args.weights, storage_options=so)
    if args.json:
        print(json.dumps([{"query": r["query"], "results": r["results"]} for r in results]))
        return 0
    categories = _categories() if any(r["query_class"] is not None for r in results) else None
    for r in results:
        head = f"query {r['query']}"
        if r["query_class"] is not None and categories:
            head += f"  (top class: {categories[r['query_class']]})"
        print(head)
        for hit in r["results"]:
            print(f"  {hit['rank']:>3}  {hit['score']:.4f}  {hit['id']}  {hit['uri']}")
    return 0


def _categories() -> Optional[list[str]]:
    """ImageNet class names for the query's top class; torchvision is only imported when an image
    query was embedded (the model is loaded then anyway)."""
    try:
        from torchvision.models import VGG16_Weights
        return list(VGG16_Weights.IMAGENET1K_V1.meta["categories"])
    except Exception:  # noqa: BLE001 - names are a nicety
        return None
