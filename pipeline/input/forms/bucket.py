"""An S3 prefix (docs/design.md §3): listed page by page, keys in S3's sorted order.

``fs.ls``/``fs.find`` collect a whole prefix before returning: a 10-million-object bucket would
sit in memory and the first shard would wait for the last page.  Here each page is one
``ListObjectsV2`` request of ``LIST_PAGE`` keys, retried on its own (a fault on page 9,000
repeats that page only), and its keys go to the plan before the next page is asked for.

A bucket prefix is a folder listed another way: the plan records it as kind ``folder``, and the
ids, uris and skips are the folder walk's.
"""

from __future__ import annotations

from typing import Iterator, Optional

from ..storage import backend, with_retries
from .base import ListingStats, Probe
from .folder import FolderForm

LIST_PAGE = 1000  # keys per step of a streamed bucket listing


class BucketForm(FolderForm):
    """A "directory" (a key prefix) on s3fs."""

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        return backend(probe.fs) == "s3" and probe.is_dir

    def _files(self, stats: ListingStats) -> Iterator[str]:
        """Keys below the prefix; keys under a hidden "directory" counted once per directory."""
        prefix = self.path.rstrip("/") + "/"
        last_hidden_dir = None
        for page in self._pages():
            for name in page:
                parts = name[len(prefix):].split("/")
                hidden = next((i for i, p in enumerate(parts[:-1]) if p.startswith(".")), None)
                if hidden is None:
                    yield name
                    continue
                hidden_dir = "/".join(parts[: hidden + 1])
                if hidden_dir != last_hidden_dir:  # sorted keys: a directory's keys are contiguous
                    stats.skip("hidden-dir")
                    last_hidden_dir = hidden_dir

    def _pages(self) -> Iterator[list[str]]:
        """``bucket/key`` names below the prefix, one ``ListObjectsV2`` page at a time."""
        fs = self.fs
        bucket, key, _ = fs.split_path(self.path)
        prefix = key.rstrip("/") + "/" if key else ""
        where = f"s3://{bucket}/{prefix}"
        token: Optional[str] = None
        while True:
            more = {"ContinuationToken": token} if token else {}
            resp = with_retries(lambda: fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix,
                                                   MaxKeys=LIST_PAGE, **more), where)
            names = [f"{bucket}/{o['Key']}" for o in resp.get("Contents", [])
                     if not o["Key"].endswith("/")]  # folder markers are not files
            if names:
                yield names
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return
