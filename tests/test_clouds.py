"""``az://`` and ``gs://`` end to end, each against a real local emulator of its storage API:
Azurite (the Azure Storage emulator, from npm) through adlfs, and gcp-storage-emulator (PyPI)
through gcsfs.  A whole ``vgg-pipeline extract`` bucket -> bucket with vgg11, then ``verify``,
then pandas and pyarrow read the result, and the account key is in no output object, no line the
CLI printed and no Ray log.  (S3 has its own, larger module: tests/test_s3.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from pipeline.config import redact
from pipeline.errors import UsageError
from pipeline.cli.cluster import extract_job
from pipeline.submit import check_job
from tests.helpers import cli_env, require_program, run_program as cli
from tests.corpus import encode, small_photo

# Azurite's one account and its key: public, the same on every machine (Microsoft's docs).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
STARTUP_TIMEOUT_S = 60
# key below INPUT_PREFIX -> photo index; the sidecar is listed but skipped by extension
PHOTOS = {"a.jpg": 0, "b.png": 1, "sub/c.jpg": 2, "sub/deep/d.jpg": 3}
SIDECAR = "a.jpg.json"


@dataclass
class Cloud:
    """One emulated object store, as a user reaches it."""
    scheme: str                      # az | gs
    admin: fsspec.AbstractFileSystem  # the test's own handle, for setup and for reading back
    options: dict                    # fsspec storage_options a reader passes (pandas, pipeline)
    extract_args: list[str]          # how the user configures the CLI for extract ...
    extract_env: dict[str, str]
    verify_args: list[str]           # ... and, the other way, for verify
    verify_env: dict[str, str]
    secrets: list[str] = field(default_factory=list)  # never in an output, a log or the CLI's output


def _wait_for_line(log: Path, marker: str, proc: subprocess.Popen) -> str:
    """The first line of ``log`` containing ``marker``, waiting (bounded) while ``proc`` starts."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if marker in line:
                return line
        if proc.poll() is not None:
            pytest.fail(f"emulator exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    pytest.fail(f"emulator not ready after {STARTUP_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def azurite(tmp_path_factory) -> Iterator[str]:
    """Azurite's blob service on 127.0.0.1 (a port of its choosing, no telemetry); yields the
    connection string of its well-known account."""
    exe = require_program("azurite-blob", "make test-deps")
    root = tmp_path_factory.mktemp("azurite")
    log = root / "azurite.log"
    with open(log, "wb") as out:
        # --skipApiVersionCheck: azure-storage-blob may speak a newer API version than Azurite knows
        proc = subprocess.Popen([exe, "--silent", "--disableTelemetry", "--skipApiVersionCheck",
                                 "--location", str(root / "data"), "--blobHost", "127.0.0.1", "--blobPort", "0"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        line = _wait_for_line(log, "listens on http://127.0.0.1:", proc)
        endpoint = line[line.index("http://"):].strip()
        yield (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
               f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator's JSON API in this process (a thread), in memory; yields its URL."""
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    server = server_mod.create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    try:
        # port 0 lets the OS choose (no race with other tests); the bound port is only on the thread's server
        yield f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    finally:
        server.stop()


def _env(**extra: str) -> dict[str, str]:
    """No storage settings but the test's own."""
    return cli_env("AZURE_", "STORAGE_EMULATOR_HOST", "GOOGLE_", "AWS_", **extra)


def make_azure(connection_string: str) -> Cloud:
    admin = fsspec.filesystem("az", connection_string=connection_string, skip_instance_cache=True)
    opt = f"--storage-option=connection_string={connection_string}"
    return Cloud("az", admin, {"connection_string": connection_string},
                 [opt], _env(), [], _env(AZURE_STORAGE_CONNECTION_STRING=connection_string),
                 secrets=[AZURITE_KEY])


def make_gcs(endpoint: str) -> Cloud:
    # gcsfs >= 2026 asks the Storage Control gRPC API for each bucket's layout; the emulator has none,
    # so every open would wait out a 60 s timeout. Real GCS answers it; only the emulator needs this.
    # gcsfs reads the switch when first imported, here and in the CLI's processes.
    hns_off = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    os.environ.update(hns_off)
    gcsfs = pytest.importorskip("gcsfs")
    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        pytest.fail("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set")
    options = {"endpoint_url": endpoint, "token": "anon", "project": "vgg-pipeline-tests"}
    admin = gcsfs.GCSFileSystem(**options, skip_instance_cache=True)
    return Cloud("gs", admin, options,
                 [f"--storage-option=endpoint_url={endpoint}", "--storage-option=token=anon"], _env(**hns_off),
                 ["--storage-option=token=anon"], _env(STORAGE_EMULATOR_HOST=endpoint, **hns_off))


@pytest.fixture(scope="module", params=["az", "gs"])
def cloud(request) -> Cloud:
    """An emulated store with containers/buckets ``images`` (the photos) and ``features`` (empty)."""
    made = (make_azure(request.getfixturevalue("azurite")) if request.param == "az"
            else make_gcs(request.getfixturevalue("gcs_emulator")))
    for bucket in ("images", "features"):
        made.admin.mkdir(bucket)
    for key, index in PHOTOS.items():
        fmt = "PNG" if key.endswith(".png") else "JPEG"
        made.admin.pipe_file(f"images/photos/{key}", encode(small_photo(index), fmt))
    made.admin.pipe_file(f"images/photos/{SIDECAR}", b'{"title": "a sidecar"}')
    return made




def readable_files(root: str) -> Iterator[tuple[str, bytes]]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    yield path, f.read()


def test_extract_bucket_to_bucket_then_verify_and_read(cloud: Cloud, vgg11_weights):
    src, out = f"{cloud.scheme}://images/photos", f"{cloud.scheme}://features/run"
    ray_tmp = tempfile.mkdtemp(prefix="vggray-", dir="/tmp")  # short: Ray's socket paths have a limit
    try:
        run = cli("extract", src, out, "--weights", str(vgg11_weights), "--set", "model.arch=vgg11",
                  "--set", "input.shard_size=3", "--set", "runtime.num_actors=1", "--no-progress",
                  *cloud.extract_args, env={**cloud.extract_env, "RAY_TMPDIR": ray_tmp})
        ray_logs = list(readable_files(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 4 images in 2 shards -> 4 embedded, 0 errors" in run.stdout

    check = cli("verify", out, *cloud.verify_args, env=cloud.verify_env)
    assert check.returncode == 0, check.stdout + check.stderr[-2000:]
    assert check.stdout.startswith("OK: 4 images in 2 shards: 4 embedded, 0 errors")

    emb = pd.read_parquet(f"{out}/embeddings/", storage_options=cloud.options).sort_values("id")
    assert emb["id"].tolist() == sorted(PHOTOS)
    for row in emb.itertuples():
        assert (row.width, row.height) == small_photo(PHOTOS[row.id]).size
        assert row.uri == f"{src}/{row.id}"   # in the scheme the input was given with (az://, not abfs://)
        with fsspec.open(row.uri, "rb", **cloud.options) as f:   # a uri opens as it is
            assert f.read() == cloud.admin.cat_file(f"images/photos/{row.id}")
    fc7 = np.stack(emb["fc7"].to_numpy())
    assert fc7.shape == (4, 4096) and fc7.dtype == np.float32 and (fc7 >= 0).all()

    cloud.admin.invalidate_cache()
    table = ds.dataset("features/run/embeddings", filesystem=cloud.admin, format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(PHOTOS)
    by_id = dict(zip(table.column("id").to_pylist(), table.column("fc7").to_pylist()))
    np.testing.assert_array_equal(np.array([by_id[i] for i in emb["id"]], np.float32), fc7)

    objects = {p.split("features/run/", 1)[1]: cloud.admin.cat_file(p)
               for p in cloud.admin.find("features/run")}
    assert sorted(objects) == ["_SUCCESS.json", "_plan/_meta.json", "_plan/part-00000.parquet",
                               "embeddings/part-00000.parquet", "embeddings/part-00001.parquet"]
    success = json.loads(objects["_SUCCESS.json"])
    assert (success["counts"]["images"], success["counts"]["embedded"], success["counts"]["errors"]) == (4, 4, 0)
    assert success["counts"]["skipped"] == {"extension:.json": 1}

    assert ray_logs, "the CLI's Ray wrote no logs under RAY_TMPDIR"
    texts = {"extract stdout": run.stdout, "extract stderr": run.stderr,
             "verify stdout": check.stdout, "verify stderr": check.stderr}
    for secret in cloud.secrets:
        for name, data in [*objects.items(), *ray_logs]:
            assert secret.encode() not in data, f"account key in {name}"
        for name, text in texts.items():
            assert secret not in text, f"account key in {name}"


def test_an_output_container_or_bucket_that_does_not_exist_is_a_usage_error(cloud: Cloud, vgg11_weights):
    out = f"{cloud.scheme}://no-such-place/run"
    run = cli("extract", f"{cloud.scheme}://images/photos", out, "--weights", str(vgg11_weights),
              "--set", "model.arch=vgg11", "--no-progress", *cloud.extract_args, env=cloud.extract_env)
    assert run.returncode == 2, run.stderr[-2000:]
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and f"{cloud.scheme}://no-such-place does not exist" in err[0], err
    assert not cloud.admin.exists("no-such-place")   # nothing was created


def test_an_azure_connection_string_is_a_secret():
    """It carries the account key: redacted in configs, refused on a submitted job's command line."""
    cs = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={AZURITE_KEY};"
    assert redact({"connection_string": cs, "account_name": "acct"}) == {
        "connection_string": "***", "account_name": "acct"}
    with pytest.raises(UsageError, match="connection_string=... looks like a credential"):
        check_job(extract_job(["extract", "az://images/photos", "az://features/run",
                               f"--storage-option=connection_string={cs}"]), None)
