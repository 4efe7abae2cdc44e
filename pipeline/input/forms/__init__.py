"""The input forms (docs/design.md §3) and :func:`open_input`, which picks one for a URL.

Each form is one class in its own module (:class:`~.base.InputForm`): a glob, an S3 prefix
(bucket), a folder on any filesystem, a manifest, a tar shard.  :data:`FORMS` is the order they
are asked in; the first whose ``detect`` says yes opens the input.  Adding a form is one new
module and one entry here.

Example::

    >>> from pipeline.input.forms import ListingStats, open_input
    >>> source = open_input("tests")                   # doctest: +SKIP
    >>> stats = ListingStats()
    >>> items = list(source.items(["jpg"], stats))      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Iterator, Optional

from ...errors import UsageError
from ..storage import url_to_fs
from .base import InputForm, ListingStats, Probe
from .bucket import BucketForm
from .folder import FolderForm
from .glob import GlobForm
from .manifest import ManifestForm
from .tar import TarForm

__all__ = ["FORMS", "InputForm", "ListingStats", "Probe", "list_input", "open_input"]

# Detection order: a glob is known from its path alone (it names no file to look up); a bucket
# prefix is a directory too, so it goes before the generic folder.
FORMS: tuple[type[InputForm], ...] = (GlobForm, BucketForm, FolderForm, ManifestForm, TarForm)


def open_input(url: str, storage_options: Optional[dict] = None) -> InputForm:
    """The input at ``url``, opened as the first of :data:`FORMS` that detects it.

    A missing input, denied access, or a file that no form reads (neither a manifest nor a tar
    shard) is a UsageError.
    """
    fs, path = url_to_fs(url, storage_options)
    probe = Probe(url, fs, path)
    for form in FORMS:
        if form.detect(probe):
            return form(url, fs, path)
    raise UsageError(f"input {url} is a file but not a manifest (.txt/.csv/.parquet) or a .tar shard")


def list_input(url: str, extensions: list[str], storage_options: Optional[dict] = None,
               stats: Optional[ListingStats] = None) -> Iterator[tuple[str, str]]:
    """``(id, uri)`` for every image of the input at ``url``, in deterministic order."""
    yield from open_input(url, storage_options).items(extensions, stats)
