"""``make demo`` (``python -m pipeline.demo``), as the README promises it on a machine with no
network: the ImageNet download fails, the demo says so, falls back to random weights, announces
them loudly, extracts the sample photos and prints each one's top-5 classes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo import PHOTOS
from pipeline.model.weights import URL_BASE_ENV
from pipeline.output.verify import verify
from tests.helpers import cli_env

pytestmark = pytest.mark.slow  # VGG16 on the CPU


def test_demo_without_network_falls_back_to_random_weights_and_prints_top5(tmp_path: Path):
    # A closed local port stands in for the unreachable download site; an empty TORCH_HOME holds
    # no cached ImageNet weights.
    env = cli_env(**{URL_BASE_ENV: "http://127.0.0.1:9/models", "TORCH_HOME": str(tmp_path / "torch")})
    proc = subprocess.run([sys.executable, "-m", "pipeline.demo", "--dir", str(tmp_path / "demo"),
                           "--weights", "imagenet"],  # what `make demo` passes, whatever DEMO_WEIGHTS says
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "could not get imagenet weights" in out and "falling back to random weights" in out
    assert "RANDOM WEIGHTS" in out
    listed = re.findall(r"^   (\S+\.jpg)\s+\d+x\d+\s+(.+)$", out, flags=re.M)
    written = sorted(p.name for p in (tmp_path / "demo" / "photos").glob("*.jpg"))
    assert written and sorted(name for name, _ in listed) == written
    assert set(written) <= {f"{name}.jpg" for name in PHOTOS}
    assert all(len(classes.split(", ")) == 5 for _, classes in listed)
    assert f"extracted {len(written)} images (0 errors)" in out
    assert verify(str(tmp_path / "demo" / "out")).ok
