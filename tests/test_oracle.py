"""Belady's MIN is optimal: >= every policy, and equal to a brute-force search on small traces."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_tui.inference import Engine
from moe_tui.inference.cache import POLICIES
from moe_tui.inference.oracle import belady, compare, shared_budget, simulate_policy


def brute_force_hits(trace, capacity, start=()):
    """Max hits over every eviction choice (demand paging, one access at a time), from any `capacity` of the
    experts in `start`."""
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

    start = sorted(set(start))
    return max(best(0, frozenset(kept)) for kept in itertools.combinations(start, min(capacity, len(start))))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=14), st.integers(1, 4))
def test_belady_equals_brute_force_on_single_access_traces(seq, capacity):
    trace = [[e] for e in seq]
    assert belady(trace, capacity)["hits"] == brute_force_hits(trace, capacity)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=12), st.integers(1, 4),
       st.lists(st.integers(0, 5), max_size=5, unique=True))
def test_belady_from_a_warm_cache_equals_brute_force(seq, capacity, start):
    trace = [[e] for e in seq]
    assert belady(trace, capacity, start)["hits"] == brute_force_hits(trace, capacity, start)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=2), min_size=1, max_size=30), st.integers(2, 6),
       st.lists(st.integers(0, 7), max_size=8, unique=True))
def test_belady_beats_every_policy(trace, capacity, start):
    for begin in ((), start):  # the same cache to start from: empty, or warm (more experts than slots, too)
        best = belady(trace, capacity, begin)["hits"]
        for policy in POLICIES:
            assert simulate_policy(trace, 8, capacity, policy, start=begin)["hits"] <= best


def test_a_warm_start_counts_the_experts_it_holds():
    trace = [[0], [1], [2], [0], [1]]
    assert belady(trace, 2)["hits"] == 1 and belady(trace, 2, start=[0, 1])["hits"] == 3
    # More experts than slots: Belady keeps those used soonest; a policy the first ones of `start`.
    assert belady(trace, 1, start=[2, 0])["hits"] == 1
    # Their order is their recency: 2 evicts the one listed last.
    assert simulate_policy([[2], [0]], 4, 2, "lru", start=[0, 1])["hits"] == 1
    assert simulate_policy([[2], [0]], 4, 2, "lru", start=[1, 0])["hits"] == 0
    assert simulate_policy(trace, 4, 1, "lru", start=[1, 0])["hits"] == 0  # one slot: it keeps 1


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


def test_belady_is_never_below_the_realized_rate_of_a_run_that_started_warm(checkpoint):
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4)
    prompt = list(range(3, 60, 2))
    for _event in engine.stream(prompt, max_tokens=16):
        pass
    engine.reset_stats()  # as /reset: counters and trace start again, the cache stays as it is
    for _event in engine.stream(prompt[:5], max_tokens=16):
        pass
    snap = engine.snapshot()
    assert snap.trace_start_warm
    rates = engine.hit_rates_vs_optimum()  # the whole trace: the steps the counters cover
    assert rates["belady"]["accesses"] == int(snap.hits.sum() + snap.misses.sum())
    # Reads ahead are loads too: no cache of this capacity gets more hits than MIN from the same start.
    assert rates["belady"]["hit_rate"] >= snap.hit_rate >= snap.demand_hit_rate
    for policy in POLICIES:
        assert rates[policy]["hit_rate"] <= rates["belady"]["hit_rate"]
    # The replay of the last steps starts from the cache as those steps found it.
    last = engine.hit_rates_vs_optimum(last_steps=5)
    assert last["belady"]["hit_rate"] >= _realized(engine, 5)


def _realized(engine, steps: int) -> float:
    """The hit rate the cache got on its last `steps` steps, from the residency logged with the trace."""
    hits = accesses = 0
    for layer, log in zip(engine.trace, engine.experts.trace_resident, strict=True):
        for back, needed in zip(range(steps, 0, -1), list(layer)[-steps:], strict=True):
            hits += len(set(needed.tolist()) & set(log.at(back)))
            accesses += len(needed)
    return hits / accesses


def test_the_residency_log_keeps_the_newest_steps():
    from moe_tui.inference.expert_cache import ResidencyLog

    log = ResidencyLog(10, size=4)
    log.extend(np.eye(10, dtype=bool)[0], 1)
    log.extend(np.eye(10, dtype=bool)[9], 2)
    assert log.at(1) == log.at(2) == [9] and log.at(3) == [0]
    log.extend(np.ones(10, dtype=bool), 6)  # more steps than the ring holds in one call
    assert log.at(4) == list(range(10))
    with pytest.raises(IndexError):
        log.at(5)


def test_known_trace_values():
    trace = [[0], [1], [2], [0], [1], [3], [0], [1], [2], [3]]
    assert simulate_policy(trace, 4, 2, "lru")["hits"] == 0
    assert belady(trace, 2)["hits"] == 3


def test_replay_gate_matches_the_engine():
    from moe_tui.inference import expert_cache, oracle

    for name in ("PREFETCH_MIN_PRECISION", "PREFETCH_MEMORY", "PREFETCH_WARMUP"):
        assert getattr(oracle, name) == getattr(expert_cache, name), name


def test_prediction_replay():
    rng = np.random.default_rng(0)
    trace = [sorted(rng.choice(12, 2, replace=False).tolist()) for _ in range(300)]
    demand = simulate_policy(trace, 16, 8, "lru")
    # Guesses that are exactly the step's experts: every access is ready once reads ahead start.
    perfect = simulate_policy(trace, 16, 8, "lru", guesses=trace, top_k=2)
    assert perfect["hits"] == perfect["accesses"] > demand["hits"]
    assert perfect["prefetches"] == perfect["prefetch_hits"] == demand["accesses"] - demand["hits"]
    # Guesses that are never needed: reads ahead stop once each rank's precision is measured.
    useless = simulate_policy(trace, 16, 8, "lru", guesses=[[14, 15]] * len(trace), top_k=2)
    assert useless["prefetch_hits"] == 0 and useless["prefetches"] <= 2 * 5  # 2 ranks; 5 decayed guesses reach 4
    # No room to guess (capacity == top_k): the same as without prediction.
    assert simulate_policy(trace, 16, 2, "lru", guesses=trace, top_k=2)["hits"] == simulate_policy(
        trace, 16, 2, "lru")["hits"]
    assert set(compare([trace], 16, 8, guesses=[trace], top_k=2)) == {
        *POLICIES, "belady", *(p + "+prediction" for p in POLICIES)}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 30), min_size=6, max_size=6), min_size=1, max_size=4), st.integers(2, 4))
def test_shared_budget_is_the_best_split(raw, capacity):
    curves = [np.maximum.accumulate(c).tolist() for c in raw]  # hits never fall with more slots
    result = shared_budget(curves, capacity, minimum=2)
    total = capacity * len(curves)
    best = max(sum(c[a - 1] for c, a in zip(curves, split, strict=True))
               for split in itertools.product(range(2, 7), repeat=len(curves)) if sum(split) <= total)
    assert result["shared_hits"] == best >= result["uniform_hits"]
    assert sum(result["allocation"]) <= total and min(result["allocation"]) >= 2


def test_a_sampled_replay_is_the_replay_of_those_layers(checkpoint):
    """The miss curve of a model with many layers replays a few spread evenly (first and last among them)."""
    from moe_tui.inference.oracle import compare, sampled_layers

    assert sampled_layers(48, 8) == [0, 7, 13, 20, 27, 34, 40, 47]
    assert sampled_layers(4, 8) == [0, 1, 2, 3] and sampled_layers(5, None) == [0, 1, 2, 3, 4]
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4)
    list(engine.stream([{"role": "user", "content": "def add(a, b):"}], max_tokens=8))
    replay = functools.partial(engine.experts.hit_rates_vs_optimum, 2, warm=False)
    layers = [replay(layers=[i]) for i in range(len(engine.layout.moe_layers))]
    assert layers[1] == compare([list(engine.experts.trace[1])], engine.layout.num_experts, 2)
    everything = replay()
    for name, rates in everything.items():  # the layers' counts add up to the whole model's
        assert sum(one[name]["hits"] for one in layers) == rates["hits"]
        assert sum(one[name]["accesses"] for one in layers) == rates["accesses"]
    engine.close()


def test_a_policy_told_the_next_step_lies_between_itself_and_belady():
    """Told which experts the next step routes to, a policy keeps those: on the demo's held-out trace it hits
    more than without being told, and never more than Belady, who knows every later step too."""
    from moe_tui.inference.cache import DEFAULT_POLICY
    from moe_tui.inference.oracle import told_next
    from moe_tui.inference.traces import load_trace

    trace = load_trace(Path(__file__).parent / "data" / "demo-handlers.trace.npz")
    for capacity in (4, 8):
        for layer in trace.steps[:2]:
            alone = simulate_policy(layer, trace.num_experts, capacity, DEFAULT_POLICY)["hit_rate"]
            told = told_next(layer, trace.num_experts, capacity)["hit_rate"]
            further = told_next(layer, trace.num_experts, capacity, steps=2)["hit_rate"]
            best = belady(layer, capacity)["hit_rate"]
            assert alone < told < further <= best


@pytest.mark.parametrize("policy", ["lru", "lfu", "markov"])
def test_told_next_keeps_what_the_next_step_needs(policy):
    """Whatever the policy's own scores (LRU's are step numbers, LFU's counts), an expert the next step
    routes to is evicted only when every candidate is one."""
    from moe_tui.inference.oracle import told_next

    # Capacity 2: at step 2 (expert 2) the cache holds 0 and 1; the next step needs 0, so 1 must go.
    trace = [[0], [1], [2], [0], [1]]
    assert told_next(trace, 3, 2, policy)["hits"] == 1
