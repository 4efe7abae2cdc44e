"""Similarity search over an output, the last step (its commands: :mod:`pipeline.cli.retrieval`).

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

import json
import logging
from typing import Any, Optional

import numpy as np

from ..config import KEYS, load_config
from ..errors import ItemError, UsageError

log = logging.getLogger(__name__)

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
        from ..model.build import make_mapper
        model = metadata.get("model", {})
        recorded = metadata.get("weights", {})
        spec = weights or recorded.get("spec")
        if not model or not spec:
            raise UsageError("the output's metadata does not record its model; pass --weights")
        values: dict[str, Any] = {"model.arch": model["arch"], "model.weights": spec}
        if column == "descriptor":
            # Part files record ModelConfig.identity() as "model": read it back through the same keys.
            identity = {f"model.{k}": v for k, v in model.items() if f"model.{k}" in KEYS}
            cfg = load_config(values={**identity, **values})
            if not cfg.model.dense:
                raise UsageError("this output has no descriptor column (extracted with model.descriptor=fc7)")
        else:  # the fc7 column is the same either way: the default model.descriptor=fc7 skips the dense pass
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
        inp = self.cfg.input
        try:
            data = self.fsys.read_bytes(uri, inp.max_bytes)
            img, (w, h) = decode_with_size(data, max_pixels=inp.max_pixels, max_bytes=inp.max_bytes,
                                           min_side=max(RESIZE, self.mapper.min_side))  # as the workers
        except ItemError as exc:
            raise UsageError(f"query image {uri} cannot be used: {exc.error_type}: {exc.message}") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"query image {uri} cannot be read: {exc}") from None
        out = self.mapper.embed([Decoded(0, preprocess_pil(img), w, h, img)])
        return out[self.column][0], out["logits"][0]


def _is_image_path(query: str, storage_options: Optional[dict]) -> bool:
    from ..input.storage import url_to_fs, with_retries
    try:
        fs, path = url_to_fs(query, storage_options)
        return with_retries(lambda: fs.isfile(path), query)
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
    from ..input.storage import open_read, url_to_fs
    from ..output.writer import METADATA_KEY
    fs, _ = url_to_fs(output, storage_options)
    for f in embedding_files(output, storage_options):
        with open_read(fs, fs._strip_protocol(f)) as fh:
            md = pq.read_schema(fh).metadata or {}
        if METADATA_KEY in md:
            return json.loads(md[METADATA_KEY])
    return {}


def ensure_index(output: str, column: str = "fc7", storage_options: Optional[dict] = None) -> None:
    """Build a flat (exact) index of ``column`` unless ``output`` already has an index of it."""
    from .index import build_index, load_index
    try:
        load_index(output, column, None, storage_options)
    except UsageError:
        log.info("%s has no %s index; building a flat one", output, column)
        build_index(output, "flat", column, storage_options=storage_options, progress=False)
