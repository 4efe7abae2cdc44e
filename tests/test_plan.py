"""The plan (pipeline/input/plan.py, docs/design.md §3): shards cut from the listing, written to
``OUTPUT/_plan/`` in parts with ``_meta.json`` last, read back shard by shard; duplicate ids."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.input import plan as plan_mod
from pipeline.input.forms import open_input
from pipeline.input.plan import Shard, build_plan, iter_shards, read_meta, shard_digest
from tests.corpus import SIDECAR_SKIPS


def cfg(shard_size: int) -> dict:
    return load_config(None, [f"input.shard_size={shard_size}"])


def test_manifest_duplicate_ids_are_flagged_after_their_first_copy(tmp_path):
    lines = ["a.jpg", "b.jpg", "a.jpg", "c.jpg", "b.jpg", "a.jpg", "d.jpg"]
    (tmp_path / "m.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    shards = list(build_plan(open_input(str(tmp_path / "m.txt")), str(out), cfg(3), "fp"))
    assert [s.ids for s in shards] == [lines[0:3], lines[3:6], lines[6:7]]
    assert [d for s in shards for d in s.duplicate] == [False, False, True, False, True, True, False]
    meta = read_meta(str(out))
    assert meta["num_duplicates"] == 3 and meta["num_items"] == 7 and meta["num_shards"] == 3
    assert meta["kind"] == "manifest" and meta["fingerprint"] == "fp"
    again = list(iter_shards(str(out)))
    assert [(s.index, s.ids, s.uris, s.duplicate) for s in again] == \
        [(s.index, s.ids, s.uris, s.duplicate) for s in shards]
    assert [s.index for s in iter_shards(str(out), skip={1})] == [0, 2]


def test_duplicates_are_found_across_hash_buckets_and_plan_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_mod, "PART_ROWS", 7)
    monkeypatch.setattr(plan_mod, "GROUP_ROWS", 3)
    monkeypatch.setattr(plan_mod, "ID_BUCKETS", 4)
    monkeypatch.setattr(plan_mod, "DEDUP_GROUP_ROWS", 10)  # several DuckDB passes, a few buckets each
    ids = [f"img{i:03d}.jpg" for i in range(40)]
    rows = ids + ids[::3] + ["img000.jpg"]  # 14 + 1 later copies
    pq.write_table(pa.table({"uri": [f"/data/{i}" for i in rows], "id": rows}), tmp_path / "m.parquet")
    out = tmp_path / "out"
    shards = list(build_plan(open_input(str(tmp_path / "m.parquet")), str(out), cfg(5), "fp"))
    flags = [d for s in shards for d in s.duplicate]
    assert flags == [False] * 40 + [True] * 15
    assert [i for s in shards for i in s.ids] == rows
    meta = read_meta(str(out))
    assert meta["num_duplicates"] == 15 and len(meta["parts"]) == 8  # 55 rows / 7 per part
    assert [d for s in iter_shards(str(out)) for d in s.duplicate] == flags


def test_folder_plan_streams_first_shard_before_the_listing_ends(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    for i in range(30):
        (root / f"d{i // 10}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i // 10}" / f"{i:03d}.jpg").write_bytes(b"x")
    pulled = []
    source = open_input(str(root))
    real = source.items

    def counting(*args, **kwargs):
        for item in real(*args, **kwargs):
            pulled.append(item[0])
            yield item
    monkeypatch.setattr(source, "items", counting)
    out = tmp_path / "out"
    gen = build_plan(source, str(out), cfg(4), "fp")
    first = next(gen)
    assert first.ids == ["d0/000.jpg", "d0/001.jpg", "d0/002.jpg", "d0/003.jpg"]
    assert len(pulled) == 4  # the listing has only reached the first shard's images
    assert read_meta(str(out)) is None  # the plan is not complete yet: no _meta.json
    rest = list(gen)
    assert len(pulled) == 30 and [s.index for s in rest] == list(range(1, 8))
    meta = read_meta(str(out))
    assert meta["num_items"] == 30 and meta["num_shards"] == 8 and meta["kind"] == "folder"
    assert [s.ids for s in iter_shards(str(out))] == [first.ids] + [s.ids for s in rest]


def test_plan_records_skipped_counts_and_replaces_an_old_plan(tmp_path, listing_corpus):
    root, good = listing_corpus
    out = tmp_path / "out"
    (out / "_plan").mkdir(parents=True)
    (out / "_plan" / "part-00099.parquet").write_bytes(b"stale")
    shards = list(build_plan(open_input(str(root)), str(out), cfg(10), "fp"))
    assert sum(len(s) for s in shards) == len(good)
    meta = json.loads((out / "_plan" / "_meta.json").read_text())
    assert meta["skipped"] == SIDECAR_SKIPS
    assert sorted(os.listdir(out / "_plan")) == ["_meta.json"] + meta["parts"]


def test_empty_manifest_and_empty_folder_plan_no_shards(tmp_path):
    (tmp_path / "m.txt").write_text("# nothing yet\n\n")
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "m.txt", tmp_path / "empty"):
        out = tmp_path / f"out-{src.name}"
        assert list(build_plan(open_input(str(src)), str(out), cfg(4), "fp")) == []
        meta = read_meta(str(out))
        assert (meta["num_items"], meta["num_shards"], meta["parts"]) == (0, 0, [])



def test_plan_files_and_meta_are_written_last(tmp_path, monkeypatch):
    """Parts ``part-NNNNN.parquet`` of PART_ROWS rows; ``_meta.json`` only once the listing is done,
    listing the parts; the part files hold the plan schema, one row per image in listing order."""
    monkeypatch.setattr(plan_mod, "PART_ROWS", 4)
    monkeypatch.setattr(plan_mod, "GROUP_ROWS", 2)
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(9):
        (root / f"{i}.jpg").write_bytes(b"x")
    out = tmp_path / "out"
    gen = build_plan(open_input(str(root)), str(out), cfg(2), "fp")
    next(gen)
    assert not (out / "_plan" / "_meta.json").exists()
    list(gen)
    meta = read_meta(str(out))
    assert meta["parts"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(os.listdir(out / "_plan")) == ["_meta.json", *meta["parts"]]
    table = pa.concat_tables(pq.read_table(out / "_plan" / p) for p in meta["parts"])
    assert table.schema.names == ["shard", "seq", "id", "uri", "duplicate"]
    assert table.column("id").to_pylist() == [f"{i}.jpg" for i in range(9)]
    assert table.column("seq").to_pylist() == list(range(9))
    assert table.column("shard").to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert (meta["num_items"], meta["num_shards"], meta["shard_size"]) == (9, 5, 2)


def test_reading_back_ignores_temporary_and_foreign_files(tmp_path):
    (tmp_path / "m.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    out = tmp_path / "out"
    source = open_input(str(tmp_path / "m.txt"))
    planned = [(s.index, s.ids) for s in build_plan(source, str(out), cfg(2), "fp")]
    (out / "_plan" / ".part-00001.parquet.tmp-0badf00d").write_bytes(b"half a file")  # a killed writer's
    (out / "_plan" / "notes.parquet").write_bytes(b"not ours")
    assert [(s.index, s.ids) for s in iter_shards(str(out))] == planned == [(0, ["a.jpg", "b.jpg"]), (1, ["c.jpg"])]


def test_read_meta_of_an_unplanned_output_is_none(tmp_path):
    assert read_meta(str(tmp_path / "nothing")) is None


def test_shard_digest_is_the_identity_of_its_ids_in_order():
    assert Shard(0, ["a", "b"], ["/a", "/b"]).digest == shard_digest(["a", "b"])
    assert shard_digest(["a", "b"]) != shard_digest(["b", "a"])
    assert shard_digest(["a", "b"]) != shard_digest(["ab"])  # ids are delimited, not concatenated
    assert len(shard_digest([])) == 16
