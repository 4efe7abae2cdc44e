"""The driver (DESIGN §6): plan, then stream shards to a pool of Ray actors until every one is written.

Guarantees (the rules are :mod:`pipeline.run.scheduler`'s):
* bounded memory: at most ``max_shards_in_flight`` shards are materialised at any time;
* an actor or node that dies loses only the shards it held: they are re-queued, bounded by
  ``runtime.max_retries``, and only a shard that provably ran alone when its actor died is
  charged a failure; a shard that keeps killing actors is bisected until the poison image
  is alone, and that image becomes a ``stage=model`` error row;
* a stuck actor (a shard running for more than ``runtime.shard_timeout_s``) is killed and replaced;
* resume: shards whose embeddings file exists are skipped, their files never rewritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..config import model_fingerprint, redact
from ..errors import JobFailed, UsageError
from ..input import layout
from ..input.plan import Shard, build_plan, iter_shards, read_meta
from ..input.sources import input_kind
from ..input.storage import is_local, join, url_to_fs, write_atomic
from ..output.verify import shard_counts
from ..model.weights import weights_identity
from ..output.writer import METADATA_KEY, done_shards
from .ray_pool import RayPool
from .scheduler import Scheduler

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- output state

def prepare_output(input_url: str, output: str, fingerprint: str, shard_size: int, overwrite: bool,
                   storage_options: Optional[dict]) -> Optional[dict]:
    """Check OUTPUT against this job; returns the reusable plan meta (or None to (re)plan)."""
    fs, root = url_to_fs(output, storage_options)
    meta = read_meta(output, storage_options)
    if overwrite:
        for entry in layout.ENTRIES:
            if fs.exists(join(root, entry)):
                fs.rm(join(root, entry), recursive=True)
        return None
    if meta is not None:
        if meta.get("input") != input_url:
            raise UsageError(f"{output} holds the output of another input ({meta.get('input')}); "
                             "use --overwrite to replace it")
        if meta.get("fingerprint") != fingerprint:
            raise UsageError(f"{output} was made with a different model, weights or preprocessing; "
                             "use --overwrite to replace it")
        if meta.get("shard_size") != shard_size:
            log.warning("input.shard_size=%s ignored: resuming the existing plan of %s images per shard",
                        shard_size, meta.get("shard_size"))
        return meta
    done = sorted(done_shards(output, storage_options))
    if done:  # a job killed before its plan was complete: are its finished shards ours?
        md = _part_metadata(fs, join(root, layout.embeddings_part(done[0])))
        if md is None:
            raise UsageError(f"{output} has embeddings/ that vgg-pipeline did not write: not a resumable "
                             "output; use --overwrite or another OUTPUT")
        if md.get("job") != job_identity(input_url, fingerprint):
            raise UsageError(f"{output} holds an unfinished job with another input, model, weights or "
                             "preprocessing; use --overwrite to replace it")
    return None


def job_identity(input_url: str, fingerprint: str) -> dict:
    """Stored in every part file's metadata: lets a job whose plan was never completed be resumed
    safely (a finished shard is only kept if it was made from the same input with the same model)."""
    return {"input_sha256": hashlib.sha256(input_url.encode()).hexdigest()[:16], "fingerprint": fingerprint}


def _part_metadata(fs, path: str) -> Optional[dict]:
    """The ``vgg_pipeline`` metadata of a part file; None if it has none or is not Parquet."""
    try:
        with fs.open(path, "rb") as f:
            raw = (pq.read_schema(f).metadata or {}).get(METADATA_KEY)
        return json.loads(raw) if raw else None
    except (OSError, ValueError, pa.ArrowException):
        return None


def remove_temp_files(output: str, storage_options: Optional[dict] = None) -> int:
    """Delete the temporary files (``layout.temp_name``) a killed writer left in OUTPUT (local disks only).

    Object stores never show half files (one PUT), so there is nothing to clean there.
    """
    fs, root = url_to_fs(output, storage_options)
    if not is_local(fs):
        return 0
    removed = 0
    for sub in layout.SHARD_DIRS:
        directory = os.path.join(root, sub)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            if layout.is_temp_name(name):
                try:
                    os.unlink(os.path.join(directory, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    if removed:
        log.info("removed %d temporary files left by an interrupted writer", removed)
    return removed


def _init_ray(address: Optional[str]):
    import ray
    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:  # a private cluster: a bare ray.init() would join whatever stale cluster was last recorded
        ray.init(address="local", include_dashboard=False, **kwargs)
    return ray, True


# ----------------------------------------------------------------------------- the run

def run_extract(input_url: str, output: str, cfg: dict, *, storage_options: Optional[dict] = None,
                address: Optional[str] = None, overwrite: bool = False, dry_run: bool = False,
                progress: bool = True) -> dict:
    """Run (or resume) an extraction; returns the summary also stored in ``_SUCCESS.json``."""
    t0 = time.perf_counter()
    input_kind(input_url, storage_options)  # a missing input is a usage error before anything is written
    m = cfg["model"]
    w = weights_identity(m["weights"], m["arch"], storage_options)
    fingerprint = model_fingerprint(cfg, w.name, w.sha256)
    meta = prepare_output(input_url, output, fingerprint, cfg["input"]["shard_size"], overwrite, storage_options)

    done = done_shards(output, storage_options)
    if meta is not None:
        shards: Iterator[Shard] = iter_shards(output, storage_options)
        total: Optional[int] = meta["num_items"]
    else:
        shards = build_plan(input_url, output, cfg, fingerprint, storage_options)
        total = None
        if done:  # an interrupted plan: only keep finished shards whose contents are unchanged
            shards = _drop_stale(shards, done, output, storage_options, job_identity(input_url, fingerprint))

    if dry_run:
        n = sum(len(s) for s in shards)
        meta = read_meta(output, storage_options) or {}
        return {"dry_run": True, "images": n, "shards": meta.get("num_shards"),
                "skipped": meta.get("skipped", {}), "duplicates": meta.get("num_duplicates", 0)}

    remove_temp_files(output, storage_options)  # left by writers killed in an earlier run
    ray, owns_ray = _init_ray(address)
    try:
        job = job_identity(input_url, fingerprint)
        pool = RayPool(ray, cfg, output, storage_options, job)
        stats = Scheduler(pool, cfg, output, storage_options, job, progress=progress).run(shards, done, total)
    except KeyboardInterrupt:
        log.warning("interrupted: finished shards are kept; rerun the same command to resume")
        raise
    finally:
        if owns_ray:
            ray.shutdown()
        remove_temp_files(output, storage_options)  # an actor killed mid-write leaves its temp file
    return _write_success(input_url, output, cfg, fingerprint, w, stats, time.perf_counter() - t0,
                          storage_options)


def _drop_stale(shards: Iterator[Shard], done: set[int], output: str,
                storage_options: Optional[dict], job: dict) -> Iterator[Shard]:
    """Re-planning after a crash mid-plan: a finished shard is kept only if it holds exactly the
    ids now planned for it and was made by the same job (input, model, weights); else it is redone."""
    fs, root = url_to_fs(output, storage_options)
    for shard in shards:
        if shard.index in done:
            md = _part_metadata(fs, join(root, layout.embeddings_part(shard.index))) or {}
            if md.get("shard_digest") != shard.digest or md.get("job") != job:
                log.warning("shard %d was written by another plan or job; redoing it", shard.index)
                done.discard(shard.index)
        yield shard


def _write_success(input_url: str, output: str, cfg: dict, fingerprint: str, weights, stats: dict,
                   wall_s: float, storage_options: Optional[dict]) -> dict:
    """Count the written shards and write ``_SUCCESS.json``.  Every read and the write retry
    transient faults; one that outlasts the budget raises ``StorageUnavailable`` (one line, exit 1)
    with every shard kept, so rerunning the command only redoes this accounting."""
    report = shard_counts(output, storage_options)
    if not report.ok:
        raise JobFailed("output incomplete after the run: " + "; ".join(report.problems[:3]))
    meta = read_meta(output, storage_options) or {}
    import torch
    summary = {
        "input": input_url, "output": output, "fingerprint": fingerprint,
        "counts": {"images": report.images, "embedded": report.embedded, "errors": report.errors,
                   "shards": report.shards, "duplicates": meta.get("num_duplicates", 0),
                   "skipped": meta.get("skipped", {})},
        "weights": {"name": weights.name, "sha256": weights.sha256, "random": weights.is_random},
        "config": redact(cfg),
        "run": dict(stats, total_wall_s=round(wall_s, 2)),
        "versions": {"vgg_pipeline": __version__, "torch": torch.__version__, "pyarrow": pa.__version__},
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "shards": report.per_shard,
    }
    fs, root = url_to_fs(output, storage_options)
    write_atomic(fs, join(root, layout.SUCCESS), json.dumps(summary, indent=1).encode())
    return summary
