"""The driver (docs/design.md §6): plan, then stream shards to a pool of Ray actors until every one is written.

Guarantees (the rules are :mod:`pipeline.run.scheduler`'s):
* bounded memory: at most ``max_shards_in_flight`` shards are materialised at any time;
* an actor or node that dies loses only the shards it held: they are re-queued, bounded by
  ``runtime.max_retries``, and only a shard that provably ran alone when its actor died is
  charged a failure; a shard that keeps killing actors is bisected until the poison image
  is alone, and that image becomes a ``stage=model`` error row;
* a stuck actor (a shard running for more than ``runtime.shard_timeout_s``) is killed and replaced;
* resume: shards whose embeddings file exists are skipped, their files never rewritten;
* growth (``update=True``): ids of the input that no plan generation holds are planned as a new
  generation after the existing shards (:func:`pipeline.input.plan.plan_update`, whose docstring
  lists the crash windows), then every unfinished shard of every generation is run.
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
from ..config import Config, model_fingerprint, redact
from ..errors import JobFailed, UsageError
from ..input import layout
from ..input.plan import Shard, build_plan, discard_uncommitted, generations, iter_shards, plan_update, read_meta
from ..input.forms import open_input
from ..input.storage import (exists, is_local, join, open_read, read_file, require_bucket, to_uri, url_to_fs,
                             with_retries, write_atomic)
from ..output.verify import shard_counts
from ..model.weights import weights_identity
from ..output.writer import METADATA_KEY, done_shards
from .ray_pool import RayPool
from .scheduler import Scheduler, run_stats

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- output state

def prepare_output(input_url: str, output: str, fingerprint: str, shard_size: int, overwrite: bool,
                   storage_options: Optional[dict], update: bool = False) -> Optional[dict]:
    """Check OUTPUT against this job; returns the reusable plan meta (or None to (re)plan).

    ``update``: the plan will grow, so a different ``shard_size`` applies to the new shards
    instead of being ignored.
    """
    if update and overwrite:
        raise UsageError("--update and --overwrite exclude each other: --update keeps OUTPUT and adds "
                         "the new images, --overwrite replaces it")
    require_bucket(output, storage_options)
    fs, root = url_to_fs(output, storage_options)
    meta = read_meta(output, storage_options)
    if overwrite:
        for entry in layout.ENTRIES:
            path = join(root, entry)
            if exists(fs, path):
                with_retries(lambda: fs.rm(path, recursive=True), to_uri(fs, path))
        return None
    if meta is not None:
        if meta.get("input") != input_url:
            raise UsageError(f"{output} holds the output of another input ({meta.get('input')}); "
                             "use --overwrite to replace it")
        if meta.get("fingerprint") != fingerprint:
            raise UsageError(f"{output} was made with a different model, weights or preprocessing; "
                             "use --overwrite to replace it")
        if meta.get("shard_size") != shard_size and not update:
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


def forget_listings(output: str, storage_options: Optional[dict]) -> None:
    """Drop the directory listings fsspec cached for OUTPUT's filesystem (s3fs, gcsfs... reuse one
    instance per process): other processes write OUTPUT, so a cached listing would hide their files."""
    url_to_fs(output, storage_options)[0].invalidate_cache()


def job_identity(input_url: str, fingerprint: str) -> dict:
    """Stored in every part file's metadata: lets a job whose plan was never completed be resumed
    safely (a finished shard is only kept if it was made from the same input with the same model)."""
    return {"input_sha256": hashlib.sha256(input_url.encode()).hexdigest()[:16], "fingerprint": fingerprint}


def _part_metadata(fs, path: str) -> Optional[dict]:
    """The ``vgg_pipeline`` metadata of a part file; None if it has none or is not Parquet.
    A storage fault is retried, and one that outlasts the budget raises (never "not ours")."""
    try:
        with open_read(fs, path) as f:
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

def run_extract(input_url: str, output: str, cfg: Config, *, storage_options: Optional[dict] = None,
                address: Optional[str] = None, overwrite: bool = False, dry_run: bool = False,
                progress: bool = True, update: bool = False) -> dict:
    """Run (or resume) an extraction; returns the summary also stored in ``_SUCCESS.json``.

    ``update``: first plan the images of ``input_url`` that OUTPUT does not hold yet as a new
    generation of shards (on an empty OUTPUT: a normal first run).  Either way every unfinished
    shard of every generation is then run; finished part files are never rewritten.
    """
    t0 = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat()
    source = open_input(input_url, storage_options)  # a missing input: a usage error before any write
    w = weights_identity(cfg.model.weights, cfg.model.arch, storage_options)
    fingerprint = model_fingerprint(cfg, w.name, w.sha256)
    forget_listings(output, storage_options)  # an earlier job in this process may have cached them
    meta = prepare_output(input_url, output, fingerprint, cfg.input.shard_size, overwrite,
                          storage_options, update)
    job = job_identity(input_url, fingerprint)

    done = done_shards(output, storage_options)
    planned: Optional[dict] = None  # the generation this run plans (None: it only resumes)
    if meta is not None:
        if update:  # (which first discards what an update killed while planning left)
            meta, planned = plan_update(source, output, cfg, storage_options)
        else:
            discard_uncommitted(output, meta, storage_options)  # an update killed while planning
        shards: Iterator[Shard] = iter_shards(output, storage_options)
        total: Optional[int] = meta["num_items"]
        if planned is not None and any(i >= planned["first_shard"] for i in done):
            # part files numbered like the new shards cannot be ours (no new shard ran before its
            # generation was committed): check them as after an interrupted plan
            shards = _drop_stale(shards, done, output, storage_options, job, planned["first_shard"])
    else:
        shards = build_plan(source, output, cfg, fingerprint, storage_options)
        total = None
        planned = {"gen": 0}  # completed below from the plan's meta
        if done:  # an interrupted plan: only keep finished shards whose contents are unchanged
            shards = _drop_stale(shards, done, output, storage_options, job)

    if dry_run:
        n = sum(len(s) for s in shards)
        meta = read_meta(output, storage_options) or {}
        result = {"dry_run": True, "images": n, "shards": meta.get("num_shards"),
                  "skipped": meta.get("skipped", {}), "duplicates": meta.get("num_duplicates", 0)}
        if update:
            new = _planned_generation(meta, planned)
            result.update(new_images=new["num_items"] if new else 0, new_shards=new["num_shards"] if new else 0)
        return result

    remove_temp_files(output, storage_options)  # left by writers killed in an earlier run
    if meta is not None and planned is None and done.issuperset(range(meta["num_shards"])):
        # a finished job rerun, or an update that found nothing new: only the accounting is redone
        # (with a new generation planned, part files numbered like its shards must be checked first)
        log.info("every one of the %d shards is written; no worker to start", meta["num_shards"])
        stats = run_stats(shards_resumed=meta["num_shards"])
    else:
        stats = _run_shards(shards, done, total, output, cfg, storage_options, job, address, progress)
    run = {"started_at": started_at, "mode": "update" if update else "extract"}
    return _write_success(input_url, output, cfg, fingerprint, w, stats, time.perf_counter() - t0,
                          storage_options, run, planned)


def _run_shards(shards: Iterator[Shard], done: set[int], total: Optional[int], output: str, cfg: Config,
                storage_options: Optional[dict], job: dict, address: Optional[str], progress: bool) -> dict:
    """Every unfinished shard through a Ray pool; returns the scheduler's statistics."""
    ray, owns_ray = _init_ray(address)
    try:
        pool = RayPool(ray, cfg, output, storage_options, job)
        stats = Scheduler(pool, cfg, output, storage_options, job, progress=progress).run(shards, done, total)
    except KeyboardInterrupt:
        log.warning("interrupted: finished shards are kept; rerun the same command to resume")
        raise
    finally:
        if owns_ray:
            ray.shutdown()
        remove_temp_files(output, storage_options)  # an actor killed mid-write leaves its temp file
    forget_listings(output, storage_options)  # the actors wrote files this process has not listed
    return stats


def _planned_generation(meta: dict, planned: Optional[dict]) -> Optional[dict]:
    """The full generation record of ``planned`` (a first run only knows it is generation 0)."""
    if planned is None:
        return None
    return next((g for g in generations(meta) if g["gen"] == planned["gen"]), None)


def _drop_stale(shards: Iterator[Shard], done: set[int], output: str,
                storage_options: Optional[dict], job: dict, from_shard: int = 0) -> Iterator[Shard]:
    """Re-planning after a crash mid-plan: a finished shard (numbered ``from_shard`` or more) is
    kept only if it holds exactly the ids now planned for it and was made by the same job (input,
    model, weights); else it is redone."""
    fs, root = url_to_fs(output, storage_options)
    for shard in shards:
        if shard.index in done and shard.index >= from_shard:
            md = _part_metadata(fs, join(root, layout.embeddings_part(shard.index))) or {}
            if md.get("shard_digest") != shard.digest or md.get("job") != job:
                log.warning("shard %d was written by another plan or job; redoing it", shard.index)
                done.discard(shard.index)
        yield shard


def _write_success(input_url: str, output: str, cfg: Config, fingerprint: str, weights, stats: dict,
                   wall_s: float, storage_options: Optional[dict], run: dict,
                   planned: Optional[dict]) -> dict:
    """Write ``_SUCCESS.json``: totals over every generation, the generations, and one record per
    run (earlier runs' records are carried over from the previous ``_SUCCESS.json``).  Every read
    and the write retry transient faults; one that outlasts the budget raises
    ``StorageUnavailable`` (one line, exit 1) with every shard kept, so rerunning the command only
    redoes this accounting."""
    report = shard_counts(output, storage_options)
    if not report.ok:
        raise JobFailed("output incomplete after the run: " + "; ".join(report.problems[:3]))
    meta = read_meta(output, storage_options) or {}
    fs, root = url_to_fs(output, storage_options)
    gens = generations(meta)
    new = _planned_generation(meta, planned)
    run = dict(run, finished_at=dt.datetime.now(dt.timezone.utc).isoformat(),
               generation=new["gen"] if new else None, new_images=new["num_items"] if new else 0,
               new_shards=new["num_shards"] if new else 0, images_this_run=stats["images_this_run"],
               shards_done=stats["shards_done"], shards_resumed=stats["shards_resumed"],
               wall_s=round(wall_s, 2))
    import torch
    summary = {
        "input": input_url, "output": output, "fingerprint": fingerprint,
        "counts": {"images": report.images, "embedded": report.embedded, "errors": report.errors,
                   "shards": report.shards, "duplicates": meta.get("num_duplicates", 0),
                   "skipped": meta.get("skipped", {})},
        "weights": {"name": weights.name, "sha256": weights.sha256, "random": weights.is_random},
        "config": redact(cfg.to_dict()),
        "run": dict(stats, total_wall_s=round(wall_s, 2)),
        "versions": {"vgg_pipeline": __version__, "torch": torch.__version__, "pyarrow": pa.__version__},
        "finished_at": run["finished_at"],
        "generations": [{k: g.get(k) for k in ("gen", "created_at", "first_shard", "num_shards", "num_items",
                                               "num_duplicates")} for g in gens],
        "runs": _earlier_runs(fs, join(root, layout.SUCCESS)) + [run],
        "shards": report.per_shard,
    }
    write_atomic(fs, join(root, layout.SUCCESS), json.dumps(summary, indent=1).encode())
    return summary


def _earlier_runs(fs, path: str) -> list[dict]:
    """The run records of the previous ``_SUCCESS.json`` (one synthesised from an older file
    that predates them); none if there is no readable previous file."""
    try:
        previous = json.loads(read_file(fs, path))
    except (FileNotFoundError, ValueError):
        return []
    if isinstance(previous.get("runs"), list):
        return previous["runs"]
    old = previous.get("run", {})
    return [{"finished_at": previous.get("finished_at"), "mode": "extract",
             "images_this_run": old.get("images_this_run"), "shards_done": old.get("shards_done"),
             "shards_resumed": old.get("shards_resumed")}]
