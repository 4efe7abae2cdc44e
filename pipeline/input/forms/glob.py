"""A glob (docs/design.md §3): ``DIR/*.jpg``, ``s3://bucket/**/*.png``: the files it matches, sorted.

Ids are relative to the glob's root, the directory above its first wildcard.  Detected from the
path alone (nothing to look up: a pattern is not a file); on http(s) ``?`` starts a query, so
an http URL is never a glob.
"""

from __future__ import annotations

from typing import Iterator

from ..storage import backend, to_uri, with_retries
from .base import InputForm, ListingStats, Probe
from .files import filter_files

GLOB_CHARS = "*?["


class GlobForm(InputForm):
    kind = "glob"

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        return any(c in probe.path for c in GLOB_CHARS) and backend(probe.fs) != "http"

    def _items(self, exts: set[str], stats: ListingStats) -> Iterator[tuple[str, str]]:
        fs, path = self.fs, self.path
        root = path[: min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
        matches = with_retries(lambda: fs.glob(path), self.url)
        files = (p for p in sorted(matches) if not with_retries(lambda: fs.isdir(p), to_uri(fs, p)))
        return filter_files(fs, root, files, exts, stats, self.scheme)
