"""The file filter that folder, bucket and glob listings share (docs/design.md §3).

Files come in sorted from a walk; each becomes ``(path relative to the root, uri)`` if its
extension is an image extension, the members of a ``.tar`` (webdataset shards inside a
folder), or a counted skip: hidden files, files under hidden directories, other extensions.
"""

from __future__ import annotations

import os
import posixpath
from typing import Iterable, Iterator, Optional

import fsspec

from ..storage import is_local, to_uri
from .base import ListingStats
from .tar import TAR_SUFFIX, tar_members


def filter_files(fs: fsspec.AbstractFileSystem, root: str, files: Iterable[str], exts: set[str],
                 stats: ListingStats, scheme: Optional[str] = None) -> Iterator[tuple[str, str]]:
    """``(id, uri)`` of the image files (and tar members) among ``files``, all below ``root``;
    uris spelled with ``scheme`` (:func:`~pipeline.input.storage.to_uri`)."""
    local = is_local(fs)
    for path in files:
        rel = _relative(root, path, local)
        base = posixpath.basename(rel)
        ext = os.path.splitext(base)[1].lower()
        if base.startswith("."):
            stats.skip("hidden")
        elif any(p.startswith(".") for p in rel.split("/")[:-1]):  # a glob can reach into hidden dirs
            stats.skip("hidden")
        elif ext == TAR_SUFFIX:
            yield from tar_members(fs, path, rel, exts, stats, scheme)
        elif ext in exts:
            yield rel, to_uri(fs, path, scheme)
        else:
            stats.skip(f"extension:{ext or '(none)'}")


def _relative(root: str, path: str, local: bool) -> str:
    rel = os.path.relpath(path, root) if local else path[len(root.rstrip("/")) + 1:]
    return rel.replace(os.sep, "/")
