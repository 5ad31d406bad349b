"""Fast mode: no host sync, misses dropped (renormalized only where the model normalizes top-k)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from moe_tui.inference import Engine

PROMPT = [5, 17, 99, 3, 42, 7, 8, 200, 31, 11, 64, 90, 13, 250, 77, 4]


def greedy(model, n=24):
    return [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=n)]


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "qwen2_moe", "mixtral"])
def test_fast_at_full_capacity_equals_exact(checkpoint, arch):
    path = checkpoint(arch)
    exact = Engine.load(path, capacity=1.0, mode="exact")
    fast = Engine.load(path, capacity=1.0, mode="fast")
    a, b = exact.model(mx.array([PROMPT])), fast.model(mx.array([PROMPT]))
    assert float(mx.abs(a - b).max()) == 0.0
    assert greedy(exact.model) == greedy(fast.model)
    assert fast.snapshot().fallbacks.sum() == 0


@pytest.mark.parametrize("arch,quant", [("qwen3_moe", None), ("olmoe", 4), ("deepseek_v3", None),
                                        ("gpt_oss", None), ("qwen2_moe", 4), ("mixtral", None)])
def test_fast_at_low_capacity_falls_back_without_nan(checkpoint, arch, quant):
    from mlx_lm.models.cache import make_prompt_cache

    path = checkpoint(arch, quant)
    engine = Engine.load(path, capacity=2, mode="fast")
    assert list(engine.stream(PROMPT, max_tokens=8))[-1].generated_tokens > 0
    cache = make_prompt_cache(engine.model)
    engine.model(mx.array([PROMPT]), cache=cache)  # a prompt runs exact
    # The cache then holds the experts used least so far, so decode steps miss (some synthetic routers send
    # every token to the same experts).
    requests = engine.snapshot().requests
    engine.warm([list(np.argsort(row, kind="stable")[:2]) for row in requests])
    for step in range(32):
        logits = engine.model(mx.array([[(step * 37 + 11) % 250]]), cache=cache)
        mx.eval(logits)
        engine.experts.after_step()
        assert not bool(mx.isnan(logits).any())
    snap = engine.snapshot()
    assert snap.fallbacks.sum() > 0 and snap.fallback_rate > 0
    assert snap.loads.sum() > 0  # missed experts were loaded between tokens


def _block_reference(arch, checkpoint, resident):
    """Stock block output with non-resident experts dropped, renormalized where the model normalizes."""
    path = checkpoint(arch)
    stock, _ = load(str(path))
    block = stock.model.layers[0].mlp
    mx.random.seed(3)
    x = mx.random.normal((1, 6, 64)) * 2
    gates = mx.softmax(block.gate(x), axis=-1, precise=True)
    k = 2
    inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if block.norm_topk_prob:
        scores = scores / scores.sum(-1, keepdims=True)
    hit = mx.array(np.isin(np.array(inds), resident))
    if block.norm_topk_prob:
        kept = scores * hit
        scores = kept / mx.maximum(kept.sum(-1, keepdims=True), 1e-30) * scores.sum(-1, keepdims=True)
    else:
        scores = scores * hit
    y = (block.switch_mlp(x, inds) * scores[..., None]).sum(axis=-2)
    return x, y


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_fast_drop_matches_reference_renormalization(checkpoint, arch):
    resident = [0, 3, 5]
    x, ref = _block_reference(arch, checkpoint, resident)
    engine = Engine.load(checkpoint(arch), capacity=3, mode="fast")
    engine.warm([resident] * len(engine.layout.moe_layers))
    assert engine.layout.normalizes_topk == (arch == "qwen3_moe")
    block = engine.model.model.layers[0].mlp
    # One token per call, as when decoding (where fast mode drops misses; a prompt runs exact).
    out = mx.concatenate([block(x[:, i : i + 1]) for i in range(x.shape[1])], axis=1)
    assert float(mx.abs(out - ref).max()) <= 1e-5


def test_a_prompt_runs_exact_in_fast_mode(checkpoint):
    """Prefill is never lossy: fast mode's prompt logits equal stock's at any capacity."""
    path = checkpoint("qwen3_moe")
    stock, _ = load(str(path))
    ref = stock(mx.array([PROMPT]))
    fast = Engine.load(path, capacity=2, mode="fast")
    logits = fast.model(mx.array([PROMPT]))
    assert float(mx.abs(logits - ref).max()) <= 1e-4
    assert fast.snapshot().fallbacks.sum() == 0
