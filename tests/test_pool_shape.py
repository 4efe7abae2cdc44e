"""Actor pool sizing from the cluster's resources (docs/design.md §6): one per GPU, else one per node;
on multi-GPU nodes the GPU actors split each node's CPUs evenly (a fake-GPU Ray cluster checks it)."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.run.ray_pool import gpu_actor_cpus, node_share, pool_shape
from pipeline.run.worker import MAX_DECODE_PROCESSES, assigned_cpus, decode_processes
from pipeline.errors import UsageError


class ClusterView:
    """What ``pool_shape`` reads from Ray: total resources and the alive nodes."""

    def __init__(self, nodes: list[dict]) -> None:
        self._nodes = [{"Alive": True, "Resources": r} for r in nodes]

    def cluster_resources(self) -> dict:
        total: dict = {}
        for n in self._nodes:
            for k, v in n["Resources"].items():
                total[k] = total.get(k, 0) + v
        return total

    def nodes(self) -> list[dict]:
        return self._nodes


def test_one_actor_per_gpu_with_cpus_to_feed_it():
    ray = ClusterView([{"CPU": 8}, {"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 2}])
    n, opts = pool_shape(load_config(), ray)
    assert n == 4 and opts["num_gpus"] == 1 and 1 <= opts["num_cpus"] <= 8


def test_cpu_cluster_gets_one_actor_per_node_using_its_cores():
    ray = ClusterView([{"CPU": 2}, {"CPU": 2}])
    n, opts = pool_shape(load_config(), ray)
    assert (n, opts) == (2, {"num_gpus": 0, "num_cpus": 2.0})
    n, opts = pool_shape(load_config(overrides=["runtime.device=cpu"]),
                          ClusterView([{"CPU": 4, "GPU": 1}]))
    assert opts["num_gpus"] == 0 and opts["num_cpus"] == 4.0


def test_cuda_on_a_cluster_that_has_not_scaled_up_yet():
    ray = ClusterView([{"CPU": 0}])
    with pytest.raises(UsageError, match="runtime.num_actors"):
        pool_shape(load_config(overrides=["runtime.device=cuda"]), ray)
    n, opts = pool_shape(load_config(overrides=["runtime.device=cuda", "runtime.num_actors=8",
                                                 "runtime.cpus_per_actor=7"]), ray)
    assert (n, opts["num_gpus"], opts["num_cpus"]) == (8, 1, 7.0)



def test_gpu_actors_requested_before_any_gpu_node_reserve_one_cpu_and_say_so(caplog):
    ray = ClusterView([{"CPU": 8}])
    n, opts = pool_shape(load_config(overrides=["runtime.device=cuda", "runtime.num_actors=4"]), ray)
    assert (n, opts["num_gpus"], opts["num_cpus"]) == (4, 1, 1.0)   # fits any GPU node type
    assert "set runtime.cpus_per_actor" in caplog.text


def test_gpu_actors_get_the_share_every_gpu_node_can_give():
    # A big CPU-only head must not inflate the share (it used to: min(8, 88 / 6 - 0.5) = 8, and the
    # 8-CPU node could host one of its two actors); each node keeps a core, and the 2-GPU node with
    # 8 CPUs (3 each) bounds the 4-GPU node with 16 (also 3).
    ray = ClusterView([{"CPU": 64}, {"CPU": 8, "GPU": 2}, {"CPU": 16, "GPU": 4}])
    n, opts = pool_shape(load_config(), ray)
    assert (n, opts) == (6, {"num_gpus": 1, "num_cpus": 3.0})
    # p5.48xlarge: 192 vCPUs for 8 GPUs, no cap at 8 CPUs per GPU any more.
    assert pool_shape(load_config(), ClusterView([{"CPU": 192, "GPU": 8}]))[1]["num_cpus"] == 23.0


def test_gpu_share_on_nodes_with_few_cpus():
    assert node_share(2, 2) == 1.0          # no core to spare: one each
    assert node_share(3, 2) == 1.0
    assert node_share(1, 2) == 0.5          # fewer CPUs than GPUs: a fraction each, both fit
    assert node_share(4, 1) == 3.0
    # No GPU node yet (autoscaling, runtime.num_actors set): 1 CPU fits any GPU node type.
    assert gpu_actor_cpus([{"Alive": True, "Resources": {"CPU": 8}}]) == 1.0


def test_decode_processes_follow_the_actors_cpus():
    assert decode_processes(None, 3.0) == 3
    assert decode_processes(None, 0.5) == 1
    assert decode_processes(None, 100.0) == MAX_DECODE_PROCESSES
    assert decode_processes(6, 3.0) == 6                # runtime.decode_threads wins
    assert assigned_cpus() is None                      # not a Ray worker


# Run in its own process: a test session shares one local Ray (tests/conftest.py), and a process
# can only be connected to one cluster.
_GPU_CLUSTER_SCRIPT = r"""
import json, ray
from ray.cluster_utils import Cluster
from pipeline.config import load_config
from pipeline.run.ray_pool import pool_shape

class Probe:
    # Where an actor started with pool_shape's options landed, and what the worker derives.
    def where(self):
        from pipeline.run.worker import assigned_cpus, decode_processes
        cpus = assigned_cpus()
        return {"node": ray.get_runtime_context().get_node_id(), "cpus": cpus,
                "processes": decode_processes(None, cpus), "gpus": len(ray.get_gpu_ids())}

# A CPU-only head with many logical CPUs, a 2-GPU node with 8 CPUs and a 4-GPU node with 16
# (logical CPUs and fake GPUs: the box has 2 cores, the probes are idle).
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 32, "include_dashboard": False})
try:
    two = cluster.add_node(num_cpus=8, num_gpus=2)
    four = cluster.add_node(num_cpus=16, num_gpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    n, opts = pool_shape(load_config(), ray)
    cls = ray.remote(Probe).options(scheduling_strategy="SPREAD", max_restarts=0, **opts)
    actors = [cls.remote() for _ in range(n)]
    ready, pending = ray.wait([a.where.remote() for a in actors], num_returns=n, timeout=120)
    print(json.dumps({"n": n, "opts": opts, "pending": len(pending), "placed": ray.get(ready),
                      "gpu_nodes": {two.node_id: [8, 2], four.node_id: [16, 4]}}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_gpu_actors_all_fit_and_split_each_node_evenly():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", _GPU_CLUSTER_SCRIPT], capture_output=True, text=True,
                         timeout=300, cwd=root, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    n, opts, gpu_nodes = got["n"], got["opts"], got["gpu_nodes"]
    assert n == 6 and opts["num_gpus"] == 1
    assert got["pending"] == 0   # every actor is scheduled: none waits for CPUs on its GPU node
    by_node: dict = {}
    for p in got["placed"]:
        by_node.setdefault(p["node"], []).append(p)
    assert set(by_node) == set(gpu_nodes)   # GPU actors only on GPU nodes, not on the head
    for node, probes in by_node.items():
        cpus, gpus = gpu_nodes[node]
        assert len(probes) == gpus and all(p["gpus"] == 1 for p in probes)
        assert sum(p["cpus"] for p in probes) <= cpus
        assert {p["cpus"] for p in probes} == {opts["num_cpus"]}     # equal shares
        assert {p["processes"] for p in probes} == {int(opts["num_cpus"])}
