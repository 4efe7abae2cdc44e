"""The shard writer (pipeline/output/writer.py): per shard, the errors file first (or a stale one
removed), the embeddings file last -- the shard's commit marker -- and which shards are done."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output import writer
from pipeline.output.writer import (ERRORS_SCHEMA, METADATA_KEY, done_shards, embeddings_schema, errors_table,
                                    write_shard)


def tables(n_errors: int, shard: int = 0) -> tuple[pa.Table, pa.Table]:
    """An empty embeddings table and ``n_errors`` error rows, both with metadata."""
    meta = {"shard": shard}
    emb = embeddings_schema().empty_table().replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
    errors = [(f"bad{i}.jpg", f"/in/bad{i}.jpg", "decode", "UnidentifiedImageError", "cannot identify")
              for i in range(n_errors)]
    return emb, errors_table(errors, meta)


def test_errors_first_and_the_embeddings_file_last(tmp_path, monkeypatch):
    written = []
    real = writer.write_atomic

    def spy(fs, path, data):  # records the order, then writes for real
        written.append(os.path.relpath(path, tmp_path))
        real(fs, path, data)
    monkeypatch.setattr(writer, "write_atomic", spy)
    write_shard(str(tmp_path), 3, *tables(2, shard=3))
    assert written == ["errors/part-00003.parquet", "embeddings/part-00003.parquet"]
    err = pq.read_table(tmp_path / "errors" / "part-00003.parquet")
    assert err.schema.names == ERRORS_SCHEMA.names and err.column("id").to_pylist() == ["bad0.jpg", "bad1.jpg"]
    assert json.loads(err.schema.metadata[METADATA_KEY]) == {"shard": 3}
    assert pq.read_table(tmp_path / "embeddings" / "part-00003.parquet").num_rows == 0  # 0 rows: still written


def test_a_rewritten_shard_without_errors_loses_its_stale_errors_file(tmp_path):
    write_shard(str(tmp_path), 0, *tables(1))
    assert (tmp_path / "errors" / "part-00000.parquet").exists()
    write_shard(str(tmp_path), 0, *tables(0))
    assert os.listdir(tmp_path / "errors") == []
    assert os.listdir(tmp_path / "embeddings") == ["part-00000.parquet"]


def test_done_shards_are_those_with_an_embeddings_file(tmp_path):
    assert done_shards(str(tmp_path / "nothing-yet")) == set()
    for shard in (0, 2, 100000):
        write_shard(str(tmp_path), shard, *tables(0, shard))
    write_shard(str(tmp_path), 5, *tables(1, 5))
    os.unlink(tmp_path / "embeddings" / "part-00005.parquet")  # errors written, then killed: not done
    (tmp_path / "embeddings" / ".part-00007.parquet.tmp-0badf00d").write_bytes(b"half")  # a killed writer's
    (tmp_path / "embeddings" / "notes.txt").write_text("not a part")
    assert done_shards(str(tmp_path)) == {0, 2, 100000}


@pytest.mark.parametrize("fc7_dtype, value_type", [("float16", pa.float16()), ("float32", pa.float32())])
def test_embeddings_schema_columns(fc7_dtype, value_type):
    base = embeddings_schema(fc7_dtype)
    assert base.names == ["id", "uri", "fc7", "logits", "width", "height"]
    assert base.field("fc7").type == pa.list_(value_type, 4096)
    assert base.field("logits").type == pa.list_(pa.float32(), 1000)
    assert embeddings_schema(fc7_dtype, top_k=5).names[-1] == "top5"
    dense = embeddings_schema(fc7_dtype, descriptor_dim=512)
    assert dense.names[-2:] == ["descriptor", "dense_probs"]
    assert dense.field("descriptor").type == pa.list_(pa.float32(), 512)
