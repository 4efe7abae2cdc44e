"""Every path goes through fsspec: opening URLs, atomic writes, and retries of transient faults.

Atomic files (docs/design.md §5): on a local disk we write the target's ``layout.temp_name`` beside it
and ``os.replace`` it; on object stores a single ``pipe_file`` (one PUT, or a multipart upload that
only becomes visible on completion) — a reader never sees half a file either way.

Retries (docs/design.md §6): every storage call goes through :func:`with_retries` (or
:func:`with_retries_async` on a filesystem's event loop): exponential backoff with jitter for
the faults object stores really produce (503 SlowDown, 500/502/504, throttling, connection
resets, timeouts, truncated bodies).  Missing files and denied access are permanent and raised
at once.  A fault that outlasts the budget raises :class:`StorageUnavailable`, a ``JobFailed``:
in a worker it fails the shard (the driver retries it), at the driver it ends the run with one
line and exit 1, resumable.  s3fs's own retry loops (botocore's and s3fs's ``_error_wrapper``)
are switched off, so one policy decides and each retry is logged once, naming the path and the
fault, never a key, token or signed URL (:func:`safe_uri`, :func:`describe_fault`).
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import posixpath
import random
import re
import time
from typing import Any, Awaitable, Callable, Optional, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from ..errors import JobFailed, UsageError
from .layout import temp_name

log = logging.getLogger(__name__)
T = TypeVar("T")

PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestLimitExceeded", "TooManyRequests",
    "TooManyRequestsException", "BandwidthLimitExceeded", "OperationAborted", "BadGateway", "GatewayTimeout",
    "408", "429", "500", "502", "503", "504"})
# errnos s3fs gives to 503 SlowDown/ServiceUnavailable (EBUSY) and 500 InternalError (EREMOTEIO),
# and what a dropped connection looks like on any filesystem.
TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", 121), errno.EAGAIN, errno.ETIMEDOUT,
                              errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE})
_CODE_IN_TEXT = re.compile(r"An error occurred \(([^)]+)\)")  # botocore's ClientError text
_TRANSIENT_TEXT = ("SlowDown", "reduce your request rate", "InternalError", "ServiceUnavailable",
                   "503", "500 Internal", "Throttl")
_PERMANENT_TEXT = ("403", "404", "AccessDenied", "NoSuchKey", "NoSuchBucket", "Forbidden")

ATTEMPTS_ENV = "VGG_PIPELINE_STORAGE_ATTEMPTS"
DEFAULT_ATTEMPTS = 12    # 1 fault in 3 requests exhausts 1 call in 500,000; 1 in 2, 1 in 4,000
BASE_DELAY_S = 0.1       # first retry after 0.1-0.2 s ...
MAX_DELAY_S = 4.0        # ... doubling up to 4-8 s: 26-53 s before a call is given up
# input.read_concurrency: at 30 ms a request, 256 in flight is ~8,500 img/s, what one GPU takes in,
# for ~40 MB of encoded images held at once; S3 serves 5,500 GETs/s per prefix before SlowDown.
DEFAULT_READ_CONCURRENCY = 256
STREAM_CHUNK = 1 << 20


class StorageUnavailable(JobFailed):
    """A transient storage fault that outlasted the retry budget (exit 1, resumable)."""


class FileTooLarge(Exception):
    """A file above ``input.max_bytes``; found from the response, no more than that is read."""


# -- urls ----------------------------------------------------------------------------------------

def url_to_fs(url: str, storage_options: Optional[dict] = None,
              pool: int = 10) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for ``url``; local paths come back absolute.

    ``pool``: connections an s3 filesystem may keep open (botocore's default is 10).
    """
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    fs, path = fsspec.core.url_to_fs(url, **_options(protocol, storage_options, pool))
    _own_retries(fs)
    if is_local(fs):
        path = os.path.abspath(path)
    return fs, path


def _options(protocol: str, storage_options: Optional[dict], pool: int) -> dict:
    """``storage_options`` plus, for s3, a connection pool of ``pool`` and botocore's retries off
    (ours replace them); a user's own ``config_kwargs`` win."""
    so = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        config = dict(so.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", pool)
        config.setdefault("retries", {"total_max_attempts": 1})
        so["config_kwargs"] = config
    return so


def _own_retries(fs: fsspec.AbstractFileSystem) -> None:
    if "s3" in _protocols(fs) and hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's _error_wrapper: one try, then our policy


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def to_uri(fs: fsspec.AbstractFileSystem, path: str, scheme: Optional[str] = None) -> str:
    """docs/design.md §3 ``uri``: an absolute local path (no ``file://``) or ``scheme://bucket/key``.

    ``scheme``: the one the user wrote, kept where it names this filesystem (``az://`` stays
    ``az://`` rather than adlfs' first name, ``abfs://``); else the filesystem's own.
    """
    if is_local(fs):
        return path
    if scheme and "://" not in path and scheme in _protocols(fs):
        return f"{scheme}://{path}"
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else os.path.join(base, *parts)


def safe_uri(uri: str) -> str:
    """``uri`` fit for a log line: no ``user:password@``, no query string (signed URLs, tokens)."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", parts.fragment))


_URL_QUERY = re.compile(r"([a-z][a-z0-9+.-]*://[^\s'\"?]*)\?[^\s'\"#]*", re.IGNORECASE)
_URL_USER = re.compile(r"([a-z][a-z0-9+.-]*://)[^\s'\"/@]+@", re.IGNORECASE)


def redact_message(text: str) -> str:
    """An error message with the query strings and passwords of any URLs in it replaced by ``***``."""
    return _URL_USER.sub(r"\1***@", _URL_QUERY.sub(r"\1?***", text))


# -- classifying faults --------------------------------------------------------------------------

def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its explicit causes (``raise ... from``: s3fs keeps botocore's error there)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__
    return out


def _status_and_code(exc: BaseException) -> tuple[Optional[int], Optional[str]]:
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError (http(s), gcs, az)
    if isinstance(status, int):
        return status, None
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        return (response.get("ResponseMetadata") or {}).get("HTTPStatusCode"), code
    return None, None


# What the cloud SDKs raise when they find no usable credentials at all (botocore, google-auth,
# azure-core), by name: checking them needs none of those packages imported.
_NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                             "NoAuthTokenError", "DefaultCredentialsError", "ClientAuthenticationError"})


def missing_credentials(exc: BaseException) -> bool:
    """The storage client found no (complete) credentials: the user's to fix, not worth a retry."""
    return any(type(e).__name__ in _NO_CREDENTIALS for e in _chain(exc))


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling (503 SlowDown, 429), 5xx, timeouts, dropped or cut connections."""
    if isinstance(exc, PERMANENT_ERRORS) or isinstance(exc, (FileTooLarge, JobFailed)):
        return False
    for e in _chain(exc):
        status, code = _status_and_code(e)
        if status is not None or code is not None:
            return status in TRANSIENT_STATUS or code in TRANSIENT_CODES
        if _is_connection_fault(e):
            return True
        if isinstance(e, OSError) and e.errno is not None:
            if e.errno in TRANSIENT_ERRNOS:
                return True
            found = _CODE_IN_TEXT.search(str(e))
            if found:  # s3fs translated it without keeping the cause: the code is in the text
                return found.group(1) in TRANSIENT_CODES
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno is None:  # a bare OSError("503 SlowDown ...")
        if any(s in text for s in _PERMANENT_TEXT):
            return False
        return any(s in text for s in _TRANSIENT_TEXT)
    return False


def _is_connection_fault(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    from fsspec.exceptions import FSTimeoutError
    if isinstance(exc, FSTimeoutError):
        return True
    try:
        import aiohttp
        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    except ImportError:  # pragma: no cover - aiohttp comes with s3fs and fsspec[http]
        pass
    try:
        from botocore import exceptions as bex
        from botocore.parsers import ResponseParserError  # a throttling answer that is not XML
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        return False
    if isinstance(exc, bex.SSLError):
        return False
    return isinstance(exc, (bex.HTTPClientError, bex.ConnectionError, bex.IncompleteReadError,
                            ResponseParserError))


def describe_fault(exc: BaseException) -> str:
    """What went wrong, without the message (which may quote a signed URL): ``503 SlowDown``,
    ``ServerDisconnectedError``..."""
    for e in _chain(exc):
        status, code = _status_and_code(e)
        if status is not None or code is not None:
            return " ".join(str(x) for x in (status, code) if x is not None)
    found = _CODE_IN_TEXT.search(str(exc))
    if found:
        return f"{type(exc).__name__} {found.group(1)}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} {errno.errorcode.get(exc.errno, exc.errno)}"
    return type(exc).__name__


# -- the retry policy ----------------------------------------------------------------------------

def retry_attempts() -> int:
    """Tries per storage call: ``VGG_PIPELINE_STORAGE_ATTEMPTS`` or 12."""
    try:
        return max(1, int(os.environ.get(ATTEMPTS_ENV, DEFAULT_ATTEMPTS)))
    except ValueError:
        return DEFAULT_ATTEMPTS


def backoff(attempt: int, base_delay: float = BASE_DELAY_S) -> float:
    """Seconds before retry ``attempt + 1``: ``d`` to ``2d`` with ``d = base * 2**attempt`` (capped);
    the jitter keeps a crowd of throttled clients from coming back in step."""
    d = min(MAX_DELAY_S, base_delay * (2 ** attempt))
    return d + random.uniform(0.0, d)


def _give_up_or_wait(exc: BaseException, what: str, attempt: int, tries: int, base_delay: float,
                     level: int) -> float:
    """Raise what ends the call (a permanent error as it is, an exhausted budget as
    :class:`StorageUnavailable`); otherwise log the retry and return the delay."""
    if not is_transient(exc):
        raise exc
    fault = describe_fault(exc)
    if attempt == tries - 1:
        raise StorageUnavailable(f"storage kept failing on {safe_uri(what)} ({fault}, {tries} attempts); "
                                 "finished work is kept, rerun the same command to resume") from exc
    delay = backoff(attempt, base_delay)
    log.log(level, "storage: %s on %s; retry %d/%d in %.2fs", fault, safe_uri(what), attempt + 1,
            tries - 1, delay)
    return delay


def with_retries(fn: Callable[[], T], what: str, attempts: Optional[int] = None,
                 base_delay: float = BASE_DELAY_S, level: int = logging.WARNING) -> T:
    """``fn()``, retried on transient storage faults (see module docstring); ``what`` names the path."""
    tries = attempts or retry_attempts()
    for attempt in range(tries):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified in _give_up_or_wait; the rest re-raised
            delay = _give_up_or_wait(exc, what, attempt, tries, base_delay, level)
        time.sleep(delay)
    raise AssertionError("unreachable")


async def with_retries_async(fn: Callable[[], Awaitable[T]], what: str, attempts: Optional[int] = None,
                             base_delay: float = BASE_DELAY_S, level: int = logging.WARNING) -> T:
    """:func:`with_retries` for a coroutine on a filesystem's event loop."""
    tries = attempts or retry_attempts()
    for attempt in range(tries):
        try:
            return await fn()
        except Exception as exc:  # noqa: BLE001 - classified in _give_up_or_wait; the rest re-raised
            delay = _give_up_or_wait(exc, what, attempt, tries, base_delay, level)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


# -- reading -------------------------------------------------------------------------------------

def read_file(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """A whole (small) file in one retried request."""
    return with_retries(lambda: fs.cat_file(path), to_uri(fs, path))


def ls(fs: fsspec.AbstractFileSystem, path: str, **kwargs: Any) -> list:
    """``fs.ls``, retried."""
    return with_retries(lambda: fs.ls(path, **kwargs), to_uri(fs, path))


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """``fs.exists``, retried (s3fs answers False only on a 404, a 503 raises)."""
    return with_retries(lambda: fs.exists(path), to_uri(fs, path))


# Object stores whose first path component is a bucket (or container) that a write cannot create.
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


def require_bucket(url: str, storage_options: Optional[dict] = None) -> None:
    """A usage error if ``url`` is on an object store whose bucket or container does not exist.

    The pipeline never creates one (its region, access policy and billing are the user's
    choice), and without this check a typo in OUTPUT would only surface at the first write,
    after the whole listing.  One HEAD of the bucket, retried; a bucket we may not inspect
    (403) is left to the writes, which may still be allowed.
    """
    fs, path = url_to_fs(url, storage_options)
    if is_local(fs) or not BUCKET_PROTOCOLS.intersection(_protocols(fs)):
        return
    bucket = path.split("/", 1)[0]
    where = f"{url.split('://', 1)[0]}://{bucket}"
    try:
        with_retries(lambda: fs.info(bucket), where)
    except FileNotFoundError:
        raise UsageError(f"output bucket or container {where} does not exist: create it first") from None
    except PermissionError:
        log.info("cannot inspect %s (access denied); the writes will tell", where)


def limited_range(max_bytes: Optional[int]) -> dict:
    """``cat_file`` arguments that read at most ``max_bytes + 1`` bytes: one ranged GET tells
    whether a file is too large, without a HEAD before it or the rest of a huge file after."""
    return {} if max_bytes is None else {"start": 0, "end": max_bytes + 1}


def check_size(data: bytes, max_bytes: Optional[int]) -> bytes:
    if max_bytes is not None and len(data) > max_bytes:
        raise FileTooLarge(f"more than input.max_bytes={max_bytes} bytes")
    return data


def is_empty_range(exc: BaseException) -> bool:
    """A ranged GET from byte 0 refused (416 InvalidRange): the object is empty."""
    return any(_status_and_code(e)[0] == 416 or _status_and_code(e)[1] == "InvalidRange"
               or "InvalidRange" in str(e) for e in _chain(exc))


def read_limited(fs: fsspec.AbstractFileSystem, path: str, max_bytes: Optional[int], what: str) -> bytes:
    """The file's bytes in one request (retried), :class:`FileTooLarge` above ``max_bytes``."""
    def get() -> bytes:
        try:
            return fs.cat_file(path, **limited_range(max_bytes))
        except Exception as exc:  # noqa: BLE001 - only an empty object's 416 is answered here
            if max_bytes is not None and not is_local(fs) and is_empty_range(exc):
                return b""
            raise
    return check_size(with_retries(get, what), max_bytes)


async def read_limited_async(fs: fsspec.AbstractFileSystem, path: str, max_bytes: Optional[int], what: str,
                             level: int = logging.INFO) -> bytes:
    """:func:`read_limited` as a coroutine on ``fs.loop`` (async filesystems)."""
    async def get() -> bytes:
        try:
            return await fs._cat_file(path, **limited_range(max_bytes))
        except Exception as exc:  # noqa: BLE001 - only an empty object's 416 is answered here
            if max_bytes is not None and is_empty_range(exc):
                return b""
            raise
    return check_size(await with_retries_async(get, what, level=level), max_bytes)


class _RetryingFile(io.RawIOBase):
    """A seekable fsspec file whose reads are retried (for Parquet, CSV and text readers).

    fsspec's buffered files only move their position once a read succeeded, so a failed read
    is simply tried again from the same place.
    """

    def __init__(self, f: Any, what: str) -> None:
        self._f, self._what = f, what

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = with_retries(lambda: self._f.read(len(b)), self._what)
        b[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_read(fs: fsspec.AbstractFileSystem, path: str) -> io.BufferedIOBase:
    """``path`` opened for random-access reading, every request retried."""
    if is_local(fs):
        return fs.open(path, "rb")
    what = to_uri(fs, path)
    f = with_retries(lambda: fs.open(path, "rb"), what)
    return io.BufferedReader(_RetryingFile(f, what), STREAM_CHUNK)


class _Stream(io.RawIOBase):
    """A file read front to back in one GET; a GET cut short is resumed from where it stopped
    (a ranged GET), so a reset in the middle of a 1 GB tar costs one request, not the tar."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self._fs, self._path, self._what = fs, path, to_uri(fs, path)
        self._pos = 0
        self._body: Any = None
        self._etag: Optional[str] = None  # a resumed GET must read the same object version
        self._kind = backend(fs)
        with_retries(self._open, self._what)  # a missing file raises here, as open() would

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        fs, path, offset = self._fs, self._path, self._pos
        if self._kind == "s3":
            bucket, key, version = fs.split_path(path)
            kw = {"Range": f"bytes={offset}-"} if offset else {}
            if version:
                kw["VersionId"] = version
            if self._etag:
                kw["IfMatch"] = self._etag
            resp = fs.call_s3("get_object", Bucket=bucket, Key=key, **kw)
            self._etag = self._etag or resp.get("ETag")
            self._body = resp["Body"]
        elif self._kind == "http":
            self._body = sync(fs.loop, _http_get, fs, path, offset)
        else:
            f = fs.open(path, "rb")
            f.seek(offset)
            self._body = f

    def _read(self, n: int) -> bytes:
        if self._body is None:
            self._open()
        try:
            if self._kind == "s3":
                return sync(self._fs.loop, self._body.read, n)
            if self._kind == "http":
                return sync(self._fs.loop, self._body.content.read, n)
            return self._body.read(n)
        except BaseException:
            self._drop()
            raise

    def readinto(self, b: Any) -> int:
        data = with_retries(lambda: self._read(len(b)), self._what)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is None:
            return
        try:
            body.release() if self._kind == "http" else body.close()
        except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
            pass

    def close(self) -> None:
        self._drop()
        super().close()


def backend(fs: fsspec.AbstractFileSystem) -> str:
    """``s3`` (s3fs: raw ``call_s3`` requests), ``http`` (fsspec's aiohttp filesystem) or ``file``
    (anything else): which of the fast paths here, and in the bucket listing, applies to ``fs``."""
    protocols = _protocols(fs)
    if "s3" in protocols and hasattr(fs, "call_s3"):
        return "s3"
    if ("http" in protocols or "https" in protocols) and hasattr(fs, "set_session"):
        return "http"
    return "file"


async def _http_get(fs: Any, url: str, offset: int) -> Any:
    kw = dict(fs.kwargs)
    headers = dict(kw.pop("headers", None) or {})
    if offset:
        headers["Range"] = f"bytes={offset}-"
    session = await fs.set_session()
    r = await session.get(fs.encode_url(url), headers=headers, **kw)
    try:
        fs._raise_not_found_for_status(r, url)
        if offset and r.status == 200:  # the server ignored the range: skip what we have
            left = offset
            while left:
                chunk = await r.content.read(min(left, STREAM_CHUNK))
                if not chunk:
                    raise ConnectionResetError("stream ended before the resume point")
                left -= len(chunk)
    except BaseException:
        r.release()
        raise
    return r


def open_stream(fs: fsspec.AbstractFileSystem, path: str) -> io.BufferedIOBase:
    """``path`` for reading front to back (tar shards, text manifests): one GET on s3 and http,
    resumed after a fault; a plain file elsewhere."""
    if is_local(fs):
        return fs.open(path, "rb")
    return io.BufferedReader(_Stream(fs, path), STREAM_CHUNK)


# -- writing -------------------------------------------------------------------------------------

def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``path`` appear with ``data`` all at once (see module docstring); object-store PUTs
    are retried (a PUT whose answer was lost is simply made again: same key, same bytes)."""
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
        with_retries(lambda: fs.pipe_file(path, data), to_uri(fs, path))


def remove_if_exists(fs: fsspec.AbstractFileSystem, path: str) -> None:
    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
    with_retries(rm, to_uri(fs, path))


class FileSystems:
    """Per-process cache of filesystems by protocol, so a worker reuses connections.

    ``read_concurrency`` is how many requests a reader keeps in flight on an async filesystem
    (``input.read_concurrency``); s3 gets a connection pool that large.
    """

    def __init__(self, storage_options: Optional[dict] = None,
                 read_concurrency: int = DEFAULT_READ_CONCURRENCY) -> None:
        self.storage_options = storage_options or {}
        self.read_concurrency = read_concurrency
        self._cache: dict[str, Any] = {}

    def get(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        if protocol not in self._cache:
            self._cache[protocol] = url_to_fs(uri, self.storage_options, pool=self.read_concurrency)[0]
        fs = self._cache[protocol]
        path = fs._strip_protocol(uri)
        return fs, (os.path.abspath(path) if is_local(fs) else path)

    def read_bytes(self, uri: str, max_bytes: Optional[int] = None) -> bytes:
        """``uri``'s bytes in one request, retried; :class:`FileTooLarge` above ``max_bytes``."""
        fs, path = self.get(uri)
        return read_limited(fs, path, max_bytes, uri)
