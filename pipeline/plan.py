"""The plan (DESIGN §3): the listing cut into shards, written once to ``OUTPUT/_plan/``.

Plan parts are Parquet files with columns ``shard`` (int32), ``seq`` (int64, position in the
listing), ``id``, ``uri`` and ``duplicate`` (a later copy of an id: it becomes a ``stage=list``
error row).  ``_plan/_meta.json`` is written last; a plan without it is incomplete and rebuilt.

Folder, bucket, glob and tar listings have unique ids by construction, so their plan streams:
:func:`build_plan` yields each shard as soon as it is cut, while the listing goes on.  Manifests
may repeat ids; they are planned completely first and de-duplicated out of core by DuckDB.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .sources import ListingStats, list_input
from .storage import is_local, join, url_to_fs, write_atomic

log = logging.getLogger(__name__)

PLAN_DIR = "_plan"
META = "_meta.json"
PART_ROWS = 200_000  # rows per plan part: bounds the driver's listing window
PLAN_SCHEMA = pa.schema([("shard", pa.int32()), ("seq", pa.int64()), ("id", pa.string()),
                         ("uri", pa.string()), ("duplicate", pa.bool_())])


@dataclass
class Shard:
    index: int
    ids: list[str]
    uris: list[str]
    duplicate: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def digest(self) -> str:
        """Identity of the shard's contents, stored in its output files for resume checks."""
        return shard_digest(self.ids)


def shard_digest(ids: list[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def plan_dir(output: str) -> str:
    return join(output, PLAN_DIR)


def read_meta(output: str, storage_options: Optional[dict] = None) -> Optional[dict]:
    fs, path = url_to_fs(join(plan_dir(output), META), storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


class _PartWriter:
    """Buffers plan rows and writes them as numbered parts (to OUTPUT or a local temp dir)."""

    def __init__(self, fs, directory: str) -> None:
        self.fs, self.directory, self.parts = fs, directory, []
        self._rows: dict[str, list] = {n: [] for n in PLAN_SCHEMA.names}

    def add(self, shard: Shard, first_seq: int) -> None:
        n = len(shard)
        self._rows["shard"].extend([shard.index] * n)
        self._rows["seq"].extend(range(first_seq, first_seq + n))
        self._rows["id"].extend(shard.ids)
        self._rows["uri"].extend(shard.uris)
        self._rows["duplicate"].extend(shard.duplicate or [False] * n)
        if len(self._rows["id"]) >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._rows["id"]:
            return
        table = pa.Table.from_pydict(self._rows, schema=PLAN_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        name = f"part-{len(self.parts):05d}.parquet"
        write_atomic(self.fs, join(self.directory, name), sink.getvalue().to_pybytes())
        self.parts.append(name)
        self._rows = {n: [] for n in PLAN_SCHEMA.names}


def _cut_shards(items: Iterator[tuple[str, str]], shard_size: int) -> Iterator[Shard]:
    ids: list[str] = []
    uris: list[str] = []
    index = 0
    for i, u in items:
        ids.append(i)
        uris.append(u)
        if len(ids) == shard_size:
            yield Shard(index, ids, uris, [False] * len(ids))
            index, ids, uris = index + 1, [], []
    if ids:
        yield Shard(index, ids, uris, [False] * len(ids))


def build_plan(input_url: str, output: str, cfg: dict, fingerprint: str,
               storage_options: Optional[dict] = None) -> Iterator[Shard]:
    """List ``input_url``, write ``OUTPUT/_plan/`` and yield every shard in order.

    For streaming kinds the shards are yielded while the listing goes on; ``_meta.json`` is
    written when the generator is exhausted.
    """
    fs, pdir = url_to_fs(plan_dir(output), storage_options)
    if fs.exists(pdir):
        fs.rm(pdir, recursive=True)
    stats = ListingStats()
    items = list_input(input_url, cfg["input"]["extensions"], storage_options, stats)
    shard_size = cfg["input"]["shard_size"]
    first = next(items, None)  # resolves the input kind (and raises for a missing input)
    if first is None:
        items = iter(())
    else:
        items = _chain(first, items)
    num_items = num_shards = num_duplicates = 0
    if stats.kind != "manifest":
        writer = _PartWriter(fs, pdir)
        for shard in _cut_shards(items, shard_size):
            writer.add(shard, num_items)
            num_items += len(shard)
            num_shards += 1
            yield shard
        writer.flush()
        parts = writer.parts
    else:
        parts, num_items, num_duplicates = _plan_manifest(items, shard_size, fs, pdir)
        for shard in iter_shards(output, storage_options):
            num_shards += 1
            yield shard
    meta = {
        "version": 1, "input": input_url, "kind": stats.kind, "fingerprint": fingerprint,
        "shard_size": shard_size, "num_items": num_items, "num_shards": num_shards,
        "num_duplicates": num_duplicates, "skipped": stats.skipped, "parts": parts,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    write_atomic(fs, join(pdir, META), json.dumps(meta, indent=2).encode())
    log.info("plan: %d images in %d shards (%d duplicate ids, skipped %s)",
             num_items, num_shards, num_duplicates, stats.skipped)


def _chain(first, rest):
    yield first
    yield from rest


def _plan_manifest(items: Iterator[tuple[str, str]], shard_size: int, fs, pdir: str) -> tuple[list[str], int, int]:
    """Write the manifest's plan to a local temp dir, flag later duplicate ids with DuckDB, upload."""
    import duckdb  # only manifests need it

    with tempfile.TemporaryDirectory(prefix="vgg-plan-") as tmp:
        from fsspec.implementations.local import LocalFileSystem
        raw = _PartWriter(LocalFileSystem(), os.path.join(tmp, "raw"))
        num_items = 0
        for shard in _cut_shards(items, shard_size):
            raw.add(shard, num_items)
            num_items += len(shard)
        raw.flush()
        if not raw.parts:
            return [], 0, 0
        final = os.path.join(tmp, "part-00000.parquet")
        con = duckdb.connect()
        con.execute("SET preserve_insertion_order = true")
        src = os.path.join(tmp, "raw", "*.parquet")
        con.execute(
            f"COPY (SELECT shard, seq, id, uri, "
            f"row_number() OVER (PARTITION BY id ORDER BY seq) > 1 AS duplicate "
            f"FROM read_parquet('{src}') ORDER BY seq) TO '{final}' (FORMAT parquet, ROW_GROUP_SIZE 100000)")
        dups = con.execute(f"SELECT count(*) FROM read_parquet('{final}') WHERE duplicate").fetchone()[0]
        con.close()
        target = join(pdir, "part-00000.parquet")
        if is_local(fs):
            os.makedirs(pdir, exist_ok=True)
            shutil.move(final, target)
        else:
            fs.put_file(final, target)
    return ["part-00000.parquet"], num_items, int(dups)


def iter_shards(output: str, storage_options: Optional[dict] = None,
                skip: Optional[set[int]] = None) -> Iterator[Shard]:
    """Read the plan back, one shard at a time (rows of a shard are contiguous)."""
    fs, pdir = url_to_fs(plan_dir(output), storage_options)
    parts = sorted(p for p in fs.ls(pdir, detail=False) if p.endswith(".parquet")
                   and os.path.basename(p).startswith("part-"))
    current: Optional[Shard] = None
    for part in parts:
        with fs.open(part, "rb") as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=65536, columns=["shard", "id", "uri", "duplicate"]):
                cols = batch.to_pydict()
                for s, i, u, d in zip(cols["shard"], cols["id"], cols["uri"], cols["duplicate"]):
                    if current is None or current.index != s:
                        if current is not None and not (skip and current.index in skip):
                            yield current
                        current = Shard(s, [], [], [])
                    current.ids.append(i)
                    current.uris.append(u)
                    current.duplicate.append(bool(d))
    if current is not None and not (skip and current.index in skip):
        yield current
