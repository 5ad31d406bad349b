"""What grows with every token stays bounded: the routing trace is a ring of the newest steps."""

from __future__ import annotations

import moe_tui.inference.expert_cache as expert_cache
from moe_tui.inference import Engine


def test_the_routing_trace_keeps_only_the_newest_steps(checkpoint, monkeypatch):
    monkeypatch.setattr(expert_cache, "TRACE_STEPS", 16)
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4)
    list(engine.stream([{"role": "user", "content": "def add(a, b):"}], max_tokens=40))
    assert all(len(layer) == 16 for layer in engine.trace)
    assert all(len(log.bits) == 16 for log in engine.experts.trace_resident)  # the cache at each kept step
    assert engine.traced_steps > 16
    rates = engine.hit_rates_vs_optimum()  # replays what is kept
    assert 0 <= rates["belady"]["hit_rate"] <= 1
    engine.reset_stats()
    assert engine.traced_steps == 0 and all(len(layer) == 0 for layer in engine.trace)
    assert all(log.logged == 0 for log in engine.experts.trace_resident)
