"""Storage access (pipeline/input/storage.py): atomic writes and their temporary files, paths,
and retried reads (transient errors retried with backoff, permanent ones raised at once)."""

from __future__ import annotations

import os

import fsspec
import pytest

from pipeline.input import layout, storage
from pipeline.input.storage import (FileSystems, FileTooLarge, StorageUnavailable, join, remove_if_exists,
                                    url_to_fs, with_retries, write_atomic)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff delays ``with_retries`` waits, recorded instead of slept."""
    delays: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", delays.append)
    return delays


# -- atomic writes -----------------------------------------------------------------------------

def test_write_atomic_makes_the_file_appear_whole_and_leaves_nothing_else(tmp_path):
    fs, root = url_to_fs(str(tmp_path))
    target = join(root, "embeddings", "part-00003.parquet")
    write_atomic(fs, target, b"first")
    write_atomic(fs, target, b"second")  # replaces, never appends
    with open(target, "rb") as f:
        assert f.read() == b"second"
    assert os.listdir(tmp_path / "embeddings") == ["part-00003.parquet"]


def test_write_atomic_writes_a_temporary_file_beside_the_target_then_renames_it(tmp_path, monkeypatch):
    fs, root = url_to_fs(str(tmp_path))
    target = join(root, "errors", "part-00001.parquet")
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        with open(src, "rb") as f:
            seen.append((os.path.dirname(src), os.path.basename(src), f.read(), os.path.exists(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(storage.os, "replace", replace)
    write_atomic(fs, target, b"rows")
    ((directory, name, data, target_existed),) = seen
    assert directory == os.path.dirname(target)  # same directory: the rename is atomic
    assert layout.is_temp_name(name) and name.startswith(".part-00001.parquet.tmp-")
    assert layout.part_number(name) is None  # no reader takes it for a part file
    assert (data, target_existed) == (b"rows", False)


def test_a_failed_atomic_write_leaves_neither_target_nor_temporary_file(tmp_path, monkeypatch):
    fs, root = url_to_fs(str(tmp_path))
    target = join(root, "embeddings", "part-00000.parquet")

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(storage.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(fs, target, b"rows")
    assert os.listdir(tmp_path / "embeddings") == []


def test_write_atomic_on_an_object_store_is_one_put():
    fs = fsspec.filesystem("memory")
    write_atomic(fs, "/vggtest-atomic/out/_SUCCESS.json", b"{}")
    assert fs.cat_file("/vggtest-atomic/out/_SUCCESS.json") == b"{}"
    assert fs.ls("/vggtest-atomic/out", detail=False) == ["/vggtest-atomic/out/_SUCCESS.json"]
    fs.rm("/vggtest-atomic", recursive=True)


def test_remove_if_exists_is_idempotent(tmp_path):
    fs, root = url_to_fs(str(tmp_path))
    (tmp_path / "x").write_bytes(b"1")
    remove_if_exists(fs, join(root, "x"))
    remove_if_exists(fs, join(root, "x"))
    assert not (tmp_path / "x").exists()


# -- paths -------------------------------------------------------------------------------------

def test_join_and_url_to_fs(tmp_path, monkeypatch):
    assert join("s3://bucket/out/", "embeddings", "part-00000.parquet") == \
        "s3://bucket/out/embeddings/part-00000.parquet"
    assert join("/data/out", layout.embeddings_part(2)) == "/data/out/embeddings/part-00002.parquet"
    monkeypatch.chdir(tmp_path)
    fs, path = url_to_fs("out")
    assert storage.is_local(fs) and path == str(tmp_path / "out")  # local paths come back absolute
    assert storage.to_uri(fs, path) == str(tmp_path / "out")


def test_read_bytes_refuses_a_file_above_max_bytes(tmp_path):
    """One ranged read of max_bytes + 1 bytes tells: no size request first, no rest of a huge file."""
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    fsys = FileSystems()
    assert fsys.read_bytes(str(tmp_path / "big.jpg"), max_bytes=100) == b"x" * 100
    with pytest.raises(FileTooLarge, match="more than input.max_bytes=99 bytes"):
        fsys.read_bytes(str(tmp_path / "big.jpg"), max_bytes=99)


# -- retries -----------------------------------------------------------------------------------

def test_with_retries_retries_transient_errors_with_backoff(sleeps):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("503 SlowDown: please reduce your request rate")
        return b"data"
    assert with_retries(flaky, "s3://b/k", base_delay=0.01) == b"data"
    assert len(calls) == 3
    # exponential backoff with jitter: d to 2d with d = 0.01, then d = 0.02
    assert len(sleeps) == 2 and 0.01 <= sleeps[0] <= 0.02 and 0.02 <= sleeps[1] <= 0.04, sleeps

    resets = []

    def reset():
        resets.append(1)
        raise ConnectionResetError("connection reset by peer")
    sleeps.clear()
    with pytest.raises(StorageUnavailable) as given_up:
        with_retries(reset, "x", attempts=3, base_delay=0.001)
    assert len(resets) == 3  # retried, then given up: the shard fails (and is retried), no error row
    assert isinstance(given_up.value.__cause__, ConnectionResetError)
    assert len(sleeps) == 2  # no wait after the last attempt


@pytest.mark.parametrize("exc", [FileNotFoundError("nope"), PermissionError("denied"),
                                 OSError("403 Forbidden"), OSError("AccessDenied"), OSError("404 NoSuchKey")])
def test_with_retries_raises_permanent_errors_at_once(exc, sleeps):
    calls = []

    def fail():
        calls.append(1)
        raise exc
    with pytest.raises(type(exc)):
        with_retries(fail, "x", base_delay=1.0)
    assert calls == [1] and sleeps == []


def test_http_status_errors_are_classified_by_status(sleeps):
    aiohttp = pytest.importorskip("aiohttp")

    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    def status_error(status: int) -> Exception:
        url = URL("http://h/x")
        info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
        return aiohttp.ClientResponseError(info, (), status=status, message="x")
    calls = []

    def throttled():
        calls.append(1)
        if len(calls) == 1:
            raise status_error(503)
        if len(calls) == 2:
            raise aiohttp.ServerDisconnectedError()
        return 1
    assert with_retries(throttled, "http://h/x", base_delay=0.001) == 1 and len(calls) == 3
    denied = []

    def forbidden():
        denied.append(1)
        raise status_error(403)
    with pytest.raises(aiohttp.ClientResponseError):
        with_retries(forbidden, "http://h/x", base_delay=1.0)
    assert denied == [1]
    with pytest.raises(ValueError):  # not a storage error: never retried
        with_retries(lambda: int("x"), "x", base_delay=1.0)


def test_to_uri_keeps_the_scheme_the_user_wrote_where_it_names_the_filesystem(tmp_path):
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(anon=True, skip_instance_cache=True)  # no request is made
    assert storage.to_uri(fs, "bucket/a/b.jpg") == "s3://bucket/a/b.jpg"
    assert storage.to_uri(fs, "bucket/a/b.jpg", "s3a") == "s3a://bucket/a/b.jpg"
    assert storage.to_uri(fs, "bucket/a/b.jpg", "gs") == "s3://bucket/a/b.jpg"  # not this filesystem's
    local = fsspec.filesystem("file")
    assert storage.to_uri(local, str(tmp_path / "x.jpg"), "file") == str(tmp_path / "x.jpg")
