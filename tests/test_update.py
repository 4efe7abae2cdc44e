"""Growing collections (docs/design.md §3): ``extract --update`` adds what is new, never rewrites what is done.

A folder, a manifest and an S3 bucket (moto server) each grow between runs; every update is
followed by ``verify`` and exact per-id counts, and the part files of earlier runs are checked
byte for byte (mtime_ns + sha256).  A driver SIGKILLed in the middle of an update (a hang
injected after its first new shard, not a race against the clock) is rerun with ``--update``;
the other crash windows of :mod:`pipeline.input.plan` are set up exactly, in process.  The
FAISS index follows the growth with adds, or rebuilds and says why.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.input.forms import open_input
from pipeline.input.plan import iter_shards, plan_update, read_meta
from pipeline.output.verify import verify
from pipeline.run import driver
from pipeline.retrieval.index import build_index, load_index
from tests.corpus import small_photo
from tests.helpers import (FC7, assert_exactly_once, clustered, kill_after_parts, parts_written, run_cli,
                           small_flags, snapshot, summary, write_output)

SMALL = {"model": {"arch": "vgg11"}, "runtime": {"batch_size": 2, "num_actors": 1}, "input__shard_size": 2}


def add_images(root: Path, first: int, n: int) -> list[str]:
    """Photos ``first .. first+n-1`` as 64x64 PNGs ``img<i>.png`` in ``root``; returns their ids."""
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(first, first + n):
        small_photo(i).resize((64, 64)).save(root / f"img{i:03d}.png")
        ids.append(f"img{i:03d}.png")
    return ids


def assert_unchanged(before: dict, out: Path) -> None:
    after = snapshot(out)
    assert {name: after.get(name) for name in before} == before  # never rewritten, never removed


def runs(out: Path) -> list[dict]:
    return summary(out)["runs"]


# ----------------------------------------------------------------------------- a folder

def test_folder_grows_and_the_index_follows(ray_local, tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    first = add_images(src, 0, 3)
    pipeline.extract(str(src), str(out), weights="random:0", **SMALL)
    assert main(["index", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("built flat index of 3 x 4096")
    before = snapshot(out)

    new = add_images(src, 3, 3)
    (src / first[0]).unlink()  # removed from the input: its row stays
    result = pipeline.extract(str(src), str(out), weights="random:0", update=True, **SMALL)
    assert_unchanged(before, out)
    assert_exactly_once(out, first + new)
    last = result["runs"][-1]
    assert (last["mode"], last["generation"], last["new_images"], last["new_shards"]) == ("update", 1, 3, 2)
    assert result["run"]["shards_resumed"] == 2 and result["run"]["images_this_run"] == 3
    assert [r["new_images"] for r in runs(out)] == [3, 3]  # the first run's record is kept
    assert [(g["gen"], g["first_shard"], g["num_shards"], g["num_items"])
            for g in summary(out)["generations"]] == [(0, 0, 2, 3), (1, 2, 2, 3)]
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == [f"part-{i:05d}.parquet" for i in range(4)]
    assert sorted(os.listdir(out / "_plan" / "gen-0001")) == ["part-00000.parquet"]
    assert [s.ids for s in iter_shards(str(out))][2:] == [new[:2], new[2:]]

    # the index gains the new rows only, and each finds itself
    assert main(["index", str(out), "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("added 3 rows to the flat index, now 6 x 4096") and "\n" not in line, line
    index = load_index(str(out), kind="flat")
    assert Counter(index.ids) == Counter(first + new)
    vectors = np.stack([index.index.reconstruct(i) for i in range(index.index.ntotal)])
    assert [hits[0][1] for hits in index.search(vectors, 1)] == index.ids
    assert main(["index", str(out), "--quiet"]) == 0
    assert "is up to date" in capsys.readouterr().out

    # nothing new: exit 0, no new shard, every file as it was, one more run record, and no
    # worker started (nor Ray: the driver's Ray entry point is made to fail)
    before = snapshot(out)
    plan_before = (out / "_plan" / "_meta.json").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(driver, "_init_ray", lambda address: pytest.fail("Ray started with nothing to run"))
    assert main(["extract", str(src), str(out), *small_flags("runtime.num_actors=1"), "--update",
                 "--no-progress"]) == 0
    assert "update: nothing new in the input" in capsys.readouterr().out
    assert snapshot(out) == before and (out / "_plan" / "_meta.json").read_bytes() == plan_before
    assert [r["new_images"] for r in runs(out)] == [3, 3, 0]
    assert runs(out)[-1]["shards_resumed"] == 4 and runs(out)[-1]["shards_done"] == 0
    assert verify(str(out)).ok
    # a plain rerun of the finished job likewise only redoes the accounting
    assert main(["extract", str(src), str(out), *small_flags("runtime.num_actors=1"), "--no-progress"]) == 0
    assert snapshot(out) == before and [r["mode"] for r in runs(out)][-1] == "extract"
    monkeypatch.undo()

    # other weights are refused as without --update: one line, exit 2, nothing touched
    assert main(["extract", str(src), str(out), *small_flags(), "--weights", "random:1", "--update",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different model, weights or preprocessing" in err[0], err
    assert main(["extract", str(src), str(out), *small_flags(), "--update", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--update and --overwrite" in err[0], err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- a manifest

def test_manifest_grows_with_duplicates_and_a_first_update_is_a_first_run(ray_local, tmp_path):
    src = tmp_path / "photos"
    add_images(src, 0, 6)
    manifest = tmp_path / "m.csv"

    def write_manifest(rows: list[tuple[str, str]]) -> None:
        manifest.write_text("id,uri\n" + "".join(f"{i},photos/{u}\n" for i, u in rows))

    rows = [("a", "img000.png"), ("b", "img001.png"), ("a", "img002.png")]  # a later copy of "a"
    write_manifest(rows)
    out = tmp_path / "out"
    result = pipeline.extract(str(manifest), str(out), weights="random:0", update=True, **SMALL)
    assert (result["runs"][-1]["generation"], result["runs"][-1]["new_images"]) == (0, 3)  # an empty OUTPUT
    assert_exactly_once(out, ["a", "b", "a"], errors=1)
    before = snapshot(out)

    # grown: "b" again (held: not new), "c", "d" twice (a later copy: an error row), "missing"
    rows += [("c", "img003.png"), ("b", "img004.png"), ("d", "img005.png"), ("d", "img005.png"),
             ("missing", "nope.png")]
    write_manifest(rows)
    result = pipeline.extract(str(manifest), str(out), weights="random:0", update=True, **SMALL)
    assert_unchanged(before, out)
    assert result["runs"][-1]["new_images"] == 4 and result["counts"]["duplicates"] == 2
    expected = ["a", "b", "a", "c", "d", "d", "missing"]
    _, errors = assert_exactly_once(out, expected, errors=3)
    assert sorted((e["id"], e["stage"]) for e in errors) == [("a", "list"), ("d", "list"), ("missing", "read")]
    gens = read_meta(str(out))["generations"]
    assert [(g["first_shard"], g["num_items"], g["num_duplicates"]) for g in gens] == [(0, 3, 1), (2, 4, 1)]
    b_row = pd.read_parquet(out / "embeddings").set_index("id").loc["b"]
    assert b_row["uri"].endswith("img001.png")  # a held id keeps its row even if its uri changed


# ----------------------------------------------------------------------------- a bucket

BUCKET = "vgg-update-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; yields fsspec storage options."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "test", "secret": "test"}
    boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="test",
                 aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        yield options
    finally:
        server.stop()


def test_bucket_grows(ray_local, s3, tmp_path):
    import s3fs
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["endpoint_url"]}, key="test", secret="test")
    local = tmp_path / "photos"
    for name in add_images(local, 0, 3):
        fs.put_file(str(local / name), f"{BUCKET}/in/{name}")
    src, out = f"s3://{BUCKET}/in/", f"s3://{BUCKET}/out"
    pipeline.extract(src, out, weights="random:0", storage_options=s3, **SMALL)
    fs.invalidate_cache()
    first = {p: fs.info(p)["ETag"] for p in fs.find(f"{BUCKET}/out/embeddings")}

    new = add_images(local, 3, 2)
    for name in new:
        fs.put_file(str(local / name), f"{BUCKET}/in/sub/{name}")
    result = pipeline.extract(src, out, weights="random:0", storage_options=s3, update=True, **SMALL)
    assert result["runs"][-1]["new_images"] == 2
    report = verify(out, s3)
    assert report.ok, report.problems
    assert (report.images, report.embedded, report.shards) == (5, 5, 3)
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in first} == first  # the first run's objects are untouched
    emb = pd.read_parquet(f"{out}/embeddings/", storage_options=s3)
    assert Counter(emb["id"]) == Counter([f"img{i:03d}.png" for i in range(3)] + [f"sub/{n}" for n in new])
    assert fs.exists(f"{BUCKET}/out/_plan/gen-0001/part-00000.parquet")


# ----------------------------------------------------------------------------- crashes

@pytest.mark.slow
def test_driver_killed_during_an_update_is_finished_by_the_next_update(ray_local, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    first = add_images(src, 0, 2)
    pipeline.extract(str(src), str(out), weights="random:0", **SMALL)
    new = add_images(src, 2, 6)  # shards 1, 2, 3 of the update; the second one hangs
    args = [str(src), str(out), *small_flags("runtime.num_actors=1"), "--update"]
    log = tmp_path / "update.log"
    kill_after_parts(args, out, 2, log, hang_id=new[2])  # its own session: the kill takes its Ray along
    assert parts_written(out) == 2  # the old shard and the first new one; the second one hung
    assert not verify(str(out)).ok  # the committed generation is not finished
    before = snapshot(out)

    later = add_images(src, 8, 1)  # arrives while the update was down
    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "update: 1 new images in 1 new shards" in rerun.stdout, rerun.stdout
    assert_unchanged(before, out)
    assert_exactly_once(out, first + new + later)
    gens = summary(out)["generations"]
    assert [(g["gen"], g["first_shard"], g["num_items"]) for g in gens] == [(0, 0, 2), (1, 1, 6), (2, 4, 1)]
    last = runs(out)[-1]
    # resumed: the first run's shard and the update's first; run: the update's other 4 + the 1 new
    assert (last["new_images"], last["shards_resumed"], last["images_this_run"]) == (1, 2, 4 + 1), last


def test_killed_before_commit_or_before_any_new_shard_resumes_without_update(ray_local, tmp_path):
    """Crash window 1 (an uncommitted ``gen-*`` plan left behind) and window 2 (the generation
    committed, none of its shards run), then a plain rerun: both end exactly once."""
    src, out = tmp_path / "src", tmp_path / "out"
    first = add_images(src, 0, 2)
    pipeline.extract(str(src), str(out), weights="random:0", **SMALL)
    stray = out / "_plan" / "gen-0001"
    stray.mkdir()
    (stray / "part-00000.parquet").write_bytes((out / "_plan" / "part-00000.parquet").read_bytes())

    new = add_images(src, 2, 3)
    cfg = load_config(overrides=["input.shard_size=2", "input.extensions=png"])
    meta, gen = plan_update(open_input(str(src)), str(out), cfg)  # what an update killed right after its commit leaves
    assert gen["gen"] == 1 and gen["num_items"] == 3 and meta["num_shards"] == 3
    assert gen["parts"] == ["gen-0001/part-00000.parquet"]  # the stray part was replaced, not kept
    assert [s.ids for s in iter_shards(str(out))] == [first, new[:2], new[2:]]
    assert not verify(str(out)).ok
    before = snapshot(out)

    result = pipeline.extract(str(src), str(out), weights="random:0", **SMALL)  # no --update
    assert_unchanged(before, out)
    assert_exactly_once(out, first + new)
    assert result["run"]["images_this_run"] == 3 and result["runs"][-1]["new_images"] == 0

    # window 1: plan parts of a generation that never got into _meta.json are ignored and removed
    stray = out / "_plan" / "gen-0002"
    stray.mkdir()
    (stray / "part-00000.parquet").write_bytes((out / "_plan" / "part-00000.parquet").read_bytes())
    assert verify(str(out)).ok  # readers only read what _meta.json lists
    result = pipeline.extract(str(src), str(out), weights="random:0", update=True, **SMALL)
    assert not stray.exists() and result["runs"][-1]["new_images"] == 0
    assert_exactly_once(out, first + new)


# ----------------------------------------------------------------------------- the index, no model

def grow(root: Path, fc7: np.ndarray, sizes: list[int]) -> None:
    """Write the parts of ``sizes`` rows (all of them; existing ones keep their files)."""
    keep = {p.name: p.read_bytes() for p in (root / "embeddings").glob("*.parquet")} \
        if (root / "embeddings").exists() else {}
    write_output(str(root), fc7, sizes)
    for name, data in keep.items():
        (root / "embeddings" / name).write_bytes(data)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_index_adds_new_part_files_only(tmp_path, kind):
    x = clustered(300, FC7, 10)
    grow(tmp_path, x[:200], [100, 100])
    assert build_index(str(tmp_path), kind, progress=False)["action"] == "built"
    grow(tmp_path, x, [100, 100, 100])
    added = build_index(str(tmp_path), kind, progress=False)
    assert (added["action"], added["rows_added"], added["rows"]) == ("added", 100, 300)
    stored = json.loads((tmp_path / "index" / f"fc7-{kind}.json").read_text())
    assert [c["file"] for c in stored["covers"]] == [f"part-{i:05d}.parquet" for i in range(3)]
    loaded = load_index(str(tmp_path), kind=kind)
    assert loaded.ids == [f"img/{i:05d}.jpg" for i in range(300)]
    hits = loaded.search(x[200:], 1)
    assert [h[0][1] for h in hits] == loaded.ids[200:]  # the added rows are searchable
    assert build_index(str(tmp_path), kind, progress=False)["action"] == "unchanged"


def test_index_rebuilds_when_an_add_would_not_do(tmp_path):
    x = clustered(3000, 64, 20)
    write_output(str(tmp_path), np.zeros((1200, FC7), np.float16), [600, 600], descriptor=x[:1200])
    assert build_index(str(tmp_path), "ivf-pq", "descriptor", progress=False)["action"] == "built"
    write_output(str(tmp_path), np.zeros((3000, FC7), np.float16), [600, 600, 1800], descriptor=x)
    rebuilt = build_index(str(tmp_path), "ivf-pq", "descriptor", progress=False)
    # 3000 vectors > 2 x the 1200 it was trained on: adds would leave it badly trained
    assert rebuilt["action"] == "rebuilt" and rebuilt["trained_rows"] == 3000, rebuilt
    assert load_index(str(tmp_path), "descriptor", "ivf-pq").index.ntotal == 3000

    flat = tmp_path / "flat"
    write_output(str(flat), clustered(20, FC7, 2), [10, 10])
    build_index(str(flat), "flat", progress=False)
    md = pq.read_metadata(flat / "embeddings" / "part-00001.parquet")
    table = pq.read_table(flat / "embeddings" / "part-00001.parquet")
    meta = json.loads(md.metadata[b"vgg_pipeline"])
    meta["created_at"] = "rewritten"
    pq.write_table(table.replace_schema_metadata({b"vgg_pipeline": json.dumps(meta)}),
                   flat / "embeddings" / "part-00001.parquet")
    again = build_index(str(flat), "flat", progress=False)
    assert again["action"] == "rebuilt" and "part-00001.parquet was rewritten" in again["reason"]


def test_an_empty_input_grows_and_a_dry_run_update_only_plans(ray_local, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    assert pipeline.extract(str(src), str(out), weights="random:0", **SMALL)["counts"]["images"] == 0
    new = add_images(src, 0, 3)
    assert main(["extract", str(src), str(out), *small_flags(), "--update", "--dry-run"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert (planned["new_images"], planned["new_shards"], planned["images"]) == (3, 2, 3)
    assert not (out / "embeddings").exists() or not os.listdir(out / "embeddings")  # no model ran
    # the dry run committed the generation (shards 0-1, after the empty generation 0): the next
    # update finds nothing newer and runs those shards
    result = pipeline.extract(str(src), str(out), weights="random:0", update=True, **SMALL)
    assert result["runs"][-1]["new_images"] == 0 and result["run"]["images_this_run"] == 3
    assert [(g["gen"], g["first_shard"], g["num_shards"]) for g in summary(out)["generations"]] == \
        [(0, 0, 0), (1, 0, 2)]
    assert_exactly_once(out, new)


# ----------------------------------------------------------------------------- the plan, no model

def test_update_plan_is_found_bucket_group_by_group(tmp_path, monkeypatch):
    """Many small DuckDB groups, several plan parts and row groups: the new generation holds
    exactly the unheld ids in listing order, later copies flagged, and ``plan_repeats`` (what
    ``verify`` runs) sees an id planned twice once the flags are wrong."""
    from pipeline.input import plan
    monkeypatch.setattr(plan, "DEDUP_GROUP_ROWS", 64)
    monkeypatch.setattr(plan, "PART_ROWS", 300)
    monkeypatch.setattr(plan, "GROUP_ROWS", 100)
    manifest = tmp_path / "m.txt"
    old = [f"a/{i:04d}.jpg" for i in range(1000)] + ["a/0007.jpg"]  # one later copy
    manifest.write_text("\n".join(old) + "\n")
    out = tmp_path / "out"
    cfg = load_config(overrides=["input.shard_size=64", "input.extensions=jpg"])
    list(plan.build_plan(open_input(str(manifest)), str(out), cfg, "fp"))
    assert plan.plan_repeats(str(out)) == (0, [])

    grown = old + [f"b/{i:04d}.jpg" for i in range(500)] + old[:300] + ["b/0003.jpg"]
    manifest.write_text("\n".join(grown) + "\n")
    meta, gen = plan.plan_update(open_input(str(manifest)), str(out), cfg)
    assert (gen["first_shard"], gen["num_items"], gen["num_duplicates"]) == (16, 501, 1)
    assert len(meta["parts"]) == 4 + 2 and meta["num_items"] == 1001 + 501
    new_shards = [s for s in plan.iter_shards(str(out)) if s.index >= 16]
    assert [i for s in new_shards for i in s.ids] == [f"b/{i:04d}.jpg" for i in range(500)] + ["b/0003.jpg"]
    assert [d for s in new_shards for d in s.duplicate] == [False] * 500 + [True]
    assert [len(s) for s in new_shards] == [64] * 7 + [53]
    assert plan.plan_update(open_input(str(manifest)), str(out), cfg)[1] is None  # nothing new the second time
    assert plan.plan_repeats(str(out)) == (0, [])

    first = out / "_plan" / "part-00003.parquet"  # holds the flagged copy of a/0007.jpg
    table = pq.read_table(first)
    pq.write_table(table.set_column(4, "duplicate", pa.array([False] * table.num_rows)), first)
    assert plan.plan_repeats(str(out)) == (1, ["a/0007.jpg"])
