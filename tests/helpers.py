"""Helpers shared by test modules (test modules never import from each other; fixtures live in
``conftest.py``, generated images in ``corpus.py``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run.worker import HANG_ENV

ROOT = Path(__file__).resolve().parents[1]

# In-process jobs: vgg11, 2-image batches and shards.
SMALL = {"model": {"arch": "vgg11"}, "runtime": {"batch_size": 2}, "input__shard_size": 2}


# ----------------------------------------------------------------------------- images and weights


def cpu_reference(data: bytes, **limits: int):
    """The CPU reader's model input for one encoded image and its upright size."""
    from pipeline.decode.cpu import decode_with_size
    from pipeline.decode.preprocess import preprocess_pil
    img, size = decode_with_size(data, min_side=256, **limits)
    return preprocess_pil(img), size


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

def write_images(root: Path, n: int) -> list[str]:
    """``n`` real photos as 64x64 PNGs (preprocessing resizes to 224 anyway); returns their ids."""
    from tests.corpus import small_photo
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        name = f"img{i:03d}.png"
        small_photo(i).resize((64, 64)).save(root / name)
        ids.append(name)
    return ids


def save_weights(arch: str, path: Path, seed: int = 0) -> Path:
    """A randomly initialised ``arch`` state dict saved at ``path``."""
    import torch

    from pipeline.model.vgg import build_vgg, init_weights
    model = build_vgg(arch)
    init_weights(model, seed)
    torch.save(model.state_dict(), path)
    return path


def extract_thumbnails(root: Path, n: int, weights: Path, side: int = 320, **overrides) -> tuple[Path, Path]:
    """``n`` real photos as JPEG thumbnails in ``root/photos``, extracted with vgg11 into ``root/out``."""
    import pipeline
    from tests.corpus import sample_photos
    photos = root / "photos"
    photos.mkdir()
    for name, img in sample_photos()[:n]:
        img.thumbnail((side, side))
        img.save(photos / f"{name}.jpg", quality=90)
    pipeline.extract(str(photos), str(root / "out"), weights=str(weights), model={"arch": "vgg11"},
                     **overrides)
    return photos, root / "out"


class GatedServer:
    """A local web server over ``root`` whose *gated* files cannot be read until :meth:`release`:
    their requests wait, like reads from a stalled disk or bucket.  A job with a gated image in a
    shard cannot finish before the test lets it, however fast or busy the machine is.  A GET of
    ``/_release`` releases the gate too, so a job's subprocess can open it."""

    def __init__(self, root: Path, gated: set[str]) -> None:
        import functools
        import http.server

        self.root, self.gated, self.released = root, set(gated), threading.Event()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def send_head(self):  # GET and HEAD
                name = self.path.lstrip("/")
                if name == "_release":
                    server.release()
                    self.send_response(204)
                    self.end_headers()
                    return None
                if name in server.gated:
                    server.released.wait()
                return super().send_head()

            def log_message(self, *args) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # a reader killed mid-request
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "GatedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def manifest(path: Path, uris: list[str]) -> Path:
    """A ``.txt`` manifest listing ``uris``, one a line (each its own id)."""
    path.write_text("".join(u + "\n" for u in uris))
    return path


# ----------------------------------------------------------------------------- the real CLI

def cli_program() -> list[str]:
    """``vgg-pipeline`` as installed in this venv (the console script, else ``python -m``)."""
    script = Path(sys.executable).with_name("vgg-pipeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def cli_command(*args: str) -> list[str]:
    """``vgg-pipeline extract ARGS --no-progress``."""
    return cli_program() + ["extract", *args, "--no-progress"]


def cli_env(*without: str, **extra: str) -> dict:
    """This process's environment for a CLI subprocess, always on a private local Ray, less the
    variables starting with any of ``without`` (e.g. ``"AWS_"``: credentials a test chooses itself)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith(without)}
    env.update(RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def run_program(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """``vgg-pipeline ARGS`` (any subcommand) with exactly the environment ``env``."""
    return subprocess.run(cli_program() + list(args), env=env, capture_output=True, text=True, timeout=timeout)


def run_cli(args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), env=cli_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def small_flags(*extra: str) -> list[str]:
    """vgg11, random weights, 2-image shards; ``extra`` are more ``--set`` overrides."""
    sets = ["model.arch=vgg11", "input.shard_size=2", "runtime.batch_size=2", "runtime.num_actors=1", *extra]
    flags = ["--weights", "random:0"]
    for kv in sets:  # a later --set of the same key wins
        flags += ["--set", kv]
    return flags


# ----------------------------------------------------------------------------- outputs

def rows(output: Path) -> tuple[list[str], list[dict]]:
    """Embedded ids and error rows of an output."""
    ids = [i for f in sorted((output / "embeddings").glob("part-*.parquet"))
           for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    errors = [r for f in sorted((output / "errors").glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    return ids, errors


def assert_exactly_once(output: Path, expected: list[str], errors: int = 0) -> tuple[list[str], list[dict]]:
    """``verify`` passes, and every expected id is in exactly one of embeddings/ and errors/."""
    from pipeline.output.verify import verify
    report = verify(str(output))
    assert report.ok, report.problems
    assert (report.images, report.embedded, report.errors) == (len(expected), len(expected) - errors, errors)
    embedded, error_rows = rows(output)
    counts = Counter(embedded) + Counter(r["id"] for r in error_rows)
    assert counts == Counter(expected)  # every image exactly once, in one of the two
    assert not [n for d in ("embeddings", "errors") if (output / d).exists()
                for n in os.listdir(output / d) if n.startswith(".")], "temporary files left behind"
    return embedded, error_rows


def summary(output: Path) -> dict:
    return json.loads((output / "_SUCCESS.json").read_text())


def parts_written(output: Path) -> int:
    try:
        return sum(n.startswith("part-") for n in os.listdir(output / "embeddings"))
    except FileNotFoundError:
        return 0


def shard_workers(root_pid: int, busy: bool = False) -> list[psutil.Process]:
    """Live ShardWorker actor processes under ``root_pid``: Ray titles them ``ray::ShardWorker``,
    and ``ray::ShardWorker.process`` while they run a shard (``busy``)."""
    title = "ray::ShardWorker.process" if busy else "ray::ShardWorker"
    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if title in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


# ----------------------------------------------------------------------------- docs

# Shell variables the docs define, with the placeholder values the infra files use.
DOC_VARS = {"$IN_BUCKET": "my-input-bucket", "$OUT_BUCKET": "my-output-bucket"}
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
INFRA_README = ROOT / "infra" / "README.md"


def shell_commands(markdown: str) -> list[list[str]]:
    """Every command of the ```bash blocks, continuation lines joined, split like a shell would."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for var, value in DOC_VARS.items():
                line = line.replace(var, value)
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:  # a line of a heredoc (JSON policy), not a command
                continue
            if tokens:
                commands.append(tokens)
    return commands


def require_program(name: str, installed_by: str) -> str:
    """Path of the program ``name``; skips the test without it, but fails under CI, where
    ``installed_by`` (a Makefile step) must have installed it: a missing install is a failure."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (installed by {installed_by})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


# -- waiting on a running job (resume, update tests) --------------------------------------

def start_cli(args: list[str], log: Path, hang_id: str) -> subprocess.Popen:
    """The CLI in a new session, its actors hanging on image ``hang_id``; output goes to a file
    (a full pipe would block it)."""
    with open(log, "w") as f:
        return subprocess.Popen(cli_command(*args), env=cli_env(**{HANG_ENV: hang_id}), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_parts(proc: subprocess.Popen, out: Path, n: int, log: Path) -> None:
    """Until ``n`` shards are written (the job cannot end before: it hangs in a later shard)."""
    while parts_written(out) < n:
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before {n} shards were written:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.05)


def kill_after_parts(args: list[str], out: Path, n: int, log: Path, hang_id: str) -> None:
    """Run the CLI (hanging on ``hang_id``) until ``n`` shards are written, then SIGKILL its whole
    session -- driver, Ray and actors, as a lost machine would -- and wait until it is gone."""
    proc = start_cli(args, log, hang_id=hang_id)
    try:
        wait_for_parts(proc, out, n, log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_session_gone(proc.pid)


def wait_session_gone(sid: int) -> None:
    """Wait for every process of session ``sid`` (driver, raylet, orphaned actors) to exit."""
    while True:
        left = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
            except (OSError, psutil.Error):
                continue
        if not left:
            return
        time.sleep(0.2)


def snapshot(out: Path) -> dict[str, tuple[int, str]]:
    """``{embeddings|errors/part: (mtime_ns, sha256)}`` of every part file."""
    snap = {}
    for sub in ("embeddings", "errors"):
        for path in sorted((out / sub).glob("part-*.parquet")) if (out / sub).exists() else []:
            snap[f"{sub}/{path.name}"] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return snap


# -- hand-made outputs (index, search, update tests) -------------------------------------

FC7 = 4096
META = {"model": {"arch": "vgg16", "descriptor": "fc7"}, "weights": {"name": "random:0"},
        "dtypes": {"fc7": "float16"}}


def clustered(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Non-negative clustered vectors (fc7 is post-ReLU), distinct enough to survive float16."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(clusters, size=n)] + 0.7 * rng.standard_normal((n, d)).astype(np.float32)
    return np.maximum(x, 0)


def write_output(root: str, fc7: np.ndarray, sizes: list[int], *, fc7_dtype=np.float16,
                 descriptor: np.ndarray | None = None, fs=None) -> list[str]:
    """Write ``OUTPUT/embeddings/part-NNNNN.parquet`` files of ``sizes`` rows; returns the ids."""
    assert sum(sizes) == len(fc7)
    fs = fs or fsspec.filesystem("file")
    rng = np.random.default_rng(1)
    ids = [f"img/{i:05d}.jpg" for i in range(len(fc7))]
    start = 0
    for shard, size in enumerate(sizes):
        rows = slice(start, start + size)
        value_type = pa.float16() if fc7_dtype == np.float16 else pa.float32()
        cols = {
            "id": pa.array(ids[rows], pa.string()),
            "uri": pa.array([f"/data/{i}" for i in ids[rows]], pa.string()),
            "fc7": pa.FixedSizeListArray.from_arrays(
                pa.array(fc7[rows].astype(fc7_dtype).ravel(), value_type), FC7),
            "logits": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.standard_normal(size * 1000).astype(np.float32)), 1000),
            "width": pa.array(np.full(size, 640, np.int32)),
            "height": pa.array(np.full(size, 480, np.int32)),
        }
        if descriptor is not None:
            cols["descriptor"] = pa.FixedSizeListArray.from_arrays(
                pa.array(descriptor[rows].astype(np.float32).ravel()), descriptor.shape[1])
        table = pa.table(cols).replace_schema_metadata(
            {b"vgg_pipeline": json.dumps({**META, "shard": shard})})
        fs.makedirs(f"{root}/embeddings", exist_ok=True)
        with fs.open(f"{root}/embeddings/part-{shard:05d}.parquet", "wb") as f:
            pq.write_table(table, f, compression="zstd")
        start += size
    return ids
