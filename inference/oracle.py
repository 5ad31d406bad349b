"""Replay routing traces: hit rates of each eviction policy and of Belady's MIN (the offline optimum).

A trace for one layer is a sequence of steps; each step is the set of distinct experts one forward
pass routed to. An access hits when the expert is resident at the start of the step, the same unit
the engine counts. Both replays start from an empty cache.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from .cache import POLICIES, LayerCache

Step = Sequence[int]


def _counts(hits: int, accesses: int) -> dict[str, float]:
    return {"hits": hits, "accesses": accesses, "hit_rate": hits / accesses if accesses else 0.0}


def simulate_policy(trace: Sequence[Step], num_experts: int, capacity: int, policy: str) -> dict[str, float]:
    """Hit rate the engine's own `LayerCache` gets on `trace` with `policy`."""
    cache = LayerCache(num_experts, capacity, policy)
    hits = accesses = 0
    for step, experts in enumerate(trace):
        experts = sorted(set(int(e) for e in experts))
        accesses += len(experts)
        hits += int(np.sum(cache.slot_of[experts] >= 0)) if experts else 0
        for group in _groups(experts, capacity):
            cache.access(group, step)
    return _counts(hits, accesses)


def belady(trace: Sequence[Step], capacity: int) -> dict[str, float]:
    """Belady's MIN: on a miss with a full cache, evict the expert whose next use is furthest away."""
    steps = [sorted(set(int(e) for e in experts)) for experts in trace]
    uses: dict[int, list[int]] = {}
    for t, experts in enumerate(steps):
        for e in experts:
            uses.setdefault(e, []).append(t)

    def next_use(expert: int, after: int) -> float:
        times = uses[expert]
        i = bisect.bisect_right(times, after)
        return times[i] if i < len(times) else float("inf")

    resident: set[int] = set()
    hits = accesses = 0
    for t, experts in enumerate(steps):
        accesses += len(experts)
        hits += sum(1 for e in experts if e in resident)
        groups = _groups(experts, capacity)
        for g, group in enumerate(groups):
            protected = set(group)
            pending = {e for later in groups[g + 1 :] for e in later}
            for e in group:
                if e in resident:
                    continue
                if len(resident) >= capacity:
                    # An expert a later group of this step still needs is used sooner than any future step.
                    victim = max(
                        (r for r in resident if r not in protected),
                        key=lambda r: (t + 0.5 if r in pending else next_use(r, t), r),
                    )
                    resident.discard(victim)
                resident.add(e)
    return _counts(hits, accesses)


def _groups(experts: list[int], capacity: int) -> list[list[int]]:
    """A step needing more experts than slots is processed in cache-sized groups, as the engine does."""
    return [experts[i : i + capacity] for i in range(0, len(experts), capacity)] or [[]]


def compare(traces: Sequence[Sequence[Step]], num_experts: int, capacity: int) -> dict[str, dict[str, float]]:
    """Hit rates over all layers for every policy and for Belady, at one capacity."""
    result: dict[str, dict[str, float]] = {}
    for name in (*POLICIES, "belady"):
        hits = accesses = 0
        for trace in traces:
            r = belady(trace, capacity) if name == "belady" else simulate_policy(trace, num_experts, capacity, name)
            hits += r["hits"]
            accesses += r["accesses"]
        result[name] = _counts(hits, accesses)
    return result
