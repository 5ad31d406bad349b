"""Loading never spikes to the full model size; multi-turn chats prefill only new tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_lm import load
from mlx_lm.generate import stream_generate
from moe_tui.inference import Engine, GenerationDone, TokenDelta
from moe_tui.inference.synthetic import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_peak_rss_while_loading_is_dense_plus_cache(tmp_path):
    path = make_checkpoint(tmp_path / "big", "qwen3_moe", hidden_size=512, num_hidden_layers=4, num_experts=8,
                           moe_intermediate_size=1024, head_dim=64, num_attention_heads=8, num_key_value_heads=2)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_memory.py"), str(path), "0.25"],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    budget = m["dense_bytes"] + m["cache_bytes"]
    assert m["all_experts_bytes"] > 0.9 * 200e6
    assert m["load_peak_rss_delta"] <= 1.10 * budget, m
    # Filling every slot afterwards stays far from the full model (experts are 4x the cache here).
    assert m["peak_rss_delta"] <= 0.5 * (m["dense_bytes"] + m["all_experts_bytes"]), m


def test_follow_up_turn_prefills_only_new_tokens(checkpoint):
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    events = list(engine.stream(messages, max_tokens=12))
    first = events[-1]
    assert isinstance(first, GenerationDone) and first.prefilled_tokens == first.prompt_tokens
    assert all(isinstance(e, TokenDelta) for e in events[:-1])
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "print(i)"}]
    second = list(engine.stream(messages, max_tokens=12))[-1]
    new_tokens = len(engine.encode(messages)) - len(engine.encode(messages[:1]))
    assert second.prompt_tokens > first.prompt_tokens
    assert second.prefilled_tokens < second.prompt_tokens
    assert second.prefilled_tokens <= new_tokens + first.generated_tokens + 2


def test_multi_turn_output_equals_stock_full_prefill(checkpoint):
    """Reusing the prompt cache gives the same greedy reply as prefilling the whole chat in stock."""
    path = checkpoint("mixtral")
    stock, tokenizer = load(str(path))
    engine = Engine.load(path, capacity=4)
    messages = [{"role": "user", "content": "for i in range(10):"}]
    reply = list(engine.stream(messages, max_tokens=8))[-1]
    messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "import os"}]
    got = list(engine.stream(messages, max_tokens=16))[-1]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ref = [r.token for r in stream_generate(stock, tokenizer, prompt, max_tokens=16)
           if r.finish_reason in (None, "length")]
    assert list(got.tokens) == ref
    assert got.prefilled_tokens < got.prompt_tokens


def test_kv_bits_quantizes_the_kv_cache(checkpoint):
    with pytest.raises(ValueError, match="divisible by 32"):
        Engine.load(checkpoint("qwen3_moe"), kv_bits=8)  # head_dim 16
    engine = Engine.load(checkpoint("qwen3_moe", head_dim=32), capacity=1.0, kv_bits=8)
    done = list(engine.stream([5, 6, 7, 8, 9, 10, 11, 12], max_tokens=8))[-1]
    assert done.generated_tokens == 8
    assert type(engine.prompt_cache.kv[0]).__name__ == "QuantizedKVCache"


def test_cancel_and_stop_sequences(checkpoint):
    import threading

    engine = Engine.load(checkpoint("olmoe"), capacity=1.0)
    cancel = threading.Event()
    cancel.set()
    done = list(engine.stream([5, 6, 7], max_tokens=50, cancel=cancel))[-1]
    assert done.finish_reason == "cancelled" and done.generated_tokens == 0  # cancelled before the first token
    full = list(engine.stream([5, 6, 7], max_tokens=30))[-1].text
    assert len(full) > 4
    stop = full[2:4]
    stopped = list(engine.stream([5, 6, 7], max_tokens=30, stop=[stop]))[-1]
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert full.startswith(stopped.text)


def test_engine_stream_reports_speeds(checkpoint):
    engine = Engine.load(checkpoint("gpt_oss"), capacity=2)
    done = list(engine.stream([5, 6, 7, 8], max_tokens=10))[-1]
    snap = engine.snapshot()
    assert done.decode_tps > 0 and done.prefill_tps > 0 and done.ttft_s > 0
    assert snap.decode_tps == pytest.approx(done.decode_tps) and snap.tokens_generated >= 1
    assert snap.memory.mlx_peak_bytes >= snap.memory.mlx_active_bytes > 0
    assert snap.memory.system_available_bytes > 0
