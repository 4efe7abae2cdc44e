"""benchmarks/retrieval.py: its AP/mAP arithmetic on hand-computed cases, and one real run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import save_weights
from tests.corpus import small_photo

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("retrieval_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_average_precision_of_known_rankings(bench):
    assert bench.average_precision([True, False, True, False]) == pytest.approx((1 + 2 / 3) / 2)
    assert bench.average_precision([False, True]) == pytest.approx(0.5)
    assert bench.average_precision([True, True, False]) == 1.0
    assert np.isnan(bench.average_precision([False, False]))


def test_mean_average_precision_hand_case(bench):
    # Classes A, A, B, B.  Cosine rankings, worked out by hand:
    #   q0 (1,0):   v2 .995 B, v3 .100 B, v1 0 A    -> [F, F, T] AP 1/3
    #   q1 (0,1):   v3 .995 B, v2 .100 B, v0 0 A    -> [F, F, T] AP 1/3
    #   q2 (1,.1):  v0 .995 A, v3 .198 B, v1 .100 A -> [F, T, F] AP 1/2
    #   q3 (.1,1):  v1 .995 A, v2 .198 B, v0 .100 A -> [F, T, F] AP 1/2
    v = np.array([[1, 0], [0, 1], [1, 0.1], [0.1, 1]])
    m, queries = bench.mean_average_precision(v, ["A", "A", "B", "B"])
    assert queries == 4 and m == pytest.approx(5 / 12)
    # Scaling a row changes nothing (cosine); a class of one is no query.
    m2, queries2 = bench.mean_average_precision(v * [[3], [1], [7], [1]], ["A", "A", "B", "B"])
    assert m2 == pytest.approx(5 / 12)
    assert bench.mean_average_precision(v, ["A", "A", "B", "C"])[1] == 2


def plain_map(vectors: np.ndarray, labels: list[str]) -> float:
    """mAP spelled out with Python lists, to check the script's numbers."""
    aps = []
    for q in range(len(vectors)):
        sims = [(-float(np.dot(vectors[q], vectors[j]) / np.linalg.norm(vectors[q])
                        / np.linalg.norm(vectors[j])), j) for j in range(len(vectors)) if j != q]
        ranked = [labels[j] == labels[q] for _, j in sorted(sims)]
        hits = [i + 1 for i, r in enumerate(ranked) if r]
        aps.append(sum((n + 1) / k for n, k in enumerate(hits)) / len(hits))
    return sum(aps) / len(aps)


def test_script_end_to_end(tmp_path):
    data = tmp_path / "data"
    for cls, photo in (("astronaut", 0), ("coffee", 2)):
        (data / cls).mkdir(parents=True)
        img = small_photo(photo)
        for k in range(3):  # three overlapping 300x240 crops of one photo per class
            x, y = 50 * k, min(13 * k, img.height - 240)
            img.crop((x, y, x + 300, y + 240)).save(data / cls / f"{k}.jpg", quality=90)
    (data / "coffee" / "notes.txt").write_text("not an image")
    weights = save_weights("vgg11", tmp_path / "vgg11.pth", seed=1)
    npz = tmp_path / "vectors.npz"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(data), "--weights", str(weights), "--arch", "vgg11",
         "--scales", "224", "--device", "cpu", "--json", "--save-vectors", str(npz)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert (r["images"], r["classes"], r["queries"]) == (6, 2, 6)
    assert r["weights"] == "vgg11.pth" and not r["random_weights"]
    assert r["scales"] == [224] and r["descriptor_dim"] == 4096
    assert r["img_per_s"]["fc7"] > 0 and r["img_per_s"]["descriptor"] > 0
    assert r["relative_cost"] == pytest.approx(r["img_per_s"]["fc7"] / r["img_per_s"]["descriptor"])
    saved = np.load(npz)
    labels = [str(x) for x in saved["labels"]]
    assert labels == ["astronaut"] * 3 + ["coffee"] * 3
    assert saved["fc7"].shape == (6, 4096) and saved["descriptor"].shape == (6, 4096)
    assert r["map"]["fc7"] == pytest.approx(plain_map(saved["fc7"], labels))
    assert r["map"]["descriptor"] == pytest.approx(plain_map(saved["descriptor"], labels))
    assert 0 < r["map"]["descriptor"] <= 1


def test_script_refuses_bad_arguments(bench, tmp_path, capsys):
    assert bench.main([str(tmp_path / "missing"), "--weights", "random:0"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert bench.main([str(tmp_path), "--scales", "200"]) == 2
    assert ">= 224" in capsys.readouterr().err
    (tmp_path / "empty_class").mkdir()
    assert bench.main([str(tmp_path), "--scales", "224"]) == 2
    assert "no images" in capsys.readouterr().err
