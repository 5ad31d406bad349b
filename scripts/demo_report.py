"""Measure the shipped demo model for its model card (docs/demo-model.md): prints JSON.

    python scripts/demo_report.py [--model inference/demo] [--tokens 2048]

Routing is traced token by token over held-out text (the same stable-hash split as training), so
each trace step is one token, as in decoding. Reports per layer: expert usage (max/min share,
normalized entropy), consecutive-token expert overlap vs the same tokens shuffled (the Mixtral
paper's locality analysis), and LRU / LFU / decay / Belady hit rates at 25/50/75% capacity; then
held-out cross-entropy through MLX and five sample replies.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from moe_tui.inference import Engine
from moe_tui.inference.demo_paths import DEMO_MODEL
from moe_tui.inference.oracle import compare

SAMPLE_PROMPTS = [
    "Write a Python function `is_palindrome(s)`: Return True if the string reads the same backwards.",
    "Write a Python function `flatten(items)`: Flatten a list of lists into one list.",
    "Write a Python function `read_json(path)`: Read a JSON file and return the parsed object.",
    "What does the `with` statement do in Python?",
    "Write a Python method `push(self, item)` of class `Stack`: Push an item onto the stack.",
]


def heldout_text(stdlib: Path, docs: Path) -> list[str]:
    spec = importlib.util.spec_from_file_location("train_demo", Path(__file__).with_name("train_demo.py"))
    train_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_demo)
    return train_demo.build_corpus(stdlib, docs)["heldout"]


def per_token_trace(engine: Engine, tokens: list[int]) -> tuple[list[list[np.ndarray]], float]:
    """Feed tokens one at a time (decode-style); returns the per-layer trace and mean CE (nats/token)."""
    engine.reset_stats()
    cache = make_prompt_cache(engine.model)
    nll = 0.0
    for i in range(len(tokens) - 1):
        logits = engine.model(mx.array([[tokens[i]]]), cache=cache)[0, -1].astype(mx.float32)
        nll += float(mx.logsumexp(logits) - logits[tokens[i + 1]])
    engine.snapshot()
    return [list(layer) for layer in engine.trace], nll / (len(tokens) - 1)


def layer_stats(trace: list[np.ndarray], num_experts: int, top_k: int, rng: np.random.Generator) -> dict:
    counts = np.zeros(num_experts)
    for step in trace:
        counts[step] += 1
    share = counts / counts.sum()
    nz = share[share > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(num_experts))

    def overlap(steps) -> float:
        return float(np.mean([len(set(a) & set(b)) / top_k for a, b in zip(steps[:-1], steps[1:], strict=True)]))

    shuffled = [trace[i] for i in rng.permutation(len(trace))]
    return {"max_share": float(share.max()), "min_share": float(share.min()), "normalized_entropy": entropy,
            "consecutive_overlap": overlap(trace), "shuffled_overlap": overlap(shuffled)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--docs", type=Path, default=Path("/usr/share/doc/python3.11/html/_sources"))
    parser.add_argument("--markdown", action="store_true", help="print the model card tables instead of JSON")
    args = parser.parse_args()
    engine = Engine.load(args.model, capacity=1.0)
    layout = engine.layout
    text = "\n".join(heldout_text(args.stdlib, args.docs))
    tokens = list(engine.tokenizer.encode(text[: args.tokens * 8]))[: args.tokens]  # 8 characters a token: ample
    started = time.perf_counter()
    trace, ce = per_token_trace(engine, tokens)
    rng = np.random.default_rng(0)
    report: dict = {
        "model": args.model, "tokens_traced": len(tokens), "trace_seconds": time.perf_counter() - started,
        "heldout_ce_mlx": ce, "heldout_ppl_mlx": math.exp(ce),
        "layers": [layer_stats(layer, layout.num_experts, layout.top_k, rng) for layer in trace],
        "hit_rates": {},
    }
    for pct in (25, 50, 75):
        capacity = round(layout.num_experts * pct / 100)
        report["hit_rates"][f"{pct}%"] = {
            name: r["hit_rate"] for name, r in compare(trace, layout.num_experts, capacity).items()}
        report["hit_rates"][f"{pct}%"]["per_layer_belady"] = [
            compare([layer], layout.num_experts, capacity)["belady"]["hit_rate"] for layer in trace]
    samples = []
    for prompt in SAMPLE_PROMPTS:
        done = list(engine.stream([{"role": "user", "content": prompt}], max_tokens=120, temperature=0.0))[-1]
        samples.append({"prompt": prompt, "reply": done.text, "decode_tps": done.decode_tps})
    report["samples"] = samples
    print(markdown(report) if args.markdown else json.dumps(report, indent=2))
    return 0


def markdown(report: dict) -> str:
    """The measured sections of docs/demo-model.md."""
    out = [f"Held-out cross-entropy through MLX (first {report['tokens_traced']} held-out tokens, token by token): "
           f"{report['heldout_ce_mlx']:.3f} nats/token (perplexity {report['heldout_ppl_mlx']:.1f}).", "",
           "| layer | max share | min share | normalized entropy | consecutive overlap | shuffled overlap |",
           "|---|---|---|---|---|---|"]
    for i, layer in enumerate(report["layers"]):
        out.append(f"| {i} | {layer['max_share']:.1%} | {layer['min_share']:.1%} | {layer['normalized_entropy']:.3f} "
                   f"| {layer['consecutive_overlap']:.3f} | {layer['shuffled_overlap']:.3f} |")
    out += ["", "| capacity | LRU | LFU | decay | Belady | Belady per layer |", "|---|---|---|---|---|---|"]
    for pct, rates in report["hit_rates"].items():
        per_layer = " / ".join(f"{r:.0%}" for r in rates["per_layer_belady"])
        out.append(f"| {pct} | {rates['lru']:.1%} | {rates['lfu']:.1%} | {rates['decay']:.1%} | "
                   f"{rates['belady']:.1%} | {per_layer} |")
    out += ["", "Samples (greedy, 120 tokens max, chat template):", ""]
    for sample in report["samples"]:
        out += [f"**Prompt:** {sample['prompt']}", "", "```text", sample["reply"].strip(), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
