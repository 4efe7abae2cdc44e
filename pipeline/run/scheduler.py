"""Which shard runs where, and what happens when an actor dies or hangs (docs/design.md §6).

The :class:`Scheduler` streams shards to a :class:`Pool` of workers and owns every failure rule;
it knows nothing of Ray (``ray_pool.RayPool`` is the real pool, tests drive it with a fake one
and a fake clock).  The rules:

* **bounded memory**: at most ``runtime.max_shards_in_flight`` shards are in flight in the whole
  pool, at most ``per_actor`` on one actor;
* **exact blame**: when an actor dies, the shards it may have been running are the suspects: with
  one ``process`` at a time that is its oldest unfinished shard (Ray runs a single-threaded actor's
  tasks in order); with several at once, every unfinished one.  A lone suspect is charged one
  failed attempt.  Several suspects are charged nothing: each is re-run *alone* (its actor gets no
  other shard until it finishes), so the next death is attributable.  A shard charged for a
  death or a timeout runs alone from then on too.  Shards provably not started are re-queued as
  they were, uncharged.  (An exception raised by ``process`` is always its own shard's: charged.)
* **bounded retries, then bisection**: a shard charged more than ``runtime.max_retries`` times is
  split in halves until the image responsible is alone; that image, charged twice, becomes one
  ``stage=model`` error row and the driver writes the shard from its pieces;
* **stuck actors**: a shard counts as running from the moment its actor has a free ``process``
  slot for it; one that has been running for more than ``runtime.shard_timeout_s`` marks its actor
  stuck, however many shards the actor's other slots finish meanwhile.  The stuck actor is killed,
  and the shards that timed out are the suspects (charged as above);
* **node loss** is several actor deaths at once, each handled as above; every lost actor is
  replaced, and the job goes on with the actors that run while replacements wait for room;
* **workers that fail to start** are replaced within a budget; a usage error (bad weights) ends
  the job in one line;
* **resume**: shards in ``done`` are skipped without starting an actor.

Termination: every death either charges exactly one shard (bounded by retries and bisection) or
turns several shards that did not run alone into ones that do (once per shard).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Optional, Protocol, Sequence

import pyarrow as pa

from ..config import Config
from ..errors import ItemError, JobFailed, UsageError
from ..input.plan import Shard
from ..output.writer import METADATA_KEY, ShardRows, embeddings_schema, embeddings_table, errors_table, write_shard

log = logging.getLogger(__name__)

PROGRESS_LOG_S = 30.0  # how often progress is logged when there is no terminal for a bar
ACTOR_START_TIMEOUT_S = 900.0   # a pool with no ready actor for this long means the cluster cannot host one
ACTOR_WAIT_WARN_S = 60.0        # ... and after this long the user is told what the driver waits for
WAIT_S = 1.0                    # longest single wait: timeouts are checked at least this often


# ----------------------------------------------------------------------------- the pool interface

@dataclass(frozen=True)
class Outcome:
    """How a handle finished: ``value`` (the result), or ``error`` (a one-line message).

    ``died`` says the actor (or its node) is gone, as opposed to an exception raised by the call;
    for an actor's start any error is a failed start.
    """
    value: Any = None
    error: Optional[str] = None
    died: bool = False
    storage: bool = False  # the call failed on storage that stayed unavailable (StorageUnavailable)


class Pool(Protocol):
    """Workers the scheduler hands shards to.  Handles are hashable; a finished handle stays
    finished (waiting on it again returns the same outcome)."""

    size: int         # actors to keep running
    concurrency: int  # ``process`` calls one actor runs at once

    def start(self) -> tuple[Any, Hashable]:
        """Start one actor; returns it and a handle that finishes with its info dict once ready."""

    def submit(self, actor: Any, shard: Shard, write: bool) -> Hashable:
        """``process(shard, write)`` on ``actor``: finishes with a summary dict (written) or
        ``(embeddings, errors, summary)`` tables (``write=False``)."""

    def wait(self, handles: Sequence[Hashable], timeout: float) -> list[tuple[Hashable, Outcome]]:
        """The finished ones among ``handles``: at least one unless ``timeout`` seconds passed;
        ``timeout=0`` only polls."""

    def kill(self, actor: Any) -> None:
        """Stop ``actor`` for good; never raises (it may be gone already)."""

    def describe(self) -> str:
        """What one actor needs and what the cluster has free, for messages."""


# ----------------------------------------------------------------------------- state

@dataclass(eq=False)
class Work:
    """A shard, or a piece ``[start, end)`` of one being bisected, and its charged failures."""
    shard: Shard
    start: int = 0
    end: Optional[int] = None
    attempts: int = 0
    alone: bool = False   # was a suspect in an actor's death: runs with no other shard beside it

    @property
    def whole(self) -> bool:
        return self.end is None

    def piece(self) -> Shard:
        if self.whole:
            return self.shard
        s, e = self.start, self.end
        return Shard(self.shard.index, self.shard.ids[s:e], self.shard.uris[s:e], self.shard.duplicate[s:e])

    def __repr__(self) -> str:
        where = "" if self.whole else f"[{self.start}:{self.end}]"
        return f"shard {self.shard.index}{where}"


@dataclass(eq=False)
class Task:
    handle: Hashable
    work: Work
    running_since: Optional[float]  # None while it waits behind ``concurrency`` others on its actor


@dataclass(eq=False)
class Slot:
    """One actor, from its start to its end."""
    actor: Any
    ready_handle: Hashable
    ready: bool = False
    info: dict = field(default_factory=dict)
    tasks: list[Task] = field(default_factory=list)   # submission order

    @property
    def exclusive(self) -> bool:
        """It runs a shard that must run alone."""
        return any(t.work.alone for t in self.tasks)


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


class Progress:
    """A tqdm bar on a terminal, else a log line every :data:`PROGRESS_LOG_S`."""

    def __init__(self, enabled: bool, total: Optional[int], clock: Callable[[], float]) -> None:
        self.bar = None
        self.clock = clock
        self.done = self.errors = 0
        self.started = self.last_log = clock()
        self.bar_total = total
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=0, unit="img", dynamic_ncols=True,
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
        elif self.clock() - self.last_log >= PROGRESS_LOG_S:  # no terminal (e.g. a Ray job's log)
            self.last_log = self.clock()
            elapsed = self.last_log - self.started
            rate = self.done / elapsed if elapsed else 0.0
            total = self.bar_total
            eta = f", ETA {(total - self.done) / rate:.0f}s" if total and rate else ""
            log.info("progress: %d/%s images, %.2f img/s%s, %d errors, %d actors", self.done,
                     total if total else "?", rate, eta, self.errors, alive)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the scheduler

STAGES = ("read_s", "decode_s", "model_s", "wait_s", "write_s")  # actor seconds, summed per run


def run_stats(shards_resumed: int = 0) -> dict[str, Any]:
    """A run's statistics before it starts; as they stay for a run that finds every shard
    already written (the driver then starts no Ray at all)."""
    return {"shards_done": 0, "shards_resumed": shards_resumed, "retries": 0, "actor_failures": 0,
            "unattributed_failures": 0, "bisected_shards": 0, "timeouts": 0, "images_this_run": 0,
            "images_compiled": 0, "wall_s": 0.0, "img_per_s": 0.0, "stage_seconds": dict.fromkeys(STAGES, 0.0)}


class Scheduler:
    """Runs every shard of a plan on a :class:`Pool` until each is written once (module docstring)."""

    def __init__(self, pool: Pool, cfg: Config, output: str, storage_options: Optional[dict], job: dict, *,
                 progress: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool, self.cfg, self.output, self.so, self.job = pool, cfg, output, storage_options, job
        self.progress_enabled, self.clock = progress, clock
        rt = cfg.runtime
        self.max_retries = rt.max_retries
        self.timeout_s = rt.shard_timeout_s
        # One running + one queued with a single process() slot, so the actor never idles between
        # shards; as many as it runs at once otherwise.
        self.per_actor = max(2, pool.concurrency)
        self.window = max(1, rt.max_shards_in_flight or pool.size * self.per_actor)
        self.slots: list[Slot] = []
        self.queue: deque[Work] = deque()   # re-queued shards go first, before the rest of the plan
        self.alone: deque[Work] = deque()   # suspects and charged shards: each runs on an idle actor
        self.owner: dict[Hashable, tuple[Slot, Task]] = {}
        self.bisections: dict[int, _Bisection] = {}
        self.charges: Counter[int] = Counter()   # shard index -> failed attempts charged to it
        self.start_failures = 0
        self.warned_wait = False
        self.stats: dict[str, Any] = run_stats()
        self.stage_s = dict.fromkeys(STAGES, 0.0)
        self.engine_s: dict[str, dict[str, float]] = {}

    # -- the loop
    def run(self, shards: Iterator[Shard], done: set[int], total: Optional[int]) -> dict:
        """Process every shard of ``shards`` not in ``done``; returns the run's statistics."""
        self.bar = Progress(self.progress_enabled, total, self.clock)
        self.source, self.done, self.listed, self.total = iter(shards), done, 0, total
        self.exhausted = False
        try:
            first = self._next_work()  # finished shards are skipped without waiting for an actor
            if first is not None:       # (a finished job starts none at all)
                self.queue.append(first)
                for _ in range(self.pool.size):
                    self._start_actor()
            last_ready = self.clock()
            while self._unfinished():
                self._top_up()
                if not self._unfinished():
                    break
                self._step(last_ready)
                if any(s.ready for s in self.slots):
                    last_ready = self.clock()
        finally:
            self.bar.close()
            for slot in self.slots:  # ready, busy or still pending (e.g. no node can host it)
                self.pool.kill(slot.actor)
            self.slots.clear()
        elapsed = self.clock() - self.bar.started
        self.stats["wall_s"] = round(elapsed, 2)
        self.stats["img_per_s"] = round(self.stats["images_this_run"] / elapsed, 2) if elapsed else 0.0
        self.stats["stage_seconds"] = {k: round(v, 2) for k, v in self.stage_s.items()}
        if self.engine_s:  # what each GPU decode engine decoded, and its rate per busy second
            self.stats["decode_engines"] = {
                e: {"images": int(a["images"]), "busy_s": round(a["busy_s"], 2),
                    "img_per_s": round(a["images"] / a["busy_s"], 1) if a["busy_s"] else None}
                for e, a in self.engine_s.items()}
        return self.stats

    def _unfinished(self) -> bool:
        return bool(self.queue or self.alone or self.owner or not self.exhausted)

    def _top_up(self) -> None:
        """Give every ready actor work while the in-flight window allows."""
        for slot in [s for s in self.slots if s.ready]:
            while len(self.owner) < self.window:
                work = self._pick(slot)
                if work is None:
                    break
                self._submit(slot, work)

    def _pick(self, slot: Slot) -> Optional[Work]:
        if slot.exclusive or len(slot.tasks) >= self.per_actor:
            return None
        if self.alone:  # busy actors take nothing new until one is idle for the shard that runs alone
            return None if slot.tasks else self.alone.popleft()
        return self.queue.popleft() if self.queue else self._next_work()

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
                self.bar.advance(len(shard), 0, self._alive(), self._queued())
                continue
            return Work(shard)
        return None

    def _step(self, last_ready: float) -> None:
        """Wait for one thing to finish, act on it, then on actors that are stuck or never come."""
        pending = {s.ready_handle: s for s in self.slots if not s.ready}
        handles = list(self.owner) + list(pending)
        if not handles:  # nothing in flight and nothing starting: every worker is gone
            raise JobFailed("no worker is left to run the remaining shards")
        for handle, outcome in self.pool.wait(handles, WAIT_S):
            if handle in pending:
                self._actor_started(pending[handle], outcome)
            elif handle in self.owner:  # (not if its actor was retired for an earlier outcome)
                self._collect(handle, outcome)
        now = self.clock()
        for slot in list(self.slots):
            started = [t for t in slot.tasks if t.running_since is not None]
            stuck = [t for t in started if now - t.running_since > self.timeout_s]
            if stuck:
                self.stats["timeouts"] += 1
                log.warning("actor on %s made no progress on %s for %.0fs; killing it", slot.info.get("host"),
                            ", ".join(repr(t.work) for t in stuck), now - min(t.running_since for t in stuck))
                self._retire(slot, f"no result for {self.timeout_s:g}s", "Timeout", stuck)
        if any(s.ready for s in self.slots):
            self.warned_wait = False
            return
        waited = now - last_ready
        if waited > max(ACTOR_START_TIMEOUT_S, self.timeout_s):
            raise JobFailed(f"no worker could be started on the cluster for {waited:.0f}s "
                            f"({self.pool.describe()})")
        if waited > ACTOR_WAIT_WARN_S and not self.warned_wait:
            self.warned_wait = True
            log.warning("no worker running for %.0fs: waiting for the cluster (%s)", waited, self.pool.describe())

    # -- actors
    def _start_actor(self) -> None:
        actor, ready = self.pool.start()
        self.slots.append(Slot(actor, ready))

    def _alive(self) -> int:
        return sum(s.ready for s in self.slots)

    def _queued(self) -> int:
        return len(self.queue) + len(self.alone)

    def _actor_started(self, slot: Slot, outcome: Outcome) -> None:
        if outcome.error is None:
            slot.info = outcome.value or {}
            slot.ready = True
            log.info("actor ready: %s", slot.info)
            self.stats.setdefault("actors", []).append(
                {k: slot.info.get(k) for k in ("host", "device", "precision", "batch_size", "decode", "compile")})
            return
        message = outcome.error
        self.slots.remove(slot)
        self.pool.kill(slot.actor)
        if "WeightsError" in message or "UsageError" in message:
            raise UsageError(message.split(": ", 1)[-1])
        # Anything else (its node died while it loaded, OOM...) may be transient: start another,
        # within a budget, and carry on with the actors that work.
        self.start_failures += 1
        if self.start_failures > self.pool.size * (self.max_retries + 1):
            if not self._alive():
                raise JobFailed(f"workers keep failing to start: {message}")
            log.warning("a worker failed to start (%s); continuing with %d", message, self._alive())
            return
        log.warning("a worker failed to start (%s); starting another", message)
        self._start_actor()

    def _retire(self, slot: Slot, reason: str, error_type: str, stuck: Optional[list[Task]] = None) -> None:
        """Kill a dead or stuck actor, start a replacement and deal with the shards it held.

        Tasks that finished before it went are collected, not redone.  Of the others, the
        suspects are the ones that timed out (``stuck``), else the ones it may have been running
        (module docstring); the rest never started and go back to the queue as they were.
        """
        if slot in self.slots:
            self.slots.remove(slot)
        self.pool.kill(slot.actor)
        self.stats["actor_failures"] += 1
        held = [t for t in slot.tasks if self.owner.pop(t.handle, None) is not None]
        slot.tasks.clear()
        finished = dict(self.pool.wait([t.handle for t in held], 0)) if held else {}
        lost: list[Task] = []
        for task in held:
            outcome = finished.get(task.handle)
            if outcome is None or outcome.died:
                lost.append(task)
            elif outcome.error is not None:
                self._failed(task.work, outcome.error, "WorkerError")
            else:
                self._result(task.work, outcome.value)
        if stuck is not None:
            suspects = [t for t in lost if t in stuck]
        else:
            suspects = lost[:1] if self.pool.concurrency == 1 else lost
        self.queue.extendleft(reversed([t.work for t in lost if t not in suspects]))
        self._start_actor()
        if len(suspects) == 1:
            work = suspects[0].work
            work.alone = True
            self._failed(work, reason, error_type)
        elif suspects:
            self.stats["unattributed_failures"] += 1
            log.warning("%s held %s: none is charged; each runs alone next", reason,
                        ", ".join(repr(t.work) for t in suspects))
            for task in suspects:
                task.work.alone = True
                self.alone.append(task.work)

    # -- work
    def _submit(self, slot: Slot, work: Work) -> None:
        write = work.whole and work.shard.index not in self.bisections
        handle = self.pool.submit(slot.actor, work.piece(), write)
        running = sum(t.running_since is not None for t in slot.tasks) < self.pool.concurrency
        task = Task(handle, work, self.clock() if running else None)
        slot.tasks.append(task)
        self.owner[handle] = (slot, task)

    def _collect(self, handle: Hashable, outcome: Outcome) -> None:
        slot, task = self.owner[handle]
        if outcome.died:
            log.warning("actor on %s died: %s", slot.info.get("host"), outcome.error)
            self._retire(slot, "worker died", "WorkerCrashed")
            return
        del self.owner[handle]
        slot.tasks.remove(task)
        waiting = next((t for t in slot.tasks if t.running_since is None), None)
        if waiting is not None:  # a process() slot is free: the next shard starts its clock
            waiting.running_since = self.clock()
        if outcome.error is not None:
            self._failed(task.work, outcome.error, "StorageUnavailable" if outcome.storage else "WorkerError")
        else:
            self._result(task.work, outcome.value)

    def _requeue(self, work: Work) -> None:
        (self.alone if work.alone else self.queue).appendleft(work)

    def _failed(self, work: Work, reason: str, error_type: str) -> None:
        """Charge ``work`` one failed attempt: retry it, bisect it, or make its image an error row."""
        work.attempts += 1
        self.charges[work.shard.index] += 1
        if work.whole and work.attempts <= self.max_retries:
            self.stats["retries"] += 1
            log.warning("%r failed (%s); retry %d/%d", work, reason, work.attempts, self.max_retries)
            self._requeue(work)
            return
        if error_type == "StorageUnavailable":
            # Storage that stays down is not the images' fault: no bisection, no error rows.  The
            # run ends (exit 1) with every finished shard kept; rerunning resumes it.
            raise JobFailed(f"storage unavailable for shard {work.shard.index} after {work.attempts} "
                            f"attempts ({reason}); finished shards are kept, rerun to resume")
        if work.whole:  # it keeps failing: bisect to find the image that kills the worker
            self.stats["bisected_shards"] += 1
            log.warning("%r failed %d times (%s); isolating the image responsible", work, work.attempts, reason)
            self.bisections[work.shard.index] = _Bisection(work.shard)
            work = Work(work.shard, 0, len(work.shard), attempts=1, alone=work.alone)
        start, end = work.start, work.end
        if end - start > 1:
            mid = (start + end) // 2
            self._requeue(Work(work.shard, mid, end, alone=work.alone))
            self._requeue(Work(work.shard, start, mid, alone=work.alone))
            return
        if work.attempts <= 1:  # one more chance, in case a node died under an innocent image
            self._requeue(work)
            return
        shard = work.shard
        what = {"Timeout": "made no progress on", "WorkerCrashed": "died on"}.get(error_type, "failed on")
        err = ItemError("model", error_type, f"the worker {what} this image {work.attempts} times ({reason})")
        schema = embeddings_schema(self.cfg.output.fc7_dtype, self.cfg.output.top_k,
                                   self.cfg.model.descriptor_dim)
        meta = {"shard": shard.index}
        row = (shard.ids[start], shard.uris[start], err.stage, err.error_type, err.message)
        self._piece_done(work, embeddings_table(ShardRows(), schema, meta), errors_table([row], meta))

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
                raise JobFailed(f"cannot write shard {work.shard.index}: {root_message(exc)}") from None
            del self.bisections[work.shard.index]
            self._shard_written(len(work.shard), err_all.num_rows)

    def _shard_written(self, n: int, errors: int) -> None:
        self.stats["shards_done"] += 1
        self.stats["images_this_run"] += n
        self.bar.advance(n, errors, self._alive(), self._queued())

    def _result(self, work: Work, result: Any) -> None:
        if isinstance(result, tuple):  # a bisection piece: tables come back to the driver
            emb, err, _summary = result
            self._piece_done(work, emb, err)
            return
        for k in self.stage_s:
            self.stage_s[k] += result.get(k, 0.0)
        for name, got in result.get("engines", {}).items():  # GPU decode engines (pipeline.decode.engines)
            acc = self.engine_s.setdefault(name, {"images": 0, "busy_s": 0.0})
            acc["images"] += got["images"]
            acc["busy_s"] += got["busy_s"]
        self.stats["images_compiled"] += result.get("compiled", 0)   # by the torch.compile'd model
        self._shard_written(result["rows"] + result["errors"], result["errors"])


def _metadata(table: pa.Table) -> dict:
    return json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))


def root_message(exc: BaseException) -> str:
    """The line of a (remote) traceback that names the error, at most 300 characters."""
    text = str(exc).strip().splitlines()
    lines = [ln.strip() for ln in text if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln and ":" in ln:
            return ln[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]
