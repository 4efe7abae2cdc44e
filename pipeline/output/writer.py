"""Parquet schema and shard files (DESIGN §5): one embeddings file and at most one errors file per shard.

Where the files go is :mod:`pipeline.input.layout`'s.

Per shard the errors file is written (or a stale one removed) first and the embeddings file
last, even with 0 rows: "``embeddings/part-NNNNN.parquet`` exists" is the shard's commit marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..model.archs import FC7_DIM, NUM_CLASSES
from ..input import layout
from ..input.storage import join, ls, remove_if_exists, url_to_fs, write_atomic

METADATA_KEY = b"vgg_pipeline"

ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("stage", pa.string()),
                           ("error_type", pa.string()), ("message", pa.string())])


def embeddings_schema(fc7_dtype: str = "float32", top_k: int = 0,
                      descriptor_dim: Optional[int] = None) -> pa.Schema:
    fields = [
        ("id", pa.string()), ("uri", pa.string()),
        ("fc7", pa.list_(pa.float16() if fc7_dtype == "float16" else pa.float32(), FC7_DIM)),
        ("logits", pa.list_(pa.float32(), NUM_CLASSES)),
        ("width", pa.int32()), ("height", pa.int32()),
    ]
    if top_k:
        fields.append((f"top{top_k}", pa.list_(pa.int32())))
    if descriptor_dim:
        fields.append(("descriptor", pa.list_(pa.float32(), descriptor_dim)))
        # the dense network's class scores: softmax averaged over positions, flips and scales
        fields.append(("dense_probs", pa.list_(pa.float32(), NUM_CLASSES)))
    return pa.schema(fields)


@dataclass
class ShardRows:
    """Rows of one shard (or part of one), in plan order, ready to become Parquet."""
    ids: list[str] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    fc7: list[np.ndarray] = field(default_factory=list)        # batches (b, 4096)
    logits: list[np.ndarray] = field(default_factory=list)     # batches (b, 1000)
    descriptor: list[np.ndarray] = field(default_factory=list)  # batches (b, D), optional
    dense_probs: list[np.ndarray] = field(default_factory=list)  # batches (b, 1000), with descriptor
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    errors: list[tuple[str, str, str, str, str]] = field(default_factory=list)


def _fixed_list(batches: list[np.ndarray], width: int, dtype: np.dtype) -> pa.Array:
    flat = (np.concatenate(batches) if batches else np.zeros((0, width))).astype(dtype, copy=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)


def embeddings_table(rows: ShardRows, schema: pa.Schema, metadata: dict) -> pa.Table:
    fc7_type = schema.field("fc7").type.value_type
    columns = {
        "id": pa.array(rows.ids, pa.string()), "uri": pa.array(rows.uris, pa.string()),
        "fc7": _fixed_list(rows.fc7, FC7_DIM, np.float16 if fc7_type == pa.float16() else np.float32),
        "logits": _fixed_list(rows.logits, NUM_CLASSES, np.float32),
        "width": pa.array(rows.widths, pa.int32()), "height": pa.array(rows.heights, pa.int32()),
    }
    top = [n for n in schema.names if n.startswith("top")]
    if top:
        k = int(top[0][3:])
        logits = np.concatenate(rows.logits) if rows.logits else np.zeros((0, NUM_CLASSES), np.float32)
        idx = np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int32)
        columns[top[0]] = pa.array(list(idx), pa.list_(pa.int32()))
    if "descriptor" in schema.names:
        dim = schema.field("descriptor").type.list_size
        columns["descriptor"] = _fixed_list(rows.descriptor, dim, np.float32)
        columns["dense_probs"] = _fixed_list(rows.dense_probs, NUM_CLASSES, np.float32)
    return pa.table(columns, schema=schema.with_metadata({METADATA_KEY: json.dumps(metadata)}))


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


def done_shards(output: str, storage_options: Optional[dict] = None) -> set[int]:
    """Shard numbers whose embeddings file (the commit marker) exists."""
    fs, root = url_to_fs(join(output, layout.EMBEDDINGS_DIR), storage_options)
    try:
        names = ls(fs, root, detail=False)
    except FileNotFoundError:
        return set()
    return {n for n in map(layout.part_number, names) if n is not None}
