"""Smoke tests of the performance benchmarks: each script runs end to end on a tiny setting,
prints its table and appends to the doc.  Figures are not asserted (2 shared cores), only that
they are there and sane.  The three that start a local Ray per run are marked ``slow``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
from pipeline.model.precision import resolve_precision  # noqa: E402
import decode  # noqa: E402
import end_to_end  # noqa: E402
import layer_profile  # noqa: E402
import model_only  # noqa: E402


@pytest.fixture
def doc(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "perf.md"
    monkeypatch.setattr(common, "DOC", path)
    return path


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-jpegs")
    common.make_jpeg_set(root, 4, sizes=[(320, 240), (240, 320)])
    return root


def _number(cell: str) -> float:
    return float(re.match(r"\**([0-9.]+)", cell.strip()).group(1))


def _rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_jpeg_set_is_realistic_and_reused(tmp_path):
    from PIL import Image
    paths = common.make_jpeg_set(tmp_path, 3, sizes=[(500, 375), (1920, 1080)])
    with Image.open(paths[1]) as img:
        assert (img.format, img.size) == ("JPEG", (1920, 1080))
    before = [p.stat().st_mtime_ns for p in paths]
    assert common.make_jpeg_set(tmp_path, 3, sizes=[(500, 375), (1920, 1080)]) == paths
    assert [p.stat().st_mtime_ns for p in paths] == before  # reused, not rewritten


def test_machine_and_doc(doc):
    m = common.machine()
    assert m["cores"] >= 1 and m["cpu"] and m["versions"]["torch"] != "-"
    common.append_doc("Title", common.table(["a", "b"], [(1, 2.5)]), m, command="python x.py")
    text = doc.read_text()
    assert "## Title" in text and "| 1 | 2.50 |" in text and "`python x.py`" in text and m["cpu"] in text


def test_model_only_prints_a_table(doc, capsys):
    import torch
    threads = torch.get_num_threads()
    try:
        assert model_only.main(["--arch", "vgg11", "--batch-size", "1,2", "--images", "2", "--repeat", "2",
                                "--warmup", "0", "--threads", "1", "--doc"]) == 0
    finally:
        torch.set_num_threads(threads)  # the rest of the session keeps its threads
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| cpu")]
    ran = resolve_precision("auto", torch.device("cpu"))  # model_only measures what the pipeline runs
    assert [[c.strip() for c in r[:5]] for r in rows] == [["cpu", "vgg11", ran, "1", "1"],
                                                          ["cpu", "vgg11", ran, "2", "1"]]
    assert all(_number(r[5]) > 0 for r in rows)
    # TFLOP/s = img/s x vgg11's 15.2 GFLOP per image (to the table's 3 significant digits)
    assert all(abs(float(r[6]) - _number(r[5]) * 15.218e-3) <= 0.006 * float(r[6]) for r in rows)
    assert "Model only, vgg11 on cpu" in doc.read_text()


def test_decode_measures_the_cpu_engine_and_the_pil_threads(jpegs, doc, capsys):
    assert decode.main(["--data", str(jpegs), "--engines", "cpu", "--processes", "1", "--threads", "1",
                        "--batch-size", "2", "--repeat", "1", "--doc"]) == 0
    rows = _rows(capsys.readouterr().out)
    engine = rows["engines cpu (batch 2)"]
    assert _number(engine[0]) > 0 and engine[2].startswith("cpu 100% ")
    assert _number(rows["PIL threads (1)"][0]) > 0 and rows["PIL threads (1)"][2] == "-"
    assert "Decode throughput (no model)" in doc.read_text()
    with pytest.raises(SystemExit, match="needs --device cuda"):
        decode.main(["--data", str(jpegs), "--engines", "hw", "--repeat", "1"])


def test_flops_per_image_is_the_papers_arithmetic():
    # 2 FLOPs per multiply-add; VGG16's 15.5 G multiply-adds are the commonly quoted figure.
    assert round(common.flops_per_image("vgg16") / 1e9, 2) == 30.94
    assert common.flops_per_image("vgg16_bn") == common.flops_per_image("vgg16")
    names = [layer["name"] for layer in common.vgg_layers("vgg11_bn")]
    assert names[:3] == ["features.0", "features.4", "features.8"] and names[-1] == "classifier.6"


def test_layer_profile_times_every_conv_and_linear(capsys):
    import torch
    threads = torch.get_num_threads()
    try:
        assert layer_profile.main(["--arch", "vgg11", "--batch-size", "1", "--repeat", "1", "--warmup", "0",
                                   "--threads", "1", "--matmul-size", "256", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["kind"] for r in res["layers"]] == ["conv3x3"] * 8 + ["linear"] * 3
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in res["layers"]) and res["peak_tflops"] > 0
    r = res["layers"][1]
    assert abs(r["tflops"] - r["flops"] / (r["ms"] / 1e3) / 1e12) <= 1e-9 + 1e-6 * r["tflops"]
    assert abs(r["peak_share"] - r["tflops"] / res["peak_tflops"]) <= 1e-9


@pytest.mark.slow  # Inductor builds vgg11 on the CPU: ~20 s on 2 shared cores
def test_model_only_measures_a_compiled_row(capsys, tmp_path, monkeypatch):
    import torch
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        assert model_only.main(["--arch", "vgg11", "--batch-size", "1", "--images", "1", "--repeat", "1",
                                "--warmup", "0", "--threads", "2", "--compile-mode", "default", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    eager, compiled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert (eager["compile"], eager["compile_s"]) == (False, None)
    assert compiled["compile"] == "default" and compiled["compile_s"] > 0 and compiled["img_per_s"] > 0


def test_model_only_measures_the_plain_torchvision_loop(capsys):
    import torch
    threads = torch.get_num_threads()
    try:
        assert model_only.main(["--arch", "vgg11", "--torchvision", "--batch-size", "1", "--images", "1",
                                "--repeat", "1", "--warmup", "0", "--threads", "1", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    (result,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert result["precision"] == "torchvision fp32" and result["img_per_s"] > 0


@pytest.mark.slow  # a fresh local Ray per run: ~15-60 s on 2 shared cores
def test_end_to_end_compares_with_model_only(jpegs, doc, capsys):
    assert end_to_end.main(["--data", str(jpegs), "--images", "4", "--arch", "vgg11", "--shard-size", "1",
                            "--batch-size", "1", "--compare-model-only", "--compare-torchvision",
                            "--model-images", "2", "--doc"]) == 0
    rows = _rows(capsys.readouterr().out)
    steady = _number(rows["pipeline steady img/s"][0])
    model = _number(rows["model-only img/s (same arch, batch, threads)"][0])
    assert steady > 0 and model > 0
    # The ratios are those of the medians shown (2-3 decimals each, hence the tolerance).
    ratio = _number(rows["**ratio steady / model-only img/s** (medians)"][0])
    assert ratio == pytest.approx(steady / model, rel=0.02, abs=0.002)
    plain = _number(rows["plain torchvision eager fp32 loop img/s (model only, same batch, threads)"][0])
    assert plain > 0
    speedup = _number(rows["**speed-up: pipeline steady / plain torchvision fp32** (medians)"][0])
    assert speedup == pytest.approx(steady / plain, rel=0.02, abs=0.002)
    actor_cpu = _number(rows["pipeline actor CPU s/img (steady)"][0])
    model_cpu = _number(rows["model-only CPU s/img"][0])
    assert actor_cpu > 0 and model_cpu > 0
    efficiency = _number(rows["CPU efficiency: model-only CPU s/img / actor CPU s/img"][0])
    # Each CPU figure is shown to 3 decimals (a few ms per image here): the ratio of the exact
    # medians lies between the ratios of the shown ones' rounding bounds.
    low, high = (model_cpu - 5e-4) / (actor_cpu + 5e-4), (model_cpu + 5e-4) / max(actor_cpu - 5e-4, 1e-9)
    assert low - 5e-4 <= efficiency <= high + 5e-4, (efficiency, model_cpu, actor_cpu)
    assert any(k.startswith("actor model s") for k in rows) and any(k.startswith("actor decode s") for k in rows)
    # The doc records the command that was measured: this extract of this data.
    assert re.search(rf"pipeline command: `[^`]* extract {re.escape(str(jpegs))} \S+ --weights ", doc.read_text())


def test_steady_state_uses_the_commit_times(tmp_path):
    import os
    emb = tmp_path / "embeddings"
    emb.mkdir()
    for i, t in enumerate((100, 102, 106)):
        p = emb / f"part-{i:05d}.parquet"
        p.write_bytes(b"")
        os.utime(p, ns=(t * 10**9, t * 10**9))
    shards = [{"shard": 0, "rows": 5, "errors": 0}, {"shard": 1, "rows": 4, "errors": 0},
              {"shard": 2, "rows": 3, "errors": 1}]
    rate, per_image = end_to_end.steady_state(tmp_path, shards)
    assert rate == pytest.approx((4 + 4) / 6) and per_image == pytest.approx(6 / 8)


@pytest.mark.slow  # a fresh local Ray per run: ~15-60 s on 2 shared cores
def test_baselines_run_the_same_job(jpegs, doc, capsys):
    import baselines
    assert baselines.main(["--data", str(jpegs), "--images", "4", "--arch", "vgg11", "--batch-size", "2",
                           "--threads", "1", "--num-workers", "1", "--modes", "raydata,dataloader",
                           "--json"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert [r["mode"] for r in results] == ["raydata", "dataloader"]
    assert all(r["images"] == 4 and r["steady_img_per_s"] > 0 for r in results)


@pytest.mark.slow  # a fresh local Ray per run: ~15-60 s on 2 shared cores
def test_memory_reports_driver_and_actor_peaks(doc, capsys):
    import memory
    code = memory.main(["--sizes", "20,60", "--shard-size", "20", "--interval", "0.1", "--tolerance", "10",
                        "--doc"])
    assert code == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows["20"][:2] == ["1", "20"] and rows["60"][:2] == ["3", "60"]  # shards, error rows
    assert all(_number(rows[n][3]) > 50 and _number(rows[n][4]) > 50 for n in ("20", "60"))  # MiB
    assert "driver peak 20 -> 60 images" in out and "Peak memory" in doc.read_text()


def test_fc7_size_measures_real_part_files(doc, capsys):
    import fc7_size
    assert fc7_size.main(["--rows", "40", "--zeros", "0.5,0.9", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["zero_fraction"] for r in results] == [0.5, 0.9]
    for r in results:
        assert r["float16_fc7_bytes"] < r["float32_fc7_bytes"] < r["float32_file_bytes"]
        assert r["float16_file_bytes"] < r["float32_file_bytes"]
    assert results[1]["float32_fc7_bytes"] < results[0]["float32_fc7_bytes"]  # zstd squeezes zeros
    assert fc7_size.main(["--rows", "40", "--zeros", "0.75", "--doc"]) == 0
    assert "| 75% |" in capsys.readouterr().out and "fc7 dtype: part-file size" in doc.read_text()

def test_rows_overhead_compares_the_two_bookkeepings(doc, capsys):
    import rows_overhead
    assert rows_overhead.main(["--images", "40", "--batch-sizes", "8", "--repeat", "2", "--doc"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert _number(rows["8"][0]) > 0 and _number(rows["8"][1]) > 0  # us/img, both ways
    assert "Shard bookkeeping per image" in doc.read_text()


def _gpu_suite(tmp_path: Path, **env: str) -> list[str]:
    """benchmarks/gpu_suite.sh with stand-ins for nvidia-smi and Python (each step echoes its command)."""
    import os
    import subprocess
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA Stand-in, 0.0, 1 MiB'\n")
    (bin_dir / "py").write_text("#!/bin/sh\necho \"ran $*\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), str(tmp_path / "log")], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                                     "PYTHON": str(bin_dir / "py"), **env})
    assert run.returncode == 0, run.stderr
    return [ln for ln in run.stdout.splitlines() if ln.startswith("=== ")]


def test_gpu_suite_quick_runs_the_essentials_in_order_within_its_budget(tmp_path):
    lines = _gpu_suite(tmp_path, STEPS="quick", BUDGET_S="200")
    started = [ln.split()[1].rstrip(":") for ln in lines if "limit" in ln]
    assert started == ["test", "model", "layers", "e2e", "engines", "engines", "engines", "compile"]  # script order
    limits = [int(re.search(r"limit (\d+) s", ln).group(1)) for ln in lines if "limit" in ln]
    assert limits[0] == 200 and all(limit <= 200 for limit in limits)   # capped by what is left
    assert limits[1] == 100                                             # its own limit when smaller


def test_gpu_suite_skips_steps_once_the_budget_is_spent(tmp_path):
    lines = _gpu_suite(tmp_path, STEPS="test model", BUDGET_S="10")
    assert lines == ["=== test: skipped, 10 s of BUDGET_S left", "=== model: skipped, 10 s of BUDGET_S left"]
