"""Read ``OUTPUT/embeddings/*.parquet`` back as float32 matrices (docs/design.md §5).

Two ways in:

* :func:`load_embeddings` — everything at once.  Row counts come from the Parquet footers
  first, so the float32 result is allocated once and filled file by file: peak memory is the
  result plus one row group, not twice the result.
* :func:`iter_embeddings` — record batches, for data that does not fit in memory.

Vector columns (``fc7`` float16/float32, ``logits``, ``descriptor``) are ``fixed_size_list``;
they become numpy through the flat child array and one reshape, never a Python loop per row.
Plain ``list`` columns of equal length (what Spark writes back) are accepted too.

Example::

    >>> from pipeline.output.embeddings import load_embeddings
    >>> emb = load_embeddings("out/", normalize=True)          # doctest: +SKIP
    >>> emb.vectors.shape, emb.ids[0]                          # doctest: +SKIP
    ((120000, 4096), 'cats/0001.jpg')
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.input import layout
from pipeline.input.storage import is_local, join, open_read, to_uri, url_to_fs, with_retries
from pipeline.output.writer import METADATA_KEY

log = logging.getLogger(__name__)

_NORM_BLOCK = 4096  # rows per l2_normalize step: a float64 temporary of <= 128 MiB at d=4096


@dataclass
class Embeddings:
    """Rows of one or more embedding files: ``vectors[i]`` belongs to ``ids[i]`` / ``uris[i]``."""

    ids: list[str]
    uris: list[str]
    vectors: np.ndarray  # float32, (n, d), C-contiguous
    metadata: dict = field(default_factory=dict)  # parsed ``vgg_pipeline`` schema metadata

    def __len__(self) -> int:
        return len(self.ids)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Scale each row of the float array ``x`` to unit L2 norm, in place; all-zero rows stay zero.

    Returns ``x``.  Works in row blocks, so temporaries stay small whatever the size of ``x``.
    """
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"l2_normalize needs a 2-d float array, got {x.dtype} {x.shape}")
    for start in range(0, len(x), _NORM_BLOCK):
        block = x[start:start + _NORM_BLOCK]
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))  # float64: 4096 terms
        norms[norms == 0] = 1.0
        block /= norms.astype(x.dtype)[:, None]
    return x


def embedding_files(output: str, storage_options: Optional[dict] = None) -> list[str]:
    """Sorted URIs of ``OUTPUT/embeddings/part-*.parquet`` (local paths stay plain paths)."""
    fs, files = _list_parts(output, storage_options)
    return [to_uri(fs, f) for f in files]


def load_embeddings(output: str, column: str = "fc7", *, normalize: bool = False,
                    storage_options: Optional[dict] = None) -> Embeddings:
    """All rows of ``column`` in ``OUTPUT`` as one float32 matrix, in file then row order.

    ``normalize=True`` L2-normalises every row (cosine similarity = inner product).
    Raises :class:`UsageError` when ``OUTPUT`` has no embeddings or lacks ``column``.
    """
    fs, files = _require_parts(output, storage_options)
    # Pass 1: footers only -> row count, vector length and metadata, so the result is allocated once.
    footers: list[pq.FileMetaData] = []
    dims: list[Optional[int]] = []
    metadata: dict = {}
    for i, name in enumerate(files):
        with _parquet(fs, name) as pf:
            footers.append(pf.metadata)
            dims.append(_vector_dim(pf, column, name))
            if i == 0:
                metadata = _metadata(pf)
    d = _common_dim(dims, column)
    n = sum(md.num_rows for md in footers)
    vectors = np.empty((n, d), dtype=np.float32)
    ids: list[str] = []
    uris: list[str] = []
    row = 0
    # Pass 2: one row group at a time straight into the preallocated matrix.
    for name, footer in zip(files, footers):
        with _parquet(fs, name, footer) as pf:
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=["id", "uri", column])
                block = vector_matrix(table.column(column), d, name)
                if row + len(block) > n:
                    raise UsageError(f"{name} changed while it was being read")
                vectors[row:row + len(block)] = block  # float16 -> float32 happens here
                row += len(block)
                ids.extend(table.column("id").to_pylist())
                uris.extend(table.column("uri").to_pylist())
    if row != n:
        raise UsageError(f"{output}: footers promised {n} rows but {row} were read")
    if normalize:
        l2_normalize(vectors)
    return Embeddings(ids, uris, vectors, metadata)


def iter_embeddings(output: str, column: str = "fc7", *, batch_size: int = 65536,
                    normalize: bool = False, storage_options: Optional[dict] = None,
                    only: Optional[set[str]] = None) -> Iterator[Embeddings]:
    """Yield ``OUTPUT``'s rows as :class:`Embeddings` of at most ``batch_size`` rows each.

    Batches never span files (each carries its own file's metadata); empty files yield nothing.
    Concatenated, the batches equal :func:`load_embeddings` with the same arguments.
    ``only``: read just the part files with these names (e.g. ``part-00007.parquet``).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    fs, files = _require_parts(output, storage_options)
    if only is not None:
        files = [f for f in files if f.rstrip("/").rsplit("/", 1)[-1] in only]
    d: Optional[int] = None
    for name in files:
        with _parquet(fs, name) as pf:
            file_dim = _vector_dim(pf, column, name)
            if file_dim is not None:
                d = _common_dim([d, file_dim], column)
            meta = _metadata(pf)
            for batch in pf.iter_batches(batch_size=batch_size, columns=["id", "uri", column]):
                if batch.num_rows == 0:
                    continue
                # astype copies: the result is writable and C-contiguous even for float32 input.
                vectors = vector_matrix(batch.column(column), d, name).astype(np.float32)
                if normalize:
                    l2_normalize(vectors)
                yield Embeddings(batch.column("id").to_pylist(), batch.column("uri").to_pylist(),
                                 vectors, meta)


def vectors_for_ids(output: str, ids: list[str], column: str = "fc7", *,
                    normalize: bool = False, storage_options: Optional[dict] = None) -> np.ndarray:
    """The float32 ``column`` vectors of ``ids`` (in that order), e.g. to search by id.

    Reads every file's ``id`` column but only the row groups that hold a wanted id.
    Raises :class:`UsageError` naming the ids that are not in ``OUTPUT``.
    """
    wanted = pa.array(list(dict.fromkeys(ids)), pa.string())
    found: dict[str, np.ndarray] = {}
    fs, files = _require_parts(output, storage_options)
    for name in files:
        with _parquet(fs, name) as pf:
            d = _vector_dim(pf, column, name)
            for g in range(pf.num_row_groups):
                group_ids = pf.read_row_group(g, columns=["id"]).column("id")
                hits = pc.indices_nonzero(pc.is_in(group_ids, value_set=wanted)).to_numpy()
                if len(hits) == 0:
                    continue
                table = pf.read_row_group(g, columns=["id", column]).take(pa.array(hits))
                block = vector_matrix(table.column(column), d, name).astype(np.float32)
                found.update(zip(table.column("id").to_pylist(), block))
        if len(found) == len(wanted):
            break
    missing = [i for i in ids if i not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UsageError(f"not in {output}: {', '.join(map(repr, missing[:5]))}{more}")
    out = np.stack([found[i] for i in ids]) if ids else np.empty((0, 0), np.float32)
    return l2_normalize(out) if normalize and len(out) else out


def count_rows(output: str, storage_options: Optional[dict] = None) -> int:
    """Rows in ``OUTPUT/embeddings`` from the Parquet footers alone (no data read)."""
    return sum(rows for _, rows, _ in part_footers(output, storage_options))


def part_footers(output: str, storage_options: Optional[dict] = None) -> list[tuple[str, int, dict]]:
    """``(name, rows, vgg_pipeline metadata)`` of every embeddings part file, from footers alone."""
    fs, files = _require_parts(output, storage_options)
    found = []
    for name in files:
        with _parquet(fs, name) as pf:
            found.append((name.rstrip("/").rsplit("/", 1)[-1], pf.metadata.num_rows, _metadata(pf)))
    return found


def vector_matrix(arr: pa.Array | pa.ChunkedArray, d: Optional[int], name: str = "") -> np.ndarray:
    """A list-typed Arrow column as an ``(n, d)`` numpy view/copy in its own dtype (no row loop)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if arr.null_count:
        raise UsageError(f"{name}: {arr.null_count} null vectors in a vector column")
    if len(arr) == 0:
        return np.empty((0, d or 0), dtype=np.float32)
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    else:
        lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
        if d is None:
            d = int(lengths[0])
        if (lengths != d).any():
            raise UsageError(f"{name}: vectors of unequal length in a list column (expected {d})")
    # ``flatten`` honours the slice offset of ``arr`` (``.values`` would not).
    flat = arr.flatten()
    if flat.null_count:
        raise UsageError(f"{name}: null elements inside vectors")
    return flat.to_numpy(zero_copy_only=False).reshape(len(arr), d)


# --- helpers ---------------------------------------------------------------------------------

def _list_parts(output: str, storage_options: Optional[dict]) -> tuple[object, list[str]]:
    fs, root = url_to_fs(output, storage_options)
    fs.invalidate_cache()  # parts are written by other processes (actors, later jobs): list afresh
    pattern = join(root, layout.embeddings_glob()) if is_local(fs) else \
        f"{root.rstrip('/')}/{layout.embeddings_glob()}"
    return fs, sorted(with_retries(lambda: fs.glob(pattern), output))


def _require_parts(output: str, storage_options: Optional[dict]) -> tuple[object, list[str]]:
    fs, files = _list_parts(output, storage_options)
    if not files:
        raise UsageError(f"{output} has no {layout.embeddings_glob()}: not a vgg-pipeline output")
    return fs, files


@contextmanager
def _parquet(fs, path: str, footer: Optional[pq.FileMetaData] = None) -> Iterator[pq.ParquetFile]:
    """Open one part file; a known ``footer`` saves re-reading it (one request less on S3)."""
    # Remote files are seekable fsspec files: pyarrow fetches the footer, then only the column
    # chunks it needs, each request retried on transient faults.
    with (open(path, "rb") if is_local(fs) else open_read(fs, path)) as f:
        pf = pq.ParquetFile(f, metadata=footer)
        try:
            yield pf
        finally:
            pf.close()


def _vector_dim(pf: pq.ParquetFile, column: str, name: str) -> Optional[int]:
    """Vector length of ``column`` from the schema (fixed_size_list) or first row (list)."""
    schema = pf.schema_arrow
    if column not in schema.names:
        vector_cols = [f.name for f in schema if _is_list(f.type)]
        raise UsageError(f"{name} has no column {column!r} (vector columns: {', '.join(vector_cols)})")
    typ = schema.field(column).type
    if not _is_list(typ) or not pa.types.is_floating(typ.value_type):
        raise UsageError(f"{name}: column {column!r} is {typ}, not a list of floats")
    if pa.types.is_fixed_size_list(typ):
        return typ.list_size
    for i in range(pf.num_row_groups):
        if pf.metadata.row_group(i).num_rows:
            first = pf.read_row_group(i, columns=[column]).column(column).chunk(0)
            return len(first[0].values)
    return None  # an empty file says nothing about d


def _is_list(typ: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ)


def _common_dim(dims: list[Optional[int]], column: str) -> int:
    known = {d for d in dims if d is not None}
    if len(known) > 1:
        raise UsageError(f"column {column!r} has different lengths across files: {sorted(known)}")
    return known.pop() if known else 0


def _metadata(pf: pq.ParquetFile) -> dict:
    raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        log.warning("unparseable %s schema metadata ignored", METADATA_KEY.decode())
        return {}
