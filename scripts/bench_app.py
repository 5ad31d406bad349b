"""Decode tok/s of the headless engine vs the same engine inside the app (heatmap and gauges refreshing),
side by side in one run (prints JSON). Keypress latency is measured in a real terminal by
scripts/keypress_latency.py.

    python scripts/bench_app.py [MODEL] [--tokens 300] [--repeats 3] [--thread]

The app runs headless (Textual's test driver): layout, rendering and widget updates all happen;
only the terminal write is skipped. With --thread the app is also run with its inference thread in
the UI's process (inference_process = false). Runs are interleaved, in a shuffled order each round.
Reported: the ratio of the medians and the median of the per-round ratios (steadier on a noisy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile

from app.main import MoeApp
from app.settings import Settings
from app.widgets.chat import PromptInput
from app.worker import EngineSpec
from inference import Engine
from inference.demo_paths import DEMO_MODEL

PROMPT = [{"role": "user", "content": "Write a Python function `merge(a, b)`: Merge two sorted lists."}]


def headless(model: str, tokens: int) -> float:
    engine = Engine.load(model, capacity=1.0)
    done = list(engine.stream(PROMPT, max_tokens=tokens, temperature=0.0))[-1]
    engine.close()
    return done.decode_tps


async def in_app(model: str, tokens: int, inference_process: bool = True) -> float:
    data = tempfile.mkdtemp(prefix="moe-bench-app-")
    os.environ["MOE_CONFIG"] = os.path.join(data, "config.toml")
    app = MoeApp(EngineSpec(model=model, capacity=1.0),
                 Settings(data_dir=data, refresh_hz=2.0, max_tokens=tokens, temperature=0.0,
                          inference_process=inference_process))
    async with app.run_test(size=(120, 40)) as pilot:
        while app.last_snapshot is None:
            await pilot.pause(0.05)
        app.query_one(PromptInput).text = PROMPT[0]["content"]
        await pilot.press("enter")
        while not app.last_done:
            await pilot.pause(0.05)
        return app.last_done.decode_tps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(DEMO_MODEL))
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--thread", action="store_true", help="also run the app with an in-process inference thread")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"headless": [], "app": []}
    if args.thread:
        runs["app_thread"] = []
    measure = {
        "headless": lambda: headless(args.model, args.tokens),
        "app": lambda: asyncio.run(in_app(args.model, args.tokens)),
        "app_thread": lambda: asyncio.run(in_app(args.model, args.tokens, inference_process=False)),
    }
    order = list(runs)
    rng = random.Random(0)
    for _ in range(args.repeats):  # interleaved in a shuffled order, so all see the same machine noise
        rng.shuffle(order)
        for name in order:
            runs[name].append(measure[name]())
    report: dict = {"model": args.model, "tokens": args.tokens, "runs": runs,
                    "headless_decode_tps": statistics.median(runs["headless"])}
    for name in [k for k in runs if k != "headless"]:
        report[f"{name}_decode_tps"] = statistics.median(runs[name])
        report[f"{name}_vs_headless"] = report[f"{name}_decode_tps"] / report["headless_decode_tps"]
        report[f"{name}_vs_headless_per_round"] = statistics.median(
            a / h for a, h in zip(runs[name], runs["headless"], strict=True))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
