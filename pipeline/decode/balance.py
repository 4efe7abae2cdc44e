"""How a batch's GPU-able JPEGs are shared among the decode engines that run it concurrently.

Pure logic (no torch, no clock of its own): :class:`Balancer` is told, after every batch, how many
images each engine decoded and how long it was busy, and keeps an exponentially weighted moving
average of each engine's rate (images per busy second).  :meth:`Balancer.split` then gives each
engine the share of the next batch that makes them all finish together: with unit-cost images and
rates ``r_e``, handing out images one at a time to the engine that would finish it first minimises
the batch's predicted makespan, so the split is never predicted slower than the fastest engine
alone (the property that makes adding an engine safe, docs/design.md §4).

Exploration, so rates stay measured while the job runs:

* an engine never measured gets a probe (``explore`` of the batch, at least one image);
* an engine whose share would be tiny (under ``min_share`` of the batch: not worth its per-call
  overhead) is dropped from that batch, and every ``probe_every`` batches it gets the probe that
  fits within the others' predicted makespan, so an engine that got faster wins its share back;
* an engine that got slower is still in use, so its average falls and its share with it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional, Sequence


MIN_RATE = 1e-6   # img/s: a measured engine's floor, so a rate is never zero (shares divide by it)


@dataclass
class EngineRate:
    """What the balancer knows about one engine."""

    rate: Optional[float] = None   # EWMA images per busy second; None until first measured
    images: int = 0                # decoded so far (all batches)
    busy_s: float = 0.0            # busy seconds so far
    since_used: int = 0            # batches since it last got a share


class Balancer:
    """Splits batches across ``engines`` (names, in preference order) by their measured rates."""

    def __init__(self, engines: Sequence[str], *, alpha: float = 0.3, explore: float = 0.05,
                 min_share: float = 0.02, probe_every: int = 20) -> None:
        if not engines:
            raise ValueError("a balancer needs at least one engine")
        if len(set(engines)) != len(engines):
            raise ValueError(f"engine names repeat: {list(engines)}")
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.engines = list(engines)
        self.alpha, self.explore, self.min_share, self.probe_every = alpha, explore, min_share, probe_every
        self.state = {e: EngineRate() for e in self.engines}

    # -- measurements
    def record(self, engine: str, images: int, busy_s: float) -> None:
        """``engine`` decoded ``images`` in ``busy_s`` seconds of its own (wall) time.

        Count only what it decoded, not what it handed back: an engine that rejects its share
        then measures slow (down to :data:`MIN_RATE`) and loses it.
        """
        if images < 0 or busy_s <= 0:
            return
        st = self.state[engine]
        sample = images / busy_s
        st.rate = max(MIN_RATE, sample if st.rate is None else (1 - self.alpha) * st.rate + self.alpha * sample)
        st.images += images
        st.busy_s += busy_s

    def remove(self, engine: str) -> None:
        """Stop using ``engine`` (it failed); the others share its work from the next batch on."""
        if engine in self.state and len(self.engines) > 1:
            self.engines.remove(engine)
            del self.state[engine]

    def rates(self) -> dict[str, Optional[float]]:
        return {e: self.state[e].rate for e in self.engines}

    # -- the split
    def split(self, n: int) -> dict[str, int]:
        """How many of the next ``n`` images each engine gets (every engine listed, counts sum to ``n``)."""
        counts = {e: 0 for e in self.engines}
        if n <= 0:
            return counts
        measured = [e for e in self.engines if self.state[e].rate]
        unmeasured = [e for e in self.engines if not self.state[e].rate]
        if not measured:  # nothing known yet: an even split measures every engine at once
            for j, e in enumerate(self.engines):
                counts[e] = n // len(self.engines) + (j < n % len(self.engines))
            self._tick(counts)
            return counts
        probe = max(1, math.ceil(self.explore * n))
        rest = n
        for e in unmeasured:
            if rest > probe:   # the measured engines always keep some of the batch
                counts[e] = probe
                rest -= probe
        rates = {e: self.state[e].rate for e in measured}
        share = _greedy(rest, rates)
        tiny = [e for e in measured if share[e] < self.min_share * rest and share[e] < rest]
        if tiny and len(tiny) < len(measured):
            kept = {e: r for e, r in rates.items() if e not in tiny}
            share = _greedy(rest, kept)
            makespan = predicted_makespan(share, kept)
            for e in tiny:  # a dropped engine is probed now and then, within the others' makespan
                if self.state[e].since_used + 1 >= self.probe_every:
                    k = min(rest - 1, math.floor(rates[e] * makespan))
                    if k >= 1:
                        share = _greedy(rest - k, kept)
                        share[e] = k
                        kept[e] = rates[e]
                        makespan = predicted_makespan(share, kept)
        for e, k in share.items():
            counts[e] += k
        self._tick(counts)
        return counts

    def _tick(self, counts: dict[str, int]) -> None:
        for e, k in counts.items():
            st = self.state[e]
            st.since_used = 0 if k else st.since_used + 1


def _greedy(n: int, rates: dict[str, float]) -> dict[str, int]:
    """Unit jobs on machines of speeds ``rates``: each to the one that would finish it first (optimal)."""
    counts = {e: 0 for e in rates}
    if n <= 0 or not rates:
        return counts
    # Start from the fluid optimum rounded down (every engine then finishes by n / sum(rates)),
    # then place the few remaining images one by one.
    total = sum(rates.values())
    for e, r in rates.items():
        counts[e] = math.floor(n * r / total)
    order = list(rates)
    heap = [((counts[e] + 1) / rates[e], order.index(e), e) for e in rates]
    heapq.heapify(heap)
    for _ in range(n - sum(counts.values())):
        _, i, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, ((counts[e] + 1) / rates[e], i, e))
    return counts


def predicted_makespan(counts: dict[str, int], rates: dict[str, float]) -> float:
    """Seconds until the last engine finishes its share, if each decodes at its rate."""
    return max((k / rates[e] for e, k in counts.items() if k), default=0.0)
