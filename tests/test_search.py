"""index + search end to end: images find themselves, near-duplicates find their originals."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.errors import UsageError
from pipeline.model.extractor import Extractor
from pipeline.model.weights import weights_identity
from pipeline.retrieval.search import QueryEmbedder, search
from tests.helpers import extract_thumbnails


@pytest.fixture(scope="module")
def searchable(ray_local, vgg11_weights, tmp_path_factory):
    return extract_thumbnails(tmp_path_factory.mktemp("search"), 8, vgg11_weights,
                              input={"shard_size": 3}, runtime={"batch_size": 4})


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_every_image_finds_itself_first(searchable, kind, capsys):
    photos, out = searchable
    assert main(["index", str(out), "--kind", kind, "--quiet"]) == 0
    assert (out / "index" / f"fc7-{kind}.faiss").exists()
    files = sorted(photos.iterdir())
    capsys.readouterr()
    assert main(["search", str(out), *map(str, files), "--k", "3", "--json", "--kind", kind]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in results] == list(map(str, files))
    for r, f in zip(results, files):
        top = r["results"][0]
        assert set(top) == {"rank", "id", "uri", "score"}
        assert (top["rank"], top["id"], top["uri"]) == (1, f.name, str(f))
        assert top["score"] == pytest.approx(1.0, abs=1e-4)  # float32 storage; batch of 4 vs of 1
        assert len(r["results"]) == 3
    by_id = search(str(out), [files[2].name], k=1, kind=kind)
    assert by_id[0]["results"][0]["id"] == files[2].name
    assert by_id[0]["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_resized_reencoded_copy_finds_its_original(searchable, tmp_path):
    photos, out = searchable
    if not (out / "index" / "fc7-flat.json").exists():
        assert main(["index", str(out), "--kind", "flat", "--quiet"]) == 0
    for original in sorted(photos.iterdir())[:4]:
        copy = tmp_path / (original.stem + "-copy.png")
        img = Image.open(original)
        img.resize((img.width * 2 // 3, img.height * 2 // 3)).save(copy)
        hit = search(str(out), [str(copy)], k=1, kind="flat")[0]["results"][0]
        assert hit["id"] == original.name, (copy, hit)


def test_clear_errors(searchable, tmp_path, capsys):
    photos, out = searchable
    bare = tmp_path / "bare"
    import shutil
    shutil.copytree(out, bare)
    shutil.rmtree(bare / "index", ignore_errors=True)
    assert main(["search", str(bare), "whatever.jpg"]) == 2
    assert "vgg-pipeline index" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["search", str(bare), str(bad), "--build-index"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be used" in err[0]
    assert (bare / "index" / "fc7-flat.faiss").exists()  # --build-index made one
    assert main(["search", str(bare), "no-such-id"]) == 2
    assert main(["search", str(bare), str(photos / "astronaut.jpg"), "--weights", "random:5"]) == 2
    assert "differ from the weights" in capsys.readouterr().err


def test_duckdb_and_pandas_read_the_output_as_is(searchable):
    import duckdb
    import pandas as pd
    _, out = searchable
    glob = str(out / "embeddings" / "*.parquet")
    con = duckdb.connect()
    types = dict(row[:2] for row in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{glob}')").fetchall())
    assert types["id"] == "VARCHAR" and types["fc7"] in ("FLOAT[]", "FLOAT[4096]")
    assert types["logits"] in ("FLOAT[]", "FLOAT[1000]")
    assert con.execute(f"SELECT min(len(fc7)), max(len(fc7)) FROM read_parquet('{glob}')").fetchone() == (4096, 4096)
    assert types["width"] == "INTEGER"
    assert con.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone()[0] == 8
    df = pd.read_parquet(out / "embeddings")
    assert len(df) == 8 and len(df["fc7"].iloc[0]) == 4096 and len(df["logits"].iloc[0]) == 1000


def test_queries_are_embedded_with_the_model_the_part_files_record(vgg11_weights):
    w = weights_identity(str(vgg11_weights), "vgg11", None)
    recorded = {"spec": str(vgg11_weights), "name": w.name, "sha256": w.sha256}
    dense = {"model": {"arch": "vgg11", "descriptor": "dense-multiscale", "layer": "fc7 (after relu7)",
                       "scales": [224, 288], "scale_aggregation": "stack"}, "weights": recorded}
    q = QueryEmbedder(dense, "descriptor", None, None)
    assert (q.mapper.scales, q.mapper.aggregation, q.mapper.descriptor_dim) == ([224, 288], "stack", 2 * 4096)
    assert type(QueryEmbedder(dense, "fc7", None, None).mapper) is Extractor  # fc7 needs no dense pass
    fc7 = {"model": {"arch": "vgg11", "descriptor": "fc7", "layer": "fc7 (after relu7)"}, "weights": recorded}
    with pytest.raises(UsageError, match="no descriptor column"):
        QueryEmbedder(fc7, "descriptor", None, None)


def test_a_query_image_is_decoded_as_the_workers_decoded_the_output(vgg11_weights, tmp_path):
    """Large JPEGs are decoded at a reduced DCT scale chosen from the mapper's smallest resize; a
    query must use the same scale as the workers did, or its vector drifts from the stored one."""
    from pipeline.decode.preprocess import RESIZE
    from pipeline.input.reader import read_shard
    from pipeline.input.storage import FileSystems
    from tests.corpus import small_photo

    big = tmp_path / "big.jpg"
    small_photo(0).resize((2400, 2048)).save(big, quality=90)  # 1/4 scale fits fc7's 256, not 512
    w = weights_identity(str(vgg11_weights), "vgg11", None)
    meta = {"model": {"arch": "vgg11", "descriptor": "fc7", "layer": "fc7 (after relu7)"},
            "weights": {"spec": str(vgg11_weights), "name": w.name, "sha256": w.sha256}}
    q = QueryEmbedder(meta, "fc7", None, None)
    [decoded] = read_shard([str(big)], set(), FileSystems(None), max_pixels=100_000_000, max_bytes=100_000_000,
                           threads=1, prefetch=1, min_side=max(RESIZE, q.mapper.min_side))  # the worker's call
    stored = q.mapper.embed([decoded])["fc7"][0]
    query, _ = q(str(big))
    assert (query == stored).all()
