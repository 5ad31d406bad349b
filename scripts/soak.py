"""Soak `moe serve`: many varied chat turns through the openai SDK, watching the server's memory for growth.

    python scripts/soak.py [--turns 300] [--every 25] [--tolerance 0.10] [--model PATH] [--capacity 50%]

The server runs as its own process (`moe serve`, the demo model by default, at half its experts). Each turn is
one chat request carrying the conversation so far (a new conversation every few turns): streaming and not in
turn, some with stop strings, some streams closed by the client after a few chunks (the server must cancel
them). Every `--every` turns the server's RSS (psutil), open descriptors and threads, and from /v1/stats its
MLX active and cache memory and the trace length are sampled. A table goes to stderr, JSON to stdout.

Exit status 1 when the RSS at the end exceeds the RSS at the first quarter's sample by more than the tolerance
(the warm-up before it, while caches and kernels fill, is not counted), when a request fails, or when the server
is not healthy at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import psutil
from moe_tui.inference.demo_paths import DEMO_MODEL

SYSTEM = "You are a concise Python assistant."
PROMPTS = [
    "Write a Python function `merge(a, b)` that merges two sorted lists.",
    "Now make it work on iterators.",
    "Add type hints and a docstring.",
    "Write a pytest test for it.",
    "def fib(n):",
    "Explain what a generator is, in two sentences.",
    "class Stack:\n    def __init__(self):",
    "Refactor this: for i in range(len(xs)): print(xs[i])",
    "What does `functools.lru_cache` do?",
    "import os\nfor root, dirs, files in os.walk('.'):",
]
STOPS = [["\n\n"], ["return"], ["def ", "class "], [")"]]
TURNS_PER_CONVERSATION = 6  # then a new one: the history stays well inside the demo's 2,048-token context
CANCEL_AFTER_CHUNKS = 3
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, capacity: str, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moe_tui.app.cli", "serve", model, "--port", str(port),
                               "--capacity", capacity], stdout=log, stderr=log, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).json().get("status") == "ok":
                return server, url
        except (httpx.TransportError, ValueError):
            time.sleep(0.2)
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            log.seek(0)
            raise SystemExit(f"moe serve did not start:\n{log.read().decode(errors='replace')[-2000:]}")


def sample(turn: int, process: psutil.Process, url: str, started: float, outcomes: dict) -> dict:
    stats = httpx.get(f"{url}/v1/stats", timeout=10).json()
    memory = stats["memory"]
    return {"turn": turn, "elapsed_s": round(time.monotonic() - started, 1),
            "rss_mib": round(process.memory_info().rss / MIB, 1),
            "mlx_active_mib": round(memory["mlx_active_bytes"] / MIB, 1),
            "mlx_cache_mib": round(memory["mlx_cache_bytes"] / MIB, 1),
            "mlx_peak_mib": round(memory["mlx_peak_bytes"] / MIB, 1),
            "trace_length": stats["trace_length"], "fds": process.num_fds(), "threads": process.num_threads(),
            **outcomes}


def turn(client: openai.OpenAI, rng: random.Random, index: int, messages: list[dict], max_tokens: int) -> tuple:
    """One request; returns (outcome, reply text or None when the reply is not to be kept)."""
    stream = index % 2 == 1
    extra = {"stop": rng.choice(STOPS)} if index % 3 == 0 else {}
    temperature = rng.choice([0.0, 0.7, 1.0])
    if not stream:
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                               temperature=temperature, **extra)
        return ("with_stop" if extra else "whole"), reply.choices[0].message.content or ""
    chunks = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                            temperature=temperature, stream=True, **extra)
    cancel = index % 5 == 0
    text = ""
    for n, chunk in enumerate(chunks, 1):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if cancel and n >= CANCEL_AFTER_CHUNKS:
            chunks.close()  # the client leaves mid-reply: the server must notice and stop generating
            return "cancelled", None
    return ("with_stop" if extra else "streamed"), text


def table(samples: list[dict]) -> str:
    columns = ["turn", "elapsed_s", "rss_mib", "mlx_active_mib", "mlx_cache_mib", "mlx_peak_mib", "trace_length",
               "fds", "threads"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(str(s[c]) for c in columns) + " |" for s in samples]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--capacity", default="50%")
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--every", type=int, default=25, help="sample every N turns")
    parser.add_argument("--tolerance", type=float, default=0.10, help="RSS growth allowed after the first quarter")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    outcomes = {"whole": 0, "streamed": 0, "with_stop": 0, "cancelled": 0, "failed": 0}
    failures: list[str] = []
    samples: list[dict] = []
    with tempfile.TemporaryFile() as log:
        server, url = start_server(args.model, args.capacity, log)
        try:
            process = psutil.Process(server.pid)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            started = time.monotonic()
            samples.append(sample(0, process, url, started, outcomes))
            messages: list[dict] = []
            for index in range(1, args.turns + 1):
                if index % TURNS_PER_CONVERSATION == 1:
                    messages = [{"role": "system", "content": SYSTEM}]
                messages.append({"role": "user", "content": rng.choice(PROMPTS)})
                try:
                    outcome, reply = turn(client, rng, index, messages, args.max_tokens)
                except openai.OpenAIError as exc:
                    outcome, reply = "failed", None
                    failures.append(f"turn {index}: {type(exc).__name__}: {str(exc)[:200]}")
                outcomes[outcome] += 1
                if reply is None:
                    messages.pop()  # a cancelled or failed turn leaves no exchange in the history
                else:
                    messages.append({"role": "assistant", "content": reply})
                if index % args.every == 0 or index == args.turns:
                    samples.append(sample(index, process, url, started, outcomes))
            healthy = httpx.get(f"{url}/health", timeout=10).json().get("status") == "ok"
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    baseline = next(s for s in samples if s["turn"] >= args.turns / 4)
    end = samples[-1]
    growth = end["rss_mib"] / baseline["rss_mib"] - 1
    passed = growth <= args.tolerance and not failures and healthy
    print(table(samples), file=sys.stderr)
    print(f"RSS {baseline['rss_mib']} MiB at turn {baseline['turn']} -> {end['rss_mib']} MiB at turn {end['turn']}: "
          f"{growth:+.1%} (tolerance {args.tolerance:.0%}); outcomes {outcomes}; healthy at the end: {healthy}",
          file=sys.stderr)
    for failure in failures[:10]:
        print(failure, file=sys.stderr)
    print(json.dumps({"model": args.model, "capacity": args.capacity, "turns": args.turns, "seed": args.seed,
                      "max_tokens": args.max_tokens, "tolerance": args.tolerance, "rss_growth": round(growth, 4),
                      "baseline_turn": baseline["turn"], "outcomes": outcomes, "failures": failures,
                      "healthy": healthy, "passed": passed, "samples": samples}, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
