"""Exact mode equals stock mlx-lm on every supported architecture, format and capacity."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from moe_tui.inference import Engine
from moe_tui.inference.synthetic import ARCHS, MORE_ARCHS, PER_EXPERT_OK, PER_EXPERT_QUANTIZED_OK

PROMPT = [5, 17, 99, 3, 42, 7, 8, 200, 31, 11, 64, 90, 13, 250, 77, 4]
GREEDY_TOKENS = 32


def variants():
    for arch in ARCHS:
        yield arch, None, "stacked", 1
        yield arch, 4, "stacked", 2
        if arch in PER_EXPERT_OK:
            yield arch, None, "per_expert", 2
        if arch in PER_EXPERT_QUANTIZED_OK:
            yield arch, 4, "per_expert", 1


def greedy(model, n: int) -> list[int]:
    out = []
    for token, _ in generate_step(mx.array(PROMPT), model, max_tokens=n):
        out.append(int(token))
    return out


@pytest.mark.parametrize("arch,quant,layout,shards", list(variants()))
def test_exact_mode_equals_stock(checkpoint, arch, quant, layout, shards):
    path = checkpoint(arch, quant, layout, shards)
    stock, _ = load(str(path))
    ref_logits = stock(mx.array([PROMPT]))
    ref_tokens = greedy(stock, GREEDY_TOKENS)
    del stock
    engine = Engine.load(path, capacity=1.0)
    E, K = engine.layout.num_experts, engine.layout.top_k
    assert (E, K) == (8, 2)
    # Expert projections are still the stock classes, now holding `capacity` slots.
    projections = [m for _, m in engine.model.named_modules() if isinstance(m, (SwitchLinear, QuantizedSwitchLinear))]
    assert projections and all(p["weight"].shape[0] == E for p in projections)
    for capacity in (K, E // 2, E):
        engine.set_capacity(capacity)
        engine.reset_stats()
        logits = engine.model(mx.array([PROMPT]))
        diff = float(mx.abs(logits.astype(mx.float32) - ref_logits.astype(mx.float32)).max())
        assert diff <= 1e-4, f"capacity {capacity}: max |logit diff| {diff}"
        assert greedy(engine.model, GREEDY_TOKENS) == ref_tokens, f"capacity {capacity}"
        snap = engine.snapshot()
        assert snap.capacity == capacity
        assert all(p["weight"].shape[0] == capacity for p in projections)
        assert snap.resident.sum(axis=1).max() <= capacity
        if capacity == K:  # (at half capacity, grouped routing may fit the experts it uses)
            assert snap.misses.sum() > 0 and snap.loads.sum() > 0
        assert snap.requests.sum() > 0
    engine.close()


def test_capacity_below_top_k_is_value_error(checkpoint):
    path = checkpoint("qwen3_moe")
    with pytest.raises(ValueError, match="below top_k"):
        Engine.load(path, capacity=1)
    engine = Engine.load(path, capacity=4)
    with pytest.raises(ValueError, match="below top_k"):
        engine.set_capacity(1)
    with pytest.raises(ValueError, match="exceeds"):
        engine.set_capacity(9)
    assert engine.capacity == 4  # a refused change leaves the engine as it was


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("capacity", [2, 3, 5])
def test_long_prefill_runs_in_cache_sized_groups(checkpoint, monkeypatch, overlap, capacity):
    """A prompt routing to every expert with fewer slots: layers run in groups, still exact, each expert read
    once per layer. With `overlap` a group is read while MLX computes the one before (half the room each)."""
    import moe_tui.inference.expert_cache as expert_cache

    monkeypatch.setattr(expert_cache, "PREFILL_OVERLAP", overlap)
    path = checkpoint("mixtral")
    stock, _ = load(str(path))
    prompt = mx.array([list(range(3, 200, 3))])
    ref = stock(prompt)
    engine = Engine.load(path, capacity=capacity)
    out = engine.model(prompt)
    assert float(mx.abs(out - ref).max()) <= 1e-4
    snap = engine.snapshot()
    assert (snap.misses.sum(axis=1) > capacity).all()  # more distinct experts than slots in one step
    assert (snap.loads <= 1).all()  # one step: every expert read at most once per layer
    # Again, the cache now full of experts this prompt needs: those are computed where they are, first, and
    # only the others are read (once each).
    resident = snap.resident.copy()
    assert float(mx.abs(engine.model(prompt) - ref).max()) <= 1e-4
    loads = engine.snapshot().loads - snap.loads
    assert (loads[resident] == 0).all()
    assert (loads[~resident] == 1).all()


def test_fractional_and_automatic_capacity(checkpoint):
    path = checkpoint("olmoe")
    assert Engine.load(path, capacity=0.5).capacity == 4
    auto = Engine.load(path)  # from available memory: this tiny model fits entirely
    assert auto.capacity == 8
    with pytest.raises(ValueError):
        Engine.load(path, capacity=1.5)


def test_dense_model_loads_and_reports_no_moe_layers(tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, save_config
    from moe_tui.inference.synthetic import write_tokenizer

    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 512,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "eos_token_id": 2}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    save_config(config, tmp_path / "config.json")
    write_tokenizer(tmp_path)
    engine = Engine.load(tmp_path)
    assert engine.layout.moe_layers == ()
    snap = engine.snapshot()
    assert snap.num_moe_layers == 0 and snap.hit_rate == 0.0
    ref = model(mx.array([PROMPT]))
    assert np.allclose(np.array(engine.model(mx.array([PROMPT]))), np.array(ref), atol=1e-5)


def test_pinned_experts_with_long_prefill_stay_exact(checkpoint):
    """Pins shrink the free slots; a prompt needing every expert still runs exactly, in groups."""
    path = checkpoint("qwen3_moe")
    stock, _ = load(str(path))
    prompt = mx.array([list(range(3, 200, 3))])
    ref = stock(prompt)
    engine = Engine.load(path, capacity=3)
    profile = {"num_experts": 8, "moe_layers": [0, 1], "counts": [[8, 7, 6, 5, 4, 3, 2, 1]] * 2,
               "universal": [[0], [0]]}
    engine.apply_profile(profile)
    assert [engine.snapshot().layer(i).pinned for i in range(2)] == [(0,), (0,)]
    assert float(mx.abs(engine.model(prompt) - ref).max()) <= 1e-4
    snap = engine.snapshot()
    assert snap.resident[:, 0].all()  # the pinned expert was never evicted
    engine.set_capacity(2)  # pins are capped at capacity - top_k
    assert engine.snapshot().pinned.sum() == 0


@pytest.mark.parametrize("arch", sorted(MORE_ARCHS))
def test_architectures_found_structurally(checkpoint, arch):
    """Hybrid attention/SSM layers, dense first layers, shared experts, gate modules: no per-model code."""
    path = checkpoint(arch)
    stock, _ = load(str(path))
    ref = stock(mx.array([PROMPT]))
    engine = Engine.load(path, capacity=2)
    assert len(engine.layout.moe_layers) == 2
    assert float(mx.abs(engine.model(mx.array([PROMPT])) - ref).max()) <= 1e-4


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_model_matches_stock_upcast(checkpoint, dtype):
    """MLX's CPU backend needs float32 expert matmuls: the engine upcasts as a stock user must."""
    path = checkpoint("qwen2_moe", dtype=dtype)
    stock, _ = load(str(path))
    if mx.default_device() == mx.cpu:
        stock.set_dtype(mx.float32)
    ref = stock(mx.array([PROMPT]))
    engine = Engine.load(path, capacity=2)
    assert float(mx.abs(engine.model(mx.array([PROMPT])) - ref).max()) <= 1e-4
    assert greedy(engine.model, 16) == greedy(stock, 16)


def test_half_precision_quantized_experts_run_in_float32_on_cpu(tmp_path):
    """mlx-community 4-bit checkpoints keep bf16 scales and biases, which MLX's CPU backend runs many times
    slower: the cache holds them in float32, as stock does once upcast, with the same tokens."""
    from moe_tui.inference.synthetic import make_checkpoint

    if mx.default_device() != mx.cpu:
        pytest.skip("the upcast is for the CPU backend")
    path = make_checkpoint(tmp_path / "bf16q4", "qwen3_moe", quant_bits=4, dtype=mx.bfloat16, router_scale=4.0)
    stock, _ = load(str(path))
    half = (mx.bfloat16, mx.float16)
    assert any(v.dtype in half for _, v in tree_flatten(stock.parameters()))
    stock.set_dtype(mx.float32, lambda d: d in half)
    ref_tokens = greedy(stock, GREEDY_TOKENS)
    engine = Engine.load(path, capacity=4)
    assert not any(v.dtype in half for _, v in tree_flatten(engine.model.parameters()))
    assert greedy(engine.model, GREEDY_TOKENS) == ref_tokens
