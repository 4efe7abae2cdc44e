"""Reading embeddings back and FAISS indexes over them (pipeline.output.embeddings, pipeline.retrieval.index).

Outputs are written here with pyarrow the way the extractor's writer does (zstd, fixed-size
lists, ``vgg_pipeline`` schema metadata, one file per shard, empty shards included), so
these tests need no model and no Ray.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import duckdb
import faiss
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.output.embeddings import (Embeddings, embedding_files, iter_embeddings, l2_normalize,
                                 load_embeddings, vector_matrix, vectors_for_ids)
from pipeline.errors import UsageError
from pipeline.retrieval.index import LoadedIndex, build_index, load_index, make_index
from tests.helpers import FC7, clustered, write_output

@pytest.fixture(autouse=True)
def one_faiss_thread():
    """One OpenMP thread: on a busy 2-core box, faiss' spinning threads slow k-means ~6x."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def small_output(tmp_path_factory) -> tuple[Path, np.ndarray, list[str]]:
    """500 clustered fc7 rows (float16) in 4 shards, one of them empty."""
    root = tmp_path_factory.mktemp("out")
    fc7 = clustered(500, FC7, clusters=20)
    ids = write_output(str(root), fc7, [200, 0, 180, 120])
    return root, fc7, ids


# --- embeddings --------------------------------------------------------------------------------

def test_load_embeddings_ids_order_values_float16_to_float32(small_output):
    root, fc7, ids = small_output
    files = embedding_files(str(root))
    assert [Path(f).name for f in files] == [f"part-{i:05d}.parquet" for i in range(4)]
    emb = load_embeddings(str(root))
    assert emb.ids == ids
    assert emb.uris == [f"/data/{i}" for i in ids]
    assert emb.vectors.dtype == np.float32 and emb.vectors.flags.c_contiguous
    assert emb.vectors.shape == (500, FC7)
    np.testing.assert_array_equal(emb.vectors, fc7.astype(np.float16).astype(np.float32))
    assert emb.metadata["model"]["arch"] == "vgg16" and emb.metadata["shard"] == 0


def test_load_embeddings_normalize_and_other_columns(small_output):
    root, fc7, _ = small_output
    emb = load_embeddings(str(root), normalize=True)
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, rtol=1e-5)
    ref = fc7.astype(np.float16).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb.vectors, ref, atol=1e-6)
    logits = load_embeddings(str(root), "logits")
    assert logits.vectors.shape == (500, 1000)


def test_iter_embeddings_batches_cover_all_rows(small_output):
    root, _, ids = small_output
    batches = list(iter_embeddings(str(root), batch_size=64, normalize=True))
    assert all(0 < len(b) <= 64 for b in batches)
    assert [i for b in batches for i in b.ids] == ids
    whole = load_embeddings(str(root), normalize=True).vectors
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in batches]), whole)
    assert all(b.vectors.flags.writeable and b.vectors.dtype == np.float32 for b in batches)


def test_vectors_for_ids_in_the_asked_order(small_output):
    root, fc7, ids = small_output
    want = [ids[450], ids[3], ids[450], ids[250]]  # across files, repeated, out of order
    got = vectors_for_ids(str(root), want)
    assert got.dtype == np.float32 and got.shape == (4, FC7)
    np.testing.assert_array_equal(got, fc7[[450, 3, 450, 250]].astype(np.float16).astype(np.float32))
    unit = vectors_for_ids(str(root), [ids[1]], normalize=True)
    assert np.linalg.norm(unit) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(UsageError, match="not in .*'nope.jpg'"):
        vectors_for_ids(str(root), [ids[0], "nope.jpg"])


def test_l2_normalize_in_place_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    out = l2_normalize(x)
    assert out is x
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 0.0]])
    with pytest.raises(ValueError):
        l2_normalize(np.ones((2, 2), dtype=np.int64))
    many = np.random.default_rng(0).standard_normal((10_000, 3)).astype(np.float32)  # > one block
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(many), axis=1), 1.0, rtol=1e-6)


def test_vector_matrix_respects_slice_offset():
    arr = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.float32)), 3)
    np.testing.assert_array_equal(vector_matrix(arr.slice(2, 2), 3), [[6, 7, 8], [9, 10, 11]])
    plain = pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))  # what Spark writes back
    np.testing.assert_array_equal(vector_matrix(plain, None), [[1, 2], [3, 4]])
    with pytest.raises(UsageError, match="unequal"):
        vector_matrix(pa.array([[1.0], [2.0, 3.0]], pa.list_(pa.float32())), None)


def test_load_errors_are_usage_errors(tmp_path, small_output):
    with pytest.raises(UsageError, match="not a vgg-pipeline output"):
        load_embeddings(str(tmp_path))
    with pytest.raises(UsageError, match="no column 'descriptor'.*fc7"):
        load_embeddings(str(small_output[0]), "descriptor")
    with pytest.raises(UsageError, match="not a list of floats"):
        load_embeddings(str(small_output[0]), "width")


def test_duckdb_and_pandas_read_embeddings_as_is(small_output):
    root, fc7, ids = small_output
    glob = f"{root}/embeddings/*.parquet"
    rel = duckdb.sql(f"SELECT id, fc7, logits, width FROM read_parquet('{glob}') ORDER BY id")
    assert [str(t) for t in rel.types] == ["VARCHAR", "FLOAT[]", "FLOAT[]", "INTEGER"]
    rows = rel.fetchall()
    assert [r[0] for r in rows] == ids
    assert len(rows[0][1]) == FC7 and len(rows[0][2]) == 1000
    np.testing.assert_array_equal(np.array(rows[7][1], np.float32),
                                  fc7[7].astype(np.float16).astype(np.float32))
    assert duckdb.sql(f"SELECT len(fc7) FROM read_parquet('{glob}') GROUP BY 1").fetchall() == [(FC7,)]

    df = pd.read_parquet(root / "embeddings")
    assert list(df.id) == ids
    assert isinstance(df.fc7.iloc[0], np.ndarray) and df.fc7.iloc[0].dtype == np.float16
    assert df.fc7.iloc[0].shape == (FC7,) and df.logits.iloc[0].dtype == np.float32
    assert df.width.dtype == np.int32


# --- indexes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_every_vector_finds_itself_first(small_output, kind):
    root, _, ids = small_output
    params = build_index(str(root), kind, progress=False)
    assert params["rows"] == 500 and params["dim"] == FC7 and params["kind"] == kind
    for suffix in (".faiss", ".ids.parquet", ".json"):
        assert (root / "index" / f"fc7-{kind}{suffix}").is_file()
    assert json.loads((root / "index" / f"fc7-{kind}.json").read_text())["rows"] == 500

    loaded = load_index(str(root), kind=kind)
    assert isinstance(loaded, LoadedIndex) and loaded.kind == kind and loaded.ids == ids
    queries = load_embeddings(str(root)).vectors * 3.0  # search() normalises queries itself
    results = loaded.search(queries, k=5)
    assert [r[0][1] for r in results] == ids
    assert all(r[0][0] == 1 and r[0][3] == pytest.approx(1.0, abs=1e-3) for r in results)
    rank, id_, uri, score = results[0][1]
    assert rank == 2 and id_ != ids[0] and uri == f"/data/{id_}" and score < results[0][0][3]


def test_load_index_prefers_hnsw_and_checks_queries(small_output):
    root, _, _ = small_output
    for kind in ("flat", "hnsw"):
        if not (root / "index" / f"fc7-{kind}.json").exists():
            build_index(str(root), kind, progress=False)
    loaded = load_index(str(root))
    assert loaded.kind == "hnsw" and loaded.params["ef_search"] == 128
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == 128
    with pytest.raises(UsageError, match="4096-d"):
        loaded.search(np.ones((1, 10), np.float32), k=3)
    single = loaded.search(np.ones(FC7, np.float32), k=3)  # one query as a 1-d vector
    assert len(single) == 1 and [r[0] for r in single[0]] == [1, 2, 3]


def test_ivf_pq_on_a_few_thousand_vectors(tmp_path):
    d, n = 64, 3000
    desc = clustered(n, d, clusters=30, seed=3)
    fc7 = np.zeros((n, FC7), np.float16)  # fc7 is not the point here: index the descriptor column
    ids = write_output(str(tmp_path), fc7, [1000, 0, 2000], descriptor=desc)
    params = build_index(str(tmp_path), "ivf-pq", "descriptor", progress=False)
    assert params["nlist"] == 3000 // 39 and params["m"] == 16 and params["nbits"] == 6
    assert params["refine"] == "sq8" and "Refine(SQ8)" in params["factory"]
    assert (tmp_path / "index" / "descriptor-ivf-pq.faiss").is_file()

    loaded = load_index(str(tmp_path), column="descriptor")
    assert loaded.kind == "ivf-pq" and loaded.index.ntotal == n
    ivf = faiss.extract_index_ivf(loaded.index)
    assert ivf.nprobe == params["nprobe"]
    results = loaded.search(desc[:200], k=10)
    assert np.mean([r[0][1] == ids[i] for i, r in enumerate(results)]) >= 0.95
    # recall@10 against exact search
    x = l2_normalize(desc.copy())
    truth = np.argsort(-(x[:200] @ x.T), axis=1)[:, :10]
    found = [[ids.index(h[1]) for h in r] for r in results]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth.tolist())])
    assert recall >= 0.9


def test_ivf_pq_refuses_tiny_outputs_and_bad_params(small_output):
    root = str(small_output[0])
    with pytest.raises(UsageError, match="at least 1000 vectors.*--kind flat"):
        build_index(root, "ivf-pq", progress=False)
    with pytest.raises(UsageError, match="unknown hnsw index parameter"):
        build_index(root, "hnsw", params={"nprobe": 3}, progress=False)
    with pytest.raises(UsageError, match="unknown index kind"):
        build_index(root, "lsh", progress=False)
    with pytest.raises(UsageError, match="not an integer"):
        make_index(np.eye(4, dtype=np.float32), "hnsw", {"M": "many"})


def test_make_index_params_and_overrides():
    x = l2_normalize(clustered(300, 32, clusters=5))
    index, params = make_index(x, "hnsw", {"M": "16", "ef_search": 40})
    assert params["factory"] == "HNSW16,Flat" and params["ef_search"] == 40
    assert index.ntotal == 300 and faiss.downcast_index(index).hnsw.efSearch == 40
    _, rows = index.search(x[:20], 1)
    assert rows[:, 0].tolist() == list(range(20))


def test_load_index_when_absent_is_a_usage_error(small_output, tmp_path):
    with pytest.raises(UsageError, match=r"no index in .*build one with `vgg-pipeline index "):
        load_index(str(tmp_path))
    with pytest.raises(UsageError, match="no ivf-pq index.*--kind ivf-pq --column descriptor"):
        load_index(str(small_output[0]), column="descriptor", kind="ivf-pq")


def test_memory_output_round_trip():
    root = f"memory://vgg-{uuid.uuid4().hex[:8]}/out"
    fs = fsspec.filesystem("memory")
    fc7 = clustered(60, FC7, clusters=4, seed=5).astype(np.float32)
    ids = write_output(root, fc7, [25, 0, 35], fc7_dtype=np.float32, fs=fs)
    try:
        files = embedding_files(root)  # fsspec spells memory URLs "memory:///..."
        assert [f.startswith("memory://") and f.endswith(f"out/embeddings/part-{i:05d}.parquet")
                for i, f in enumerate(files)] == [True] * 3
        assert fsspec.open(files[2]).fs.size(files[2]) > 0
        emb = load_embeddings(root)
        assert isinstance(emb, Embeddings) and emb.ids == ids
        np.testing.assert_array_equal(emb.vectors, fc7)
        build_index(root, "flat", progress=False)
        assert fs.exists(f"{root}/index/fc7-flat.faiss") and fs.exists(f"{root}/index/fc7-flat.json")
        loaded = load_index(root)
        assert loaded.kind == "flat"
        hits = loaded.search(fc7[10:12], k=3)
        assert [h[0][1] for h in hits] == ids[10:12]
    finally:
        fs.rm(root.split("/out")[0], recursive=True)
