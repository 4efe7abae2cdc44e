"""Listing the input (DESIGN §3): folders, buckets, globs, manifests and tar shards, streamed.

:func:`list_input` yields ``(id, uri)`` pairs in a deterministic order and never materialises
the whole listing: folders are walked one directory at a time (sorted), manifests are read in
record batches, tar shards are scanned member by member.  ``ListingStats`` counts what was
skipped (sidecars, hidden files, other extensions).

Example::

    >>> from pipeline.sources import list_input, ListingStats
    >>> stats = ListingStats()
    >>> items = list(list_input("tests", ["jpg"], stats=stats))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

import fsspec
import pyarrow.parquet as pq

from .errors import UsageError
from .storage import is_local, to_uri, url_to_fs

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
TAR_SUFFIX = ".tar"
GLOB_CHARS = "*?["


@dataclass
class ListingStats:
    listed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count
    kind: str = ""                                           # folder | glob | manifest | tar

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def input_kind(url: str, storage_options: Optional[dict] = None) -> str:
    """``manifest`` | ``tar`` | ``glob`` | ``folder``; a missing input is a UsageError."""
    fs, path = url_to_fs(url, storage_options)
    if any(c in path for c in GLOB_CHARS):
        return "glob"
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise UsageError(f"input not found: {url}") from None
    if info.get("type") == "directory":
        return "folder"
    lower = path.lower()
    if lower.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    if lower.endswith(TAR_SUFFIX):
        return "tar"
    raise UsageError(f"input {url} is a file but not a manifest (.txt/.csv/.parquet) or a .tar shard")


def list_input(url: str, extensions: list[str], storage_options: Optional[dict] = None,
               stats: Optional[ListingStats] = None) -> Iterator[tuple[str, str]]:
    """Yield ``(id, uri)`` for every image of the input, in deterministic order."""
    stats = stats if stats is not None else ListingStats()
    stats.kind = input_kind(url, storage_options)
    fs, path = url_to_fs(url, storage_options)
    exts = {"." + e.lower().lstrip(".") for e in extensions}
    if stats.kind == "manifest":
        items = _manifest(fs, path)
    elif stats.kind == "tar":
        items = _tar_members(fs, path, posixpath.basename(path), exts, stats)
    else:
        if stats.kind == "glob":
            root = path[: min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
            files = (p for p in sorted(fs.glob(path)) if not fs.isdir(p))
        else:
            root, files = path, _walk_sorted(fs, path)
        items = _filter_files(fs, root, files, exts, stats)
    for item in items:
        stats.listed += 1
        yield item


def _walk_sorted(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[str]:
    """Depth-first, each directory's entries sorted; hidden directories are not entered."""
    if is_local(fs):  # os.scandir is ~10x faster than fsspec's ls on large local trees
        with os.scandir(root) as it:
            entries = sorted((e.name, e.is_dir(follow_symlinks=True)) for e in it)
        for name, is_dir in entries:
            full = os.path.join(root, name)
            if is_dir:
                if not name.startswith("."):
                    yield from _walk_sorted(fs, full)
            else:
                yield full
        return
    entries = sorted(fs.ls(root, detail=True), key=lambda e: e["name"])
    for e in entries:
        name = e["name"].rstrip("/")
        if name == root.rstrip("/"):
            continue
        if e["type"] == "directory":
            if not posixpath.basename(name).startswith("."):
                yield from _walk_sorted(fs, name)
        else:
            yield name


def _relative(root: str, path: str, local: bool) -> str:
    rel = os.path.relpath(path, root) if local else path[len(root.rstrip("/")) + 1:]
    return rel.replace(os.sep, "/")


def _filter_files(fs: fsspec.AbstractFileSystem, root: str, files: Iterator[str], exts: set[str],
                  stats: ListingStats) -> Iterator[tuple[str, str]]:
    local = is_local(fs)
    for path in files:
        base = posixpath.basename(path.replace(os.sep, "/"))
        ext = os.path.splitext(base)[1].lower()
        rel = _relative(root, path, local)
        if base.startswith("."):
            stats.skip("hidden")
        elif ext == TAR_SUFFIX:
            yield from _tar_members(fs, path, rel, exts, stats)
        elif ext in exts:
            yield rel, to_uri(fs, path)
        else:
            stats.skip(f"extension:{ext or '(none)'}")


def _tar_members(fs: fsspec.AbstractFileSystem, path: str, tar_id: str, exts: set[str],
                 stats: ListingStats) -> Iterator[tuple[str, str]]:
    """Webdataset layout: each image member of the tar is one item, ``TAR_URI#member``."""
    tar_uri = to_uri(fs, path)
    seen: set[str] = set()  # bounded by one tar's members
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            if os.path.splitext(name)[1].lower() not in exts or posixpath.basename(name).startswith("."):
                stats.skip("tar-sidecar")
                continue
            if name in seen:
                stats.skip("tar-duplicate-member")
                continue
            seen.add(name)
            yield f"{tar_id}#{name}", f"{tar_uri}#{name}"


def _resolve(line: str, manifest_dir: str, fs: fsspec.AbstractFileSystem) -> str:
    if line.startswith("file://"):
        return line[len("file://"):]
    if "://" in line or os.path.isabs(line) and is_local(fs):
        return line
    joined = posixpath.normpath(posixpath.join(manifest_dir, line))
    return os.path.abspath(joined) if is_local(fs) else fs.unstrip_protocol(joined)


def _manifest(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, str]]:
    """Rows of a manifest, in its own order. ``.txt`` lines are their own ids."""
    manifest_dir = posixpath.dirname(path)
    lower = path.lower()
    if lower.endswith(".txt"):
        with fs.open(path, "rt", encoding="utf-8") as f:
            for raw in f:
                line = raw.strip()
                if line and not line.startswith("#"):
                    yield line, _resolve(line, manifest_dir, fs)
        return
    if lower.endswith(".csv"):
        with fs.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if "uri" not in (reader.fieldnames or []):
                raise UsageError(f"manifest {path} has no 'uri' column")
            for row in reader:
                uri = (row["uri"] or "").strip()
                if uri:
                    yield (row.get("id") or uri).strip(), _resolve(uri, manifest_dir, fs)
        return
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if "uri" not in names:
            raise UsageError(f"manifest {path} has no 'uri' column")
        columns = ["uri"] + (["id"] if "id" in names else [])
        for batch in pf.iter_batches(batch_size=65536, columns=columns):
            uris = batch.column("uri").to_pylist()
            ids = batch.column("id").to_pylist() if "id" in columns else uris
            for i, u in zip(ids, uris):
                if u:
                    yield str(i if i is not None else u), _resolve(str(u), manifest_dir, fs)


def read_tar_members(fileobj: io.BufferedIOBase, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
    """Stream a tar once and yield ``(member, bytes)`` for the wanted members (no extraction)."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                f = tar.extractfile(member)
                yield member.name, f.read() if f else b""
