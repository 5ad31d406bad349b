"""Decode tok/s of the headless engine vs the same engine inside the app (heatmap and gauges refreshing),
side by side in one run (prints JSON). Keypress latency is measured in a real terminal by
scripts/keypress_latency.py.

    python scripts/bench_app.py [MODEL] [--tokens 200] [--rounds 40] [--thread]

Both stay loaded for the whole run and take turns, one reply each per round (the order alternates), so
each pair of replies is seconds apart and shares the machine's noise; on a shared machine the same
engine's speed drifts over minutes (docs/performance.md). The headless engine is a plain process that only
loads the model and generates; while it runs, the app's UI loop is blocked (it spends nothing). The app
runs headless (Textual's test driver: layout, rendering and widget updates all happen; only the
terminal write is skipped), each round in a new chat with the same prompt. With --thread the app runs
its inference thread in the UI's process (inference_process = false) instead of in a child process.

Reported: the ratio of the medians, and the geometric mean of the per-round ratios with its 90%
confidence interval (normal approximation on the log ratios; use 30 rounds or more). On a noisy machine
whether a target is met is a question of that interval, not of one number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile

import numpy as np

PROMPT = [{"role": "user", "content": "Write a Python function `merge(a, b)`: Merge two sorted lists."}]


def serve_headless(model: str, tokens: int, conn) -> None:
    """The headless engine's process: one reply per request, its decode tok/s sent back."""
    from moe_tui.inference import Engine

    engine = Engine.load(model, capacity=1.0)
    conn.send("ready")
    while conn.recv():
        done = list(engine.stream(PROMPT, max_tokens=tokens, temperature=0.0))[-1]
        conn.send(done.decode_tps)
    engine.close()


async def app_reply(app, pilot) -> float:
    """One reply in a new chat; returns once the app's idle-time work after it (the optimum replay) is done,
    so that it does not run beside the next headless reply."""
    from moe_tui.app.widgets.chat import PromptInput

    before, optimum = app.last_done, app.last_optimum
    app.action_new_chat()
    app.query_one(PromptInput).text = PROMPT[0]["content"]
    await pilot.press("enter")
    while app.last_done is before:  # not pilot.pause(): it walks every widget and repaints the screen each call
        await asyncio.sleep(0.05)
    for _ in range(100):
        if app.last_optimum is not optimum:
            break
        await asyncio.sleep(0.05)
    return app.last_done.decode_tps


async def run(model: str, tokens: int, rounds: int, inference_process: bool) -> dict[str, list[float]]:
    from moe_tui.app.main import MoeApp
    from moe_tui.app.settings import Settings
    from moe_tui.app.worker import EngineSpec

    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    headless = ctx.Process(target=serve_headless, args=(model, tokens, child_conn), daemon=True)
    headless.start()
    assert conn.recv() == "ready"
    data = tempfile.mkdtemp(prefix="moe-bench-app-")
    os.environ["MOE_CONFIG"] = os.path.join(data, "config.toml")
    app = MoeApp(EngineSpec(model=model, capacity=1.0),
                 Settings(data_dir=data, refresh_hz=2.0, max_tokens=tokens, temperature=0.0,
                          inference_process=inference_process))
    runs: dict[str, list[float]] = {"headless": [], "app": []}
    async with app.run_test(size=(120, 40)) as pilot:
        while app.last_snapshot is None:
            await pilot.pause(0.05)
        await app_reply(app, pilot)  # warm-up for both: first-reply costs are not decode speed
        conn.send(True)
        conn.recv()
        for round_ in range(rounds):
            for name in ("headless", "app") if round_ % 2 == 0 else ("app", "headless"):
                if name == "headless":
                    conn.send(True)
                    runs[name].append(conn.recv())  # blocks the UI loop: the app spends nothing meanwhile
                else:
                    runs[name].append(await app_reply(app, pilot))
    conn.send(False)
    headless.join(10)
    return runs


def geometric_mean_interval(ratios: list[float], level: float = 0.9) -> tuple[float, list[float]]:
    """Geometric mean of paired ratios and its confidence interval (normal approximation on the logs)."""
    logs = np.log(np.asarray(ratios))
    half = statistics.NormalDist().inv_cdf(0.5 + level / 2) * logs.std(ddof=1) / np.sqrt(len(logs))
    mean = logs.mean()
    return float(np.exp(mean)), [round(float(np.exp(mean - half)), 4), round(float(np.exp(mean + half)), 4)]


def main() -> int:
    from moe_tui.inference.demo_paths import DEMO_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(DEMO_MODEL))
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--thread", action="store_true",
                        help="run the app's inference thread in the UI's process instead of a child process")
    args = parser.parse_args()
    runs = asyncio.run(run(args.model, args.tokens, args.rounds, inference_process=not args.thread))
    ratios = [a / h for a, h in zip(runs["app"], runs["headless"], strict=True)]
    report = {
        "model": args.model, "tokens": args.tokens, "rounds": args.rounds,
        "inference": "thread" if args.thread else "process", "runs": runs,
        "headless_decode_tps": statistics.median(runs["headless"]),
        "app_decode_tps": statistics.median(runs["app"]),
    }
    report["app_vs_headless"] = report["app_decode_tps"] / report["headless_decode_tps"]
    report["app_vs_headless_per_round"], report["app_vs_headless_per_round_90ci"] = geometric_mean_interval(ratios)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
