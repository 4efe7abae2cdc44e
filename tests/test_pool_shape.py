"""Actor pool sizing from the cluster's resources (docs/design.md §6): one per GPU, else one per node."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.run.ray_pool import pool_shape
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
