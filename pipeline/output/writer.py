"""Parquet schema and shard files (docs/design.md §5): one embeddings file and at most one errors file per shard.

Where the files go is :mod:`pipeline.input.layout`'s.

Per shard the errors file is written (or a stale one removed) first and the embeddings file
last, even with 0 rows: "``embeddings/part-NNNNN.parquet`` exists" is the shard's commit marker.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..model.archs import FC7_DIM, NUM_CLASSES
from ..input import layout
from ..input.storage import join, ls, remove_if_exists, url_to_fs, write_atomic
from ..model.mapper import OutputColumn

METADATA_KEY = b"vgg_pipeline"

ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("stage", pa.string()),
                           ("error_type", pa.string()), ("message", pa.string())])


# Where the mapper's columns go (docs/design.md §5 order): these first, before width and height; the
# others (e.g. the dense descriptor's) after the optional topK column.
LEADING = ("fc7", "logits")


def embeddings_schema(fc7_dtype: str = "float32", top_k: int = 0, descriptor_dim: Optional[int] = None,
                      *, columns: Optional[Sequence[OutputColumn]] = None) -> pa.Schema:
    """The embeddings schema for a mapper's declared ``columns`` (:attr:`Mapper.columns`).

    ``fc7`` is stored as ``fc7_dtype``.  Without ``columns``: the standard fc7 mapper's, plus the
    dense descriptor's two columns when ``descriptor_dim`` is given.
    """
    if columns is None:
        columns = [OutputColumn.vector("fc7", FC7_DIM), OutputColumn.vector("logits", NUM_CLASSES)]
        if descriptor_dim:
            columns += [OutputColumn.vector("descriptor", descriptor_dim),
                        OutputColumn.vector("dense_probs", NUM_CLASSES)]
    declared = {c.name: c.type for c in columns}
    if "fc7" in declared:
        declared["fc7"] = pa.list_(pa.float16() if fc7_dtype == "float16" else pa.float32(), FC7_DIM)
    fields = [("id", pa.string()), ("uri", pa.string())]
    fields += [(n, declared[n]) for n in LEADING if n in declared]
    fields += [("width", pa.int32()), ("height", pa.int32())]
    if top_k:
        fields.append((f"top{top_k}", pa.list_(pa.int32())))
    fields += [(n, t) for n, t in declared.items() if n not in LEADING]
    return pa.schema(fields)


@dataclass
class ShardRows:
    """Rows of one shard (or part of one), in plan order, kept as per-batch arrays.

    ``add`` takes a whole batch, so building a shard costs a few list extends per batch and one
    concatenate per column at the end, not work per image.
    """
    ids: list[str] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # column -> batches (b, width)
    errors: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    def add(self, ids: Sequence[str], uris: Sequence[str], widths: Sequence[int], heights: Sequence[int],
            outputs: dict[str, np.ndarray]) -> None:
        """One batch of embedded images: ``outputs[column]`` has one row per image."""
        self.ids.extend(ids)
        self.uris.extend(uris)
        self.widths.extend(widths)
        self.heights.extend(heights)
        for name, value in outputs.items():
            self.outputs.setdefault(name, []).append(value)


def _fixed_list(batches: list[np.ndarray], type_: pa.FixedSizeListType) -> pa.Array:
    width, dtype = type_.list_size, type_.value_type.to_pandas_dtype()
    flat = (np.concatenate(batches) if batches else np.zeros((0, width))).astype(dtype, copy=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)


def embeddings_table(rows: ShardRows, schema: pa.Schema, metadata: dict) -> pa.Table:
    """The Parquet table of ``rows``: every vector column of ``schema`` from ``rows.outputs``."""
    columns = {
        "id": pa.array(rows.ids, pa.string()), "uri": pa.array(rows.uris, pa.string()),
        "width": pa.array(rows.widths, pa.int32()), "height": pa.array(rows.heights, pa.int32()),
    }
    for f in schema:
        if pa.types.is_fixed_size_list(f.type):
            columns[f.name] = _fixed_list(rows.outputs.get(f.name, []), f.type)
    top = [n for n in schema.names if n.startswith("top")]
    if top:
        k = int(top[0][3:])
        logits = rows.outputs.get("logits", [])
        logits = np.concatenate(logits) if logits else np.zeros((0, NUM_CLASSES), np.float32)
        idx = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int32)
        offsets = np.arange(len(idx) + 1, dtype=np.int32) * idx.shape[1]
        columns[top[0]] = pa.ListArray.from_arrays(offsets, pa.array(idx.reshape(-1)))
    return pa.table({n: columns[n] for n in schema.names},
                    schema=schema.with_metadata({METADATA_KEY: json.dumps(metadata)}))


def errors_table(errors: list[tuple[str, str, str, str, str]], metadata: dict) -> pa.Table:
    cols = list(zip(*errors)) if errors else [[] for _ in ERRORS_SCHEMA.names]
    return pa.table({n: pa.array(list(c), pa.string()) for n, c in zip(ERRORS_SCHEMA.names, cols)},
                    schema=ERRORS_SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata)}))


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    # Dictionary pages and min/max statistics pay off for repeated short strings and scalars, not for
    # millions of floats: on 1000 x 4096 fp16 they cost more time than zstd itself and made the file
    # 12 % larger (measured with pyarrow 26), which a GPU worker waits for between shards.
    scalars = [f.name for f in table.schema if not pa.types.is_fixed_size_list(f.type)]
    pq.write_table(table, sink, compression="zstd", write_statistics=scalars,
                   use_dictionary=[n for n in scalars if n in ("stage", "error_type")])
    return sink.getvalue().to_pybytes()


def write_shard(output: str, shard: int, embeddings: pa.Table, errors: pa.Table,
                storage_options: Optional[dict] = None) -> None:
    """Errors first (or remove a stale one), embeddings last: the commit marker.

    Each write is retried on transient faults; one that outlasts the budget raises
    ``StorageUnavailable`` before the commit marker exists, so the shard is simply redone.
    """
    fs, root = url_to_fs(output, storage_options)
    err_path = join(root, layout.errors_part(shard))
    if errors.num_rows:
        write_atomic(fs, err_path, _parquet_bytes(errors))
    else:
        remove_if_exists(fs, err_path)
    write_atomic(fs, join(root, layout.embeddings_part(shard)), _parquet_bytes(embeddings))


class BackgroundWriter:
    """Writes shards on one background thread, so a finished shard's Parquet encoding and upload
    stay off the model's path; ``submit`` blocks while ``depth`` shards already wait (bounded memory).
    """

    def __init__(self, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
        self._room = threading.BoundedSemaphore(depth)

    def submit(self, output: str, shard: int, embeddings: pa.Table, errors: pa.Table,
               storage_options: Optional[dict] = None) -> "Future[float]":
        """Queue :func:`write_shard`; the future gives the seconds it took once the files are committed."""
        self._room.acquire()
        try:
            fut = self._pool.submit(_timed_write, output, shard, embeddings, errors, storage_options)
        except BaseException:
            self._room.release()
            raise
        fut.add_done_callback(lambda _: self._room.release())
        return fut

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _timed_write(output: str, shard: int, embeddings: pa.Table, errors: pa.Table,
                 storage_options: Optional[dict]) -> float:
    t0 = time.perf_counter()
    write_shard(output, shard, embeddings, errors, storage_options)
    return time.perf_counter() - t0


def done_shards(output: str, storage_options: Optional[dict] = None) -> set[int]:
    """Shard numbers whose embeddings file (the commit marker) exists."""
    fs, root = url_to_fs(join(output, layout.EMBEDDINGS_DIR), storage_options)
    try:
        names = ls(fs, root, detail=False)
    except FileNotFoundError:
        return set()
    return {n for n in map(layout.part_number, names) if n is not None}
