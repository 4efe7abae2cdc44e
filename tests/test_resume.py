"""Killing or interrupting the driver, then running the same command again (docs/design.md §5, §6).

The real CLI runs in its own session (``start_new_session``) so that the test can signal its whole
process group like a terminal's Ctrl-C, or SIGKILL it like an OOM killer; Ray's worker processes
live in process groups of their own, so the test waits until nothing of that session is left
before it looks at the files.  The first run cannot finish before the signal, however fast the
machine: its actor hangs on an image of a later shard (``VGG_PIPELINE_FAULT_HANG_ID``), and the
test signals once the shards before it are written.  The rerun has no fault.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.cli import main
from pipeline.errors import UsageError
from tests.helpers import (SMALL, assert_exactly_once, kill_after_parts, run_cli, small_flags, snapshot,
                           start_cli, summary, wait_for_parts, wait_session_gone, write_images)

N_IMAGES = 12  # 6 shards of 2


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("resume-images")
    return root, write_images(root, N_IMAGES)


def test_unfinished_plan_is_resumed_only_by_the_same_job(ray_local, tmp_path):
    """A job killed before its plan was complete leaves embeddings/ and no ``_plan/_meta.json``:
    the same command resumes it; another input or other weights are refused (exit 2)."""
    src = tmp_path / "src"
    ids = write_images(src, 4)
    out = tmp_path / "out"
    pipeline.extract(str(src), str(out), weights="random:0", **SMALL)
    shutil.rmtree(out / "_plan")  # what a driver killed mid-plan leaves behind
    (out / "_SUCCESS.json").unlink()
    (out / "embeddings" / ".part-00001.parquet.tmp-0badf00d").write_bytes(b"half a file")  # a killed writer's
    before = snapshot(out)

    with pytest.raises(UsageError, match="unfinished job"):
        pipeline.extract(str(src), str(out), weights="random:1", **SMALL)
    twin = tmp_path / "twin"  # same file names, so the same ids, but another input
    shutil.copytree(src, twin)
    with pytest.raises(UsageError, match="unfinished job"):
        pipeline.extract(str(twin), str(out), weights="random:0", **SMALL)

    result = pipeline.extract(str(src), str(out), weights="random:0", **SMALL)
    assert (result["run"]["shards_resumed"], result["run"]["images_this_run"]) == (2, 0)
    assert snapshot(out) == before
    assert_exactly_once(out, ids)  # also: the temporary file is gone

    foreign = tmp_path / "foreign"
    (foreign / "embeddings").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["x"]}), foreign / "embeddings" / "part-00000.parquet")
    with pytest.raises(UsageError, match="did not write"):
        pipeline.extract(str(src), str(foreign), weights="random:0", **SMALL)


@pytest.mark.slow
def test_killed_driver_resumes_without_rewriting_finished_shards(ray_local, images, tmp_path, capsys):
    src, ids = images
    out = tmp_path / "out"
    args = [str(src), str(out), *small_flags()]
    log = tmp_path / "first.log"
    kill_after_parts(args, out, 2, log, hang_id=ids[4])  # shards 0 and 1 get written, shard 2 never
    assert not (out / "_SUCCESS.json").exists()
    before = snapshot(out)
    finished = [name for name in before if name.startswith("embeddings/")]
    assert {"embeddings/part-00000.parquet", "embeddings/part-00001.parquet"} <= set(finished)
    assert "embeddings/part-00002.parquet" not in finished

    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = snapshot(out)
    assert {name: after.get(name) for name in before} == before  # finished shards never rewritten
    assert_exactly_once(out, ids)
    run = summary(out)["run"]
    assert run["shards_resumed"] == len(finished), run
    assert run["images_this_run"] == N_IMAGES - 2 * len(finished), run

    # The CLI in this process from here on (it needs no Ray to refuse, and reuses the session's
    # Ray to run): another model into the same OUTPUT is refused in one line, nothing touched.
    capsys.readouterr()
    assert main(["extract", str(src), str(out), *small_flags("model.arch=vgg13"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("vgg-pipeline: error:") and "--overwrite" in err, err
    assert snapshot(out) == after

    # Other weights with --overwrite: a complete new output, nothing of the old one resumed.
    args = [str(src), str(out), *small_flags(), "--weights", "random:1", "--overwrite", "--no-progress"]
    assert main(["extract", *args]) == 0
    assert_exactly_once(out, ids)
    done = summary(out)
    assert done["weights"]["name"] == "random:1" and done["run"]["shards_resumed"] == 0
    for path in (out / "embeddings").glob("part-*.parquet"):
        meta = json.loads(pq.read_schema(path).metadata[b"vgg_pipeline"])
        assert meta["weights"]["name"] == "random:1", path


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_rerun_completes(ray_local, images, tmp_path):
    src, ids = images
    out = tmp_path / "out"
    args = [str(src), str(out), *small_flags()]
    log = tmp_path / "first.log"
    proc = start_cli(args, log, hang_id=ids[2])  # shard 0 gets written, shard 1 never
    try:
        wait_for_parts(proc, out, 1, log)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        code = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wait_session_gone(proc.pid)
    output = log.read_text()
    assert code == 130, output[-3000:]
    assert "interrupted" in output and "Traceback" not in output, output[-3000:]
    assert not (out / "_SUCCESS.json").exists()
    for sub in ("embeddings", "errors"):
        names = os.listdir(out / sub) if (out / sub).exists() else []
        assert all(n.startswith("part-") and n.endswith(".parquet") for n in names), names

    first = {n for n in os.listdir(out / "embeddings")}
    assert "part-00000.parquet" in first and "part-00001.parquet" not in first, first
    assert main(["extract", *args, "--no-progress"]) == 0  # the rerun, on the session's Ray
    assert_exactly_once(out, ids)
    assert summary(out)["run"]["shards_resumed"] == len(first)
