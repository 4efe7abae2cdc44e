"""The driver under failure (docs/design.md §6): no image is lost or doubled whatever dies.

* an actor's process is SIGKILLed mid-job (in-process job on the session's local Ray);
* a worker node of a two-node ``ray.cluster_utils.Cluster`` dies mid-job;
* a poison image kills every worker that reaches it (``VGG_PIPELINE_FAULT_CRASH_ID``);
* a stuck image wedges its worker until ``runtime.shard_timeout_s`` (``VGG_PIPELINE_FAULT_HANG_ID``);
* an actor that cannot load its weights is a one-line usage error, not a hang;
* ``jobs/extract.py`` (the ``ray job submit`` entrypoint) joins the cluster in ``RAY_ADDRESS``.

Every run ends with ``verify(output).ok`` and exact per-id counts.  The fault hooks are read by the
actors from their environment, so those jobs run the real CLI in a subprocess (its private local
Ray inherits the variable); the multi-node job also runs in a subprocess, so that its cluster can
never clash with the session's ``ray_local``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.errors import UsageError
from pipeline.run.worker import CRASH_ENV, HANG_ENV, ShardWorker
from tests.helpers import (SMALL, GatedServer, assert_exactly_once, cli_env, manifest, parts_written, run_cli,
                           shard_workers, small_flags, summary, write_images)

N_IMAGES = 16


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("fault-images")
    return root, write_images(root, N_IMAGES)


# ----------------------------------------------------------------------------- actor death

@pytest.mark.parametrize("concurrency", [1, 2])
def test_killed_actor_loses_no_image(ray_local, images, tmp_path, monkeypatch, concurrency):
    """SIGKILL the actor once it has written a shard: its shards are redone elsewhere, once; also
    with two ``process`` calls running at once in the actor (the driver then keeps two in flight).

    The images come from a local web server that holds the second shard's first image until the
    kill, so the job cannot finish before the actor is killed, however fast the machine is."""
    monkeypatch.setattr(ShardWorker, "MAX_CONCURRENCY", concurrency)  # read by the driver's pool
    src, names = images
    out = tmp_path / "out"
    stale = {p.pid for p in shard_workers(os.getpid())}  # from earlier tests, possibly still exiting
    killed: list[int] = []
    stop = threading.Event()
    with GatedServer(src, gated={names[2]}) as server:
        ids = [f"{server.url}/{n}" for n in names]
        listing = manifest(tmp_path / "images.txt", ids)

        def killer() -> None:
            while not stop.is_set():
                fresh = [p for p in shard_workers(os.getpid(), busy=True) if p.pid not in stale]
                if fresh and parts_written(out) >= 1:  # shard 0 written, shard 1 held by the server
                    os.kill(fresh[0].pid, signal.SIGKILL)
                    killed.append(fresh[0].pid)
                    break
                time.sleep(0.02)
            server.release()

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            result = pipeline.extract(str(listing), str(out), weights="random:0", runtime__num_actors=1, **SMALL)
        finally:
            stop.set()
            thread.join()
    assert killed, "the actor was never seen: nothing was killed"
    run = result["run"]
    # A lone shard in flight is charged a retry; two running at once are both re-run alone, uncharged.
    assert run["actor_failures"] >= 1 and run["retries"] + run["unattributed_failures"] >= 1, run
    assert run["shards_done"] == len(ids) // 2
    embedded, errors = assert_exactly_once(out, ids)
    assert sorted(embedded) == sorted(ids) and errors == []


def test_actor_that_cannot_load_its_weights_is_a_usage_error(ray_local, images, vgg11_weights, tmp_path):
    """The weights fail inside the actor (wrong arch): one line, raised, nothing written, no hang."""
    src, _ = images
    with pytest.raises(UsageError) as info:
        pipeline.extract(str(src), str(tmp_path / "out"), weights=str(vgg11_weights), model={"arch": "vgg13"},
                         runtime={"num_actors": 1}, input__shard_size=2)
    message = str(info.value)
    assert "\n" not in message and "vgg13" in message and "vgg11" in message, message
    assert "Traceback" not in message and "ActorDiedError" not in message, message
    assert parts_written(tmp_path / "out") == 0


# ----------------------------------------------------------------------------- poison and stuck images

@pytest.mark.slow
def test_poison_and_stuck_images_become_one_error_row_each(images, tmp_path):
    """Every worker that reaches one image dies; every worker that reaches another one hangs.
    After retries and bisection (killing stuck workers after runtime.shard_timeout_s), exactly those
    two images are error rows, their shard-mates are embedded and the job exits 0.  Both faults
    run in one job, on two actors, to pay for one Ray start."""
    src, ids = images
    out = tmp_path / "out"
    # Second images of shards 2 and 0: the first shards the two actors get, so both chains of
    # failures run side by side from the start.
    poison, stuck = ids[5], ids[1]
    flags = small_flags("runtime.max_retries=1", "runtime.num_actors=2", "runtime.shard_timeout_s=4")
    proc = run_cli([str(src), str(out), *flags], **{CRASH_ENV: poison, HANG_ENV: stuck})
    assert proc.returncode == 0, proc.stderr[-3000:]
    embedded, errors = assert_exactly_once(out, ids, errors=2)
    assert sorted((e["id"], e["stage"], e["error_type"]) for e in errors) == sorted([
        (poison, "model", "WorkerCrashed"), (stuck, "model", "Timeout")])
    assert ids[4] in embedded and ids[0] in embedded  # shard-mates are kept, not thrown away
    run = summary(out)["run"]
    # Each bad shard: whole shard twice (max_retries=1), then its bad half twice (one more chance
    # after bisection).  On a very busy machine an innocent shard may also time out: that only
    # costs it a retry, so the timeout counts are lower bounds.  With several shards running in
    # an actor, a death that cannot be pinned on one of them charges none ("unattributed"): they
    # re-run alone, which costs at most one more death each.
    assert run["timeouts"] >= 4, run
    assert 4 <= run["actor_failures"] - run["timeouts"] <= 4 + run["unattributed_failures"], run
    assert run["bisected_shards"] >= 2 and run["retries"] >= 2, run
    for shard in (0, 2):  # a shard assembled by the driver from pieces is a complete part file
        schema = pq.read_schema(out / "embeddings" / f"part-{shard:05d}.parquet")
        meta = json.loads(schema.metadata[b"vgg_pipeline"])
        assert meta["shard"] == shard and meta["model"]["arch"] == "vgg11" and meta["job"], meta


# ----------------------------------------------------------------------------- node loss

NODE_LOSS_SCRIPT = r'''
import json, os, sys, threading, time, urllib.request
import psutil
import ray
from ray.cluster_utils import Cluster

src, out, release_url = sys.argv[1], sys.argv[2], sys.argv[3]
# Fast failure detection: a dead raylet is declared dead after ~2 s instead of ~30 s.
system = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                        "_system_config": system})
worker = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
info = {}
try:
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    import pipeline

    raylet = worker.all_processes["raylet"][0].process.pid

    def busy_on_worker_node():
        for proc in psutil.Process(raylet).children(recursive=True):
            try:
                if "ray::ShardWorker.process" in " ".join(proc.cmdline()):
                    return True
            except psutil.Error:
                pass
        return False

    def remove_worker_node():
        emb = os.path.join(out, "embeddings")
        try:
            while True:  # the job cannot end before the images are released below
                written = os.path.isdir(emb) and any(n.startswith("part-") for n in os.listdir(emb))
                if written and busy_on_worker_node():  # the node's actor holds shards right now
                    # Like a machine that vanishes: its processes go at once.  Killing only the raylet
                    # leaves the actor alive for a moment, answering the driver directly (actor calls
                    # do not pass through the raylet), so it could still finish what it held.
                    for proc in psutil.Process(raylet).children(recursive=True):
                        try:
                            proc.kill()
                        except psutil.Error:
                            pass
                    cluster.remove_node(worker, allow_graceful=False)
                    info["removed"] = True
                    return
                time.sleep(0.02)
        finally:
            urllib.request.urlopen(release_url).close()

    info["nodes_before"] = sum(n["Alive"] for n in ray.nodes())
    threading.Thread(target=remove_worker_node, daemon=True).start()
    result = pipeline.extract(src, out, weights="random:0", model={"arch": "vgg11"}, input__shard_size=2,
                              runtime={"batch_size": 2})
    # The job may end before the head's health checks declare the removed node dead: wait for
    # that (the test's own timeout bounds it) rather than read a count that is still catching up.
    while sum(n["Alive"] for n in ray.nodes()) > 1:
        time.sleep(0.2)
    info["nodes_after"] = sum(n["Alive"] for n in ray.nodes())
    info["run"] = result["run"]
finally:
    ray.shutdown()
    cluster.shutdown()
print("RESULT " + json.dumps(info))
'''


@pytest.mark.slow
def test_lost_worker_node_loses_no_image(images, tmp_path):
    """Two nodes, one actor each; the worker node dies mid-job.  Its replacement actor cannot be
    placed anywhere (the head's only CPU is taken), so the job must finish on the head's actor and
    not wait for the pending one.  The images come from a local web server that holds the first
    image of every shard but the first until the node is gone: both actors are then stuck in a
    shard, so the job cannot finish before the node is removed with shards on it."""
    src, names = images
    out = tmp_path / "out"
    script = tmp_path / "node_loss.py"
    script.write_text(NODE_LOSS_SCRIPT)
    with GatedServer(src, gated=set(names[2::2])) as server:
        ids = [f"{server.url}/{n}" for n in names]
        listing = manifest(tmp_path / "images.txt", ids)
        proc = subprocess.run([sys.executable, str(script), str(listing), str(out), f"{server.url}/_release"],
                              env=cli_env(), capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).parents[1])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    info = json.loads(lines[-1][len("RESULT "):])
    assert info.get("removed") and info["nodes_before"] == 2 and info["nodes_after"] == 1, info
    run = info["run"]
    assert run["actor_failures"] >= 1 and run["retries"] + run["unattributed_failures"] >= 1, run
    embedded, errors = assert_exactly_once(out, ids)
    assert sorted(embedded) == sorted(ids) and errors == []


# ----------------------------------------------------------------------------- ray job entrypoint

def test_jobs_entrypoint_joins_the_cluster_in_ray_address(ray_local, tmp_path):
    """``jobs/extract.py`` (what ``ray job submit`` runs) is ``vgg-pipeline extract``, and with
    RAY_ADDRESS set, as Ray Jobs sets it, its actors run on that cluster: here the session's.
    The second shard's first image is held by a local web server until the actor has been seen,
    so the job cannot finish unseen."""
    src = tmp_path / "src"
    names = write_images(src, 4)
    out = tmp_path / "out"
    entry = Path(__file__).parents[1] / "jobs" / "extract.py"
    env = cli_env(RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    seen: set[int] = set()
    with GatedServer(src, gated={names[2]}) as server:
        ids = [f"{server.url}/{n}" for n in names]
        listing = manifest(tmp_path / "images.txt", ids)
        proc = subprocess.Popen([sys.executable, str(entry), str(listing), str(out), *small_flags()], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        while proc.poll() is None:  # the actor is a process of *this* test's Ray, not of a private one
            try:
                private = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                break
            seen.update(p.pid for p in shard_workers(os.getpid()) if p.pid not in private)
            if seen:
                server.release()
            time.sleep(0.05)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert seen, "no actor ran on the cluster named by RAY_ADDRESS"
    assert stdout.startswith(f"done: {len(ids)} images")
    assert_exactly_once(out, ids)

    bad = subprocess.run([sys.executable, str(entry), str(tmp_path / "missing"), str(out)], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("vgg-pipeline: error: input")
