"""The scheduler's failure rules (pipeline/run/scheduler.py), driven by a fake pool and a fake clock.

No Ray, no sleeps, no wall clock: :class:`FakePool` is a deterministic world.  Each ``wait`` with a
timeout is one step of it: every started actor finishes the oldest of the shards it is running
(its first ``concurrency`` unfinished ones) unless one of them kills it (a *poison* image, or a
shard scripted to crash once) or hangs it (a *stuck* image: that one never finishes, the others
do).  The fake clock moves ``step`` seconds per step that returned something and the whole
timeout per one that did not.  Shards that run to completion are written by the fake "worker" into
a real output directory with the real writer, so every test reads back exact per-image outcomes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.errors import JobFailed, UsageError
from pipeline.input.plan import Shard
from pipeline.output.writer import (ShardRows, done_shards, embeddings_schema, embeddings_table, errors_table,
                                    write_shard)
from pipeline.run.scheduler import ACTOR_START_TIMEOUT_S, WAIT_S, Outcome, Scheduler

JOB = {"input_sha256": "0" * 16, "fingerprint": "fake"}
DIED = "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class FakeActor:
    id: int
    node: int
    start_error: Optional[str]
    started: bool = False
    alive: bool = True
    tasks: list = field(default_factory=list)   # unfinished FakeTasks, submission order


@dataclass(eq=False)
class FakeTask:
    handle: tuple
    actor: FakeActor
    shard: Shard
    write: bool
    running_since: Optional[float] = None   # when it became one of its actor's running shards
    outcome: Optional[Outcome] = None


class FakePool:
    """A deterministic :class:`~pipeline.run.scheduler.Pool` (module docstring)."""

    def __init__(self, output: Path, clock: FakeClock, cfg: dict, *, size: int = 2, concurrency: int = 2,
                 nodes: int = 1, poison: frozenset = frozenset(), stuck: frozenset = frozenset(),
                 raises: frozenset = frozenset(), storage_down: frozenset = frozenset(), crash_once: Optional[set] = None,
                 start_errors: Optional[list] = None, never_ready: bool = False,
                 node_loss: Optional[tuple[int, int]] = None, step: float = 0.25) -> None:
        self.output, self.clock, self.size, self.concurrency = str(output), clock, size, concurrency
        self.nodes, self.dead_nodes = nodes, set()
        self.poison, self.stuck, self.raises, self.storage_down = poison, stuck, raises, storage_down
        self.crash_once = set(crash_once or ())
        self.start_errors = list(start_errors or [])
        self.never_ready, self.node_loss, self.step = never_ready, node_loss, step
        self.schema = embeddings_schema(cfg.output.fc7_dtype, cfg.output.top_k)
        self.actors: list[FakeActor] = []
        self.tasks: dict[tuple, FakeTask] = {}
        # (kind, actor id, handle, shard index, ids, tasks its actor held before, time); kind: submit,
        # done, died (a crash or its node) or killed (by the scheduler)
        self.events: list[tuple] = []
        self.kills: list[tuple[float, int, int]] = []   # (time, actor id, unfinished tasks it held)
        self.writes: Counter[int] = Counter()   # shard index -> part files written by a worker
        self.max_in_flight = self.max_per_actor = 0
        self.steps = 0

    # -- the Pool interface
    def start(self) -> tuple[FakeActor, tuple]:
        alive = [n for n in range(self.nodes) if n not in self.dead_nodes]
        actor = FakeActor(len(self.actors), alive[len(self.actors) % len(alive)],
                          self.start_errors.pop(0) if self.start_errors else None)
        self.actors.append(actor)
        return actor, ("ready", actor.id)

    def submit(self, actor: FakeActor, shard: Shard, write: bool) -> tuple:
        task = FakeTask(("task", len(self.tasks)), actor, shard, write)
        self.tasks[task.handle] = task
        self.events.append(("submit", actor.id, task.handle, shard.index, tuple(shard.ids), len(actor.tasks),
                            self.clock()))
        if actor.alive:
            actor.tasks.append(task)
            self._mark_running(actor)
        else:  # like Ray: a call on a dead actor fails as a death
            task.outcome = Outcome(error=DIED, died=True)
        self.max_in_flight = max(self.max_in_flight, sum(len(a.tasks) for a in self.actors))
        self.max_per_actor = max(self.max_per_actor, len(actor.tasks))
        return task.handle

    def wait(self, handles, timeout: float) -> list[tuple[tuple, Outcome]]:
        if timeout > 0:
            self.steps += 1
            self._step()
        done = [(h, out) for h in handles if (out := self._outcome(h)) is not None]
        if timeout > 0:
            self.clock.now += self.step if done else timeout
        return done

    def kill(self, actor: FakeActor) -> None:
        self.kills.append((self.clock(), actor.id, len(actor.tasks)))
        self._die(actor, "killed")

    def describe(self) -> str:
        return "each worker needs {'CPU': 1}; the cluster has {} free"

    # -- the world
    def _outcome(self, handle: tuple) -> Optional[Outcome]:
        if handle[0] == "task":
            return self.tasks[handle].outcome
        actor = self.actors[handle[1]]
        if not actor.started:
            return None
        if actor.start_error:
            return Outcome(error=actor.start_error)
        return Outcome(value={"host": f"node{actor.node}"})

    def _step(self) -> None:
        if self.node_loss and self.steps == self.node_loss[0]:
            self.dead_nodes.add(self.node_loss[1])
            for actor in self.actors:
                if actor.node == self.node_loss[1]:
                    self._die(actor, "died")
        for actor in list(self.actors):
            if not actor.alive:
                continue
            if not actor.started:
                actor.started = not self.never_ready
                if actor.start_error:
                    actor.alive = False
                continue
            running = actor.tasks[:self.concurrency]
            if any(self._crashes(t) for t in running):
                self._die(actor, "died")
                continue
            task = next((t for t in running if not self.stuck & set(t.shard.ids)), None)
            if task is not None:
                self._complete(task)

    def _crashes(self, task: FakeTask) -> bool:
        if task.shard.index in self.crash_once:
            self.crash_once.discard(task.shard.index)
            return True
        return bool(self.poison & set(task.shard.ids))

    def _mark_running(self, actor: FakeActor) -> None:
        for task in actor.tasks[:self.concurrency]:
            if task.running_since is None:
                task.running_since = self.clock()

    def _die(self, actor: FakeActor, kind: str) -> None:
        actor.alive = False
        for task in actor.tasks:
            task.outcome = Outcome(error=DIED, died=True)
            self.events.append((kind, actor.id, task.handle, task.shard.index, tuple(task.shard.ids), 0,
                                self.clock()))
        actor.tasks.clear()

    def _complete(self, task: FakeTask) -> None:
        actor, shard = task.actor, task.shard
        actor.tasks.remove(task)
        self._mark_running(actor)
        self.events.append(("done", actor.id, task.handle, shard.index, tuple(shard.ids), 0, self.clock()))
        if self.raises & set(shard.ids):
            task.outcome = Outcome(error="RuntimeError: cannot embed this shard")
            return
        if self.storage_down & set(shard.ids):
            task.outcome = Outcome(error="storage unavailable: 503 SlowDown on s3://b/k", storage=True)
            return
        n = len(shard)
        rows = ShardRows()
        rows.add(shard.ids, shard.uris, [64] * n, [48] * n,
                 {"fc7": np.full((n, 4096), shard.index, np.float32), "logits": np.zeros((n, 1000), np.float32)})
        meta = {"model": {"arch": "fake"}, "shard": shard.index, "shard_digest": shard.digest, "job": JOB}
        emb, err = embeddings_table(rows, self.schema, meta), errors_table([], meta)
        summary = {"shard": shard.index, "rows": n, "errors": 0, "model_s": 0.5,
                   # a GPU worker's decode engines (pipeline/run/worker.py): what each decoded
                   "engines": {"cuda": {"images": n - 1, "busy_s": 0.25}, "cpu": {"images": 1, "busy_s": 0.5}}}
        if task.write:
            write_shard(self.output, shard.index, emb, err)
            self.writes[shard.index] += 1
            task.outcome = Outcome(value=summary)
        else:
            task.outcome = Outcome(value=(emb, err, summary))

    # -- what tests look at
    def runs(self, shard: int) -> list[tuple]:
        """The id tuples of every submission of shard ``shard`` (whole or a piece), in order."""
        return [e[4] for e in self.events if e[0] == "submit" and e[3] == shard]

    def ran_alone(self, ids: tuple, after: int = 0) -> bool:
        """Every submission of exactly ``ids`` after event ``after`` found its actor idle, and the
        actor got nothing else until that task ended."""
        runs = 0
        for i, e in enumerate(self.events[after:], after):
            if e[0] != "submit" or e[4] != ids:
                continue
            runs += 1
            if e[5] != 0:
                return False
            end = next(j for j, f in enumerate(self.events) if j > i and f[0] != "submit" and f[2] == e[2])
            if any(f[0] == "submit" and f[1] == e[1] for f in self.events[i + 1:end]):
                return False
        return runs > 0

    def first_death(self) -> int:
        return next(i for i, e in enumerate(self.events) if e[0] == "died")


def make_shards(n: int, images: int) -> list[Shard]:
    return [Shard(i, [f"s{i}-{j}" for j in range(images)], [f"file:///in/s{i}-{j}.jpg" for j in range(images)],
                  [False] * images) for i in range(n)]


def ids(shard: int, images: int, start: int = 0, end: Optional[int] = None) -> tuple:
    """The ids of shard ``shard`` (``images`` per shard), or of its piece ``[start, end)``."""
    return tuple(f"s{shard}-{j}" for j in range(images))[start:end]


def run(tmp_path: Path, shards: int = 4, images: int = 2, sets: tuple = (), done: tuple = (),
        **pool: Any) -> tuple[Scheduler, FakePool, dict]:
    """One job of ``shards`` shards of ``images`` images on a FakePool; (scheduler, pool, stats)."""
    cfg = load_config(overrides=["runtime.max_retries=2", *sets])
    clock = FakeClock()
    fake = FakePool(tmp_path, clock, cfg, **pool)
    sched = Scheduler(fake, cfg, str(tmp_path), None, JOB, clock=clock)
    stats = sched.run(iter(make_shards(shards, images)), set(done), None)
    assert not [a for a in fake.actors if a.alive], "an actor was left running"
    return sched, fake, stats


def outcomes(output: Path) -> dict[str, Any]:
    """``{id: "embedded" | (stage, error_type)}`` over every part file; fails on a doubled id."""
    seen: Counter[str] = Counter()
    result: dict[str, Any] = {}
    for path in sorted((output / "embeddings").glob("part-*.parquet")):
        for i in pq.read_table(path, columns=["id"])["id"].to_pylist():
            seen[i] += 1
            result[i] = "embedded"
    for path in sorted((output / "errors").glob("part-*.parquet")):
        for r in pq.read_table(path).to_pylist():
            seen[r["id"]] += 1
            result[r["id"]] = (r["stage"], r["error_type"])
    assert [i for i, c in seen.items() if c > 1] == []
    return result


def expected(shards: int, images: int, errors: Optional[dict] = None, skip: tuple = ()) -> dict[str, Any]:
    """Every image of shards not in ``skip`` embedded, but those in ``errors``."""
    out = {i: "embedded" for s in range(shards) if s not in skip for i in ids(s, images)}
    out.update(errors or {})
    return out


def test_run_stats_sum_what_each_decode_engine_decoded(tmp_path):
    _, _, stats = run(tmp_path, shards=4, images=3)
    assert stats["decode_engines"] == {"cuda": {"images": 8, "busy_s": 1.0, "img_per_s": 8.0},
                                       "cpu": {"images": 4, "busy_s": 2.0, "img_per_s": 2.0}}


# ----------------------------------------------------------------------------- actor death

def test_death_with_two_shards_in_flight_charges_neither(tmp_path):
    """An actor running shards 0 and 1 at once dies (shard 1's fault, once).  Which one did it is
    unknown, so neither is charged; both re-run alone, and every shard is written exactly once."""
    sched, pool, stats = run(tmp_path, shards=4, size=1, concurrency=2, crash_once={1})
    assert outcomes(tmp_path) == expected(4, 2)
    assert pool.writes == {0: 1, 1: 1, 2: 1, 3: 1}
    assert sched.charges == {}
    assert (stats["actor_failures"], stats["unattributed_failures"], stats["retries"]) == (1, 1, 0)
    death = pool.first_death()
    assert [e[3] for e in pool.events[:death] if e[0] == "submit"] == [0, 1]
    for shard in (0, 1):  # the two suspects, after the death: each on an idle actor, alone
        assert pool.ran_alone(ids(shard, 2), after=death)
    assert not pool.ran_alone(ids(2, 2)), "shards that were never suspects share their actor"


def test_death_with_one_process_slot_charges_the_running_shard_only(tmp_path):
    """With one ``process`` at a time, the oldest unfinished shard is the one that was running:
    it is charged and re-runs alone; the one queued behind it is not charged."""
    sched, pool, stats = run(tmp_path, shards=4, size=1, concurrency=1, crash_once={0})
    assert outcomes(tmp_path) == expected(4, 2)
    assert pool.writes == {0: 1, 1: 1, 2: 1, 3: 1}
    assert sched.charges == {0: 1}
    assert (stats["actor_failures"], stats["unattributed_failures"], stats["retries"]) == (1, 0, 1)
    death = pool.first_death()
    assert [e[3] for e in pool.events[:death] if e[0] == "submit"] == [0, 1]
    assert pool.ran_alone(ids(0, 2), after=death)


def test_node_loss_requeues_every_shard_of_its_actors(tmp_path):
    """Two nodes, two actors each, two shards in flight per actor; node 1 vanishes.  Its four
    shards are suspects that run alone, none is charged, both actors are replaced on node 0."""
    sched, pool, stats = run(tmp_path, shards=12, size=4, nodes=2, concurrency=2, node_loss=(2, 1))
    assert outcomes(tmp_path) == expected(12, 2)
    assert pool.writes == {i: 1 for i in range(12)}
    assert sched.charges == {}
    assert (stats["actor_failures"], stats["unattributed_failures"], stats["retries"]) == (2, 2, 0)
    lost = sorted(e[3] for e in pool.events if e[0] == "died")
    assert lost == [2, 3, 6, 7]   # actors 1 and 3 (node 1) held shards 2, 3 and 6, 7
    assert [a.node for a in pool.actors] == [0, 1, 0, 1, 0, 0]
    for shard in lost:
        assert pool.ran_alone(ids(shard, 2), after=pool.first_death())


# ----------------------------------------------------------------------------- stuck actors

@pytest.mark.parametrize("concurrency", [1, 2])
def test_stuck_shard_is_killed_after_the_timeout_although_its_actor_finishes_others(tmp_path, concurrency):
    """Shard 1's second image hangs its actor.  With two process() slots the actor keeps finishing
    other shards beside it for longer than the timeout: that is no progress on shard 1, which is
    killed ``shard_timeout_s`` after it started, retried, bisected, and its image made one
    ``Timeout`` error row.  Nothing else is charged."""
    sched, pool, stats = run(tmp_path, shards=30, size=2, concurrency=concurrency, stuck=frozenset({"s1-1"}),
                             sets=("runtime.shard_timeout_s=10", "runtime.max_retries=1"), step=1.0)
    assert outcomes(tmp_path) == expected(30, 2, {"s1-1": ("model", "Timeout")})
    assert pool.writes == {i: 1 for i in range(30) if i != 1}  # shard 1: written by the driver
    assert sched.charges == {1: 4}   # twice whole (max_retries=1), twice its bad image alone
    assert (stats["timeouts"], stats["actor_failures"], stats["unattributed_failures"]) == (4, 4, 0)
    assert stats["bisected_shards"] == 1
    assert pool.runs(1) == [ids(1, 2)] * 2 + [ids(1, 2, 0, 1), ids(1, 2, 1, 2), ids(1, 2, 1, 2)]
    # Each kill came within one wait (plus one fake step) of the stuck shard's timeout.
    stuck = [t for t in pool.tasks.values() if "s1-1" in t.shard.ids]
    kills = [k for k in pool.kills if k[2]]   # kills of actors that held work (not the final clean-up)
    assert len(kills) == len(stuck) == 4
    for (at, _, _), task in zip(kills, stuck):
        assert 10 < at - task.running_since <= 10 + WAIT_S + pool.step
    first = stuck[0]
    if concurrency == 2:  # the other slot of the stuck actor went on finishing shards meanwhile
        done_beside = [e for e in pool.events if e[0] == "done" and e[1] == first.actor.id and e[3] != 1]
        assert len(done_beside) > 10
    last_done = max(e[6] for e in pool.events if e[0] == "done" and e[3] != 1)
    assert kills[0][0] < last_done, "the stuck actor was killed only once all other work was done"


# ----------------------------------------------------------------------------- poison and retries

@pytest.mark.parametrize("concurrency", [1, 2])
def test_poison_image_becomes_exactly_one_model_error_row(tmp_path, concurrency):
    """Image s2-2 kills every actor that touches it.  Shard 2 is retried, bisected and written
    by the driver from its pieces; s2-2 is the only error row, nothing else is charged."""
    sched, pool, stats = run(tmp_path, shards=6, images=4, size=2, concurrency=concurrency,
                             poison=frozenset({"s2-2"}))
    assert outcomes(tmp_path) == expected(6, 4, {"s2-2": ("model", "WorkerCrashed")})
    assert pool.writes == {i: 1 for i in range(6) if i != 2}
    # 3 whole (max_retries=2), then [2:4] once, then s2-2 alone twice; [0:2] and [3:4] succeed.
    assert sched.charges == {2: 6}
    assert stats["unattributed_failures"] == (0 if concurrency == 1 else 1)  # shard 2 beside shard 3
    assert stats["actor_failures"] == 6 + stats["unattributed_failures"]
    assert (stats["retries"], stats["bisected_shards"], stats["shards_done"]) == (2, 1, 6)
    assert sorted(pool.runs(2)[-5:]) == sorted([ids(2, 4, 0, 2), ids(2, 4, 2, 4), ids(2, 4, 2, 3),
                                                ids(2, 4, 2, 3), ids(2, 4, 3, 4)])
    for piece in (ids(2, 4), ids(2, 4, 2, 3)):
        assert pool.ran_alone(piece, after=pool.first_death())
    meta = json.loads(pq.read_schema(tmp_path / "embeddings" / "part-00002.parquet").metadata[b"vgg_pipeline"])
    assert (meta["shard"], meta["shard_digest"], meta["job"], meta["model"]) == (
        2, make_shards(3, 4)[2].digest, JOB, {"arch": "fake"})
    errors = pq.read_table(tmp_path / "errors" / "part-00002.parquet").to_pylist()
    assert [(e["id"], e["uri"]) for e in errors] == [("s2-2", "file:///in/s2-2.jpg")]
    assert "died on this image 2 times" in errors[0]["message"]


def test_retries_exhausted_turn_a_failing_shard_into_error_rows(tmp_path):
    """``process`` raises on shard 1 every time (its actor survives): the shard is tried
    1 + max_retries times whole, then each image twice alone; both become WorkerError rows."""
    sched, pool, stats = run(tmp_path, shards=3, size=1, concurrency=2, raises=frozenset({"s1-0", "s1-1"}))
    assert outcomes(tmp_path) == expected(3, 2, {"s1-0": ("model", "WorkerError"),
                                                 "s1-1": ("model", "WorkerError")})
    assert pool.runs(1) == [ids(1, 2)] * 3 + [ids(1, 2, 0, 1), ids(1, 2, 1, 2)] * 2
    assert sched.charges == {1: 7}
    assert (stats["retries"], stats["bisected_shards"], stats["actor_failures"]) == (2, 1, 0)
    errors = pq.read_table(tmp_path / "errors" / "part-00001.parquet").to_pylist()
    assert all("failed on this image 2 times (RuntimeError: cannot embed" in e["message"] for e in errors)


def test_storage_that_stays_down_ends_the_run_without_error_rows(tmp_path):
    """``process`` fails with StorageUnavailable on shard 1 every time: the whole shard is retried,
    never bisected into error rows; then the run ends (JobFailed: exit 1) and a rerun resumes."""
    with pytest.raises(JobFailed, match="storage unavailable for shard 1 after 3 attempts"):
        run(tmp_path, shards=3, size=1, concurrency=1, storage_down=frozenset({"s1-0"}))
    assert not (tmp_path / "errors").exists() or not any((tmp_path / "errors").iterdir())
    assert not (tmp_path / "embeddings" / "part-00001.parquet").exists()
    done = done_shards(str(tmp_path))
    assert 1 not in done
    sched, pool, stats = run(tmp_path, shards=3, done=tuple(done))  # the storage is back: resume
    assert outcomes(tmp_path) == expected(3, 2)
    assert pool.runs(1) == [ids(1, 2)] and stats["shards_done"] == 3 - len(done)


# ----------------------------------------------------------------------------- starting workers

def test_worker_that_fails_to_start_is_replaced(tmp_path):
    sched, pool, stats = run(tmp_path, shards=4, size=2, start_errors=["RuntimeError: CUDA error: out of memory"])
    assert outcomes(tmp_path) == expected(4, 2)
    assert len(pool.actors) == 3 and stats["actor_failures"] == 0
    assert {e[1] for e in pool.events if e[0] == "submit"} == {1, 2}   # never the one that failed


def test_worker_that_cannot_load_its_weights_is_a_usage_error(tmp_path):
    error = "pipeline.errors.WeightsError: the weights are for vgg11, the model is vgg13"
    with pytest.raises(UsageError) as info:
        run(tmp_path, shards=4, size=2, start_errors=[error])
    assert str(info.value) == "the weights are for vgg11, the model is vgg13"
    assert not (tmp_path / "embeddings").exists()


def test_workers_that_keep_failing_to_start_end_the_job(tmp_path):
    cfg = load_config(overrides=["runtime.max_retries=2"])
    clock = FakeClock()
    pool = FakePool(tmp_path, clock, cfg, size=2, start_errors=["RuntimeError: no GPU"] * 100)
    with pytest.raises(JobFailed, match="workers keep failing to start: RuntimeError: no GPU"):
        Scheduler(pool, cfg, str(tmp_path), None, JOB, clock=clock).run(iter(make_shards(4, 2)), set(), None)
    # 2 starts, then a budget of size * (max_retries + 1) = 6 replacements: the 7th failure ends it.
    assert len(pool.actors) == 8 and pool.events == []


def test_a_cluster_that_never_hosts_a_worker_fails_after_the_start_timeout(tmp_path, caplog):
    cfg = load_config(overrides=["runtime.shard_timeout_s=60"])
    clock = FakeClock()
    pool = FakePool(tmp_path, clock, cfg, never_ready=True)
    with caplog.at_level(logging.WARNING), pytest.raises(JobFailed, match="no worker could be started"):
        Scheduler(pool, cfg, str(tmp_path), None, JOB, clock=clock).run(iter(make_shards(2, 2)), set(), None)
    assert ACTOR_START_TIMEOUT_S < clock() <= ACTOR_START_TIMEOUT_S + WAIT_S
    assert [a.alive for a in pool.actors] == [False, False]   # the pending ones are cancelled
    waiting = [r.getMessage() for r in caplog.records if "waiting for the cluster" in r.getMessage()]
    assert len(waiting) == 1 and "each worker needs" in waiting[0]


# ----------------------------------------------------------------------------- resume and memory

def test_finished_shards_are_skipped(tmp_path):
    sched, pool, stats = run(tmp_path, shards=4, size=2, done=(0, 2))
    assert {e[3] for e in pool.events if e[0] == "submit"} == {1, 3}
    assert outcomes(tmp_path) == expected(4, 2, skip=(0, 2))
    assert (stats["shards_resumed"], stats["shards_done"], stats["images_this_run"]) == (2, 2, 4)


def test_a_finished_job_starts_no_worker(tmp_path):
    sched, pool, stats = run(tmp_path, shards=3, size=2, done=(0, 1, 2))
    assert pool.actors == [] and pool.events == []
    assert (stats["shards_resumed"], stats["shards_done"]) == (3, 0)


@pytest.mark.parametrize("window, bound", [(None, 4), (3, 3), (1, 1)])
def test_shards_in_flight_are_bounded(tmp_path, window, bound):
    sets = (f"runtime.max_shards_in_flight={window}",) if window else ()
    sched, pool, stats = run(tmp_path, shards=10, size=2, concurrency=2, sets=sets)
    assert outcomes(tmp_path) == expected(10, 2)
    assert pool.max_in_flight == bound and pool.max_per_actor <= 2
