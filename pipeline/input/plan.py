"""The plan (DESIGN §3): the listing cut into shards, written once to ``OUTPUT/_plan/``.

Plan parts are Parquet files with columns ``shard`` (int32), ``seq`` (int64, position in the
listing), ``id``, ``uri`` and ``duplicate`` (a later copy of an id: it becomes a ``stage=list``
error row).  ``_plan/_meta.json`` is written last; a plan without it is incomplete and rebuilt.

Folder, bucket, glob and tar listings have unique ids by construction, so their plan streams:
:func:`build_plan` yields each shard as soon as it is cut, while the listing goes on.  Manifests
may repeat ids; they are planned completely first, column-wise (a million lines in a few
seconds), and their duplicates are found out of core: the ids are hash-partitioned to local
disk and DuckDB ranks one partition at a time, so memory stays flat as the manifest grows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import layout
from .sources import ListingStats, list_input, manifest_batches, open_input
from .storage import exists, join, ls, open_read, read_file, url_to_fs, with_retries, write_atomic

log = logging.getLogger(__name__)

PART_ROWS = 200_000  # rows per plan part file
GROUP_ROWS = 32_768  # rows per Parquet row group: what planning and reading back hold at once
ID_BUCKETS = 64  # hash partitions of a manifest's ids (local scratch files)
DEDUP_GROUP_ROWS = 131_072  # ids ranked per DuckDB query: bounds duplicate finding's memory
PLAN_SCHEMA = pa.schema([("shard", pa.int32()), ("seq", pa.int64()), ("id", pa.string()),
                         ("uri", pa.string()), ("duplicate", pa.bool_())])
_RAW_SCHEMA = pa.schema([("seq", pa.int64()), ("id", pa.string()), ("uri", pa.string())])
_BUCKET_SCHEMA = pa.schema([("seq", pa.int64()), ("id", pa.string())])


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
    return join(output, layout.PLAN_DIR)


def read_meta(output: str, storage_options: Optional[dict] = None) -> Optional[dict]:
    fs, path = url_to_fs(join(output, layout.PLAN_META), storage_options)
    try:
        return json.loads(read_file(fs, path))
    except FileNotFoundError:
        return None


class _PartSink:
    """Plan rows -> ``part-NNNNN.parquet`` files of ``PART_ROWS`` rows in row groups of ``GROUP_ROWS``.

    A part is encoded into memory (compressed, a few MB) and written with one atomic write, so
    a plan part, like every output file, appears whole or not at all.
    """

    def __init__(self, fs, directory: str) -> None:
        self.fs, self.directory, self.parts = fs, directory, []
        self._sink: Optional[pa.BufferOutputStream] = None
        self._writer: Optional[pq.ParquetWriter] = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._sink = pa.BufferOutputStream()
                # ids and uris are (mostly) unique: dictionaries would only cost time
                self._writer = pq.ParquetWriter(self._sink, PLAN_SCHEMA, use_dictionary=["shard", "duplicate"])
            take = min(PART_ROWS - self._rows, table.num_rows - offset)
            self._writer.write_table(table.slice(offset, take), row_group_size=GROUP_ROWS)
            self._rows += take
            offset += take
            if self._rows == PART_ROWS:
                self.close()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        name = layout.part_name(len(self.parts))
        write_atomic(self.fs, join(self.directory, name), self._sink.getvalue().to_pybytes())
        self.parts.append(name)
        self._sink, self._writer, self._rows = None, None, 0


class _PartWriter:
    """Buffers streamed shards (``GROUP_ROWS`` rows at most) into a :class:`_PartSink`."""

    def __init__(self, fs, directory: str) -> None:
        self.sink = _PartSink(fs, directory)
        self._shards: list[tuple[Shard, int]] = []
        self._rows = 0

    @property
    def parts(self) -> list[str]:
        return self.sink.parts

    def add(self, shard: Shard, first_seq: int) -> None:
        self._shards.append((shard, first_seq))
        self._rows += len(shard)
        if self._rows >= GROUP_ROWS:
            self._flush_rows()

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        shard_col = np.concatenate([np.full(len(s), s.index, np.int32) for s, _ in self._shards])
        seq = np.concatenate([np.arange(f, f + len(s), dtype=np.int64) for s, f in self._shards])
        self.sink.write(pa.table({
            "shard": shard_col, "seq": seq,
            "id": pa.array([i for s, _ in self._shards for i in s.ids], pa.string()),
            "uri": pa.array([u for s, _ in self._shards for u in s.uris], pa.string()),
            "duplicate": np.zeros(self._rows, dtype=bool),
        }, schema=PLAN_SCHEMA))
        self._shards, self._rows = [], 0

    def flush(self) -> None:
        self._flush_rows()
        self.sink.close()


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
    kind, in_fs, in_path = open_input(input_url, storage_options)  # a missing input raises here
    fs, pdir = url_to_fs(plan_dir(output), storage_options)
    if exists(fs, pdir):
        with_retries(lambda: fs.rm(pdir, recursive=True), plan_dir(output))
    stats = ListingStats(kind=kind)
    shard_size = cfg["input"]["shard_size"]
    num_items = num_shards = num_duplicates = 0
    if kind != "manifest":
        items = list_input(input_url, cfg["input"]["extensions"], storage_options, stats)
        writer = _PartWriter(fs, pdir)
        for shard in _cut_shards(items, shard_size):
            writer.add(shard, num_items)
            num_items += len(shard)
            num_shards += 1
            yield shard
        writer.flush()
        parts = writer.parts
    else:
        parts, num_items, num_duplicates = _plan_manifest(
            manifest_batches(in_fs, in_path), shard_size, fs, pdir)
        for shard in (iter_shards(output, storage_options) if parts else ()):
            num_shards += 1
            yield shard
    meta = {
        "version": 1, "input": input_url, "kind": kind, "fingerprint": fingerprint,
        "shard_size": shard_size, "num_items": num_items, "num_shards": num_shards,
        "num_duplicates": num_duplicates, "skipped": stats.skipped, "parts": parts,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    write_atomic(fs, join(pdir, layout.PLAN_META_NAME), json.dumps(meta, indent=2).encode())
    log.info("plan: %d images in %d shards (%d duplicate ids, skipped %s)",
             num_items, num_shards, num_duplicates, stats.skipped)


def _plan_manifest(batches: Iterator[tuple[pa.Array, pa.Array]], shard_size: int, fs,
                   pdir: str) -> tuple[list[str], int, int]:
    """Plan a manifest column-wise: rows to a local scratch file (ids also hash-partitioned into
    buckets), later duplicate ids found bucket by bucket, then the plan parts written."""
    with tempfile.TemporaryDirectory(prefix="vgg-plan-") as tmp:
        raw = os.path.join(tmp, "raw.parquet")
        buckets = _IdBuckets(tmp)
        try:
            num_items = 0
            # A scratch file read back once: no compression, no dictionaries (values are mostly unique).
            with pq.ParquetWriter(raw, _RAW_SCHEMA, compression="none", use_dictionary=False) as w:
                for ids, uris in batches:
                    seq = pa.array(np.arange(num_items, num_items + len(ids), dtype=np.int64))
                    w.write_table(pa.table([seq, ids, uris], schema=_RAW_SCHEMA))
                    buckets.add(seq, ids)
                    num_items += len(ids)
            dup_set = pa.array(buckets.duplicate_seqs(), pa.int64())
        finally:
            buckets.close()
        sink = _PartSink(fs, pdir)
        for batch in _row_groups(pq.ParquetFile(raw)):
            seq = batch.column("seq")
            sink.write(pa.table({
                "shard": (seq.to_numpy() // shard_size).astype(np.int32), "seq": seq,
                "id": batch.column("id"), "uri": batch.column("uri"),
                "duplicate": pc.is_in(seq, value_set=dup_set),
            }, schema=PLAN_SCHEMA))
        sink.close()
    return sink.parts, num_items, len(dup_set)


class _IdBuckets:
    """``(seq, id)`` rows hash-partitioned into ``ID_BUCKETS`` Arrow files on local disk.

    Copies of an id land in the same bucket, so duplicates are found a few buckets at a time
    (``DEDUP_GROUP_ROWS`` ids at most): memory stays flat, time is linear in the manifest.
    """

    def __init__(self, directory: str) -> None:
        import duckdb  # only manifests need it

        self.paths = [os.path.join(directory, f"ids-{b:03d}.arrow") for b in range(ID_BUCKETS)]
        self.rows = [0] * ID_BUCKETS
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self._con = duckdb.connect()
        self._con.execute("SET threads = 1")  # ordered output; the planner is one stream anyway

    def add(self, seq: pa.Array, ids: pa.Array) -> None:
        self._con.register("block", pa.table({"id": ids}))
        bucket = self._con.execute(f"SELECT (hash(id) % {ID_BUCKETS})::INTEGER AS b FROM block").fetchnumpy()["b"]
        self._con.unregister("block")
        bucket = np.asarray(bucket, dtype=np.int64)
        order = np.argsort(bucket, kind="stable")  # keeps seq order inside each bucket
        bounds = np.searchsorted(bucket[order], np.arange(ID_BUCKETS + 1))
        batch = pa.record_batch([seq, ids], schema=_BUCKET_SCHEMA).take(pa.array(order))
        for b in range(ID_BUCKETS):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            if hi > lo:
                if b not in self._writers:
                    self._writers[b] = pa.ipc.new_stream(self.paths[b], _BUCKET_SCHEMA)
                self._writers[b].write_batch(batch.slice(lo, hi - lo))
                self.rows[b] += hi - lo

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        self._con.close()

    def duplicate_seqs(self) -> np.ndarray:
        """Positions of every later copy of an id, sorted (DuckDB ranks each group's copies)."""
        for w in self._writers.values():
            w.close()
        self._writers = {}
        found = []
        group: list[int] = []
        for b in [b for b in range(ID_BUCKETS) if self.rows[b]] + [None]:
            if group and (b is None or sum(self.rows[g] for g in group) + self.rows[b] > DEDUP_GROUP_ROWS):
                found.append(self._duplicates_in(group))
                group = []
            if b is not None:
                group.append(b)
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def _duplicates_in(self, buckets: list[int]) -> np.ndarray:
        tables = []
        for b in buckets:
            with pa.OSFile(self.paths[b]) as f:
                tables.append(pa.ipc.open_stream(f).read_all())
        self._con.register("ids", pa.concat_tables(tables))
        res = self._con.execute(
            "SELECT seq FROM (SELECT seq, row_number() OVER (PARTITION BY id ORDER BY seq) AS rn "
            "FROM ids) WHERE rn > 1").fetchnumpy()
        self._con.unregister("ids")
        return np.asarray(res["seq"], dtype=np.int64)


def _row_groups(pf: pq.ParquetFile, columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
    """A Parquet file one row group at a time (``iter_batches`` reads ahead and holds far more)."""
    for i in range(pf.num_row_groups):
        yield pf.read_row_group(i, columns=columns, use_threads=False)


def iter_shards(output: str, storage_options: Optional[dict] = None,
                skip: Optional[set[int]] = None) -> Iterator[Shard]:
    """Read the plan back, one shard at a time (rows of a shard are contiguous)."""
    fs, pdir = url_to_fs(plan_dir(output), storage_options)
    parts = sorted(p for p in ls(fs, pdir, detail=False) if layout.part_number(p) is not None)
    current: Optional[Shard] = None
    for part in parts:
        with open_read(fs, part) as f:
            pf = pq.ParquetFile(f)
            for batch in _row_groups(pf, ["shard", "id", "uri", "duplicate"]):
                shard_col = batch.column("shard").to_numpy()
                ids = batch.column("id").to_pylist()
                uris = batch.column("uri").to_pylist()
                dups = batch.column("duplicate").to_pylist()
                cuts = [0, *(np.flatnonzero(np.diff(shard_col)) + 1).tolist(), len(shard_col)]
                for a, b in zip(cuts[:-1], cuts[1:]):
                    if a == b:
                        continue
                    s = int(shard_col[a])
                    if current is None or current.index != s:
                        if current is not None and not (skip and current.index in skip):
                            yield current
                        current = Shard(s, [], [], [])
                    current.ids.extend(ids[a:b])
                    current.uris.extend(uris[a:b])
                    current.duplicate.extend(dups[a:b])
    if current is not None and not (skip and current.index in skip):
        yield current
