"""Eviction policies, pinning, and live capacity / mode / policy changes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from moe_tui.inference import Engine
from moe_tui.inference.cache import LayerCache

PROMPT = [5, 17, 99, 3, 42, 7, 8, 200, 31, 11]


def test_lru_evicts_least_recently_used():
    cache = LayerCache(8, 3, "lru")
    for step, e in enumerate([0, 1, 2]):
        cache.access([e], step)
    cache.access([0], 3)  # 1 is now the oldest
    placements = cache.access([5], 4)
    assert placements == [(5, int(cache.slot_of[5]), 1)]
    assert list(cache.resident()) == [0, 2, 5]


def test_lfu_evicts_least_frequently_used():
    cache = LayerCache(8, 2, "lfu")
    for step, e in enumerate([0, 0, 0, 1]):
        cache.access([e], step)
    cache.access([2], 5)
    assert list(cache.resident()) == [0, 2]


def test_decay_forgets_old_frequency():
    cache = LayerCache(8, 2, "decay")
    for step in range(5):
        cache.access([0], step)  # heavily used long ago
    cache.access([1], 2000)
    cache.access([1], 2001)
    cache.access([2], 2002)  # 0's decayed score is now below 1's
    assert list(cache.resident()) == [1, 2]


def test_pinned_expert_is_never_evicted():
    cache = LayerCache(8, 2, "lru")
    cache.access([4], 0)
    cache.pin([4])
    for step, e in enumerate([0, 1, 2, 3, 5, 6], start=1):
        cache.access([e], step)
        assert cache.slot_of[4] >= 0
    with pytest.raises(ValueError):
        cache.pin([0, 1, 2])


def test_unknown_policy_and_mode_are_rejected(checkpoint):
    with pytest.raises(ValueError, match="policy"):
        LayerCache(8, 2, "random")
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4)
    with pytest.raises(ValueError, match="policy"):
        engine.set_policy("fifo")
    with pytest.raises(ValueError, match="mode"):
        engine.set_mode("turbo")


def test_live_changes_without_reloading(checkpoint):
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4)
    model = engine.model
    ref = engine.model(mx.array([PROMPT]))
    resident_before = engine.snapshot().resident.sum(axis=1)
    engine.set_capacity(2)
    snap = engine.snapshot()
    assert snap.capacity == 2 and (snap.resident.sum(axis=1) <= 2).all()
    assert (snap.resident.sum(axis=1) == np.minimum(resident_before, 2)).all()  # kept what fit
    engine.set_policy("lfu")
    assert (engine.mode, engine.policy, engine.snapshot().policy) == ("exact", "lfu", "lfu")
    with pytest.raises(ValueError, match="fast mode was removed"):
        engine.set_mode("fast")
    engine.set_capacity(8)
    assert engine.model is model  # same stock model object throughout
    assert float(mx.abs(engine.model(mx.array([PROMPT])) - ref).max()) <= 1e-5


def test_snapshot_is_frozen_and_independent(checkpoint):
    engine = Engine.load(checkpoint("olmoe"), capacity=3)
    engine.model(mx.array([PROMPT]))
    snap = engine.snapshot()
    with pytest.raises(ValueError):
        snap.hits[0, 0] = 99  # read-only copy
    before = snap.requests.sum()
    engine.model(mx.array([PROMPT]))
    assert snap.requests.sum() == before  # later work does not leak into an old snapshot
    assert engine.snapshot().requests.sum() > before
    layer = snap.layer(0)
    assert len(layer.resident) <= 3 and 0 <= layer.hit_rate <= 1
    assert snap.memory.rss_bytes > 0 and snap.memory.expert_cache_bytes == engine.cache_bytes()
    assert isinstance(snap.to_dict()["hits"], list)
    engine.reset_stats()
    assert engine.snapshot().requests.sum() == 0


def test_lrfu_weighs_recent_use_over_old_frequency_sooner_than_decay():
    # Expert 0 used 4 times, then expert 1 twice 40 steps later; then 2 needs a slot. decay (half-life 128)
    # still ranks 0's old frequency higher, lrfu (16) already ranks 1's recent uses higher.
    kept = {}
    for policy in ("decay", "lrfu"):
        cache = LayerCache(8, 2, policy)
        for step in range(4):
            cache.access([0], step)
        cache.access([1], 40)
        cache.access([1], 41)
        cache.access([2], 42)
        kept[policy] = list(cache.resident())
    assert kept == {"decay": [0, 2], "lrfu": [1, 2]}


def test_every_policy_keeps_its_state_whatever_the_policy(checkpoint):
    from moe_tui.inference.cache import DEFAULT_POLICY, POLICIES

    assert DEFAULT_POLICY in POLICIES and {"lru", "lfu", "decay"} <= set(POLICIES)
    cache = LayerCache(8, 2, "lru")
    cache.access([0], 0)
    cache.access([0], 1)
    cache.access([1], 2)
    cache.policy = "lrfu"  # a live change ranks by the history kept all along
    assert cache.priority(np.array([0, 1]), 2)[0] > cache.priority(np.array([0, 1]), 2)[1]
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4)
    assert engine.policy == DEFAULT_POLICY
    engine.set_policy("lrfu")
    engine.model(mx.array([PROMPT]))
    assert engine.snapshot().policy == "lrfu"


def test_markov_keeps_the_expert_that_follows():
    # Expert 3 has always come right after expert 1. When 1 is routed again and a slot is needed, markov
    # keeps 3 (likely next) and evicts 0; lrfu evicts 3, used longer ago than 0.
    kept = {}
    for policy in ("lrfu", "markov"):
        cache = LayerCache(8, 3, policy)
        steps = [[1], [3]] * 6 + [[5]] * 20 + [[0]] * 5 + [[1]]
        for step, experts in enumerate(steps):
            cache.access(experts, step)
        kept[policy] = [int(e) for e in cache.resident()]
    assert kept == {"lrfu": [0, 1, 5], "markov": [1, 3, 5]}


def test_markov_learns_from_single_token_steps_only_and_state_carries_over():
    cache = LayerCache(16, 4, "markov")
    cache.touch([1, 2], 0)
    cache.touch([3, 4], 1)
    assert cache.counted_transitions()[1, 3] > cache.counted_transitions()[3, 1]
    before = cache.counted_transitions().copy()
    cache.touch(list(range(10)), 2)  # a prompt chunk: most experts at once
    cache.touch([5, 6], 3)
    assert np.array_equal(cache.counted_transitions(), before)
    cache.touch([7], 4)
    rebuilt = LayerCache(16, 8, "markov")
    rebuilt.copy_policy_state(cache)
    assert rebuilt.transitions[5, 7] == rebuilt.transitions[6, 7] > before[5, 7] and rebuilt.step_experts == [7]
    assert np.array_equal(rebuilt.last_use, cache.last_use) and rebuilt.transitions is not cache.transitions
