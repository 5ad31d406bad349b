"""Belady's MIN is optimal: >= every policy, and equal to a brute-force search on small traces."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st
from moe_tui.inference import Engine
from moe_tui.inference.cache import POLICIES
from moe_tui.inference.oracle import belady, compare, simulate_policy


def brute_force_hits(trace, capacity):
    """Max hits over every eviction choice (demand paging, one access at a time)."""
    seq = [e for step in trace for e in sorted(set(step))]

    @functools.cache
    def best(i, resident):
        if i == len(seq):
            return 0
        e = seq[i]
        if e in resident:
            return 1 + best(i + 1, resident)
        if len(resident) < capacity:
            return best(i + 1, resident | {e})
        return max(best(i + 1, (resident - {v}) | {e}) for v in resident)

    return best(0, frozenset())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=14), st.integers(1, 4))
def test_belady_equals_brute_force_on_single_access_traces(seq, capacity):
    trace = [[e] for e in seq]
    assert belady(trace, capacity)["hits"] == brute_force_hits(trace, capacity)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=2), min_size=1, max_size=30), st.integers(2, 6))
def test_belady_beats_every_policy(trace, capacity):
    best = belady(trace, capacity)["hits"]
    for policy in POLICIES:
        assert simulate_policy(trace, 8, capacity, policy)["hits"] <= best


def test_belady_on_recorded_engine_trace(checkpoint):
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=2)
    for _event in engine.stream(list(range(3, 60, 2)), max_tokens=24):
        pass
    rates = engine.hit_rates_vs_optimum()
    assert set(rates) == {*POLICIES, "belady"}
    for policy in POLICIES:
        assert rates[policy]["hit_rate"] <= rates["belady"]["hit_rate"] + 1e-12
    # The LRU replay reproduces what the engine itself counted in exact mode.
    snap = engine.snapshot()
    assert rates["lru"]["hits"] == int(snap.hits.sum())
    assert rates["lru"]["accesses"] == int(snap.hits.sum() + snap.misses.sum())
    assert len(engine.trace) == 2 and len(engine.trace[0]) > 24
    # With room for every expert, only first uses miss (compulsory misses), for every policy.
    full = compare(engine.trace, 8, 8)
    distinct = sum(len({int(e) for step in layer for e in step}) for layer in engine.trace)
    for name, r in full.items():
        assert r["accesses"] - r["hits"] == distinct, name


def test_known_trace_values():
    trace = [[0], [1], [2], [0], [1], [3], [0], [1], [2], [3]]
    assert simulate_policy(trace, 4, 2, "lru")["hits"] == 0
    assert belady(trace, 2)["hits"] == 3
