"""Tar shards in the webdataset layout (docs/design.md §3): each image member is one item.

This module is the one place that spells member addressing: an item's uri is ``TAR_URI#member``
and its id ``TAR_ID#member`` (:func:`member_uri`), and :func:`split_member_uri` takes a uri
apart again for the reader.  The split is at the first ``#`` that directly follows ``.tar``
(or ``.tar?query``, a signed URL), case-insensitively: a member name may hold any character,
``#`` included, and so may the tar's path, except the sequence ``.tar#`` itself.

The tar is streamed (``r|``), never extracted: listing reads only the 512-byte headers, and
:func:`read_members` yields the members a shard wants from one pass over the stream.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import tarfile
from typing import Iterator, Optional

import fsspec

from ..storage import open_stream, to_uri
from .base import InputForm, ListingStats, Probe

log = logging.getLogger(__name__)

TAR_SUFFIX = ".tar"
_MEMBER_URI = re.compile(r"(.*?\.tar(?:\?[^#]*)?)#(.+)", re.IGNORECASE | re.DOTALL)


def member_uri(tar: str, member: str) -> str:
    """``TAR#member``: the uri (or id) of ``member`` of the tar ``tar``."""
    return f"{tar}#{member}"


def split_member_uri(uri: str) -> Optional[tuple[str, str]]:
    """``TAR_URI#member`` -> ``(TAR_URI, member)``; ``None`` for a plain file."""
    m = _MEMBER_URI.fullmatch(uri)
    return (m.group(1), m.group(2)) if m else None


class TarForm(InputForm):
    """One ``.tar`` shard given as the input (a folder or glob of tars lists their members too)."""

    kind = "tar"

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        return not probe.is_dir and probe.name.endswith(TAR_SUFFIX)

    def _items(self, exts: set[str], stats: ListingStats) -> Iterator[tuple[str, str]]:
        return tar_members(self.fs, self.path, posixpath.basename(self.path), exts, stats, self.scheme)


def tar_members(fs: fsspec.AbstractFileSystem, path: str, tar_id: str, exts: set[str],
                stats: ListingStats, scheme: Optional[str] = None) -> Iterator[tuple[str, str]]:
    """``(TAR_ID#member, TAR_URI#member)`` for each image member of the tar at ``path``.

    A member is skipped (and counted) when it is hidden, not an image (a webdataset sidecar:
    ``.json``, ``.txt``, ...) or a repeat of an earlier member's name.  A damaged tar keeps the
    members before the damage.
    """
    tar_uri = to_uri(fs, path, scheme)
    seen: set[str] = set()  # bounded by one tar's members
    try:
        with open_stream(fs, path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                if any(p.startswith(".") and p not in (".", "..") for p in name.split("/")):
                    stats.skip("hidden")
                elif os.path.splitext(name)[1].lower() not in exts:
                    stats.skip("tar-sidecar")
                elif name in seen:
                    stats.skip("tar-duplicate-member")
                else:
                    seen.add(name)
                    yield member_uri(tar_id, name), member_uri(tar_uri, name)
    except (tarfile.TarError, EOFError) as exc:
        # A broken shard must not sink the whole listing: members before the damage are kept.
        log.warning("unreadable tar %s after %d members (%s); rest skipped", tar_uri, len(seen), exc)
        stats.skip("unreadable-tar")


def read_members(fileobj: io.BufferedIOBase, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
    """Stream a tar once and yield ``(member, bytes)`` for the wanted members (no extraction).

    Stops after the last wanted member: the rest of the tar is neither read nor checked.
    """
    left = set(wanted)
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if member.name in left and member.isfile():
                f = tar.extractfile(member)
                yield member.name, f.read() if f else b""
                left.discard(member.name)
                if not left:
                    return
