"""``vgg-pipeline index`` and ``vgg-pipeline search``: the last step, similarity search over an output.

A query is an id present in the output (its stored vector is used) or an image path/URI, embedded
with the model, weights and preprocessing recorded in the output's metadata, so query and
collection vectors are comparable.

Example::

    >>> from pipeline.retrieval.search import search
    >>> hits = search("out/", ["cat.jpg"], k=5)   # doctest: +SKIP
    >>> hits[0]["results"][0]["id"]                # doctest: +SKIP
    'pets/cat.jpg'
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

import numpy as np

from ..config import load_config, parse_storage_options
from ..errors import ItemError, UsageError

COLUMNS = ("fc7", "descriptor")


def default_kind(rows: int) -> str:
    """Exact search while it is cheap; beyond, IVF-PQ with re-ranking: on 100k x 4096 it built
    faster, answered faster and was 3.7x smaller than HNSW at recall@10 >= 0.95 (docs/benchmarks.md)."""
    return "flat" if rows <= 100_000 else "ivf-pq"


class QueryEmbedder:
    """Embeds query images exactly as the output's images were (model, weights, preprocessing)."""

    def __init__(self, metadata: dict, column: str, weights: Optional[str],
                 storage_options: Optional[dict]) -> None:
        from ..input.storage import FileSystems
        from ..model.mapper import make_mapper
        model = metadata.get("model", {})
        recorded = metadata.get("weights", {})
        spec = weights or recorded.get("spec")
        if not model or not spec:
            raise UsageError("the output's metadata does not record its model; pass --weights")
        values: dict[str, Any] = {"model.arch": model["arch"], "model.weights": spec,
                                  "model.descriptor": model.get("descriptor", "fc7")}
        if column == "descriptor":
            if model.get("descriptor") != "dense-multiscale":
                raise UsageError("this output has no descriptor column (extracted with model.descriptor=fc7)")
            values.update({"model.scales": model["scales"], "model.scale_aggregation": model["scale_aggregation"]})
        else:
            values["model.descriptor"] = "fc7"  # the fc7 column is the same either way; skip the dense pass
        cfg = load_config(values=values)
        try:
            self.mapper = make_mapper(cfg, storage_options, None)
        except UsageError as exc:
            raise UsageError(f"the weights recorded in the output ({recorded.get('name', spec)}) are not "
                             f"available here: {exc}; pass --weights PATH") from None
        w = self.mapper.weights
        want = recorded.get("sha256")
        if (w.sha256 != want) if want else (w.name != recorded.get("name")):
            raise UsageError(f"--weights {w.name} differ from the weights the output was made with "
                             f"({recorded.get('name')}): scores would be meaningless")
        self.column, self.fsys, self.cfg = column, FileSystems(storage_options), cfg

    def __call__(self, uri: str) -> tuple[np.ndarray, np.ndarray]:
        """``(vector, logits)`` for the image at ``uri``; an unreadable image is a UsageError."""
        from ..decode.cpu import decode_with_size
        from ..decode.preprocess import RESIZE, preprocess_pil
        from ..decode.preprocess import Decoded
        inp = self.cfg["input"]
        try:
            data = self.fsys.read_bytes(uri, inp["max_bytes"])
            img, (w, h) = decode_with_size(data, max_pixels=inp["max_pixels"], max_bytes=inp["max_bytes"],
                                           min_side=max(RESIZE, *self.cfg["model"]["scales"]))
        except ItemError as exc:
            raise UsageError(f"query image {uri} cannot be used: {exc.error_type}: {exc.message}") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"query image {uri} cannot be read: {exc}") from None
        out = self.mapper.embed([Decoded(0, preprocess_pil(img), w, h, img)])
        return out[self.column][0], out["logits"][0]


def _is_image_path(query: str, storage_options: Optional[dict]) -> bool:
    from ..input.storage import url_to_fs
    try:
        fs, path = url_to_fs(query, storage_options)
        return fs.isfile(path)
    except (OSError, ValueError):
        return False


def search(output: str, queries: list[str], *, k: int = 10, column: str = "fc7", kind: Optional[str] = None,
           weights: Optional[str] = None, storage_options: Optional[dict] = None) -> list[dict]:
    """Top ``k`` neighbours for each query (an id in ``output`` or an image path/URI)."""
    from ..output.embeddings import vectors_for_ids
    from .index import load_index
    if column not in COLUMNS:
        raise UsageError(f"--column must be one of {', '.join(COLUMNS)}")
    index = load_index(output, column, kind, storage_options)
    known = set(index.ids)
    id_queries = list(dict.fromkeys(q for q in queries if q in known))
    by_id = dict(zip(id_queries, vectors_for_ids(output, id_queries, column, storage_options=storage_options)
                     if id_queries else []))
    embedder: Optional[QueryEmbedder] = None
    vectors, classes = [], []
    for q in queries:
        if q in by_id:
            vectors.append(by_id[q])
            classes.append(None)
            continue
        if not _is_image_path(q, storage_options):
            raise UsageError(f"query {q!r} is neither an id in {output} nor a readable image path")
        if embedder is None:
            embedder = QueryEmbedder(_output_metadata(output, storage_options), column, weights, storage_options)
        vec, logits = embedder(q)
        vectors.append(vec)
        classes.append(int(np.argmax(logits)))
    hits = index.search(np.stack(vectors).astype(np.float32), k) if vectors else []
    return [{"query": q, "query_class": c,
             "results": [{"rank": r, "id": i, "uri": u, "score": round(float(s), 6)} for r, i, u, s in h]}
            for q, c, h in zip(queries, classes, hits)]


def _output_metadata(output: str, storage_options: Optional[dict]) -> dict:
    import pyarrow.parquet as pq
    from ..output.embeddings import embedding_files
    from ..input.storage import url_to_fs
    from ..output.writer import METADATA_KEY
    fs, _ = url_to_fs(output, storage_options)
    for f in embedding_files(output, storage_options):
        with fs.open(fs._strip_protocol(f), "rb") as fh:
            md = pq.read_schema(fh).metadata or {}
        if METADATA_KEY in md:
            return json.loads(md[METADATA_KEY])
    return {}


# ----------------------------------------------------------------------------- CLI

def _cmd_index(args: argparse.Namespace) -> int:
    from ..output.embeddings import count_rows
    from .index import build_index
    so = parse_storage_options(args.storage_option)
    kind = args.kind if args.kind != "auto" else default_kind(count_rows(args.output, so))
    p = build_index(args.output, kind, args.column, storage_options=so, progress=not args.quiet)
    where = f"{args.output.rstrip('/')}/index/"
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


def _cmd_search(args: argparse.Namespace) -> int:
    so = parse_storage_options(args.storage_option)
    if args.build_index:
        from .index import load_index
        try:
            load_index(args.output, args.column, None, so)
        except UsageError:
            from .index import build_index
            build_index(args.output, "flat", args.column, storage_options=so, progress=False)
    results = search(args.output, args.query, k=args.k, column=args.column, kind=args.kind,
                     weights=args.weights, storage_options=so)
    if args.json:
        print(json.dumps([{"query": r["query"], "results": r["results"]} for r in results]))
        return 0
    categories = _categories()
    for r in results:
        head = f"query {r['query']}"
        if r["query_class"] is not None and categories:
            head += f"  (top class: {categories[r['query_class']]})"
        print(head)
        for hit in r["results"]:
            print(f"  {hit['rank']:>3}  {hit['score']:.4f}  {hit['id']}  {hit['uri']}")
    return 0


def _categories() -> Optional[list[str]]:
    try:
        from torchvision.models import VGG16_Weights
        return list(VGG16_Weights.IMAGENET1K_V1.meta["categories"])
    except Exception:  # noqa: BLE001 - names are a nicety
        return None


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build a FAISS index of OUTPUT's embeddings under OUTPUT/index/")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("--kind", choices=("auto", "flat", "ivf-pq", "hnsw"), default="auto",
                   help="auto: flat up to 100k rows, ivf-pq beyond")
    p.add_argument("--column", choices=COLUMNS, default="fc7")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(handler=_cmd_index)

    p = sub.add_parser("search", help="nearest neighbours of images or ids in OUTPUT")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("query", metavar="QUERY", nargs="+", help="an image path/URI, or an id in OUTPUT")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per query")
    p.add_argument("--column", choices=COLUMNS, default="fc7")
    p.add_argument("--kind", choices=("flat", "ivf-pq", "hnsw"), help="which index (default: the best built)")
    p.add_argument("--weights", help="weights to embed query images with (default: those recorded in OUTPUT)")
    p.add_argument("--build-index", action="store_true", help="build a flat index first if OUTPUT has none")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(handler=_cmd_search)
