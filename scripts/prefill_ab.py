"""Prefill at a capacity below 100% against prefill with every expert resident, interleaved in one process.

    python scripts/prefill_ab.py [--model DIR] [--capacity 0.25] [--prompt-tokens 64] [--rounds 16]

Without --model the script makes `moe bench --synthetic`'s checkpoint in a temporary folder. Three
configurations take turns, one prefill each per round, the order reversed every other round: every expert
resident (100%), and at --capacity the expert-major prefill with its groups overlapped (a group is read while
MLX computes the one before, the default) and in turn (`PREFILL_OVERLAP = False`: read, compute, wait). The
engines keep their caches from round to round, as `moe bench`'s warm pass does, and the page cache holds the
file. Reported: median prefill tok/s of each, and each capacity configuration over the 100% one of the same
round (median and geometric mean of the per-round ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

from moe_tui.inference import Engine, expert_cache
from moe_tui.inference.bench import _prompt_tokens, synthetic_checkpoint
from moe_tui.inference.offload_bench import prefill_rounds, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--capacity", type=float, default=0.25)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=16)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        model = args.model or stack.enter_context(synthetic_checkpoint(prefix="moe-prefill-"))
        run(model, args.capacity, args.prompt_tokens, args.rounds)


def run(model: Path, capacity: float, prompt_tokens: int, rounds: int) -> None:
    full = Engine.load(model, capacity=1.0, prefetch=False)
    part = Engine.load(model, capacity=capacity, prefetch=False)
    prompt = _prompt_tokens(full.tokenizer, prompt_tokens)
    pct = f"{capacity:.0%}"

    def overlap(on: bool):
        return lambda: setattr(expert_cache, "PREFILL_OVERLAP", on)

    speeds = prefill_rounds([("100%", full, overlap(True)), (f"{pct} overlapped", part, overlap(True)),
                             (f"{pct} in turn", part, overlap(False))], prompt, rounds)
    print(f"model {model}  prompt {len(prompt)} tokens  {rounds} rounds")
    for name, values in speeds.items():
        line = f"{name:<18} prefill {statistics.median(values):7.1f} tok/s"
        if name != "100%":
            r = ratios(values, speeds["100%"])
            line += f"   vs 100%: median {r['median']:.3f}  geometric mean {r['geometric_mean']:.3f}"
        print(line)


if __name__ == "__main__":
    main()
