"""FAISS indexes over an output's embeddings, stored next to the data (``OUTPUT/index/``).

Vectors are L2-normalised before they go in and queries are normalised by
:meth:`LoadedIndex.search`, so inner product = cosine similarity throughout.  Kinds:

``flat``    exact (``IndexFlatIP``), 4·d bytes a vector; no training; each query scans everything.
``ivf-pq``  ``IndexIVFPQ`` (nlist ≈ 4·√n lists, 64 sub-quantizers × 8 bits at 4096-d) whose
            16·k best candidates are re-ranked with an 8-bit scalar-quantized copy of the
            vectors (``IndexRefine``): ≈ d + 64 bytes a vector, a quarter of flat.
``hnsw``    ``IndexHNSWFlat`` graph (M=32, efConstruction=80): 4·d + ~2·M·4 bytes a vector,
            slowest to build.

Defaults are tuned with ``benchmarks/search.py`` (recall@10 ≥ 0.95 at 100k × 4096; see
docs/benchmarks.md) and can be overridden with ``params``.  Files, per column and kind::

    OUTPUT/index/<column>-<kind>.faiss        the index (faiss.write_index)
    OUTPUT/index/<column>-<kind>.ids.parquet  id, uri of faiss row i
    OUTPUT/index/<column>-<kind>.json         build parameters; written last = commit marker

Growing outputs (``extract --update``): the JSON records which part files the index covers
(``covers``: name, rows and the part's ``created_at``).  :func:`build_index` on an output that
has gained part files since then adds only their rows to the existing index (every kind supports
``add``), unless a covered file changed or vanished, the index files disagree with the JSON, or
an ``ivf-pq`` index would hold more than ``IVF_PQ_GROWTH`` times the vectors it was trained on
(its lists and codebooks were sized for the old collection): then it rebuilds.  The returned
dict's ``action`` says which: ``built``, ``rebuilt`` (with ``reason``), ``added`` (with
``rows_added``) or ``unchanged``.

:func:`make_index` builds from an in-memory matrix and :func:`build_index` streams an output
through the same steps (:func:`_build`), so the benchmark measures what the CLI builds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator, Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.output.embeddings import iter_embeddings, l2_normalize, part_footers
from pipeline.errors import UsageError
from pipeline.input import layout
from pipeline.input.storage import exists, is_local, open_read, read_file, url_to_fs, with_retries, write_atomic

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf-pq", "hnsw")
PREFERENCE = ("hnsw", "ivf-pq", "flat")  # load_index(kind=None) takes the first that exists
ADD_CHUNK = 16384  # rows per index.add call: bounds the float32 batch to 256 MiB at d=4096
IVF_PQ_GROWTH = 2.0  # an ivf-pq index grows by adds up to this multiple of its training-time rows
IDS_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string())])

# Below this many vectors IVF-PQ cannot train meaningful codebooks; flat is exact and fast there.
MIN_IVF_PQ_ROWS = 1000
REFINES = {"sq8": "SQ8", "fp16": "SQfp16", "flat": "Flat", "none": ""}

# Tunables and their defaults (None = derived from n and d in _resolve_params).
PARAM_DEFAULTS: dict[str, dict[str, object]] = {
    "flat": {},
    "ivf-pq": {"nlist": None, "m": None, "nbits": None, "nprobe": 32, "train_size": None,
               "refine": "sq8", "k_factor": 16, "seed": 0},
    "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 128},
}


@dataclass
class LoadedIndex:
    """An index read back from ``OUTPUT/index/``; row ``i`` of ``index`` is ``ids[i]``/``uris[i]``."""

    ids: list[str]
    uris: list[str]
    kind: str
    params: dict
    index: faiss.Index

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, str, str, float]]]:
        """Top ``k`` rows by cosine similarity for each query row (queries are normalised here).

        Returns one list per query of ``(rank, id, uri, score)``, rank starting at 1.
        """
        q = np.array(queries, dtype=np.float32, ndmin=2, copy=True)
        if q.ndim != 2 or q.shape[1] != self.index.d:
            raise UsageError(f"query vectors have shape {np.shape(queries)}; this index needs "
                             f"{self.index.d}-d vectors (column {self.params.get('column')!r})")
        if k < 1:
            raise UsageError("k must be >= 1")
        if self.index.ntotal == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        l2_normalize(q)
        scores, rows = self.index.search(q, min(k, self.index.ntotal))
        results = []
        for row_ids, row_scores in zip(rows.tolist(), scores.tolist()):
            hits = [(r, s) for r, s in zip(row_ids, row_scores) if r >= 0]  # -1: fewer than k found
            results.append([(rank, self.ids[r], self.uris[r], s)
                            for rank, (r, s) in enumerate(hits, start=1)])
        return results


def make_index(vectors: np.ndarray, kind: str = "flat", params: Optional[dict] = None, *,
               progress: bool = False) -> tuple[faiss.Index, dict]:
    """Build a ``kind`` index from ``vectors`` (float32, rows already L2-normalised).

    Returns ``(index, params)`` with every default filled in.  This is exactly what
    :func:`build_index` does, minus reading and writing files.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-d, got shape {x.shape}")
    n, d = x.shape

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, n, ADD_CHUNK):
            yield x[start:start + ADD_CHUNK]

    def sample(rows: np.ndarray) -> np.ndarray:
        return x[rows]

    return _build(kind, n, d, batches, sample, params, progress)


def build_index(output: str, kind: str = "flat", column: str = "fc7", *,
                storage_options: Optional[dict] = None, progress: bool = True,
                params: Optional[dict] = None, incremental: bool = True) -> dict:
    """Index ``column`` of ``OUTPUT``'s embeddings and save it under ``OUTPUT/index/``.

    With an index of this kind and column already there (and ``incremental``, and no new
    ``params``), only part files it does not cover yet are added, or nothing is done when there
    are none; see the module docstring for when it rebuilds instead.  A build streams the
    Parquet files (twice for ``ivf-pq``: a training sample, then the adds), so memory is the
    index plus one batch.  Returns the stored parameter dict plus ``action``.
    """
    _check_kind(kind)
    started = time.perf_counter()
    footers = part_footers(output, storage_options)
    n = sum(rows for _, rows, _ in footers)
    if n == 0:
        raise UsageError(f"{output} has no embedding rows to index")
    fs, root = url_to_fs(output, storage_options)
    paths = _paths(fs, root, column, kind)
    covers = [{"file": name, "rows": rows, "created_at": md.get("created_at")} for name, rows, md in footers]
    reason = None
    if fs.exists(paths["json"]):
        if not incremental or params is not None:
            reason = "asked for a full build" if not incremental else "new parameters"
        else:
            existing = json.loads(fs.cat_file(paths["json"]))
            new, reason = _growth(existing, covers, kind)
            if reason is None:
                return _add(output, column, kind, existing, new, covers, paths, fs, storage_options,
                            started)
        log.info("rebuilding the %s index of %s: %s", kind, column, reason)
    return _build_and_store(output, kind, column, covers, params, paths, fs, storage_options, progress,
                            reason, started)


def _build_and_store(output: str, kind: str, column: str, covers: list[dict], params: Optional[dict],
                     paths: dict, fs, storage_options: Optional[dict], progress: bool,
                     reason: Optional[str], started: float) -> dict:
    """A full build, its record (the JSON, written last) and the log line."""
    n = sum(c["rows"] for c in covers)
    built = _full_build(output, kind, column, n, params, paths, fs, storage_options, progress)
    built.update(column=column, rows=n, trained_rows=n, covers=covers,
                 action="rebuilt" if reason else "built", reason=reason, rows_added=n,
                 build_seconds=round(time.perf_counter() - started, 3),
                 created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 faiss_version=faiss.__version__)
    write_atomic(fs, paths["json"], json.dumps(built, indent=2, sort_keys=True).encode())
    log.info("%s %s index of %d x %d in %.1fs: %s", built["action"], kind, n, built["dim"],
             built["build_seconds"], paths["faiss"])
    return built


def _growth(existing: dict, covers: list[dict], kind: str) -> tuple[list[str], Optional[str]]:
    """``(new part files, None)`` if the index can be brought up to date by adds, else
    ``([], why it must be rebuilt)``."""
    covered = existing.get("covers")
    if not covered:
        return [], "it predates coverage records"
    now = {c["file"]: c for c in covers}
    for c in covered:
        cur = now.get(c["file"])
        if cur is None:
            return [], f"{c['file']} is gone"
        if (cur["rows"], cur["created_at"]) != (c["rows"], c.get("created_at")):
            return [], f"{c['file']} was rewritten"
    names = {c["file"] for c in covered}
    new = [c["file"] for c in covers if c["file"] not in names]
    total = sum(c["rows"] for c in covers)
    trained = existing.get("trained_rows") or existing.get("rows") or 0
    if kind == "ivf-pq" and total > IVF_PQ_GROWTH * trained:
        return [], (f"{total} vectors are more than {IVF_PQ_GROWTH:g}x the {trained} it was trained on; "
                    "retraining")
    return new, None


def _full_build(output: str, kind: str, column: str, n: int, params: Optional[dict], paths: dict, fs,
                storage_options: Optional[dict], progress: bool) -> dict:
    """Build ``kind`` over every row of ``column`` and upload the index and ids files."""
    d = _first_dim(output, column, storage_options)
    with _local_temp(fs, paths["ids"]) as ids_tmp, _local_temp(fs, paths["faiss"]) as faiss_tmp:
        writer = pq.ParquetWriter(ids_tmp, IDS_SCHEMA)
        written = 0

        def batches() -> Iterator[np.ndarray]:
            nonlocal written
            for emb in iter_embeddings(output, column, batch_size=ADD_CHUNK, normalize=True,
                                       storage_options=storage_options):
                writer.write_table(pa.table({"id": emb.ids, "uri": emb.uris}, schema=IDS_SCHEMA))
                written += len(emb)
                yield emb.vectors

        def sample(rows: np.ndarray) -> np.ndarray:
            return _sample_rows(output, column, rows, d, storage_options)

        try:
            index, built = _build(kind, n, d, batches, sample, params, progress)
        finally:
            writer.close()
        if written != n or index.ntotal != n:
            raise UsageError(f"{output} changed while it was indexed ({n} rows listed, "
                             f"{written} read); run the index command again")
        faiss.write_index(index, faiss_tmp)
        _upload(fs, ids_tmp, paths["ids"])
        _upload(fs, faiss_tmp, paths["faiss"])
    built["dim"] = d
    return built


def _add(output: str, column: str, kind: str, existing: dict, new: list[str], covers: list[dict],
         paths: dict, fs, storage_options: Optional[dict], started: float) -> dict:
    """Add the rows of the part files ``new`` to the stored index; rebuild if it is unreadable."""
    if not new:
        log.info("the %s index of %s already covers all %d rows", kind, column, existing["rows"])
        return dict(existing, action="unchanged", reason=None, rows_added=0)
    reason = None
    try:
        loaded = load_index(output, column, kind, storage_options)
    except UsageError as exc:  # e.g. an index killed between its two uploads
        reason = f"the stored index is unreadable ({exc})"
    if loaded.index.ntotal != existing.get("rows"):
        reason = "the stored index does not match its record"
    if reason is not None:
        log.warning("rebuilding the %s index of %s: %s", kind, column, reason)
        return _build_and_store(output, kind, column, covers, None, paths, fs, storage_options, False,
                                reason, started)
    index, added = loaded.index, 0
    with _local_temp(fs, paths["ids"]) as ids_tmp, _local_temp(fs, paths["faiss"]) as faiss_tmp:
        with pq.ParquetWriter(ids_tmp, IDS_SCHEMA) as writer:
            writer.write_table(pa.table({"id": loaded.ids, "uri": loaded.uris}, schema=IDS_SCHEMA))
            for emb in iter_embeddings(output, column, batch_size=ADD_CHUNK, normalize=True,
                                       storage_options=storage_options, only=set(new)):
                if emb.vectors.shape[1] != index.d:
                    raise UsageError(f"{column} vectors of the new part files are {emb.vectors.shape[1]}-d, "
                                     f"the index is {index.d}-d; rebuild it with --kind {kind}")
                index.add(emb.vectors)
                writer.write_table(pa.table({"id": emb.ids, "uri": emb.uris}, schema=IDS_SCHEMA))
                added += len(emb)
        expected = sum(c["rows"] for c in covers)
        if index.ntotal != expected:
            raise UsageError(f"{output} changed while it was indexed; run the index command again")
        faiss.write_index(index, faiss_tmp)
        _upload(fs, ids_tmp, paths["ids"])
        _upload(fs, faiss_tmp, paths["faiss"])
    stored = dict(existing, rows=int(index.ntotal), covers=covers, action="added", reason=None,
                  rows_added=added, build_seconds=round(time.perf_counter() - started, 3),
                  updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  faiss_version=faiss.__version__)
    write_atomic(fs, paths["json"], json.dumps(stored, indent=2, sort_keys=True).encode())
    log.info("added %d rows from %d new part files to the %s index of %s (now %d)", added, len(new),
             kind, column, index.ntotal)
    return stored


def load_index(output: str, column: str = "fc7", kind: Optional[str] = None,
               storage_options: Optional[dict] = None) -> LoadedIndex:
    """Read the ``kind`` index of ``column`` (``None``: the best that exists, hnsw > ivf-pq > flat)."""
    fs, root = url_to_fs(output, storage_options)
    kinds = PREFERENCE if kind is None else (_check_kind(kind),)
    for k in kinds:
        paths = _paths(fs, root, column, k)
        if exists(fs, paths["json"]):
            break
    else:
        how = f"vgg-pipeline index {output}" + (f" --kind {kind}" if kind else "") + \
            (f" --column {column}" if column != "fc7" else "")
        what = f"no {kind} index" if kind else "no index"
        raise UsageError(f"{what} in {output} (column {column}); build one with `{how}`")
    params = json.loads(read_file(fs, paths["json"]))
    with open_read(fs, paths["ids"]) as f:
        table = pq.read_table(f)
    if is_local(fs):
        index = faiss.read_index(paths["faiss"])
    else:
        with tempfile.TemporaryDirectory(prefix="vgg-index-") as tmp:
            local = os.path.join(tmp, "index.faiss")
            with_retries(lambda: fs.get_file(paths["faiss"], local), paths["faiss"])
            index = faiss.read_index(local)
    if index.ntotal != table.num_rows:
        raise UsageError(f"{paths['faiss']} holds {index.ntotal} vectors but its ids file "
                         f"{table.num_rows}: the index is incomplete; rebuild it")
    set_search_params(index, params)
    return LoadedIndex(table.column("id").to_pylist(), table.column("uri").to_pylist(), k, params,
                       index)


# --- the shared build path -------------------------------------------------------------------

def _build(kind: str, n: int, d: int, batches: Callable[[], Iterator[np.ndarray]],
           sample: Callable[[np.ndarray], np.ndarray], params: Optional[dict],
           progress: bool) -> tuple[faiss.Index, dict]:
    """Create, train (on ``sample(rows)``), fill (from ``batches()``) and configure an index."""
    p = _resolve_params(_check_kind(kind), n, d, params)
    index = faiss.index_factory(d, p["factory"], faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = p["ef_construction"]
    elif kind == "ivf-pq":
        # The factory turns on polysemous training (code re-ordering for Hamming pre-filtering,
        # which we never use); it multiplies training time by ~10.
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    t0 = time.perf_counter()
    if not index.is_trained:
        rng = np.random.default_rng(p["seed"])
        rows = np.sort(rng.choice(n, size=p["train_size"], replace=False))
        log.info("training %s on %d of %d vectors", p["factory"], len(rows), n)
        index.train(np.ascontiguousarray(sample(rows), dtype=np.float32))
    p["train_seconds"] = round(time.perf_counter() - t0, 3)
    with tqdm(total=n, unit="vec", desc=f"index {kind}", disable=not progress) as bar:
        for chunk in batches():
            index.add(chunk)
            bar.update(len(chunk))
    set_search_params(index, p)
    return index, p


def _resolve_params(kind: str, n: int, d: int, params: Optional[dict]) -> dict:
    """Defaults for ``kind`` at ``n`` x ``d``, overridden by ``params`` (values may be strings)."""
    defaults = PARAM_DEFAULTS[kind]
    given = dict(params or {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise UsageError(f"unknown {kind} index parameter(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(defaults) or 'none'}")
    p: dict = {"kind": kind, "metric": "inner_product", "normalized": True}
    for key, default in defaults.items():
        value = given.get(key, default)
        if value is not None and key != "refine":
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise UsageError(f"index parameter {key}={value!r} is not an integer") from None
            if value < (0 if key == "seed" else 1):
                raise UsageError(f"index parameter {key}={value} must be positive")
        p[key] = value
    if kind == "flat":
        p["factory"] = "Flat"
    elif kind == "hnsw":
        p["factory"] = f"HNSW{p['M']},Flat"
    else:
        _resolve_ivf_pq(p, n, d)
    return p


def _resolve_ivf_pq(p: dict, n: int, d: int) -> None:
    if n < MIN_IVF_PQ_ROWS:
        raise UsageError(f"ivf-pq needs at least {MIN_IVF_PQ_ROWS} vectors to train (this output has "
                         f"{n}); use --kind flat, which is exact and fast at this size")
    # nlist ~ 4 sqrt(n), but at least 39 training points per list (faiss' k-means minimum).
    if p["nlist"] is None:
        p["nlist"] = int(min(max(1, round(4 * math.sqrt(n))), max(1, n // 39), 65536))
    if p["nlist"] > n:
        raise UsageError(f"nlist={p['nlist']} is more than the {n} vectors")
    if p["train_size"] is None:
        p["train_size"] = max(39 * p["nlist"], 20000)
    p["train_size"] = min(p["train_size"], n)
    if p["m"] is None:  # 64 sub-quantizers (64-d each at 4096-d); >= 4 dims each for small d
        p["m"] = max(m for m in range(1, min(64, max(1, d // 4)) + 1) if d % m == 0)
    if d % p["m"]:
        raise UsageError(f"m={p['m']} sub-quantizers must divide the dimension {d}")
    if p["nbits"] is None:  # 2**nbits centroids need ~39 training points each
        p["nbits"] = int(min(8, max(4, math.floor(math.log2(p["train_size"] / 39)))))
    p["nprobe"] = min(p["nprobe"], p["nlist"])
    refine = str(p["refine"]).lower()
    if refine not in REFINES:
        raise UsageError(f"refine={p['refine']!r}; choose one of {', '.join(REFINES)}")
    p["refine"] = refine
    p["factory"] = f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}" + \
        (f",Refine({REFINES[refine]})" if REFINES[refine] else "")
    if not REFINES[refine]:
        p["k_factor"] = 1


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Apply the search-time knobs in ``params`` (hnsw ``ef_search``; ivf-pq ``nprobe`` and
    ``k_factor``) to ``index``; :func:`load_index` does it from the stored JSON."""
    kind = params.get("kind")
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])
    elif kind == "ivf-pq":
        base = index
        if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
            refine = faiss.downcast_index(index)
            refine.k_factor = float(params["k_factor"])
            base = refine.base_index
        faiss.extract_index_ivf(base).nprobe = int(params["nprobe"])


# --- files -----------------------------------------------------------------------------------

def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UsageError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def _paths(fs, root: str, column: str, kind: str) -> dict[str, str]:
    rel = layout.index_paths(column, kind)
    if is_local(fs):
        return {what: os.path.join(root, path) for what, path in rel.items()}
    return {what: f"{root.rstrip('/')}/{path}" for what, path in rel.items()}


@contextmanager
def _local_temp(fs, target: str) -> Iterator[str]:
    """A local scratch path for ``target``: beside it on a local disk (so rename is atomic),
    in the temp dir otherwise.  Removed on exit if still there."""
    if is_local(fs):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        path = os.path.join(os.path.dirname(target), layout.temp_name(os.path.basename(target)))
    else:
        fd, path = tempfile.mkstemp(prefix="vgg-index-", suffix=os.path.splitext(target)[1])
        os.close(fd)
    try:
        yield path
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _upload(fs, local: str, target: str) -> None:
    """Make ``target`` appear whole: rename on a local disk, a single (retried) put on object stores."""
    if is_local(fs):
        os.replace(local, target)
    else:
        with_retries(lambda: fs.put_file(local, target), target)


def _first_dim(output: str, column: str, storage_options: Optional[dict]) -> int:
    for emb in iter_embeddings(output, column, batch_size=1, storage_options=storage_options):
        return emb.vectors.shape[1]
    raise UsageError(f"{output} has no embedding rows to index")


def _sample_rows(output: str, column: str, rows: np.ndarray, d: int,
                 storage_options: Optional[dict]) -> np.ndarray:
    """The normalised vectors at global row numbers ``rows`` (sorted), in one streaming pass."""
    out = np.empty((len(rows), d), dtype=np.float32)
    start = filled = 0
    for emb in iter_embeddings(output, column, batch_size=ADD_CHUNK, normalize=True,
                               storage_options=storage_options):
        end = start + len(emb)
        lo, hi = np.searchsorted(rows, [start, end])
        out[filled:filled + hi - lo] = emb.vectors[rows[lo:hi] - start]
        filled += hi - lo
        start = end
        if filled == len(rows):
            break
    if filled != len(rows):
        raise UsageError(f"{output} changed while it was indexed; run the index command again")
    return out
