"""Every path goes through fsspec: opening URLs, atomic writes, retried reads.

Atomic files (DESIGN §5): on a local disk we write the target's ``layout.temp_name`` beside it
and ``os.replace`` it; on object stores a single ``pipe_file`` (one PUT, or a multipart upload that
only becomes visible on completion) — a reader never sees half a file either way.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from typing import Any, Callable, Optional, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .layout import temp_name

log = logging.getLogger(__name__)
T = TypeVar("T")

PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
READ_ATTEMPTS = 4


def url_to_fs(url: str, storage_options: Optional[dict] = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for ``url``; local paths come back absolute."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if is_local(fs):
        path = os.path.abspath(path)
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """DESIGN §3 ``uri``: an absolute local path (no ``file://``) or ``scheme://bucket/key``."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else os.path.join(base, *parts)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``path`` appear with ``data`` all at once (see module docstring)."""
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, temp_name(os.path.basename(path)))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def remove_if_exists(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def with_retries(fn: Callable[[], T], what: str, attempts: int = READ_ATTEMPTS,
                 base_delay: float = 0.25) -> T:
    """Run ``fn``; retry transient storage errors (throttling, resets) with exponential backoff.

    Missing files and denied access are permanent and raised at once.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            delay = base_delay * (4 ** attempt)
            log.warning("transient error on %s (%s); retry %d in %.2fs", what, exc, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling (503 SlowDown, 429), 5xx, timeouts, dropped connections."""
    if isinstance(exc, PERMANENT_ERRORS):
        return False
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError (http(s):// inputs)
    if isinstance(status, int):
        return status in TRANSIENT_STATUS
    if _looks_permanent(exc):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) or _is_client_error(exc)


def _looks_permanent(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("403", "404", "AccessDenied", "NoSuchKey", "NoSuchBucket", "Forbidden"))


def _is_client_error(exc: BaseException) -> bool:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp comes with fsspec[http]
        return False
    return isinstance(exc, aiohttp.ClientError)  # resets, disconnects, payload errors


class FileSystems:
    """Per-process cache of filesystems by protocol, so a worker reuses connections."""

    def __init__(self, storage_options: Optional[dict] = None) -> None:
        self.storage_options = storage_options or {}
        self._cache: dict[str, Any] = {}

    def get(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        if protocol not in self._cache:
            self._cache[protocol] = url_to_fs(uri, self.storage_options)[0]
        fs = self._cache[protocol]
        path = fs._strip_protocol(uri)
        return fs, (os.path.abspath(path) if is_local(fs) else path)

    def read_bytes(self, uri: str, max_bytes: Optional[int] = None) -> bytes:
        fs, path = self.get(uri)

        def read() -> bytes:
            if max_bytes is not None:
                size = fs.size(path)
                if size is not None and size > max_bytes:
                    raise FileTooLarge(f"{size} bytes > input.max_bytes={max_bytes}")
            return fs.cat_file(path)
        return with_retries(read, uri)


class FileTooLarge(Exception):
    """A file above ``input.max_bytes``; refused before it is read into memory."""
