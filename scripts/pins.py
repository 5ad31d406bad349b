"""Does pinning a profile's universal experts help? Realized hit rates with and without. Prints JSON.

    python scripts/pins.py [MODEL] [--profile profiles/demo.json] [--capacity 0.5] [--tokens 150]

Runs the same prompts (not the ones the profile was made from) through the engine at one capacity,
once per setting: no profile (a cold cache), the profile's warm start without pins (what `moe` does
on the demo), and warmed and pinned (`--pin`). Greedy decoding, so all see the same tokens. Reports
each setting's hit rate over all MoE layers, and Belady's optimum on the same trace.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_tui.inference import Engine
from moe_tui.inference.demo_paths import DEMO_MODEL

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a Python function `is_palindrome(s)`: Return True if the string reads the same backwards.",
    "Write a Python function `flatten(items)`: Flatten a list of lists into one list.",
    "Write a Python function `read_json(path)`: Read a JSON file and return the parsed object.",
    "What does the `with` statement do in Python?",
    "Write a Python method `push(self, item)` of class `Stack`: Push an item onto the stack.",
    "Write a Python class `LRUCache` with get and put methods.",
    "Explain the difference between a list and a tuple.",
    "Write a Python function `chunks(seq, n)`: Yield successive n-sized chunks of seq.",
]


def run(model: str, capacity: float, profile: dict | None, tokens: int) -> dict:
    engine = Engine.load(model, capacity=capacity, profile=profile)
    pinned = int(engine.snapshot().pinned.sum())
    engine.reset_stats()
    for prompt in PROMPTS:
        for _ in engine.stream([{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0.0):
            pass
    snap = engine.snapshot()
    optimum = engine.hit_rates_vs_optimum()
    engine.close()
    return {"pinned_experts": pinned, "hit_rate": float(snap.hits.sum() / max(1, snap.requests.sum())),
            "requests": int(snap.requests.sum()), "belady": optimum.get("belady", optimum)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(DEMO_MODEL))
    parser.add_argument("--profile", type=Path, default=ROOT / "profiles" / "demo.json")
    parser.add_argument("--capacity", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=150)
    args = parser.parse_args()
    profile = json.loads(args.profile.read_text())
    unpinned = {**profile, "universal": [[] for _ in profile["universal"]]}  # warm start, nothing pinned
    report = {"model": args.model, "capacity": args.capacity, "prompts": len(PROMPTS), "tokens": args.tokens,
              "cold": run(args.model, args.capacity, None, args.tokens),
              "warm": run(args.model, args.capacity, unpinned, args.tokens),
              "warm_and_pinned": run(args.model, args.capacity, profile, args.tokens)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
