"""What every input form is (docs/design.md §3): :class:`InputForm`, :class:`Probe`, :class:`ListingStats`.

An input form is one way of naming a collection of images (a folder, a bucket prefix, a glob, a
manifest, a tar shard).  Each is one class with the same small interface:

* ``detect(probe)``: does this form read the input ``probe`` describes?  Forms are asked in the
  order of :data:`pipeline.input.forms.FORMS`; the first that says yes opens it.
* ``items(extensions, stats)``: ``(id, uri)`` pairs in a deterministic order, streamed.
* ``batches(extensions, stats)``: the same as ``(ids, uris)`` string columns, a block at a time
  (the default groups :meth:`items`; a manifest reads columns directly).
* ``streams``: whether ids are unique by construction, so the plan may hand out each shard as
  soon as it is cut (True), or must first find repeated ids across the whole listing (False).
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar, Iterator, Optional

import fsspec
import pyarrow as pa

from ...errors import UsageError
from ..storage import with_retries

BATCH_ROWS = 32_768  # rows per (ids, uris) batch handed to the planner


@dataclass
class ListingStats:
    listed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count
    kind: str = ""                                           # folder | glob | manifest | tar

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


class Probe:
    """An input as detection sees it: the url, its filesystem and path, and ``info`` (one
    ``fs.info`` call, made the first time a form asks; a glob never needs it)."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.url, self.fs, self.path = url, fs, path

    @cached_property
    def info(self) -> dict:
        """``fs.info(path)``; a missing input or denied access is a UsageError."""
        try:
            return with_retries(lambda: self.fs.info(self.path), self.url)
        except FileNotFoundError:
            raise UsageError(f"input not found: {self.url}") from None
        except PermissionError:
            raise UsageError(f"access denied to input {self.url}: check the credentials "
                             "(environment, profile or --storage-option)") from None

    @property
    def is_dir(self) -> bool:
        return self.info.get("type") == "directory"

    @property
    def name(self) -> str:
        """The path's file name in lower case, without a URL query: what suffixes are matched on."""
        return posixpath.basename(self.path.split("?", 1)[0]).lower()


class InputForm(ABC):
    """One form of input, opened: ``url`` as given, its filesystem ``fs`` and ``path`` on it.

    A subclass sets ``kind`` (what the plan's ``_meta.json`` and :class:`ListingStats` record),
    ``streams``, and implements :meth:`detect` and :meth:`_items` (and :meth:`_batches` where it
    can do better than grouping items).
    """

    kind: ClassVar[str] = ""
    streams: ClassVar[bool] = True

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.url, self.fs, self.path = url, fs, path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    def scheme(self) -> Optional[str]:
        """The url's scheme as the user wrote it (None for a local path): listed uris keep it."""
        return self.url.split("://", 1)[0].lower() if "://" in self.url else None

    @classmethod
    @abstractmethod
    def detect(cls, probe: Probe) -> bool:
        """True if this form reads the input ``probe`` describes."""

    def items(self, extensions: list[str], stats: Optional[ListingStats] = None) -> Iterator[tuple[str, str]]:
        """``(id, uri)`` for every image, in deterministic order; skips are counted in ``stats``."""
        stats = self._start(stats)
        for item in self._items(_suffixes(extensions), stats):
            stats.listed += 1
            yield item

    def batches(self, extensions: list[str], stats: Optional[ListingStats] = None
                ) -> Iterator[tuple[pa.Array, pa.Array]]:
        """The same listing as ``(ids, uris)`` string columns, a block at a time."""
        stats = self._start(stats)
        for ids, uris in self._batches(_suffixes(extensions), stats):
            stats.listed += len(ids)
            yield ids, uris

    def _start(self, stats: Optional[ListingStats]) -> ListingStats:
        stats = stats if stats is not None else ListingStats()
        stats.kind = self.kind
        return stats

    @abstractmethod
    def _items(self, exts: set[str], stats: ListingStats) -> Iterator[tuple[str, str]]:
        """The listing; ``exts`` are lower-case suffixes with their dot."""

    def _batches(self, exts: set[str], stats: ListingStats) -> Iterator[tuple[pa.Array, pa.Array]]:
        ids: list[str] = []
        uris: list[str] = []
        for i, u in self._items(exts, stats):
            ids.append(i)
            uris.append(u)
            if len(ids) == BATCH_ROWS:
                yield pa.array(ids, pa.string()), pa.array(uris, pa.string())
                ids, uris = [], []
        if ids:
            yield pa.array(ids, pa.string()), pa.array(uris, pa.string())


def _suffixes(extensions: list[str]) -> set[str]:
    """``["JPG", ".png"]`` -> ``{".jpg", ".png"}``."""
    return {"." + e.lower().lstrip(".") for e in extensions}
