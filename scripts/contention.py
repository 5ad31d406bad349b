"""How much other CPU work slows decoding on this machine, by where it runs. Prints JSON.

    python scripts/contention.py [MODEL] [--tokens 500] [--rounds 6]

Decode tok/s of one engine (in this process's main thread), alone and while:
  thread   - a Python loop busy 12 ms of every 100 runs in a thread of this process (shares the GIL),
  process  - the same loop runs in another process,
  ui       - the app's UI streams a scripted reply (scripts/ui_cost.py) in another process.
Rounds are interleaved in a shuffled order; reported per load: the median of per-round ratios to alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from moe_tui.inference import Engine
from moe_tui.inference.demo_paths import DEMO_MODEL

PROMPT = [{"role": "user", "content": "Write a Python function `merge(a, b)`: Merge two sorted lists."}]


def busy(stop, busy_s: float = 0.012, period_s: float = 0.1) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < busy_s:
            sum(i * i for i in range(200))
        time.sleep(period_s - busy_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(DEMO_MODEL))
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    engine = Engine.load(args.model, capacity=1.0)

    def decode() -> float:
        return list(engine.stream(PROMPT, max_tokens=args.tokens, temperature=0.0))[-1].decode_tps

    def under_thread() -> float:
        stop = threading.Event()
        worker = threading.Thread(target=busy, args=(stop,))
        worker.start()
        try:
            return decode()
        finally:
            stop.set()
            worker.join()

    def under_process() -> float:
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        worker = ctx.Process(target=busy, args=(stop,))
        worker.start()
        time.sleep(0.5)
        try:
            return decode()
        finally:
            stop.set()
            worker.join()

    def under_ui() -> float:
        script = Path(__file__).with_name("ui_cost.py")
        ui = subprocess.Popen([sys.executable, str(script), "--seconds", "12", "--repeats", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3.0)  # started, and streaming
        try:
            return decode()
        finally:
            ui.wait()

    loads = {"alone": decode, "thread": under_thread, "process": under_process, "ui": under_ui}
    decode()  # warm up
    runs: dict[str, list[float]] = {name: [] for name in loads}
    order, rng = list(loads), random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            runs[name].append(loads[name]())
    report = {"tokens": args.tokens, "runs": runs}
    for name in loads:
        report[f"{name}_vs_alone"] = statistics.median(r / a for r, a in zip(runs[name], runs["alone"], strict=True))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
