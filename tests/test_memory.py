"""The driver's memory is bounded by its windows, not by the number of images (docs/design.md §6).

Two real CLI runs, 4,000 and 40,000 images, each in a fresh driver process, through the whole
code path (listing, plan, Ray actors, writer, final count) -- fast because every image is an empty
``.jpg``, so each becomes a ``stage=decode`` error row without any model work.  The driver's peak
RSS must not grow with the number of images: the 10x bigger job may only cost a few MB more.
(One process running both jobs would save a Ray start, but allocator noise across jobs in one
process is larger than the signal.)

Scale model: the planner keeps up to ``GROUP_ROWS`` rows (and one ``PART_ROWS`` part) in memory
before writing them; the test shrinks both, so that *both* runs exceed them, as a production
listing of millions of images exceeds the defaults.  ``pandas`` is imported up front because
pyarrow imports it lazily on first use (a one-off ~60 MB step that is not about the job's size).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.output.verify import verify
from tests.helpers import cli_env

pytestmark = pytest.mark.slow

SMALL, BIG = 4_000, 40_000
PER_DIR = 1_000
MAX_GROWTH_MB = 15  # holding the 36,000 extra entries alone would take ~30 MB (long names below)

WRAPPER = r'''
import resource, sys
import pandas  # noqa: F401 - see the test module's docstring
import pipeline.input.plan as plan
for name, rows in (("GROUP_ROWS", 1000), ("PART_ROWS", 4000)):
    assert hasattr(plan, name), f"pipeline.input.plan.{name} is gone: update tests/test_memory.py"
    setattr(plan, name, rows)
from pipeline.cli import main
rc = main(["extract", *sys.argv[1:]])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
'''


def empty_images(root: Path, n: int) -> Path:
    """``n`` empty ``.jpg`` files with long names, ``PER_DIR`` per folder."""
    for d in range(n // PER_DIR):
        sub = root / f"folder-{d:03d}-{'d' * 40}"
        sub.mkdir(parents=True)
        for i in range(PER_DIR):
            (sub / f"{i:05d}-{'n' * 200}.jpg").touch()
    return root


def peak_rss_mb(src: Path, out: Path, wrapper: Path) -> float:
    """Run the CLI on ``src`` in a fresh driver process; its peak RSS in MB."""
    args = [str(src), str(out), "--weights", "random:0", "--set", "model.arch=vgg11",
            "--set", "input.shard_size=1000", "--set", "runtime.num_actors=1",
            "--set", "runtime.max_shards_in_flight=2", "--no-progress"]
    proc = subprocess.run([sys.executable, str(wrapper), *args], env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_RSS_KB ")][-1]
    return int(line.split()[1]) / 1024


def test_driver_memory_does_not_grow_with_the_number_of_images(tmp_path):
    wrapper = tmp_path / "measure.py"
    wrapper.write_text(WRAPPER)
    peaks = {}
    for n in (SMALL, BIG):
        src, out = empty_images(tmp_path / f"in{n}", n), tmp_path / f"out{n}"
        peaks[n] = peak_rss_mb(src, out, wrapper)
        report = verify(str(out))
        assert report.ok, report.problems
        assert (report.images, report.embedded, report.errors, report.shards) == (n, 0, n, n // 1000)
        stages = {s for f in (out / "errors").glob("part-*.parquet")
                  for s in pq.read_table(f, columns=["stage"])["stage"].to_pylist()}
        assert stages == {"decode"}
    assert peaks[BIG] - peaks[SMALL] < MAX_GROWTH_MB, \
        f"driver peak RSS {peaks[SMALL]:.0f} MB for {SMALL} images, {peaks[BIG]:.0f} MB for {BIG}"
