"""The scheduler's :class:`~pipeline.run.scheduler.Pool` on Ray: ``ShardWorker`` actors (docs/design.md §6)."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from ..config import Config
from ..errors import UsageError
from ..input.storage import StorageUnavailable
from ..input.plan import Shard
from .scheduler import Outcome, root_message

log = logging.getLogger(__name__)

# glibc otherwise hands VGG's ~100 MB activation buffers back to the kernel after every batch and
# faults them in again: keeping them costs ~10 % RSS and gives +25 % CPU img/s (docs/benchmarks.md).
CPU_ACTOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


def node_share(cpus: float, gpus: int) -> float:
    """The CPUs each of a GPU node's ``gpus`` actors may reserve so that all of them fit and split
    the node evenly: whole CPUs, one core left to the raylet, object store and (on the head) the
    driver where the node has at least two per GPU; a fraction each on a node with fewer CPUs than
    GPUs."""
    spare = cpus - 1 if cpus >= 2 * gpus else cpus
    share = float(spare // gpus)
    return share if share >= 1 else cpus / gpus


def gpu_actor_cpus(nodes: Sequence[dict]) -> float:
    """CPUs per GPU actor: the smallest :func:`node_share` over the alive GPU nodes, so that on every
    node, whatever its CPUs per GPU, one actor per GPU fits; CPU-only nodes (a big head) do not
    count.  No GPU node yet (an autoscaling cluster): 1, which fits any GPU node type
    (``runtime.cpus_per_actor`` asks for more)."""
    shares = [node_share(n["Resources"].get("CPU", 0), int(n["Resources"]["GPU"])) for n in nodes
              if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1]
    return min(shares, default=1.0)


def pool_shape(cfg: Config, ray) -> tuple[int, dict]:
    """Number of actors and their Ray options: one per GPU (with :func:`gpu_actor_cpus` CPUs each),
    else one per node (docs/design.md §6)."""
    rt = cfg.runtime
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if rt.device == "cuda" and not gpus and not rt.num_actors:
        # An autoscaling cluster starts with no GPU node: pending GPU actors are what scales it up.
        raise UsageError("runtime.device=cuda but the cluster has no GPU yet; set runtime.num_actors "
                         "(how many GPU workers to request) so the autoscaler can add them")
    if rt.device == "cuda" or (gpus and rt.device != "cpu"):
        n = rt.num_actors or gpus
        cpus = rt.cpus_per_actor or gpu_actor_cpus(ray.nodes())
        if not gpus and not rt.cpus_per_actor:
            log.warning("no GPU node is up yet: each GPU actor reserves 1 CPU, so it decodes in one "
                        "process; set runtime.cpus_per_actor to what a GPU node gives per GPU "
                        "(conf/gpu.yaml: 8)")
        return n, {"num_gpus": 1, "num_cpus": cpus}
    node_cpus = sorted(n["Resources"]["CPU"] for n in nodes) or [resources.get("CPU", 1)]
    n = rt.num_actors or max(1, len(node_cpus))
    cpus = rt.cpus_per_actor or max(1.0, min(node_cpus[0], resources.get("CPU", 1) / n))
    return n, {"num_gpus": 0, "num_cpus": float(int(cpus)) if cpus >= 1 else cpus}


def is_actor_death(exc: BaseException) -> bool:
    """The actor (or its node) is gone, as opposed to an exception raised by ``process``."""
    from ray import exceptions as rex
    # RayActorError covers ActorDiedError (process or node died) and ActorUnavailableError.
    return isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError,
                            rex.NodeDiedError, rex.OutOfMemoryError, rex.ActorUnschedulableError))


class RayPool:
    """``ShardWorker`` actors spread over the cluster, never restarted by Ray (the scheduler
    replaces them), each running ``ShardWorker.MAX_CONCURRENCY`` shards at once."""

    def __init__(self, ray, cfg: Config, output: str, storage_options: Optional[dict], job: dict) -> None:
        from .worker import ShardWorker
        self.ray = ray
        self.size, self.actor_opts = pool_shape(cfg, ray)
        self.concurrency = ShardWorker.MAX_CONCURRENCY
        opts = dict(self.actor_opts)
        if not opts["num_gpus"]:
            opts["runtime_env"] = {"env_vars": CPU_ACTOR_ENV}
        self._cls = ray.remote(ShardWorker).options(max_restarts=0, max_task_retries=0,
                                                    max_concurrency=self.concurrency,
                                                    scheduling_strategy="SPREAD", **opts)
        threads = int(self.actor_opts["num_cpus"]) if not self.actor_opts["num_gpus"] else None
        self._args = (cfg, output, storage_options, threads, job)
        # Each actor numbers its process() calls 0, 1, 2, ... so it serves shards to its model in
        # submission order, whatever order Ray's threads pick them up in (worker.ShardSequencer).
        self._calls: dict[int, int] = {}

    def start(self) -> tuple[Any, Any]:
        actor = self._cls.remote(*self._args)
        return actor, actor.ready.remote()

    def submit(self, actor: Any, shard: Shard, write: bool) -> Any:
        seq = self._calls.get(id(actor), 0)
        self._calls[id(actor)] = seq + 1
        return actor.process.remote(shard, write, seq)

    def wait(self, handles: Sequence[Any], timeout: float) -> list[tuple[Any, Outcome]]:
        refs = list(handles)
        if not refs:
            return []
        if timeout > 0:
            first, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
            if not first:
                return []
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        return [(ref, self._outcome(ref)) for ref in ready]

    def _outcome(self, ref: Any) -> Outcome:
        try:
            return Outcome(value=self.ray.get(ref))
        except Exception as exc:  # noqa: BLE001 - every failure is reported, classified
            cause = getattr(exc, "cause", None)  # a RayTaskError carries the exception process() raised
            if isinstance(cause, StorageUnavailable):
                return Outcome(error=str(cause).splitlines()[0][:300], storage=True)
            return Outcome(error=root_message(exc), died=is_actor_death(exc))

    def kill(self, actor: Any) -> None:
        self._calls.pop(id(actor), None)
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - the actor may already be gone with its node
            log.debug("kill: %s", exc)

    def describe(self) -> str:
        return f"each worker needs {self.actor_opts}; the cluster has {self.ray.available_resources()} free"
