"""The driver (DESIGN §6): plan, then stream shards to a pool of Ray actors until every one is written.

Guarantees:
* bounded memory: at most ``max_shards_in_flight`` shards are materialised at any time;
* an actor or node that dies loses only the shards it held: they are re-queued, bounded by
  ``runtime.max_retries``; a shard that keeps killing actors is bisected until the poison image
  is alone, and that image becomes a ``stage=model`` error row;
* a stuck actor (no result within ``runtime.shard_timeout_s``) is killed and replaced;
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
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..config import model_fingerprint, redact
from ..errors import ItemError, JobFailed, UsageError
from ..input.plan import Shard, build_plan, discard_uncommitted, generations, iter_shards, plan_update, read_meta
from ..input.sources import input_kind
from ..input.storage import is_local, join, url_to_fs, write_atomic
from ..output.verify import shard_counts
from ..model.weights import weights_identity
from ..output.writer import (EMBEDDINGS_DIR, ERRORS_DIR, METADATA_KEY, SUCCESS, ShardRows, done_shards,
                     embeddings_schema, embeddings_table, errors_table, part_name, write_shard)

log = logging.getLogger(__name__)

# glibc otherwise hands VGG's ~100 MB activation buffers back to the kernel after every batch and
# faults them in again: keeping them costs ~10 % RSS and gives +25 % CPU img/s (docs/benchmarks.md).
CPU_ACTOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
PROGRESS_LOG_S = 30.0  # how often progress is logged when there is no terminal for a bar
ACTOR_START_TIMEOUT_S = 900.0   # a pool with no ready actor for this long means the cluster cannot host one
ACTOR_WAIT_WARN_S = 60.0        # ... and after this long the user is told what the driver waits for
OUTPUT_ENTRIES = ("_plan", "embeddings", "errors", "index", SUCCESS)


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
    fs, root = url_to_fs(output, storage_options)
    meta = read_meta(output, storage_options)
    if overwrite:
        for entry in OUTPUT_ENTRIES:
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
        if meta.get("shard_size") != shard_size and not update:
            log.warning("input.shard_size=%s ignored: resuming the existing plan of %s images per shard",
                        shard_size, meta.get("shard_size"))
        return meta
    done = sorted(done_shards(output, storage_options))
    if done:  # a job killed before its plan was complete: are its finished shards ours?
        md = _part_metadata(fs, join(root, EMBEDDINGS_DIR, part_name(done[0])))
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
    """The ``vgg_pipeline`` metadata of a part file; None if it has none or is not Parquet."""
    try:
        with fs.open(path, "rb") as f:
            raw = (pq.read_schema(f).metadata or {}).get(METADATA_KEY)
        return json.loads(raw) if raw else None
    except (OSError, ValueError, pa.ArrowException):
        return None


# ----------------------------------------------------------------------------- Ray pool

@dataclass
class Slot:
    actor: Any
    ready_ref: Any
    ready: bool = False
    info: dict = field(default_factory=dict)
    inflight: list = field(default_factory=list)   # refs, oldest first
    busy_since: float = 0.0


@dataclass
class Work:
    shard: Shard
    start: int = 0                # a piece [start, end) of a shard being bisected
    end: Optional[int] = None
    attempts: int = 0

    @property
    def whole(self) -> bool:
        return self.end is None

    def piece(self) -> Shard:
        if self.whole:
            return self.shard
        s, e = self.start, self.end
        return Shard(self.shard.index, self.shard.ids[s:e], self.shard.uris[s:e], self.shard.duplicate[s:e])


class _Bisection:
    """Collects the pieces of a shard that kept crashing its actor, then writes the shard."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.done: dict[int, tuple[pa.Table, pa.Table]] = {}   # start -> (embeddings, errors)
        self.covered = 0

    def add(self, start: int, end: int, emb: pa.Table, err: pa.Table) -> None:
        self.done[start] = (emb, err)
        self.covered += end - start

    @property
    def complete(self) -> bool:
        return self.covered == len(self.shard)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        parts = [self.done[s] for s in sorted(self.done)]
        embs = [e for e, _ in parts if e.num_rows] or [parts[0][0]]
        return pa.concat_tables(embs), pa.concat_tables([e for _, e in parts])


def _pool_shape(cfg: dict, ray) -> tuple[int, dict]:
    """Number of actors and their Ray options: one per GPU, else one per node (DESIGN §6)."""
    rt = cfg["runtime"]
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if rt["device"] == "cuda" and not gpus and not rt["num_actors"]:
        # An autoscaling cluster starts with no GPU node: pending GPU actors are what scales it up.
        raise UsageError("runtime.device=cuda but the cluster has no GPU yet; set runtime.num_actors "
                         "(how many GPU workers to request) so the autoscaler can add them")
    if rt["device"] == "cuda" or (gpus and rt["device"] != "cpu"):
        n = rt["num_actors"] or gpus
        cpus = rt["cpus_per_actor"] or max(1.0, min(8.0, resources.get("CPU", 1) / max(gpus, 1) - 0.5))
        return n, {"num_gpus": 1, "num_cpus": cpus}
    node_cpus = sorted(n["Resources"]["CPU"] for n in nodes) or [resources.get("CPU", 1)]
    n = rt["num_actors"] or max(1, len(node_cpus))
    cpus = rt["cpus_per_actor"] or max(1.0, min(node_cpus[0], resources.get("CPU", 1) / n))
    return n, {"num_gpus": 0, "num_cpus": float(int(cpus)) if cpus >= 1 else cpus}


def _is_actor_death(exc: BaseException) -> bool:
    """The actor (or its node) is gone, as opposed to an exception raised by ``process``."""
    from ray import exceptions as rex
    # RayActorError covers ActorDiedError (process or node died) and ActorUnavailableError.
    return isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError,
                            rex.NodeDiedError, rex.OutOfMemoryError, rex.ActorUnschedulableError))


def _kill(ray, actor) -> None:
    """``ray.kill`` that never raises: the actor may already be gone with its node."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # noqa: BLE001
        log.debug("kill: %s", exc)


def remove_temp_files(output: str, storage_options: Optional[dict] = None) -> int:
    """Delete ``.part-*.tmp-*`` files a killed writer left in OUTPUT (local disks only).

    Object stores never show half files (one PUT), so there is nothing to clean there.
    """
    fs, root = url_to_fs(output, storage_options)
    if not is_local(fs):
        return 0
    removed = 0
    for sub in (EMBEDDINGS_DIR, ERRORS_DIR):
        directory = os.path.join(root, sub)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith(".part-") and ".tmp-" in name:
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

class _Progress:
    def __init__(self, enabled: bool, total: Optional[int], initial: int) -> None:
        self.bar = None
        self.done = initial
        self.errors = 0
        self.started = time.perf_counter()
        self.initial = initial
        self.bar_total = total
        self.last_log = self.started
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1, desc="extract")

    def set_total(self, total: int) -> None:
        self.bar_total = total
        if self.bar is not None and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def advance(self, n: int, errors: int, alive: int, queued: int) -> None:
        self.done += n
        self.errors += errors
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(errors=self.errors, actors=alive, queued=queued, refresh=False)
        elif time.perf_counter() - self.last_log >= PROGRESS_LOG_S:  # no terminal (e.g. a Ray job's log)
            self.last_log = time.perf_counter()
            elapsed = self.last_log - self.started
            rate = (self.done - self.initial) / elapsed if elapsed else 0.0
            total = self.bar_total
            eta = f", ETA {(total - self.done) / rate:.0f}s" if total and rate else ""
            log.info("progress: %d/%s images, %.2f img/s%s, %d errors, %d actors", self.done,
                     total if total else "?", rate, eta, self.errors, alive)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_extract(input_url: str, output: str, cfg: dict, *, storage_options: Optional[dict] = None,
                address: Optional[str] = None, overwrite: bool = False, dry_run: bool = False,
                progress: bool = True, update: bool = False) -> dict:
    """Run (or resume) an extraction; returns the summary also stored in ``_SUCCESS.json``.

    ``update``: first plan the images of ``input_url`` that OUTPUT does not hold yet as a new
    generation of shards (on an empty OUTPUT: a normal first run).  Either way every unfinished
    shard of every generation is then run; finished part files are never rewritten.
    """
    t0 = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat()
    input_kind(input_url, storage_options)  # a missing input is a usage error before anything is written
    m = cfg["model"]
    w = weights_identity(m["weights"], m["arch"], storage_options)
    fingerprint = model_fingerprint(cfg, w.name, w.sha256)
    forget_listings(output, storage_options)  # an earlier job in this process may have cached them
    meta = prepare_output(input_url, output, fingerprint, cfg["input"]["shard_size"], overwrite,
                          storage_options, update)
    job = job_identity(input_url, fingerprint)

    done = done_shards(output, storage_options)
    planned: Optional[dict] = None  # the generation this run plans (None: it only resumes)
    if meta is not None:
        if update:  # (which first discards what an update killed while planning left)
            meta, planned = plan_update(input_url, output, cfg, storage_options)
        else:
            discard_uncommitted(output, meta, storage_options)  # an update killed while planning
        shards: Iterator[Shard] = iter_shards(output, storage_options)
        total: Optional[int] = meta["num_items"]
        if planned is not None and any(i >= planned["first_shard"] for i in done):
            # part files numbered like the new shards cannot be ours (no new shard ran before its
            # generation was committed): check them as after an interrupted plan
            shards = _drop_stale(shards, done, output, storage_options, job, planned["first_shard"])
    else:
        shards = build_plan(input_url, output, cfg, fingerprint, storage_options)
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
    ray, owns_ray = _init_ray(address)
    try:
        stats = _Scheduler(ray, cfg, output, storage_options, progress, job).run(shards, done, total)
    except KeyboardInterrupt:
        log.warning("interrupted: finished shards are kept; rerun the same command to resume")
        raise
    finally:
        if owns_ray:
            ray.shutdown()
        remove_temp_files(output, storage_options)  # an actor killed mid-write leaves its temp file
    forget_listings(output, storage_options)  # the actors wrote files this process has not listed
    run = {"started_at": started_at, "mode": "update" if update else "extract"}
    return _write_success(input_url, output, cfg, fingerprint, w, stats, time.perf_counter() - t0,
                          storage_options, run, planned)


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
            md = _part_metadata(fs, join(root, EMBEDDINGS_DIR, part_name(shard.index))) or {}
            if md.get("shard_digest") != shard.digest or md.get("job") != job:
                log.warning("shard %d was written by another plan or job; redoing it", shard.index)
                done.discard(shard.index)
        yield shard


class _Scheduler:
    def __init__(self, ray, cfg: dict, output: str, storage_options: Optional[dict], progress: bool,
                 job: dict) -> None:
        self.ray, self.cfg, self.output, self.so, self.job = ray, cfg, output, storage_options, job
        self.progress_enabled = progress
        rt = cfg["runtime"]
        self.max_retries = rt["max_retries"]
        self.timeout_s = rt["shard_timeout_s"]
        self.num_actors, self.actor_opts = _pool_shape(cfg, ray)
        self.per_actor = 2  # one running + one queued, so an actor never idles between shards
        self.window = rt["max_shards_in_flight"] or self.num_actors * self.per_actor
        self.slots: list[Slot] = []
        self.queue: deque[Work] = deque()         # retries and bisection pieces go first
        self.owner: dict[Any, tuple[Slot, Work]] = {}
        self.bisections: dict[int, _Bisection] = {}
        self.start_failures = 0
        self.warned_wait = False
        self.stats = {"shards_done": 0, "shards_resumed": 0, "retries": 0, "actor_failures": 0,
                      "bisected_shards": 0, "timeouts": 0, "images_this_run": 0}
        self.stage_s = {"read_s": 0.0, "decode_s": 0.0, "model_s": 0.0, "wait_s": 0.0, "write_s": 0.0}

    # -- actors
    def _start_actor(self) -> Slot:
        from .worker import ShardWorker
        opts = dict(self.actor_opts)
        if not opts["num_gpus"]:
            opts["runtime_env"] = {"env_vars": CPU_ACTOR_ENV}
        cls = self.ray.remote(ShardWorker).options(max_restarts=0, max_task_retries=0,
                                                   max_concurrency=ShardWorker.MAX_CONCURRENCY,
                                                   scheduling_strategy="SPREAD", **opts)
        threads = int(self.actor_opts["num_cpus"]) if not self.actor_opts["num_gpus"] else None
        actor = cls.remote(self.cfg, self.output, self.so, threads, self.job)
        slot = Slot(actor, actor.ready.remote())
        self.slots.append(slot)
        return slot

    def _retire(self, slot: Slot, reason: str, error_type: str) -> None:
        """Kill a dead or stuck actor, start a replacement and re-queue the shards it held.

        Its tasks run in submission order, so the oldest unfinished one is the shard that was
        running when it died: only that one is charged an attempt.  Shards queued behind it are
        innocent and go back to the front of the queue as they were; tasks that had already
        finished are collected, not redone.
        """
        if slot in self.slots:
            self.slots.remove(slot)
        _kill(self.ray, slot.actor)
        lost: list[Work] = []
        for ref in slot.inflight:
            entry = self.owner.pop(ref, None)
            if entry is None:
                continue
            done, _ = self.ray.wait([ref], timeout=0)
            if done:
                try:
                    result = self.ray.get(ref)
                except Exception:  # noqa: BLE001 - lost with the actor
                    lost.append(entry[1])
                else:
                    self._result(entry[1], result)
                continue
            lost.append(entry[1])
        slot.inflight.clear()
        self.stats["actor_failures"] += 1
        self._start_actor()
        if lost:
            suspect, innocent = lost[0], lost[1:]
            self.queue.extendleft(reversed(innocent))
            self._failed(suspect, reason, error_type)

    # -- work
    def _submit(self, slot: Slot, work: Work) -> None:
        write = work.whole and work.shard.index not in self.bisections
        ref = slot.actor.process.remote(work.piece(), write)
        if not slot.inflight:
            slot.busy_since = time.monotonic()
        slot.inflight.append(ref)
        self.owner[ref] = (slot, work)

    def _failed(self, work: Work, reason: str, error_type: str) -> None:
        """Charge ``work`` one failed attempt: retry it, bisect it, or make its image an error row."""
        work.attempts += 1
        if work.whole and work.attempts <= self.max_retries:
            self.stats["retries"] += 1
            log.warning("shard %d failed (%s); retry %d/%d", work.shard.index, reason, work.attempts,
                        self.max_retries)
            self.queue.appendleft(work)
            return
        if work.whole:  # it keeps failing: bisect to find the image that kills the worker
            self.stats["bisected_shards"] += 1
            log.warning("shard %d failed %d times (%s); isolating the image responsible",
                        work.shard.index, work.attempts, reason)
            self.bisections[work.shard.index] = _Bisection(work.shard)
            work = Work(work.shard, 0, len(work.shard), attempts=1)
        start, end = work.start, work.end
        if end - start > 1:
            mid = (start + end) // 2
            self.queue.appendleft(Work(work.shard, mid, end))
            self.queue.appendleft(Work(work.shard, start, mid))
            return
        if work.attempts <= 1:  # one more chance, in case a node died under an innocent image
            self.queue.appendleft(work)
            return
        shard = work.shard
        what = "made no progress on" if error_type == "Timeout" else "died on"
        err = ItemError("model", error_type, f"the worker {what} this image {work.attempts} times ({reason})")
        schema = embeddings_schema(self.cfg["output"]["fc7_dtype"], self.cfg["output"]["top_k"],
                                   self._descriptor_dim())
        meta = {"shard": shard.index}
        row = (shard.ids[start], shard.uris[start], err.stage, err.error_type, err.message)
        self._piece_done(work, embeddings_table(ShardRows(), schema, meta), errors_table([row], meta))

    def _descriptor_dim(self) -> Optional[int]:
        m = self.cfg["model"]
        if m["descriptor"] != "dense-multiscale":
            return None
        return 4096 * (len(m["scales"]) if m["scale_aggregation"] == "stack" else 1)

    def _piece_done(self, work: Work, emb: pa.Table, err: pa.Table) -> None:
        b = self.bisections[work.shard.index]
        b.add(work.start, work.end, emb, err)
        if b.complete:
            emb_all, err_all = b.tables()
            # Metadata of a worker-made piece (model, weights, versions), with the whole shard's digest.
            pieces = [e for e, _ in b.done.values() if "model" in _metadata(e)] or [emb_all]
            md = dict(_metadata(pieces[0]), shard=work.shard.index, shard_digest=work.shard.digest,
                      job=self.job)
            md_bytes = {METADATA_KEY: json.dumps(md)}
            emb_all = emb_all.replace_schema_metadata(md_bytes)
            err_all = err_all.replace_schema_metadata(md_bytes)
            try:
                write_shard(self.output, work.shard.index, emb_all, err_all, self.so)
            except Exception as exc:  # noqa: BLE001 - a storage failure ends the job, cleanly
                raise JobFailed(f"cannot write shard {work.shard.index}: {_root_message(exc)}") from None
            del self.bisections[work.shard.index]
            self._shard_written(len(work.shard), err_all.num_rows)

    def _shard_written(self, n: int, errors: int) -> None:
        self.stats["shards_done"] += 1
        self.stats["images_this_run"] += n
        self.bar.advance(n, errors, sum(s.ready for s in self.slots), len(self.queue))

    def run(self, shards: Iterator[Shard], done: set[int], total: Optional[int]) -> dict:
        self.bar = _Progress(self.progress_enabled, total, 0)
        self.source, self.done, self.listed, self.total = iter(shards), done, 0, total
        self.exhausted = False
        try:
            first = self._next_work()  # finished shards are skipped without waiting for an actor
            if first is not None:       # (a finished job starts none at all)
                self.queue.append(first)
                for _ in range(self.num_actors):
                    self._start_actor()
            last_ready = time.monotonic()
            while self.queue or self.owner or not self.exhausted:
                # Top up: give every ready actor work while the in-flight window allows.
                for slot in [s for s in self.slots if s.ready]:
                    while len(slot.inflight) < self.per_actor and len(self.owner) < self.window:
                        work = self.queue.popleft() if self.queue else self._next_work()
                        if work is None:
                            break
                        self._submit(slot, work)
                if not (self.queue or self.owner or not self.exhausted):
                    break
                self._wait(last_ready)
                if any(s.ready for s in self.slots):
                    last_ready = time.monotonic()
        finally:
            self.bar.close()
            for slot in self.slots:  # ready, busy or still pending (e.g. no node can host it)
                _kill(self.ray, slot.actor)
            self.slots.clear()
        elapsed = time.perf_counter() - self.bar.started
        self.stats["wall_s"] = round(elapsed, 2)
        self.stats["img_per_s"] = round(self.stats["images_this_run"] / elapsed, 2) if elapsed else 0.0
        self.stats["stage_seconds"] = {k: round(v, 2) for k, v in self.stage_s.items()}
        return self.stats

    def _next_work(self) -> Optional[Work]:
        """The next planned shard that is not finished yet; None once the plan is exhausted."""
        while not self.exhausted:
            shard = next(self.source, None)
            if shard is None:
                self.exhausted = True
                if self.total is None:
                    self.total = self.listed
                    self.bar.set_total(self.listed)
                return None
            self.listed += len(shard)
            if shard.index in self.done:
                self.stats["shards_resumed"] += 1
                self.bar.advance(len(shard), 0, sum(s.ready for s in self.slots), len(self.queue))
                continue
            return Work(shard)
        return None

    def _wait(self, last_ready: float) -> None:
        ray = self.ray
        pending_ready = {s.ready_ref: s for s in self.slots if not s.ready}
        refs = list(self.owner) + list(pending_ready)
        if not refs:
            if not self.slots:  # every worker failed to start and none is left to wait for
                raise JobFailed("no worker is left to run the remaining shards")
            time.sleep(0.1)
            return
        finished, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        for ref in finished:
            if ref in pending_ready:
                self._actor_started(pending_ready[ref], ref)
            else:
                self._collect(ref)
        now = time.monotonic()
        for slot in list(self.slots):
            if slot.inflight and now - slot.busy_since > self.timeout_s:
                self.stats["timeouts"] += 1
                log.warning("actor on %s made no progress for %.0fs; killing it", slot.info.get("host"),
                            now - slot.busy_since)
                self._retire(slot, f"no result for {self.timeout_s:g}s", "Timeout")
        if any(s.ready for s in self.slots):
            self.warned_wait = False
            return
        waited = now - last_ready
        if waited > max(ACTOR_START_TIMEOUT_S, self.timeout_s):
            raise JobFailed(f"no worker could be started on the cluster for {waited:.0f}s "
                            f"(each needs {self.actor_opts}; cluster: {self.ray.available_resources()})")
        if waited > ACTOR_WAIT_WARN_S and not self.warned_wait:
            self.warned_wait = True
            log.warning("no worker running for %.0fs: waiting for the cluster to offer %s (available: %s)",
                        waited, self.actor_opts, self.ray.available_resources())

    def _actor_started(self, slot: Slot, ref) -> None:
        try:
            slot.info = self.ray.get(ref)
            slot.ready = True
            log.info("actor ready: %s", slot.info)
            self.stats.setdefault("actors", []).append(
                {k: slot.info.get(k) for k in ("host", "device", "precision", "batch_size", "decode")})
        except Exception as exc:  # noqa: BLE001
            message = _root_message(exc)
            self.slots.remove(slot)
            _kill(self.ray, slot.actor)
            if "WeightsError" in message or "UsageError" in message:
                raise UsageError(message.split(": ", 1)[-1]) from None
            # Anything else (its node died while it loaded, OOM...) may be transient: start another,
            # within a budget, and carry on with the actors that work.
            self.start_failures += 1
            if self.start_failures > self.num_actors * (self.max_retries + 1):
                if not any(s.ready for s in self.slots):
                    raise JobFailed(f"workers keep failing to start: {message}") from None
                log.warning("a worker failed to start (%s); continuing with %d", message,
                            sum(s.ready for s in self.slots))
                return
            log.warning("a worker failed to start (%s); starting another", message)
            self._start_actor()

    def _collect(self, ref) -> None:
        slot, work = self.owner[ref]
        try:
            result = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001
            if _is_actor_death(exc):
                log.warning("actor on %s died: %s", slot.info.get("host"), _root_message(exc))
                self._retire(slot, "worker died", "WorkerCrashed")
                return
            self._forget(ref, slot)
            self._failed(work, _root_message(exc), "WorkerError")
            return
        self._forget(ref, slot)
        self._result(work, result)

    def _forget(self, ref, slot: Slot) -> None:
        del self.owner[ref]
        slot.inflight.remove(ref)
        slot.busy_since = time.monotonic()  # progress: the timeout clock restarts

    def _result(self, work: Work, result: Any) -> None:
        if isinstance(result, tuple):  # a bisection piece: tables come back to the driver
            emb, err, summary = result
            self._piece_done(work, emb, err)
            return
        for k in self.stage_s:
            self.stage_s[k] += result.get(k, 0.0)
        self._shard_written(result["rows"] + result["errors"], result["errors"])


def _metadata(table: pa.Table) -> dict:
    return json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))


def _root_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    lines = [ln.strip() for ln in text if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln and ":" in ln:
            return ln[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _write_success(input_url: str, output: str, cfg: dict, fingerprint: str, weights, stats: dict,
                   wall_s: float, storage_options: Optional[dict], run: dict,
                   planned: Optional[dict]) -> dict:
    """Write ``_SUCCESS.json``: totals over every generation, the generations, and one record per
    run (earlier runs' records are carried over from the previous ``_SUCCESS.json``)."""
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
        "config": redact(cfg),
        "run": dict(stats, total_wall_s=round(wall_s, 2)),
        "versions": {"vgg_pipeline": __version__, "torch": torch.__version__, "pyarrow": pa.__version__},
        "finished_at": run["finished_at"],
        "generations": [{k: g.get(k) for k in ("gen", "created_at", "first_shard", "num_shards", "num_items",
                                               "num_duplicates")} for g in gens],
        "runs": _earlier_runs(fs, join(root, SUCCESS)) + [run],
        "shards": report.per_shard,
    }
    write_atomic(fs, join(root, SUCCESS), json.dumps(summary, indent=1).encode())
    return summary


def _earlier_runs(fs, path: str) -> list[dict]:
    """The run records of the previous ``_SUCCESS.json`` (one synthesised from an older file
    that predates them); none if there is no readable previous file."""
    try:
        previous = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return []
    if isinstance(previous.get("runs"), list):
        return previous["runs"]
    old = previous.get("run", {})
    return [{"finished_at": previous.get("finished_at"), "mode": "extract",
             "images_this_run": old.get("images_this_run"), "shards_done": old.get("shards_done"),
             "shards_resumed": old.get("shards_resumed")}]
