"""``vgg-pipeline verify OUTPUT``: is every planned image in exactly one of embeddings/ or errors/?

Checks, shard by shard (so memory stays at one shard's ids): the plan is complete, every shard
has its embeddings file (commit marker), both files have the expected schema, the union of the
two files' ids equals the plan's ids for that shard with no id twice, no stray part files, and
``_SUCCESS.json`` exists with matching counts.  Every read is retried on transient faults
(:mod:`pipeline.input.storage`): a 503 is never reported as a missing file.

Every generation of a grown output (``extract --update``) is checked the same way; besides, the
generations must tile the shard numbers with the image counts ``_meta.json`` records for them,
no id may be planned twice across all of them (found out of core, as duplicates are), and
``_SUCCESS.json`` must have been written after the last generation was.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UsageError
from ..input import layout
from ..input.plan import generations, iter_shards, plan_repeats, read_meta
from ..input.storage import exists, join, ls, open_read, read_file, url_to_fs
from .writer import ERRORS_SCHEMA

REQUIRED_EMBEDDING_COLUMNS = ("id", "uri", "fc7", "logits", "width", "height")
MAX_REPORTED = 20


@dataclass
class Report:
    ok: bool = True
    images: int = 0
    embedded: int = 0
    errors: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    per_shard: list[dict] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.ok = False
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(message)
        elif len(self.problems) == MAX_REPORTED:
            self.problems.append("... more problems not shown")

    def text(self) -> str:
        head = (f"{'OK' if self.ok else 'BROKEN'}: {self.images} images in {self.shards} shards: "
                f"{self.embedded} embedded, {self.errors} errors")
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


def _read_ids(fs, path: str) -> tuple[Optional[list[str]], Optional[pa.Schema]]:
    try:
        with open_read(fs, path) as f:
            pf = pq.ParquetFile(f)
            return pf.read(columns=["id"]).column("id").to_pylist(), pf.schema_arrow
    except FileNotFoundError:
        return None, None


def shard_counts(output: str, storage_options: Optional[dict] = None, check: bool = False) -> Report:
    """Walk the plan and the part files; with ``check`` compare ids (exactly-once)."""
    meta = read_meta(output, storage_options)
    fs, root = url_to_fs(output, storage_options)
    report = Report()
    if meta is None:
        report.fail("no complete plan (_plan/_meta.json missing): the job never finished planning")
        return report
    seen_shards = set()
    gen_images: dict[Optional[int], int] = {}  # images seen per generation (None: in none)
    spans = sorted((g["first_shard"], g["first_shard"] + g["num_shards"], g["gen"])
                   for g in generations(meta) if g["num_shards"])
    starts = [lo for lo, _, _ in spans]
    for shard in iter_shards(output, storage_options):
        seen_shards.add(shard.index)
        at = bisect.bisect_right(starts, shard.index) - 1
        gen = spans[at][2] if at >= 0 and shard.index < spans[at][1] else None
        gen_images[gen] = gen_images.get(gen, 0) + len(shard)
        report.shards += 1
        report.images += len(shard)
        emb_ids, emb_schema = _read_ids(fs, join(root, layout.embeddings_part(shard.index)))
        err_ids, err_schema = _read_ids(fs, join(root, layout.errors_part(shard.index)))
        if emb_ids is None:
            report.fail(f"shard {shard.index}: {layout.embeddings_part(shard.index)} missing (shard not done)")
            continue
        err_ids = err_ids or []
        report.embedded += len(emb_ids)
        report.errors += len(err_ids)
        report.per_shard.append({"shard": shard.index, "rows": len(emb_ids), "errors": len(err_ids)})
        if not check:
            continue
        missing_cols = [c for c in REQUIRED_EMBEDDING_COLUMNS if c not in emb_schema.names]
        if missing_cols:
            report.fail(f"shard {shard.index}: embeddings lack columns {missing_cols}")
        if "fc7" in emb_schema.names and getattr(emb_schema.field("fc7").type, "list_size", None) != 4096:
            report.fail(f"shard {shard.index}: fc7 is not a fixed-size list of 4096")
        if err_schema is not None and not all(n in err_schema.names for n in ERRORS_SCHEMA.names):
            report.fail(f"shard {shard.index}: errors file has wrong columns {err_schema.names}")
        got = Counter(emb_ids) + Counter(err_ids)
        want = Counter(shard.ids)
        for i, n in got.items():
            if n > want.get(i, 0):
                report.fail(f"shard {shard.index}: id {i!r} appears {n} times (planned {want.get(i, 0)})")
        for i, n in want.items():
            if got.get(i, 0) < n:
                report.fail(f"shard {shard.index}: id {i!r} is missing from embeddings and errors")
    if report.shards != meta.get("num_shards") or report.images != meta.get("num_items"):
        report.fail(f"plan holds {report.images} images/{report.shards} shards, _meta.json says "
                    f"{meta.get('num_items')}/{meta.get('num_shards')}")
    if check:
        _check_generations(meta, gen_images, seen_shards, report)
        repeated, examples = plan_repeats(output, storage_options)
        if repeated:
            report.fail(f"{repeated} ids are planned more than once across shards/generations "
                        f"(e.g. {', '.join(map(repr, examples))})")
        for sub in layout.SHARD_DIRS:
            try:
                names = ls(fs, join(root, sub), detail=False)
            except FileNotFoundError:
                continue
            for name in names:
                base = name.rstrip("/").rsplit("/", 1)[-1]
                if base.startswith(layout.PART_PREFIX) and layout.part_number(base) not in seen_shards:
                    report.fail(f"{sub}/{base} belongs to no planned shard")
    return report


def _check_generations(meta: dict, gen_images: dict[Optional[int], int], seen_shards: set[int],
                       report: Report) -> None:
    """Generations follow each other without gap or overlap and hold what ``_meta.json`` says."""
    if gen_images.get(None):
        report.fail(f"{gen_images[None]} planned images are in shards of no generation")
    expected_first = 0
    for g in generations(meta):
        label = f"generation {g['gen']}"
        if g["first_shard"] != expected_first:
            report.fail(f"{label} starts at shard {g['first_shard']}, expected {expected_first}")
        shards = set(range(g["first_shard"], g["first_shard"] + g["num_shards"]))
        if not shards <= seen_shards:
            report.fail(f"{label}: {len(shards - seen_shards)} of its {g['num_shards']} shards are not in the plan")
        if gen_images.get(g["gen"], 0) != g["num_items"]:
            report.fail(f"{label}: plan holds {gen_images.get(g['gen'], 0)} images, "
                        f"_meta.json says {g['num_items']}")
        expected_first = g["first_shard"] + g["num_shards"]


def verify(output: str, storage_options: Optional[dict] = None) -> Report:
    """Full check of ``output``; ``report.ok`` is False if anything is lost, doubled or malformed."""
    fs, root = url_to_fs(output, storage_options)
    fs.invalidate_cache()  # the writers were other processes: no listing cached before them counts
    if not exists(fs, root):
        raise UsageError(f"not found: {output}")
    if not exists(fs, join(root, layout.PLAN_DIR)):
        raise UsageError(f"{output} is not a vgg-pipeline output (no {layout.PLAN_DIR}/)")
    report = shard_counts(output, storage_options, check=True)
    try:
        success = json.loads(read_file(fs, join(root, layout.SUCCESS)))
    except FileNotFoundError:
        report.fail("_SUCCESS.json missing: the job did not finish")
        return report
    counts = success.get("counts", {})
    last_gen = generations(read_meta(output, storage_options) or {})[-1]["gen"]
    recorded = [g.get("gen") for g in success.get("generations", [{"gen": 0}])]
    if report.ok and last_gen not in recorded:
        report.fail(f"_SUCCESS.json predates generation {last_gen}: the update did not finish; "
                    "rerun `extract --update`")
    if report.ok and (counts.get("embedded"), counts.get("errors")) != (report.embedded, report.errors):
        report.fail(f"_SUCCESS.json counts {counts.get('embedded')}/{counts.get('errors')} differ from "
                    f"the files {report.embedded}/{report.errors}")
    return report
