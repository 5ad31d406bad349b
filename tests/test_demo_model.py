"""The shipped demo model: loads in stock mlx-lm and the engine, matches stock, sane perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from moe_tui.inference import Engine
from moe_tui.inference.demo_paths import DEMO_MODEL, DEMO_PROFILE

HELDOUT = Path(__file__).parent / "data" / "demo_heldout.txt"

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").exists(), reason="demo model not built")


@pytest.fixture(scope="module")
def stock():
    model, tokenizer = load(str(DEMO_MODEL))
    model.set_dtype(mx.float32)  # shipped in bf16; MLX's CPU gather_mm needs float32
    return model, tokenizer


def test_config_is_qwen3_moe_with_long_context():
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["max_position_embeddings"] >= 1024
    assert config["num_experts"] == 16 and config["num_experts_per_tok"] == 2


def test_engine_exact_mode_equals_stock(stock):
    model, tokenizer = stock
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function `add(a, b)`"}],
                                           add_generation_prompt=True)
    ref_logits = model(mx.array([prompt]))
    ref_tokens = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=24)]
    engine = Engine.load(DEMO_MODEL, capacity=1.0)
    for capacity in (2, 8, 16):
        engine.set_capacity(capacity)
        assert float(mx.abs(engine.model(mx.array([prompt])) - ref_logits).max()) <= 1e-4
        assert [int(t) for t, _ in generate_step(mx.array(prompt), engine.model, max_tokens=24)] == ref_tokens


def test_chat_template(stock):
    _, tokenizer = stock
    text = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                         add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"


def test_heldout_perplexity_is_sane(stock):
    model, tokenizer = stock
    tokens = tokenizer.encode(HELDOUT.read_text())[:1024]
    logits = model(mx.array([tokens[:-1]]))[0].astype(mx.float32)
    targets = mx.array(tokens[1:])
    ce = float((mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]).mean())
    assert ce < 5.0, f"held-out cross-entropy {ce:.2f} nats/token (ppl {math.exp(ce):.0f}): broken export?"


def test_profile_matches_the_model():
    profile = json.loads(DEMO_PROFILE.read_text())
    assert profile["num_experts"] == 16 and profile["moe_layers"] == [0, 1, 2, 3]
    assert len(profile["counts"]) == 4 and all(len(row) == 16 for row in profile["counts"])
    engine = Engine.load(DEMO_MODEL, capacity=8, profile=DEMO_PROFILE)
    assert engine.snapshot().resident.sum() == 4 * 8


def test_tokenizer_loads_in_transformers_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
