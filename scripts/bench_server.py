"""Server overhead, side by side in one run (prints JSON): decode tok/s and time to first token of the
in-process engine vs the same engine behind `moe serve`'s streaming OpenAI API (real openai client).

    python scripts/bench_server.py [MODEL] [--tokens 200] [--repeats 3]

The server runs as its own process (`moe serve`), as it does for real clients; the in-process engine runs
in this process. The two sides alternate, so they share the machine's noise. Both are timed the same
way: TTFT from the call to the first content token, decode tok/s as generated tokens (the engine's count,
or the API's usage) over the time after that first token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import openai
from moe_tui.inference.demo_paths import DEMO_MODEL
from moe_tui.inference.telemetry import GenerationDone, TokenDelta

MESSAGES = [{"role": "user", "content": "Write a Python function `merge(a, b)`: Merge two sorted lists."}]


def in_process(engine, tokens: int) -> dict:
    started = time.perf_counter()
    first = done = None
    for event in engine.stream(MESSAGES, max_tokens=tokens, temperature=0.0):
        if isinstance(event, TokenDelta) and event.text:
            first = first or time.perf_counter()
        elif isinstance(event, GenerationDone):
            done = event
    ended = time.perf_counter()
    n = done.generated_tokens
    return {"ttft_s": first - started, "decode_tps": (n - 1) / (ended - first), "tokens": n}


def through_api(client: openai.OpenAI, tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    n = 0
    for chunk in client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
        if chunk.usage:
            n = chunk.usage.completion_tokens
    ended = time.perf_counter()
    return {"ttft_s": first - started, "decode_tps": (n - 1) / (ended - first), "tokens": n}


def main() -> int:
    import os
    import socket
    import subprocess
    import sys

    import httpx
    from moe_tui.inference import Engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(DEMO_MODEL))
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moe_tui.app.cli", "serve", args.model, "--port", str(port),
                               "--capacity", "1.0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("moe serve did not start")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        engine = Engine.load(args.model, capacity=1.0)
        in_process(engine, 8)  # warm both sides: experts loaded, kernels compiled
        through_api(client, 8)
        runs = {"in_process": [], "api": []}
        for _ in range(args.repeats):
            runs["in_process"].append(in_process(engine, args.tokens))
            runs["api"].append(through_api(client, args.tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    report = {
        "model": args.model, "tokens": args.tokens, "repeats": args.repeats, "runs": runs,
        "in_process_decode_tps": median("in_process", "decode_tps"), "api_decode_tps": median("api", "decode_tps"),
        "in_process_ttft_ms": 1000 * median("in_process", "ttft_s"), "api_ttft_ms": 1000 * median("api", "ttft_s"),
    }
    report["api_vs_in_process"] = report["api_decode_tps"] / report["in_process_decode_tps"]
    report["ttft_overhead_ms"] = report["api_ttft_ms"] - report["in_process_ttft_ms"]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
