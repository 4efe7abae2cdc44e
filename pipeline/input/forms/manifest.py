"""Manifests (docs/design.md §3): ``.txt``, ``.csv`` and ``.parquet`` lists of images, read column-wise.

``.txt``: one uri a line, the line is its id; blank lines and ``#`` comments are ignored; lines
are stripped.  ``.csv``/``.parquet``: a ``uri`` column and an optional ``id`` column (an empty
id: the uri).  Relative uris are resolved against the manifest's folder; existence is not
checked here.  Rows come a block at a time (``MANIFEST_BLOCK_BYTES`` of text, ``BATCH_ROWS``
Parquet rows), in the manifest's own order.  A manifest may repeat ids, so its plan does not
stream: the planner finds the repeats first (:mod:`pipeline.input.plan`).
"""

from __future__ import annotations

import csv
import os
import posixpath
from typing import Callable, Iterator, Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from ...errors import UsageError
from ..storage import is_local, open_read, open_stream, to_uri
from .base import BATCH_ROWS, InputForm, ListingStats, Probe

MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
MANIFEST_BLOCK_BYTES = 1 << 20   # a .txt/.csv manifest is read this much at a time

# Manifest lines that are not a plain relative path: URLs, absolute paths, and lines that
# posixpath.normpath would change (dot segments, "//", a trailing "/").  RE2 syntax (Arrow).
_SLOW_LINE = r"://|^/|(?:^|/)\.\.?(?:/|$)|//|/$"


class ManifestForm(InputForm):
    """A ``.txt``, ``.csv`` or ``.parquet`` file listing the images; extensions are not filtered."""

    kind = "manifest"
    streams = False

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        return not probe.is_dir and probe.name.endswith(MANIFEST_SUFFIXES)

    def _items(self, exts: set[str], stats: ListingStats) -> Iterator[tuple[str, str]]:
        for ids, uris in self._batches(exts, stats):
            yield from zip(ids.to_pylist(), uris.to_pylist())

    def _batches(self, exts: set[str], stats: ListingStats) -> Iterator[tuple[pa.Array, pa.Array]]:
        fs, path = self.fs, self.path
        manifest_dir = posixpath.dirname(path.split("?", 1)[0])
        lower = path.lower().split("?", 1)[0]
        if lower.endswith(".txt"):
            blocks = _txt_blocks(fs, path)
        elif lower.endswith(".csv"):
            blocks = _table_blocks(fs, path, _csv_batches)
        else:
            blocks = _table_blocks(fs, path, _parquet_batches)
        for ids, raw in blocks:
            if len(ids):
                yield ids, resolve_uris(raw, fs, manifest_dir, self.scheme)


def _resolve(line: str, manifest_dir: str, fs: fsspec.AbstractFileSystem, scheme: Optional[str] = None) -> str:
    """A manifest line as a uri: URLs as they are, relative lines against the manifest's folder."""
    if line.startswith("file://"):
        return line[len("file://"):]
    if "://" in line:
        return line
    if is_local(fs):
        return os.path.normpath(os.path.join(manifest_dir, line))  # an absolute line stays as it is
    prefix, sep, rest = manifest_dir.partition("://")  # http(s) paths are whole URLs
    if not sep:
        prefix, rest = "", manifest_dir
    joined = posixpath.normpath(posixpath.join(rest, line))
    return to_uri(fs, prefix + sep + joined, scheme)


def resolve_uris(lines: pa.Array, fs: fsspec.AbstractFileSystem, manifest_dir: str,
                 scheme: Optional[str] = None) -> pa.Array:
    """:func:`_resolve` over a column: plain relative lines are appended to the folder's uri
    by Arrow; only URLs, absolute paths and lines with dot segments go through Python."""
    head = _resolve("x", manifest_dir, fs, scheme)[:-1]
    uris = pc.binary_join_element_wise(head, lines, "")
    slow = pc.match_substring_regex(lines, _SLOW_LINE)
    if pc.any(slow).as_py():
        fixed = [_resolve(line, manifest_dir, fs, scheme) for line in lines.filter(slow).to_pylist()]
        uris = pc.replace_with_mask(uris, slow, pa.array(fixed, pa.string()))
    return uris


def _txt_blocks(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[pa.Array, pa.Array]]:
    with open_stream(fs, path) as f:
        rest, offset = b"", 0
        while True:
            block = f.read(MANIFEST_BLOCK_BYTES)
            data = rest + block
            cut = data.rfind(b"\n") if block else len(data)
            if cut < 0:
                rest = data
                continue
            if cut > 0:
                lines = _txt_lines(data[:cut], path, offset)
                yield lines, lines
            offset += cut + 1
            rest = data[cut + 1:]
            if not block:
                return


def _txt_lines(chunk: bytes, path: str, offset: int) -> pa.Array:
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"manifest {path} is not UTF-8 text (byte {offset + exc.start})") from None
    if offset == 0:
        text = text.removeprefix("\ufeff")
    lines = pc.utf8_trim_whitespace(pa.array(text.split("\n"), pa.string()))
    keep = pc.and_(pc.not_equal(lines, ""), pc.invert(pc.starts_with(lines, "#")))
    return lines.filter(keep)


def _table_blocks(fs: fsspec.AbstractFileSystem, path: str,
                  batches: Callable[..., Iterator[pa.RecordBatch]]) -> Iterator[tuple[pa.Array, pa.Array]]:
    with open_read(fs, path) as f:
        for batch in batches(f, path):
            uri = pc.utf8_trim_whitespace(batch.column("uri").cast(pa.string()))
            if "id" in batch.schema.names:
                ident = pc.utf8_trim_whitespace(batch.column("id").cast(pa.string()))
                ident = pc.if_else(pc.fill_null(pc.equal(ident, ""), True), uri, ident)
            else:
                ident = uri
            keep = pc.fill_null(pc.not_equal(uri, ""), False)
            yield ident.filter(keep), uri.filter(keep)


def _csv_batches(f, path: str) -> Iterator[pa.RecordBatch]:
    header = next(csv.reader([f.readline().decode("utf-8-sig", errors="replace")]), [])
    if "uri" not in header:
        raise UsageError(f"manifest {path} has no 'uri' column (header: {header[:10]})")
    f.seek(0)
    columns = ["uri"] + (["id"] if "id" in header else [])
    try:
        reader = pa_csv.open_csv(
            f, read_options=pa_csv.ReadOptions(block_size=MANIFEST_BLOCK_BYTES),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(include_columns=columns,
                                                  column_types={c: pa.string() for c in columns}))
        yield from reader
    except pa.ArrowInvalid as exc:
        raise UsageError(f"manifest {path}: {str(exc).splitlines()[0]}") from None


def _parquet_batches(f, path: str) -> Iterator[pa.RecordBatch]:
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if "uri" not in names:
        raise UsageError(f"manifest {path} has no 'uri' column (columns: {names[:10]})")
    columns = ["uri"] + (["id"] if "id" in names else [])
    yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
