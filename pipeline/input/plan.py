"""The plan (docs/design.md §3): the listing cut into shards, written once to ``OUTPUT/_plan/``.

Plan parts are Parquet files with columns ``shard`` (int32), ``seq`` (int64, position in the
listing the generation was planned from), ``id``, ``uri`` and ``duplicate`` (a later copy of an
id: it becomes a ``stage=list`` error row).  ``_plan/_meta.json`` is written last; a plan
without it is incomplete and rebuilt.

Folder, bucket, glob and tar listings have unique ids by construction (their input form
``streams``, :mod:`pipeline.input.forms`), so their plan streams: :func:`build_plan` yields each
shard as soon as it is cut, while the listing goes on.  Manifests may repeat ids; they are
planned completely first, column-wise (a million lines in a few seconds), and their duplicates
are found out of core: the ids are hash-partitioned to local disk and DuckDB ranks one
partition at a time, so memory stays flat as the manifest grows.

Generations (``extract --update``, :func:`plan_update`).  The first plan is generation 0, its
parts directly in ``_plan/``.  An update re-lists the input into local scratch files, hashes the
listed ids *and* every id already planned into the same buckets, and lets DuckDB keep, bucket
by bucket, the listed ids that no generation holds yet (an anti-join; memory is one bucket
group plus 8 bytes per new image).  Those become generation ``g`` in ``_plan/gen-000g/``, with
shard numbers following the last existing shard.  ``_meta.json`` lists every committed part
(``parts``, relative to ``_plan/``, in shard order) and every generation (``generations``:
when, first shard, shards, images, duplicates).  Readers only ever read the parts that
``_meta.json`` lists, so the crash windows of an update are:

1. killed while listing or while writing ``gen-000g/`` parts (``_meta.json`` not yet replaced):
   generation ``g`` does not exist for anyone; no shard of it can have run (shards of an update
   run only after the commit).  Any rerun removes the uncommitted ``gen-*`` directory first
   (:func:`discard_uncommitted`); ``--update`` plans it again from a fresh listing, a plain
   rerun resumes the committed generations.
2. killed after ``_meta.json`` was replaced (one atomic write: the commit), with some of the new
   shards written: the new ids are now *planned*, so a rerun with ``--update`` does not plan
   them again (the anti-join is against planned ids, not written ones) and finishes the
   unfinished shards with whatever is new since; a plain rerun resumes the unfinished shards.
3. killed after the last shard, before ``_SUCCESS.json``: any rerun writes it; the generation
   record in ``_meta.json`` still says when and how many images it added.

Exactly once therefore holds across generations as it holds within one: every id is planned
once (later copies flagged ``duplicate``), and every planned shard is committed by its
embeddings file.  One writer at a time per OUTPUT is assumed, as for every run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import layout
from .forms import InputForm, ListingStats
from .storage import exists, join, ls, open_read, read_file, to_uri, url_to_fs, with_retries, write_atomic

if TYPE_CHECKING:  # annotation only: the input wing does not load the config module
    from ..config import Config

log = logging.getLogger(__name__)

META_VERSION = 2  # 2: ``generations`` and generation directories (version 1 plans read as generation 0)
PART_ROWS = 200_000  # rows per plan part file
GROUP_ROWS = 32_768  # rows per Parquet row group: what planning and reading back hold at once
ID_BUCKETS = 64  # hash partitions of a manifest's ids (local scratch files)
DEDUP_GROUP_ROWS = 131_072  # ids ranked per DuckDB query: bounds duplicate finding's memory
PLAN_SCHEMA = pa.schema([("shard", pa.int32()), ("seq", pa.int64()), ("id", pa.string()),
                         ("uri", pa.string()), ("duplicate", pa.bool_())])
_RAW_SCHEMA = pa.schema([("seq", pa.int64()), ("id", pa.string()), ("uri", pa.string())])
_BUCKET_SCHEMA = pa.schema([("seq", pa.int64()), ("id", pa.string())])
_HELD_SCHEMA = pa.schema([("id", pa.string())])


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


def generations(meta: dict) -> list[dict]:
    """The plan's generations, oldest first; a version-1 plan is one generation 0."""
    if meta.get("generations"):
        return meta["generations"]
    return [{"gen": 0, "first_shard": 0, "num_shards": meta.get("num_shards", 0),
             "num_items": meta.get("num_items", 0), "num_duplicates": meta.get("num_duplicates", 0),
             "shard_size": meta.get("shard_size"), "parts": list(meta.get("parts", [])),
             "skipped": meta.get("skipped", {}), "created_at": meta.get("created_at")}]


def discard_uncommitted(output: str, meta: Optional[dict], storage_options: Optional[dict] = None) -> int:
    """Remove ``_plan/gen-*`` directories that ``meta`` does not list: what an update killed while
    planning leaves (crash window 1 of the module docstring).  Returns how many were removed."""
    fs, pdir = url_to_fs(plan_dir(output), storage_options)
    committed = {p.split("/", 1)[0] for p in (meta or {}).get("parts", []) if "/" in p}
    try:
        entries = ls(fs, pdir, detail=False)
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if layout.is_plan_generation(name) and name not in committed:
            with_retries(lambda: fs.rm(entry, recursive=True), to_uri(fs, entry))
            removed += 1
            log.info("removed %s/%s: an update's plan that was never committed", layout.PLAN_DIR, name)
    return removed


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


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def build_plan(source: InputForm, output: str, cfg: Config, fingerprint: str,
               storage_options: Optional[dict] = None) -> Iterator[Shard]:
    """List ``source`` (an opened input, :func:`pipeline.input.forms.open_input`), write
    ``OUTPUT/_plan/`` (generation 0) and yield every shard in order.

    For forms that stream the shards are yielded while the listing goes on; ``_meta.json`` is
    written when the generator is exhausted.
    """
    fs, pdir = url_to_fs(plan_dir(output), storage_options)
    if exists(fs, pdir):
        with_retries(lambda: fs.rm(pdir, recursive=True), plan_dir(output))
    stats = ListingStats()
    shard_size = cfg.input.shard_size
    num_items = num_shards = num_duplicates = 0
    if source.streams:
        items = source.items(list(cfg.input.extensions), stats)
        writer = _PartWriter(fs, pdir)
        for shard in _cut_shards(items, shard_size):
            writer.add(shard, num_items)
            num_items += len(shard)
            num_shards += 1
            yield shard
        writer.flush()
        parts = writer.parts
    else:
        with tempfile.TemporaryDirectory(prefix="vgg-plan-") as tmp, _Listing(tmp) as listing:
            listing.write(source.batches(list(cfg.input.extensions), stats))
            dup_set = pa.array(listing.buckets.duplicate_seqs(), pa.int64())
            parts = _write_selected(listing, None, dup_set, shard_size, 0, fs, pdir)
            num_items, num_duplicates = listing.rows, len(dup_set)
        for shard in iter_shards(output, storage_options, parts=parts):
            num_shards += 1
            yield shard
    created = _now()
    gen0 = {"gen": 0, "first_shard": 0, "num_shards": num_shards, "num_items": num_items,
            "num_duplicates": num_duplicates, "shard_size": shard_size, "parts": parts,
            "skipped": stats.skipped, "created_at": created}
    meta = {
        "version": META_VERSION, "input": source.url, "kind": source.kind, "fingerprint": fingerprint,
        "shard_size": shard_size, "num_items": num_items, "num_shards": num_shards,
        "num_duplicates": num_duplicates, "skipped": stats.skipped, "parts": parts,
        "generations": [gen0], "created_at": created,
    }
    write_atomic(fs, join(pdir, layout.PLAN_META_NAME), json.dumps(meta, indent=2).encode())
    log.info("plan: %d images in %d shards (%d duplicate ids, skipped %s)",
             num_items, num_shards, num_duplicates, stats.skipped)


def plan_update(source: InputForm, output: str, cfg: Config, storage_options: Optional[dict] = None
                ) -> tuple[dict, Optional[dict]]:
    """Plan the ids of ``source`` (an opened input) that no committed generation of ``output``
    holds as a new generation; returns ``(meta, generation)`` (``generation`` None: nothing new,
    nothing written).

    Ids already planned keep their rows, whatever their uri is now; ids gone from the input keep
    theirs too.  ``_meta.json`` is replaced last: that write commits the generation.
    """
    meta = read_meta(output, storage_options)
    if meta is None:
        raise ValueError(f"{output} has no complete plan to update")
    discard_uncommitted(output, meta, storage_options)
    gens = generations(meta)
    gen = gens[-1]["gen"] + 1
    gen_name = layout.plan_generation(gen)
    fs, pdir = url_to_fs(plan_dir(output), storage_options)
    stats = ListingStats()
    shard_size = cfg.input.shard_size
    first_shard = meta["num_shards"]
    with tempfile.TemporaryDirectory(prefix="vgg-plan-") as tmp, _Listing(tmp, held=True) as listing:
        listing.write(source.batches(list(cfg.input.extensions), stats))
        for part in meta.get("parts", []):
            with open_read(fs, join(pdir, part)) as f:
                for table in _row_groups(pq.ParquetFile(f), ["id"]):
                    listing.buckets.add_held(table.column("id"))
        keep, dup = listing.buckets.new_seqs()
        dup_set = pa.array(dup, pa.int64())
        listed = listing.rows
        parts = _write_selected(listing, keep, dup_set, shard_size, first_shard, fs,
                                join(pdir, gen_name)) if len(keep) else []
    if not len(keep):
        log.info("update: %d images listed, none new (%d already planned)", listed, meta["num_items"])
        return meta, None
    num_shards = -(-len(keep) // shard_size)
    entry = {"gen": gen, "first_shard": first_shard, "num_shards": num_shards, "num_items": len(keep),
             "num_duplicates": len(dup_set), "shard_size": shard_size,
             "parts": [f"{gen_name}/{p}" for p in parts], "listed": listed,
             "skipped": stats.skipped, "created_at": _now()}
    new_meta = dict(meta, version=META_VERSION, num_items=meta["num_items"] + len(keep),
                    num_shards=first_shard + num_shards,
                    num_duplicates=meta.get("num_duplicates", 0) + len(dup_set),
                    skipped=stats.skipped, parts=list(meta.get("parts", [])) + entry["parts"],
                    generations=gens + [entry], updated_at=entry["created_at"])
    write_atomic(fs, join(pdir, layout.PLAN_META_NAME), json.dumps(new_meta, indent=2).encode())
    log.info("update: %d images listed, %d new in shards %d-%d (generation %d, %d duplicate ids)",
             listed, len(keep), first_shard, first_shard + num_shards - 1, gen, len(dup_set))
    return new_meta, entry


class _Listing:
    """A listing spilled to local scratch: rows to ``raw.parquet`` (read back once, in order),
    ids hash-partitioned into :class:`_IdBuckets` (closed when the ``with`` block ends)."""

    def __init__(self, directory: str, held: bool = False) -> None:
        self.raw = os.path.join(directory, "raw.parquet")
        self.buckets = _IdBuckets(directory, held=held)
        self.rows = 0

    def __enter__(self) -> "_Listing":
        return self

    def __exit__(self, *exc) -> None:
        self.buckets.close()

    def write(self, batches: Iterator[tuple[pa.Array, pa.Array]]) -> None:
        # A scratch file read back once: no compression, no dictionaries (values are mostly unique).
        with pq.ParquetWriter(self.raw, _RAW_SCHEMA, compression="none", use_dictionary=False) as w:
            for ids, uris in batches:
                seq = pa.array(np.arange(self.rows, self.rows + len(ids), dtype=np.int64))
                w.write_table(pa.table([seq, ids, uris], schema=_RAW_SCHEMA))
                self.buckets.add(seq, ids)
                self.rows += len(ids)


def _write_selected(listing: _Listing, keep: Optional[np.ndarray], dup_set: pa.Array, shard_size: int,
                    first_shard: int, fs, directory: str) -> list[str]:
    """Write the rows of ``listing`` at positions ``keep`` (None: all), in order, as plan parts;
    the k-th kept row goes to shard ``first_shard + k // shard_size``."""
    sink = _PartSink(fs, directory)
    for batch in _row_groups(pq.ParquetFile(listing.raw)):
        seq = batch.column("seq").to_numpy()
        if keep is None:
            rank = seq
        else:
            if not len(seq):
                continue
            lo, hi = np.searchsorted(keep, [seq[0], seq[-1] + 1])
            chosen = keep[lo:hi]
            if not len(chosen):
                continue
            batch = batch.take(pa.array(chosen - seq[0]))  # raw seq is contiguous: an offset
            seq, rank = chosen, np.arange(lo, hi, dtype=np.int64)
        sink.write(pa.table({
            "shard": (first_shard + rank // shard_size).astype(np.int32), "seq": seq,
            "id": batch.column("id"), "uri": batch.column("uri"),
            "duplicate": pc.is_in(pa.array(seq), value_set=dup_set),
        }, schema=PLAN_SCHEMA))
    sink.close()
    return sink.parts


class _IdBuckets:
    """``(seq, id)`` rows hash-partitioned into ``ID_BUCKETS`` Arrow files on local disk, and
    (``held=True``) the ids an output already holds, partitioned by the same hash.

    Copies of an id land in the same bucket, so duplicates (and held ids) are found a few
    buckets at a time (``DEDUP_GROUP_ROWS`` ids at most): memory stays flat, time is linear.
    """

    def __init__(self, directory: str, held: bool = False) -> None:
        import duckdb  # only manifests and updates need it

        self.paths = [os.path.join(directory, f"ids-{b:03d}.arrow") for b in range(ID_BUCKETS)]
        self.held_paths = [os.path.join(directory, f"held-{b:03d}.arrow") for b in range(ID_BUCKETS)] \
            if held else []
        self.rows = [0] * ID_BUCKETS
        self.held_rows = [0] * ID_BUCKETS
        self._writers: dict[str, pa.ipc.RecordBatchStreamWriter] = {}
        self._con = duckdb.connect()
        self._con.execute("SET threads = 1")  # ordered output; the planner is one stream anyway

    def add(self, seq: pa.Array, ids: pa.Array) -> None:
        self._spread(pa.record_batch([seq, ids], schema=_BUCKET_SCHEMA), self.paths, self.rows)

    def add_held(self, ids: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        self._spread(pa.record_batch([ids], schema=_HELD_SCHEMA), self.held_paths, self.held_rows)

    def _spread(self, batch: pa.RecordBatch, paths: list[str], rows: list[int]) -> None:
        self._con.register("block", pa.table({"id": batch.column("id")}))
        bucket = self._con.execute(f"SELECT (hash(id) % {ID_BUCKETS})::INTEGER AS b FROM block").fetchnumpy()["b"]
        self._con.unregister("block")
        bucket = np.asarray(bucket, dtype=np.int64)
        order = np.argsort(bucket, kind="stable")  # keeps seq order inside each bucket
        bounds = np.searchsorted(bucket[order], np.arange(ID_BUCKETS + 1))
        batch = batch.take(pa.array(order))
        for b in range(ID_BUCKETS):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            if hi > lo:
                if paths[b] not in self._writers:
                    self._writers[paths[b]] = pa.ipc.new_stream(paths[b], batch.schema)
                self._writers[paths[b]].write_batch(batch.slice(lo, hi - lo))
                rows[b] += hi - lo

    def close(self) -> None:
        self._close_writers()
        self._con.close()

    def _close_writers(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}

    def duplicate_seqs(self) -> np.ndarray:
        """Positions of every later copy of an id, sorted (DuckDB ranks each group's copies)."""
        found = [np.asarray(r["seq"], dtype=np.int64) for r in self._query(
            "SELECT seq FROM (SELECT seq, row_number() OVER (PARTITION BY id ORDER BY seq) AS rn "
            "FROM ids) WHERE rn > 1")]
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def new_seqs(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keep, duplicates)``: sorted positions of listed rows whose id is not held, and the
        later copies of an id among them."""
        keep, dup = [], []
        for r in self._query(
                "SELECT seq, rn > 1 AS dup FROM (SELECT seq, id, row_number() OVER "
                "(PARTITION BY id ORDER BY seq) AS rn FROM ids) l "
                "WHERE NOT EXISTS (SELECT 1 FROM held h WHERE h.id = l.id)"):
            seq = np.asarray(r["seq"], dtype=np.int64)
            keep.append(seq)
            dup.append(seq[np.asarray(r["dup"], dtype=bool)])
        if not keep:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.sort(np.concatenate(keep)), np.sort(np.concatenate(dup))

    def repeated_ids(self, limit: int) -> tuple[int, list[str]]:
        """How many ids occur more than once, and up to ``limit`` of them."""
        count, examples = 0, []
        for r in self._query("SELECT id FROM ids GROUP BY id HAVING count(*) > 1"):
            count += len(r["id"])
            examples.extend(str(i) for i in r["id"][:max(0, limit - len(examples))])
        return count, examples

    def _query(self, sql: str) -> Iterator[dict]:
        """Run ``sql`` over each group of buckets (tables ``ids`` and, if held, ``held``)."""
        self._close_writers()
        sizes = [self.rows[b] + self.held_rows[b] for b in range(ID_BUCKETS)]
        group: list[int] = []
        for b in [b for b in range(ID_BUCKETS) if self.rows[b]] + [None]:
            if group and (b is None or sum(sizes[g] for g in group) + sizes[b] > DEDUP_GROUP_ROWS):
                self._con.register("ids", _read_buckets(self.paths, group, self.rows, _BUCKET_SCHEMA))
                if self.held_paths:
                    self._con.register("held", _read_buckets(self.held_paths, group, self.held_rows,
                                                             _HELD_SCHEMA))
                yield self._con.execute(sql).fetchnumpy()
                self._con.unregister("ids")
                if self.held_paths:
                    self._con.unregister("held")
                group = []
            if b is not None:
                group.append(b)


def _read_buckets(paths: list[str], buckets: list[int], rows: list[int], schema: pa.Schema) -> pa.Table:
    tables = [schema.empty_table()]
    for b in buckets:
        if rows[b]:
            with pa.OSFile(paths[b]) as f:
                tables.append(pa.ipc.open_stream(f).read_all())
    return pa.concat_tables(tables)


def plan_repeats(output: str, storage_options: Optional[dict] = None, limit: int = 5) -> tuple[int, list[str]]:
    """Ids planned more than once across every generation, not counting rows flagged
    ``duplicate`` (those are expected error rows): ``(how many, up to limit of them)``."""
    meta = read_meta(output, storage_options)
    if meta is None:
        return 0, []
    fs, pdir = url_to_fs(plan_dir(output), storage_options)
    with tempfile.TemporaryDirectory(prefix="vgg-verify-") as tmp:
        buckets = _IdBuckets(tmp)
        try:
            seq = 0
            for part in meta.get("parts", []):
                with open_read(fs, join(pdir, part)) as f:
                    for table in _row_groups(pq.ParquetFile(f), ["id", "duplicate"]):
                        ids = table.filter(pc.invert(table.column("duplicate"))).column("id").combine_chunks()
                        buckets.add(pa.array(np.arange(seq, seq + len(ids), dtype=np.int64)), ids)
                        seq += len(ids)
            return buckets.repeated_ids(limit)
        finally:
            buckets.close()


def _row_groups(pf: pq.ParquetFile, columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
    """A Parquet file one row group at a time (``iter_batches`` reads ahead and holds far more)."""
    for i in range(pf.num_row_groups):
        yield pf.read_row_group(i, columns=columns, use_threads=False)


def iter_shards(output: str, storage_options: Optional[dict] = None,
                skip: Optional[set[int]] = None, parts: Optional[list[str]] = None) -> Iterator[Shard]:
    """Read the plan back, one shard at a time (rows of a shard are contiguous), every
    generation in order.  ``parts`` (relative to ``_plan/``) defaults to those ``_meta.json``
    lists; without a ``_meta.json``, the generation-0 parts found in ``_plan/``."""
    fs, pdir = url_to_fs(plan_dir(output), storage_options)
    if parts is None:
        meta = read_meta(output, storage_options)
        if meta is not None:
            parts = list(meta.get("parts", []))
        else:
            parts = sorted(os.path.basename(p.rstrip("/")) for p in ls(fs, pdir, detail=False)
                           if layout.part_number(p) is not None)
    current: Optional[Shard] = None
    for part in parts:
        with open_read(fs, join(pdir, part)) as f:
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
