"""The engine with every expert resident against stock mlx-lm, decoding in turn in one process.

    python scripts/stock_ab.py [--model DIR] [--quantized] [--rounds 10] [--decode-tokens 128]

Without --model the script makes `moe bench --synthetic`'s checkpoint (or its 4-bit one, bf16 scales and
biases, with --quantized) in a temporary folder. Three configurations take turns, one greedy generation each
per round, the order reversed every other round: stock (`mlx_lm.load`, half precision upcast to float32 on the
CPU backend as stock needs there), the engine's model (capacity 100%) through stock `stream_generate` (what the
swapped expert layers cost), and `Engine.stream` (that plus the engine's generation loop and its bookkeeping).
Reported: median decode tok/s, and the median per-round ratio to stock by wall time and by process CPU time.
`moe bench` loads each configuration afresh per repeat; this keeps all three loaded, which takes the load
order and the machine's drift between repeats out of the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import stream_generate
from moe_tui.inference import Engine
from moe_tui.inference.bench import _prompt_tokens, synthetic_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--quantized", action="store_true", help="without --model: the 4-bit synthetic checkpoint")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        model = args.model or stack.enter_context(synthetic_checkpoint(args.quantized, prefix="moe-stock-ab-"))
        run(model, args.rounds, args.decode_tokens)


def run(model_path: Path, rounds: int, decode_tokens: int) -> None:
    stock, tokenizer = load(str(model_path))
    if mx.default_device() == mx.cpu:
        stock.set_dtype(mx.float32, lambda d: mx.issubdtype(d, mx.floating) and d != mx.float32)
    engine = Engine.load(model_path, capacity=1.0)
    engine.tokenizer.eos_token_ids = set()  # every run decodes exactly decode_tokens
    tokenizer.eos_token_ids = set()
    prompt = _prompt_tokens(engine.tokenizer, 64)

    def through_stream_generate(model) -> tuple[float, float]:
        cpu = time.process_time()
        *_, last = stream_generate(model, tokenizer, prompt, max_tokens=decode_tokens)
        return last.generation_tps, time.process_time() - cpu

    def engine_stream() -> tuple[float, float]:
        engine.reset_prompt_cache()
        cpu = time.process_time()
        *_, last = engine.stream(prompt, max_tokens=decode_tokens)
        return last.decode_tps, time.process_time() - cpu

    configs = {"stock": lambda: through_stream_generate(stock),
               "engine.model, stock loop": lambda: through_stream_generate(engine.model),
               "Engine.stream": engine_stream}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for r in range(rounds + 1):  # round 0 warms up and is not counted
        for name in list(configs) if r % 2 else list(configs)[::-1]:
            result = configs[name]()
            if r:
                runs[name].append(result)
    print(f"model {model_path}  {rounds} rounds x {decode_tokens} tokens")
    for name, values in runs.items():
        wall = statistics.median(a[0] / b[0] for a, b in zip(values, runs["stock"], strict=True))
        cpu = statistics.median(b[1] / a[1] for a, b in zip(values, runs["stock"], strict=True))
        print(f"{name:<26} decode {statistics.median(v[0] for v in values):7.1f} tok/s   vs stock: wall "
              f"{wall:.3f}  CPU {cpu:.3f}")


if __name__ == "__main__":
    main()
