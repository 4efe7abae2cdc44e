"""pipeline.decode.balance: shares of a batch from measured engine rates (fed rates, no clock, no torch)."""

from __future__ import annotations

import random

import pytest

from pipeline.decode.balance import Balancer, predicted_makespan


def _run(balancer: Balancer, true_rates: dict[str, float], n: int, batches: int) -> dict[str, int]:
    """``batches`` batches of ``n``: each engine "decodes" its share at its true rate; the last split."""
    counts: dict[str, int] = {}
    for _ in range(batches):
        counts = balancer.split(n)
        assert sum(counts.values()) == n and set(counts) == set(balancer.engines)
        for e, k in counts.items():
            if k:
                balancer.record(e, k, k / true_rates[e])
    return counts


def test_shares_converge_to_the_rate_ratio():
    b = Balancer(["hw", "cuda", "cpu"])
    counts = _run(b, {"hw": 2000.0, "cuda": 1000.0, "cpu": 500.0}, 280, 40)
    assert counts == {"hw": 160, "cuda": 80, "cpu": 40}
    assert b.rates() == pytest.approx({"hw": 2000.0, "cuda": 1000.0, "cpu": 500.0})


def test_the_first_batch_is_split_evenly_to_measure_every_engine():
    assert Balancer(["hw", "cuda", "cpu"]).split(10) == {"hw": 4, "cuda": 3, "cpu": 3}


def test_a_new_engine_is_measured_then_gets_its_share():
    b = Balancer(["cuda", "cpu"])
    for _ in range(5):  # cuda alone so far: cpu is new (never measured)
        b.record("cuda", 256, 256 / 1000.0)
    first = b.split(256)
    assert 1 <= first["cpu"] <= 0.1 * 256 and first["cuda"] == 256 - first["cpu"]  # a probe, no more
    b.record("cuda", first["cuda"], first["cuda"] / 1000.0)
    b.record("cpu", first["cpu"], first["cpu"] / 1000.0)
    assert b.rates()["cpu"] == pytest.approx(1000.0)  # measured from its probe
    counts = _run(b, {"cuda": 1000.0, "cpu": 1000.0}, 256, 30)
    assert abs(counts["cpu"] - 128) <= 2


def test_an_engine_that_becomes_slow_loses_its_share():
    b = Balancer(["hw", "cuda"])
    before = _run(b, {"hw": 1000.0, "cuda": 1000.0}, 200, 20)
    assert before == {"hw": 100, "cuda": 100}
    after = _run(b, {"hw": 100.0, "cuda": 1000.0}, 200, 30)
    assert after["hw"] <= 20 and after["cuda"] >= 180


def test_a_tiny_share_is_dropped_and_probed_now_and_then():
    b = Balancer(["cuda", "cpu"], probe_every=10)
    true = {"cuda": 1000.0, "cpu": 10.0}  # cpu's share would be ~1 %: not worth a call
    _run(b, true, 256, 10)
    used = []
    for _ in range(30):
        counts = _run(b, true, 256, 1)
        used.append(counts["cpu"])
    assert used.count(0) >= 25                    # dropped from most batches
    assert 0 < max(used) <= 2                     # but probed, with what fits in cuda's time
    # The slow engine got fast: a probe sees it and it wins its share back.
    true["cpu"] = 1000.0
    counts = _run(b, true, 256, 60)
    assert abs(counts["cpu"] - 128) <= 3


def test_one_engine_gets_everything():
    b = Balancer(["cuda"])
    assert b.split(64) == {"cuda": 64}
    b.record("cuda", 64, 0.05)
    assert b.split(100) == {"cuda": 100} and b.split(0) == {"cuda": 0}


def test_never_predicted_slower_than_the_best_engine_alone():
    rng = random.Random(13)
    for trial in range(200):
        names = ["hw", "cuda", "cpu"][:rng.randint(1, 3)]
        b = Balancer(names, probe_every=rng.randint(1, 5))
        rates = {e: rng.choice([1.0, 10.0, 100.0, 1000.0]) * rng.uniform(0.5, 2.0) for e in names}
        for e in names:
            b.record(e, 10, 10 / rates[e])
        for _ in range(10):  # several splits: probe batches included
            n = rng.randint(1, 600)
            counts = b.split(n)
            assert sum(counts.values()) == n
            best_alone = n / max(rates.values())
            assert predicted_makespan(counts, rates) <= best_alone * (1 + 1e-9), (trial, rates, counts)


def test_a_failed_engine_is_removed_but_never_the_last():
    b = Balancer(["hw", "cuda"])
    b.remove("hw")
    assert b.split(10) == {"cuda": 10}
    b.remove("cuda")
    assert b.engines == ["cuda"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        Balancer([])
    with pytest.raises(ValueError):
        Balancer(["cuda", "cuda"])
    b = Balancer(["cuda"])
    b.record("cuda", 5, 0.0)   # no time measured: nothing learnt
    b.record("cuda", -1, 1.0)
    assert b.rates() == {"cuda": None}


def test_an_engine_that_rejects_its_share_loses_it():
    b = Balancer(["hw", "cuda"])
    counts = b.split(100)
    b.record("hw", 0, 0.01)                      # handed everything back
    b.record("cuda", counts["cuda"], counts["cuda"] / 1000.0)
    assert b.rates()["hw"] > 0
    assert _run(b, {"hw": 1000.0, "cuda": 1000.0}, 100, 1)["hw"] == 0   # dropped
