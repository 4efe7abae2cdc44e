"""``verify`` (pipeline/output/verify.py): every planned image in exactly one of embeddings/ and
errors/, checked on outputs built here from a real plan and real part files (no model needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.errors import UsageError
from pipeline.input.forms import open_input
from pipeline.input.plan import build_plan
from pipeline.output.verify import shard_counts, verify
from pipeline.output.writer import embeddings_schema, errors_table, write_shard

IDS = [f"img{i}.jpg" for i in range(5)]  # shards of 2: [0, 1], [2, 3], [4]
ERROR_IDS = {"img3.jpg"}


def embeddings(ids: list[str]) -> pa.Table:
    n = len(ids)
    fc7 = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 4096, np.float16)), 4096)
    logits = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * 1000, np.float32)), 1000)
    return pa.table({"id": ids, "uri": [f"/in/{i}" for i in ids], "fc7": fc7, "logits": logits,
                     "width": pa.array([8] * n, pa.int32()), "height": pa.array([8] * n, pa.int32())},
                    schema=embeddings_schema())


def make_output(root: Path) -> Path:
    """A complete output: plan, one embeddings file per shard (img3 an error row), _SUCCESS.json."""
    (root / "m.txt").write_text("".join(i + "\n" for i in IDS))
    out = root / "out"
    source = open_input(str(root / "m.txt"))
    for shard in build_plan(source, str(out), load_config(None, ["input.shard_size=2"]), "fp"):
        good = [i for i in shard.ids if i not in ERROR_IDS]
        bad = [(i, f"/in/{i}", "decode", "UnidentifiedImageError", "x") for i in shard.ids if i in ERROR_IDS]
        write_shard(str(out), shard.index, embeddings(good), errors_table(bad, {}))
    (out / "_SUCCESS.json").write_text(json.dumps({"counts": {"embedded": 4, "errors": 1}}))
    return out


@pytest.fixture
def output(tmp_path) -> Path:
    return make_output(tmp_path)


def test_a_complete_output_is_ok(output):
    report = verify(str(output))
    assert report.ok, report.problems
    assert (report.images, report.embedded, report.errors, report.shards) == (5, 4, 1, 3)
    assert report.text() == "OK: 5 images in 3 shards: 4 embedded, 1 errors"
    assert [s["rows"] for s in shard_counts(str(output)).per_shard] == [2, 1, 1]


def problems(output: Path) -> list[str]:
    report = verify(str(output))
    assert not report.ok
    assert report.text().startswith("BROKEN: ")
    return report.problems


def test_a_missing_shard(output):
    (output / "embeddings" / "part-00001.parquet").unlink()
    (output / "errors" / "part-00001.parquet").unlink()
    assert problems(output) == ["shard 1: embeddings/part-00001.parquet missing (shard not done)"]


def test_an_image_twice_and_an_image_lost(output):
    write_shard(str(output), 0, embeddings(["img0.jpg", "img0.jpg"]), errors_table([], {}))
    found = problems(output)
    assert "shard 0: id 'img0.jpg' appears 2 times (planned 1)" in found
    assert "shard 0: id 'img1.jpg' is missing from embeddings and errors" in found


def test_an_image_both_embedded_and_an_error(output):
    write_shard(str(output), 1, embeddings(["img2.jpg", "img3.jpg"]),
                errors_table([("img3.jpg", "/in/img3.jpg", "decode", "X", "x")], {}))
    assert problems(output)[0] == "shard 1: id 'img3.jpg' appears 2 times (planned 1)"


@pytest.mark.parametrize("stray", ["embeddings/part-00007.parquet", "errors/part-00003.parquet",
                                   "embeddings/part-abcde.parquet"])
def test_stray_part_files(output, stray):
    shutil.copy(output / "embeddings" / "part-00000.parquet", output / stray)
    assert problems(output)[-1] == f"{stray} belongs to no planned shard"


def test_temporary_files_of_a_killed_writer_are_not_stray(output):
    (output / "embeddings" / ".part-00009.parquet.tmp-0badf00d").write_bytes(b"half")
    assert verify(str(output)).ok


def test_missing_columns_and_wrong_vector_length(output):
    pq.write_table(pa.table({"id": ["img4.jpg"], "uri": ["/in/img4.jpg"], "fc7": [[0.0] * 8]}),
                   output / "embeddings" / "part-00002.parquet")
    found = problems(output)
    assert "shard 2: embeddings lack columns ['logits', 'width', 'height']" in found
    assert "shard 2: fc7 is not a fixed-size list of 4096" in found


def test_unfinished_jobs(output):
    (output / "_SUCCESS.json").write_text(json.dumps({"counts": {"embedded": 5, "errors": 0}}))
    assert problems(output) == ["_SUCCESS.json counts 5/0 differ from the files 4/1"]
    (output / "_SUCCESS.json").unlink()
    assert problems(output) == ["_SUCCESS.json missing: the job did not finish"]
    (output / "_plan" / "_meta.json").unlink()
    assert problems(output) == ["no complete plan (_plan/_meta.json missing): the job never finished planning",
                                "_SUCCESS.json missing: the job did not finish"]


def test_not_an_output_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        verify(str(tmp_path / "nothing"))
    (tmp_path / "embeddings").mkdir()
    with pytest.raises(UsageError, match=r"is not a vgg-pipeline output \(no _plan/\)"):
        verify(str(tmp_path))


def test_many_problems_are_capped(output):
    for shard in range(3):
        for sub in ("embeddings", "errors"):
            (output / sub / f"part-{shard:05d}.parquet").unlink(missing_ok=True)
    for n in range(30):
        shutil.copy(output / "_plan" / "part-00000.parquet", output / "embeddings" / f"part-{100 + n:05d}.parquet")
    found = problems(output)
    assert len(found) == 21 and found[-1] == "... more problems not shown"
