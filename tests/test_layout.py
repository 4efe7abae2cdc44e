"""The output layout (pipeline/input/layout.py): every name in OUTPUT, pinned byte for byte, and
part numbers parsed one way for every reader."""

from __future__ import annotations

import pytest

from pipeline.input import layout


def test_names_are_pinned():
    """Users, scripts and existing outputs depend on these exact names: changing one is a break."""
    assert (layout.PLAN_DIR, layout.EMBEDDINGS_DIR, layout.ERRORS_DIR, layout.INDEX_DIR, layout.SUCCESS) == \
        ("_plan", "embeddings", "errors", "index", "_SUCCESS.json")
    assert layout.PLAN_META == "_plan/_meta.json"
    assert set(layout.ENTRIES) == {"_plan", "embeddings", "errors", "index", "_SUCCESS.json"}
    assert layout.part_name(0) == "part-00000.parquet" and layout.part_name(123456) == "part-123456.parquet"
    assert layout.embeddings_part(7) == "embeddings/part-00007.parquet"
    assert layout.errors_part(7) == "errors/part-00007.parquet"
    assert layout.embeddings_glob() == "embeddings/part-*.parquet"
    assert layout.index_paths("fc7", "ivf-pq") == {
        "faiss": "index/fc7-ivf-pq.faiss", "ids": "index/fc7-ivf-pq.ids.parquet", "json": "index/fc7-ivf-pq.json"}


@pytest.mark.parametrize("n", [0, 1, 99999, 100000, 1234567])
def test_part_number_inverts_part_name(n):
    assert layout.part_number(layout.part_name(n)) == n
    assert layout.part_number(f"/out/embeddings/{layout.part_name(n)}") == n  # a path
    assert layout.part_number(f"bucket/out/errors/{layout.part_name(n)}/") == n  # a listing's key


@pytest.mark.parametrize("name", [
    ".part-00001.parquet.tmp-0badf00d",   # a temporary file
    "part-00001.parquet.tmp-0badf00d",
    "part-1.parquet",                     # too few digits: not ours
    "part-00001.parquet.bak", "part-abcde.parquet", "xpart-00001.parquet", "_meta.json", "part-.parquet",
])
def test_part_number_refuses_every_other_name(name):
    assert layout.part_number(name) is None


def test_temp_names_are_hidden_unique_and_recognised():
    name = layout.temp_name("part-00004.parquet")
    assert name.startswith(".part-00004.parquet.tmp-") and len(name) == len(".part-00004.parquet.tmp-") + 8
    assert layout.temp_name("part-00004.parquet") != name
    assert layout.temp_name("x.json", token="0badf00d") == ".x.json.tmp-0badf00d"
    assert layout.is_temp_name(name) and layout.is_temp_name(".fc7-flat.faiss.tmp-01234567")
    for other in ("part-00004.parquet", ".part-00004.parquet", ".DS_Store", "x.tmp-1234"):
        assert not layout.is_temp_name(other), other
