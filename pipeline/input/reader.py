"""The reader: fetch, decode and preprocess a shard's images ahead of the model.

:func:`read_shard` yields one :class:`Decoded` or :class:`Failed` per item, in plan order, with up
to ``prefetch`` items decoded ahead on a thread pool so decoding overlaps inference (PIL releases
the GIL).  :func:`fetch_shard` does the same with the encoded bytes (:class:`Fetched`), for the GPU
decoder.

Fetching (docs/design.md §6): on async filesystems (s3, gcs, az, http) the reads run as coroutines on the
filesystem's own event loop, ``read_concurrency`` of them in flight at once whatever the number of
cores, one ranged GET per image (``input.max_bytes`` is enforced from the response, no HEAD first).
Local and other synchronous filesystems, and tar members (each tar streamed once, one GET), are
read on a thread pool.  Transient faults are retried (:mod:`.storage`); one that outlasts the retry
budget raises :class:`~.storage.StorageUnavailable` out of the reader, failing the shard, instead
of becoming an error row.
"""

from __future__ import annotations

import asyncio
import tarfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar, Union


from ..decode.cpu import decode_with_size
from ..errors import ItemError
from ..decode.preprocess import RESIZE, Decoded, preprocess_pil
from .forms.tar import read_members, split_member_uri
from .storage import (FileSystems, FileTooLarge, StorageUnavailable, is_local, open_stream, read_limited,
                      read_limited_async, redact_message)

T = TypeVar("T")


@dataclass
class Fetched:
    pos: int
    data: bytes  # the encoded image


@dataclass
class Failed:
    pos: int
    error: ItemError


@dataclass
class StageTimes:
    read_s: float = 0.0
    decode_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, read_s: float, decode_s: float) -> None:
        with self._lock:  # += from several reader threads
            self.read_s += read_s
            self.decode_s += decode_s


class _TarCache:
    """Streams each tar of a shard once (one GET), keeping only the members the shard wants."""

    def __init__(self, fsys: FileSystems, uris: list[str]) -> None:
        self.fsys = fsys
        self.wanted: dict[str, set[str]] = {}
        for uri in uris:
            parts = split_member_uri(uri)
            if parts:
                self.wanted.setdefault(parts[0], set()).add(parts[1])
        self.members: dict[str, dict[str, bytes]] = {}
        self.damage: dict[str, BaseException] = {}  # tar -> why its stream ended early
        self.locks = {tar: threading.Lock() for tar in self.wanted}

    def read(self, tar_uri: str, member: str) -> bytes:
        with self.locks[tar_uri]:
            if tar_uri not in self.members:
                members: dict[str, bytes] = {}
                fs, path = self.fsys.get(tar_uri)
                try:
                    with open_stream(fs, path) as f:
                        for name, data in read_members(f, self.wanted[tar_uri]):
                            members[name] = data
                except (tarfile.TarError, EOFError) as exc:  # members before the damage still count
                    self.damage[tar_uri] = exc
                # only a finished (or damaged) stream is final: after a storage failure the next
                # member streams the tar again rather than reporting the rest missing
                self.members[tar_uri] = members
            members = self.members[tar_uri]
        if member not in members:
            if tar_uri in self.damage:
                raise tarfile.ReadError(f"tar damaged before {member}: {self.damage[tar_uri]}")
            raise FileNotFoundError(f"{member} not in {tar_uri}")
        return members.pop(member)


def _read_error(exc: BaseException) -> ItemError:
    if isinstance(exc, ItemError):
        return exc
    if isinstance(exc, FileTooLarge):
        return ItemError("read", "TooLarge", str(exc))
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ItemError("read", type(exc).__name__, redact_message(text))


class _Fetcher:
    """Starts the read of each position of a shard; :meth:`start` returns a future of
    :class:`Fetched` or :class:`Failed` (a :class:`StorageUnavailable` is raised by ``result()``).

    Plain files on an async filesystem are coroutines on its event loop, at most ``concurrency``
    in flight; the rest (local files, synchronous filesystems, tar members) run on ``threads``
    threads.
    """

    def __init__(self, uris: list[str], fsys: FileSystems, max_bytes: int, times: StageTimes, *,
                 threads: int, concurrency: int) -> None:
        self.uris, self.fsys, self.max_bytes, self.times = uris, fsys, max_bytes, times
        self.concurrency = max(1, concurrency)
        self.tars = _TarCache(fsys, uris)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fetch")
        self._limits: dict[int, asyncio.Semaphore] = {}  # one per event loop, made on that loop

    def _async_fs(self, uri: str) -> Optional[tuple[Any, str]]:
        if split_member_uri(uri) is not None:
            return None
        try:
            fs, path = self.fsys.get(uri)
        except Exception:  # noqa: BLE001 - e.g. an unknown protocol: the blocking read makes it an error row
            return None
        if getattr(fs, "async_impl", False) and not is_local(fs):
            return fs, path
        return None

    def depth(self, prefetch: int) -> int:
        """How many reads to keep started ahead of the consumer."""
        remote = next((u for u in self.uris if split_member_uri(u) is None), None)
        return max(prefetch, self.concurrency) if remote and self._async_fs(remote) else prefetch

    def start(self, pos: int) -> Future:
        target = self._async_fs(self.uris[pos])
        if target is not None:
            fs, path = target
            return asyncio.run_coroutine_threadsafe(self._fetch_async(pos, fs, path), fs.loop)
        return self.pool.submit(self._fetch_blocking, pos)

    async def _fetch_async(self, pos: int, fs: Any, path: str) -> Union[Fetched, Failed]:
        key = id(asyncio.get_running_loop())
        limit = self._limits.get(key)
        if limit is None:  # all coroutines run on this loop's thread: no race here
            limit = self._limits[key] = asyncio.Semaphore(self.concurrency)
        async with limit:
            t0 = time.perf_counter()
            try:
                return Fetched(pos, await read_limited_async(fs, path, self.max_bytes, self.uris[pos]))
            except Exception as exc:  # noqa: BLE001 - classified in _failed
                return self._failed(pos, exc)
            finally:
                self.times.add(time.perf_counter() - t0, 0.0)

    def _fetch_blocking(self, pos: int) -> Union[Fetched, Failed]:
        uri = self.uris[pos]
        t0 = time.perf_counter()
        try:
            tar = split_member_uri(uri)
            if tar:
                return Fetched(pos, self.tars.read(*tar))
            fs, path = self.fsys.get(uri)
            return Fetched(pos, read_limited(fs, path, self.max_bytes, uri))
        except Exception as exc:  # noqa: BLE001 - classified in _failed
            return self._failed(pos, exc)
        finally:
            self.times.add(time.perf_counter() - t0, 0.0)

    @staticmethod
    def _failed(pos: int, exc: Exception) -> Failed:
        """A read failure is the image's error row, except storage that stayed unavailable: that
        fails the shard (the driver retries it), never a row for an image that is fine."""
        if isinstance(exc, StorageUnavailable):
            raise exc
        return Failed(pos, _read_error(exc))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _ahead(items: Iterable[T], start: Callable[[T], Future], depth: int) -> Iterator[tuple[T, Future]]:
    """``(item, start(item))`` in order, up to ``depth`` started before the one handed out;
    closing the generator cancels what was started but not handed out."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, start(item)))
            if len(pending) >= depth:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        for _, fut in pending:
            fut.cancel()


def _positions(n: int, skip: set[int]) -> Iterator[int]:
    return (p for p in range(n) if p not in skip)


def _results(ahead: Iterable[tuple[int, Future]], before_item: Optional[Callable[[int], None]]) -> Iterator[Any]:
    """Each position's result in plan order, ``before_item(pos)`` called first (the tests' hook)."""
    for pos, fut in ahead:
        if before_item:
            before_item(pos)
        yield fut.result()


def fetch_shard(uris: list[str], skip: set[int], fsys: FileSystems, *, max_bytes: int, threads: int,
                prefetch: int, times: Optional[StageTimes] = None,
                before_item: Optional[Callable[[int], None]] = None,
                read_concurrency: Optional[int] = None) -> Iterator[Union[Fetched, Failed]]:
    """The encoded bytes of ``uris`` (positions in ``skip`` left out), in order, ``prefetch`` ahead
    (at least ``read_concurrency``, default ``fsys.read_concurrency``, on async filesystems).

    For decoders that take bytes themselves (:class:`pipeline.decode.gpu.GpuBatchDecoder`).
    """
    fetcher = _Fetcher(uris, fsys, max_bytes, times if times is not None else StageTimes(), threads=threads,
                       concurrency=read_concurrency or fsys.read_concurrency)
    fetches = _ahead(_positions(len(uris), skip), fetcher.start, fetcher.depth(prefetch))
    try:
        yield from _results(fetches, before_item)
    finally:
        fetches.close()
        fetcher.close()


def read_shard(uris: list[str], skip: set[int], fsys: FileSystems, *, max_pixels: int, max_bytes: int,
               threads: int, prefetch: int, keep_image: bool = False, min_side: int = RESIZE,
               times: Optional[StageTimes] = None,
               before_item: Optional[Callable[[int], None]] = None,
               read_concurrency: Optional[int] = None) -> Iterator[Union[Decoded, Failed]]:
    """Decode ``uris`` (positions in ``skip`` are left out) in order, ``prefetch`` items ahead on
    ``threads`` threads; the reads run further ahead (see :func:`fetch_shard`).

    ``min_side`` is the smallest shorter side the mapper will resize to (JPEG draft decoding keeps
    4x that); the dense descriptor raises it to its largest scale.
    """
    times = times if times is not None else StageTimes()
    fetcher = _Fetcher(uris, fsys, max_bytes, times, threads=threads,
                       concurrency=read_concurrency or fsys.read_concurrency)

    def load(pos: int, fetched: Future) -> Union[Decoded, Failed]:
        got = fetched.result()  # the fetch never waits on a decode: no deadlock between the pools
        if isinstance(got, Failed):
            return got
        t0 = time.perf_counter()
        try:
            img, (width, height) = decode_with_size(got.data, max_pixels=max_pixels, max_bytes=max_bytes,
                                                    min_side=min_side)
            pixels = preprocess_pil(img)
        except ItemError as exc:
            return Failed(pos, exc)
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill the shard
            return Failed(pos, ItemError("decode", type(exc).__name__, str(exc)[:200]))
        finally:
            times.add(0.0, time.perf_counter() - t0)
        return Decoded(pos, pixels, width, height, img if keep_image else None)

    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode")
    fetches = _ahead(_positions(len(uris), skip), fetcher.start, fetcher.depth(prefetch))
    decodes = _ahead(fetches, lambda pf: pool.submit(load, *pf), prefetch)
    try:
        yield from _results(((pos, fut) for (pos, _), fut in decodes), before_item)
    finally:
        decodes.close()
        fetches.close()
        pool.shutdown(wait=True, cancel_futures=True)
        fetcher.close()
