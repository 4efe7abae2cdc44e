"""Shared by the performance benchmarks: the machine, a JPEG set, statistics, tables, the doc.

Every benchmark prints a Markdown table and, with ``--doc``, appends it to
``docs/benchmarks.md`` together with the machine it ran on (CPU model, cores, GPU), the
package versions and the exact command, so each figure in the doc can be reproduced.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DOC = REPO / "docs" / "benchmarks.md"

# Realistic photo sizes (web and camera exports), cycled over the generated set.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (500, 375), (640, 480), (800, 600), (1024, 768), (375, 500), (1280, 720), (1600, 1200), (1920, 1080),
)


# -- the command line ---------------------------------------------------------------------------


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: the first paragraph of its docstring as the description, and the
    ``--json`` / ``--doc`` switches that :func:`report` reads."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the machine and the results as one JSON line")
    p.add_argument("--doc", action="store_true", help="append the table to docs/benchmarks.md")
    return p


def add_model_args(p: argparse.ArgumentParser, *, weights: bool = True) -> None:
    """``--device``, ``--arch`` and (for benchmarks that load a checkpoint) ``--weights``."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", default="vgg16", help="a VGG of Table 1: vgg11 ... vgg19, _bn variants")
    if weights:
        p.add_argument("--weights", default="random:0",
                       help="as extract --weights (default random:0: speed does not depend on them)")


# -- the machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> Optional[str]:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:  # noqa: BLE001 - a broken CUDA install is "no GPU" here
        pass
    return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("vgg_pipeline:pipeline", "torch", "torchvision", "ray", "PIL", "pyarrow", "numpy"):
        name, _, module = mod.partition(":")
        try:
            out[name] = __import__(module or name).__version__
        except Exception:  # noqa: BLE001 - reported as missing, not fatal
            out[name] = "-"
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on; the load average says how noisy the box was."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem_gib, 1),
            "gpu": gpu_name() or "none", "load_avg_1m": round(os.getloadavg()[0], 2), "versions": versions()}


def describe(m: dict[str, Any]) -> str:
    v = m["versions"]
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu']}; "
            f"load average at start {m['load_avg_1m']}; "
            + ", ".join(f"{k} {val}" for k, val in v.items()))


# -- data ---------------------------------------------------------------------------------------


def make_jpeg_set(root: Path, n: int, *, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
                  quality: int = 90) -> list[Path]:
    """``n`` JPEGs of realistic sizes made from the real photos in ``tests.corpus`` (reused if present).

    Image i is photo ``i % 9`` resized (bicubic) to ``sizes[i % len(sizes)]``, mirrored on odd
    rounds of the photos; quality 90, baseline, 4:2:0, no EXIF.  Each distinct (photo, size,
    mirror) is encoded once and its bytes reused, so 10,000 files take seconds to write.
    """
    from PIL import Image

    from tests.corpus import sample_photos

    root = Path(root)
    stamp = root / ".complete"
    key = json.dumps({"n": n, "sizes": [list(s) for s in sizes], "quality": quality})
    paths = [root / f"img-{i:06d}.jpg" for i in range(n)]
    if stamp.exists() and stamp.read_text() == key and all(p.exists() for p in paths):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for old in root.glob("img-*.jpg"):
        old.unlink()
    photos = [img for _, img in sample_photos()]
    encoded: dict[tuple[int, int, bool], bytes] = {}
    for i, path in enumerate(paths):
        combo = (i % len(photos), i % len(sizes), bool((i // len(photos)) % 2))
        if combo not in encoded:
            img = photos[combo[0]].resize(sizes[combo[1]], Image.Resampling.BICUBIC)
            if combo[2]:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=quality)
            encoded[combo] = buf.getvalue()
        path.write_bytes(encoded[combo])
    stamp.write_text(key)
    return paths


def jpeg_pixels(data: bytes) -> int:
    """width x height of an encoded image, from its header."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        return img.width * img.height


# -- process trees -------------------------------------------------------------------------------


def hwm_bytes(pid: int) -> Optional[int]:
    """The process' peak resident set size so far (``VmHWM``), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class TreeSampler:
    """Samples a ``vgg-pipeline`` process and its descendants on a background thread.

    Each process is classed ``driver`` (the root), ``actor`` (``ray::ShardWorker``) or ``ray``
    (raylet, GCS, idle workers...).  Kept: each one's peak RSS (``VmHWM``, so spikes between
    samples count) and a time series ``(time.time(), actor CPU s, whole-tree CPU s)`` where a
    process that exited keeps contributing the CPU it had used.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.kinds: dict[int, str] = {}
        self.peaks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.series: list[tuple[float, float, float]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _kind(self, proc) -> str:
        if proc.pid == self.root.pid:
            return "driver"
        if self.kinds.get(proc.pid) == "actor":
            return "actor"
        try:
            return "actor" if "ShardWorker" in " ".join(proc.cmdline()) else "ray"
        except Exception:  # noqa: BLE001 - gone, or a zombie
            return self.kinds.get(proc.pid, "ray")

    def sample(self) -> None:
        import psutil
        try:
            family = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in family:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            self.kinds[proc.pid] = self._kind(proc)
            self.cpu[proc.pid] = t.user + t.system
            hwm = hwm_bytes(proc.pid)
            if hwm is not None:
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), hwm)
        actor = sum(c for pid, c in self.cpu.items() if self.kinds.get(pid) == "actor")
        self.series.append((time.time(), actor, sum(self.cpu.values())))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def peak(self, kind: str, how: str = "max") -> float:
        """Peak RSS in MiB over the processes of ``kind``: the largest one, or the ``sum``."""
        vals = [v for pid, v in self.peaks.items() if self.kinds.get(pid) == kind]
        if not vals:
            return float("nan")
        return (sum(vals) if how == "sum" else max(vals)) / 2**20

    def cpu_between(self, t0: float, t1: float) -> tuple[float, float]:
        """(actor, whole tree) CPU seconds used between wall times ``t0`` and ``t1`` (interpolated)."""
        def at(t: float) -> tuple[float, float]:
            before = [s for s in self.series if s[0] <= t]
            after = [s for s in self.series if s[0] >= t]
            if not before or not after:
                s = (before or after)[-1 if before else 0]
                return s[1], s[2]
            a, b = before[-1], after[0]
            w = 0.0 if b[0] == a[0] else (t - a[0]) / (b[0] - a[0])
            return a[1] + w * (b[1] - a[1]), a[2] + w * (b[2] - a[2])
        (a0, c0), (a1, c1) = at(t0), at(t1)
        return a1 - a0, c1 - c0


# -- model arithmetic --------------------------------------------------------------------------


def vgg_layers(arch: str, size: int = 224) -> list[dict[str, Any]]:
    """The conv and linear layers of ``arch`` (Table 1) at ``size`` x ``size``: module name (as in
    :class:`pipeline.model.vgg.VGG`), its input per image, shape and FLOPs per image (2 per
    multiply-add)."""
    from pipeline.model.archs import ARCH_TO_CONFIG, CONFIGS, FC7_DIM, NUM_CLASSES
    base, _, bn = arch.partition("_")
    layers, idx, channels, side = [], 0, 3, size
    for v in CONFIGS[ARCH_TO_CONFIG[base]]:
        if v == "M":
            idx, side = idx + 1, side // 2
            continue
        layers.append({"name": f"features.{idx}", "kind": "conv3x3", "input": (channels, side, side),
                       "shape": f"{channels}->{v} @{side}", "flops": 2 * channels * 9 * int(v) * side * side})
        idx += 3 if bn else 2          # conv (+ batch norm) + relu
        channels = int(v)
    fcs = [(channels * 7 * 7, FC7_DIM), (FC7_DIM, FC7_DIM), (FC7_DIM, NUM_CLASSES)]
    for i, (n_in, n_out) in zip((0, 3, 6), fcs):
        layers.append({"name": f"classifier.{i}", "kind": "linear", "input": (n_in,),
                       "shape": f"{n_in}->{n_out}", "flops": 2 * n_in * n_out})
    return layers


def flops_per_image(arch: str) -> int:
    """Forward FLOPs of one 224x224 image through ``arch`` (convolutions and FC layers; ReLU and
    pooling are a rounding error): VGG16 ~31 GFLOP."""
    return sum(layer["flops"] for layer in vgg_layers(arch))


# -- numbers and tables -------------------------------------------------------------------------


def summary(values: Iterable[float]) -> dict[str, float]:
    vals = sorted(values)
    if not vals:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan"), "n": 0}
    return {"min": vals[0], "median": statistics.median(vals), "max": vals[-1], "n": len(vals)}


def fmt(x: Any, digits: int = 2) -> str:
    if isinstance(x, float):
        return "-" if x != x else f"{x:.{digits}f}"
    return str(x)


def spread(values: Sequence[float], digits: int = 2) -> str:
    """``median (min-max, n=k)``: the figure to quote, and how noisy it was."""
    s = summary(values)
    if s["n"] == 1:
        return fmt(s["median"], digits)
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}-{fmt(s['max'], digits)}, n={s['n']})"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def command_line() -> str:
    """The command that produced this run, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = str(script)
    return shlex.join(["python", script_s, *sys.argv[1:]])


def append_doc(title: str, body: str, m: dict[str, Any], *, command: Optional[str] = None,
               path: Optional[Path] = None) -> None:
    """Append one dated section (title, machine, command, body) to the performance doc."""
    path = path or DOC
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write("# Performance measurements\n\nAppended by the scripts in `benchmarks/` "
                    "(`--doc`); newest last.\n")
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        f.write(f"\n## {title} ({when})\n\n")
        f.write(f"Machine: {describe(m)}.\n\n")
        f.write(f"Command: `{command or command_line()}`\n\n")
        f.write(body.rstrip() + "\n")


def report(args: Any, m: dict[str, Any], payload: dict[str, Any], render: Callable[[], str], title: str,
           note: str = "") -> None:
    """A script's output: ``--json`` prints the machine and ``payload`` as one JSON line; otherwise
    the Markdown table ``render()`` is printed and, with ``--doc``, appended (with ``note``) here."""
    if args.json:
        print(json.dumps({"machine": m, **payload}))
        return
    body = render()
    print(body)
    if args.doc:
        append_doc(title, body + ("\n" + note if note else ""), m)
