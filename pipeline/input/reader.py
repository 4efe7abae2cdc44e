"""The reader: fetch, decode and preprocess a shard's images on a thread pool, ahead of the model.

:func:`read_shard` yields one :class:`Decoded` or :class:`Failed` per item, in plan order, with up
to ``prefetch`` items in flight so decoding overlaps inference (PIL and fsspec release the GIL).
:func:`fetch_shard` does the same with the encoded bytes (:class:`Fetched`), for the GPU decoder.
"""

from __future__ import annotations

import tarfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Union


from ..decode.cpu import decode_with_size
from ..errors import ItemError
from ..decode.preprocess import RESIZE, Decoded, preprocess_pil
from .sources import read_tar_members
from .storage import FileSystems, FileTooLarge


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


def split_tar_uri(uri: str) -> Optional[tuple[str, str]]:
    """``TAR_URI#member`` -> ``(TAR_URI, member)``; ``None`` for a plain file."""
    head, sep, member = uri.partition("#")
    return (head, member) if sep and head.lower().endswith(".tar") and member else None


class _TarCache:
    """Streams each tar of a shard once, keeping only the members the shard wants."""

    def __init__(self, fsys: FileSystems, uris: list[str]) -> None:
        self.fsys = fsys
        self.wanted: dict[str, set[str]] = {}
        for uri in uris:
            parts = split_tar_uri(uri)
            if parts:
                self.wanted.setdefault(parts[0], set()).add(parts[1])
        self.members: dict[str, dict[str, bytes]] = {}
        self.damage: dict[str, BaseException] = {}  # tar -> why its stream ended early
        self.locks = {tar: threading.Lock() for tar in self.wanted}

    def read(self, tar_uri: str, member: str) -> bytes:
        with self.locks[tar_uri]:
            if tar_uri not in self.members:
                members = self.members[tar_uri] = {}
                fs, path = self.fsys.get(tar_uri)
                try:
                    with fs.open(path, "rb") as f:
                        for name, data in read_tar_members(f, self.wanted[tar_uri]):
                            members[name] = data
                except (tarfile.TarError, EOFError) as exc:  # members before the damage still count
                    self.damage[tar_uri] = exc
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
    return ItemError("read", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def _ordered(work: Callable[[int], object], positions: Iterable[int], *, threads: int, prefetch: int,
             before_item: Optional[Callable[[int], None]]) -> Iterator:
    """``work(pos)`` for each position on a thread pool, yielded in order, ``prefetch`` ahead."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="read") as pool:
        pending: deque = deque()
        for pos in positions:
            pending.append((pos, pool.submit(work, pos)))
            if len(pending) >= prefetch:
                p, fut = pending.popleft()
                if before_item:
                    before_item(p)
                yield fut.result()
        while pending:
            p, fut = pending.popleft()
            if before_item:
                before_item(p)
            yield fut.result()


def _fetcher(uris: list[str], fsys: FileSystems, max_bytes: int,
             times: StageTimes) -> Callable[[int], Union[Fetched, Failed]]:
    """``fetch(pos)``: the bytes of ``uris[pos]`` (a tar member or a file), or why not."""
    tars = _TarCache(fsys, uris)

    def fetch(pos: int) -> Union[Fetched, Failed]:
        uri = uris[pos]
        t0 = time.perf_counter()
        try:
            tar = split_tar_uri(uri)
            return Fetched(pos, tars.read(*tar) if tar else fsys.read_bytes(uri, max_bytes))
        except Exception as exc:  # noqa: BLE001 - every read failure becomes an error row
            return Failed(pos, _read_error(exc))
        finally:
            times.add(time.perf_counter() - t0, 0.0)
    return fetch


def fetch_shard(uris: list[str], skip: set[int], fsys: FileSystems, *, max_bytes: int, threads: int,
                prefetch: int, times: Optional[StageTimes] = None,
                before_item: Optional[Callable[[int], None]] = None) -> Iterator[Union[Fetched, Failed]]:
    """The encoded bytes of ``uris`` (positions in ``skip`` left out), in order, ``prefetch`` ahead.

    For decoders that take bytes themselves (:class:`pipeline.decode.gpu.GpuBatchDecoder`).
    """
    fetch = _fetcher(uris, fsys, max_bytes, times if times is not None else StageTimes())
    return _ordered(fetch, (p for p in range(len(uris)) if p not in skip), threads=threads,
                    prefetch=prefetch, before_item=before_item)


def read_shard(uris: list[str], skip: set[int], fsys: FileSystems, *, max_pixels: int, max_bytes: int,
               threads: int, prefetch: int, keep_image: bool = False, min_side: int = RESIZE,
               times: Optional[StageTimes] = None,
               before_item: Optional[Callable[[int], None]] = None) -> Iterator[Union[Decoded, Failed]]:
    """Decode ``uris`` (positions in ``skip`` are left out) in order, ``prefetch`` items ahead.

    ``min_side`` is the smallest shorter side the mapper will resize to (JPEG draft decoding keeps
    4x that); the dense descriptor raises it to its largest scale.
    """
    times = times if times is not None else StageTimes()
    fetch = _fetcher(uris, fsys, max_bytes, times)

    def load(pos: int) -> Union[Decoded, Failed]:
        got = fetch(pos)
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

    return _ordered(load, (p for p in range(len(uris)) if p not in skip), threads=threads,
                    prefetch=prefetch, before_item=before_item)
