"""End to end: the real CLI on real photos gives torchvision's VGG16 numbers, and `verify` catches damage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

from pipeline.cli import main
from pipeline.decode.preprocess import preprocess_pil
from pipeline.output.verify import verify

CLI = [sys.executable, "-m", "pipeline.cli"]
FP32 = ("--set", "runtime.precision=fp32")


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def vgg16_torchvision(tmp_path_factory):
    torch.manual_seed(1234)
    model = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path_factory.mktemp("tv") / "vgg16-torchvision.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def cli_output(photo_dir, vgg16_torchvision, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    # fp32: the precision that promises torchvision's numbers (auto may pick bf16; tests/test_precision.py)
    res = run_cli("extract", str(photo_dir), str(out), "--weights", str(vgg16_torchvision[1]), *FP32,
                  "--set", "input.shard_size=4", "--set", "runtime.batch_size=4",
                  "--set", "output.top_k=5")
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_cli_matches_torchvision_vgg16(photo_dir, vgg16_torchvision, cli_output):
    model, _ = vgg16_torchvision
    out, res = cli_output
    assert "10 embedded, 0 errors" in res.stdout
    table = pq.read_table(out / "embeddings")
    assert table.num_rows == 10
    assert table.schema.field("fc7").type.value_type == "float"  # float32 by default: Spark reads it
    expected_ids = sorted(p.relative_to(photo_dir).as_posix() for p in photo_dir.rglob("*") if p.is_file())
    assert table.column("id").to_pylist() == expected_ids  # sorted listing, one row each, in order
    rows = table.to_pylist()
    imgs = [Image.open(photo_dir / r["id"]).convert("RGB") for r in rows]
    batch = torch.stack([preprocess_pil(ImageOps.exif_transpose(i)) for i in imgs])
    with torch.inference_mode():
        x = torch.flatten(model.avgpool(model.features(batch)), 1)
        fc7 = model.classifier[:5](x).numpy()
        logits = model(batch).numpy()
    for r, img, f, lg in zip(rows, imgs, fc7, logits):
        assert r["uri"] == str(photo_dir / r["id"])
        assert (r["width"], r["height"]) == img.size
        got = np.asarray(r["fc7"], dtype=np.float32)
        cos = got @ f / (np.linalg.norm(got) * np.linalg.norm(f))
        assert cos >= 0.999, (r["id"], cos)
        got_logits = np.asarray(r["logits"], dtype=np.float32)
        assert int(got_logits.argmax()) == int(lg.argmax())
        np.testing.assert_allclose(got_logits, lg, rtol=1e-3, atol=1e-3)
        assert r["top5"] == list(np.argsort(-lg, kind="stable")[:5])


def test_output_layout_metadata_and_success(cli_output):
    out, _ = cli_output
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not (out / "errors").exists() or not any((out / "errors").iterdir())
    meta = json.loads(pq.read_schema(out / "embeddings" / "part-00001.parquet").metadata[b"vgg_pipeline"])
    assert meta["model"]["arch"] == "vgg16" and meta["shard"] == 1
    assert meta["weights"]["name"] == "vgg16-torchvision.pth" and len(meta["weights"]["sha256"]) == 64
    assert meta["preprocessing"]["crop"] == 224 and meta["dtypes"]["fc7"] == "float32"
    assert "torch" in meta["versions"]
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["counts"]["embedded"] == 10 and success["counts"]["errors"] == 0
    assert [s["rows"] for s in success["shards"]] == [4, 4, 2]
    plan = json.loads((out / "_plan" / "_meta.json").read_text())
    assert plan["num_items"] == 10 and plan["num_shards"] == 3


def test_verify_accepts_good_and_rejects_tampered_outputs(cli_output, tmp_path, capsys):
    good, _ = cli_output
    assert verify(str(good)).ok
    assert main(["verify", str(good)]) == 0

    duplicated = tmp_path / "dup"
    shutil.copytree(good, duplicated)
    part = duplicated / "embeddings" / "part-00001.parquet"
    t = pq.read_table(part)
    import pyarrow as pa
    pq.write_table(pa.concat_tables([t, t.slice(0, 1)]), part)
    report = verify(str(duplicated))
    assert not report.ok and any("appears 2 times" in p for p in report.problems)
    assert main(["verify", str(duplicated)]) == 1

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "embeddings" / "part-00002.parquet").unlink()
    report = verify(str(missing))
    assert not report.ok and any("part-00002" in p and "missing" in p for p in report.problems)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(good, unfinished)
    (unfinished / "_SUCCESS.json").unlink()
    assert main(["verify", str(unfinished)]) == 1
    assert "_SUCCESS.json missing" in capsys.readouterr().out

    assert main(["verify", str(tmp_path / "nothing-here")]) == 2


def test_rerun_is_a_resume_and_other_model_is_refused(photo_dir, cli_output, vgg16_torchvision):
    out, _ = cli_output
    before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    res = run_cli("extract", str(photo_dir), str(out), "--weights", str(vgg16_torchvision[1]), *FP32,
                  "--set", "input.shard_size=4", "--set", "runtime.batch_size=4", "--set", "output.top_k=5")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "3 shards resumed" in res.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()} == before
    res = run_cli("extract", str(photo_dir), str(out), "--weights", "random:0")
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("vgg-pipeline: error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0]
    assert "Traceback" not in res.stderr
