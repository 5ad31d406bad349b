"""Keypress-to-screen latency in a real terminal (tmux) while a reply streams. Prints JSON.

    python scripts/keypress_latency.py [MODEL] [--keys 100]

Starts `moe` in a tmux session, sends a prompt, then while the reply streams types one character at
a time with `tmux send-keys` and polls `tmux capture-pane` until it shows on screen. The poll itself
takes a few milliseconds, so the numbers are an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def prompt_area(session: str) -> str:
    """The prompt box only (bottom rows, chat column): the streaming reply above it may contain the
    marker letters too, and scrolls them away a page at a time."""
    rows = tmux("capture-pane", "-t", session, "-p").splitlines()
    return "".join(row[:70] for row in rows[-6:-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="")
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--moe", default=str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "moe"))
    parser.add_argument("--thread", action="store_true", help="inference thread in the UI's process")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="moe-latency-")
    session = f"moe-latency-{os.getpid()}"
    # A long reply so the typing happens while tokens stream.
    Path(tmp, "config.toml").write_text("max_tokens = 2000\ntemperature = 0.8\n"
                                        f"inference_process = {'false' if args.thread else 'true'}\n")
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40",
         f"MOE_CONFIG={tmp}/config.toml {args.moe} chat {args.model} --data-dir {tmp}/data")
    try:
        deadline = time.monotonic() + 120
        while "experts per layer" not in tmux("capture-pane", "-t", session, "-p"):
            if time.monotonic() > deadline:
                raise SystemExit("the app did not start")
            time.sleep(0.2)
        tmux("send-keys", "-t", session, "Write a long Python module with many functions", "Enter")
        time.sleep(1.0)
        latencies = []
        for i in range(args.keys):
            marker = "q" if i % 2 else "z"
            before = prompt_area(session).count(marker)
            started = time.perf_counter()
            tmux("send-keys", "-t", session, "-l", marker)
            while prompt_area(session).count(marker) <= before:
                if time.perf_counter() - started > 2:
                    break
            latencies.append(time.perf_counter() - started)
            time.sleep(0.03)
        screen = tmux("capture-pane", "-t", session, "-p")
        still_streaming = "tokens" in screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    lat = sorted(latencies)
    print(json.dumps({
        "keys": len(lat), "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[int(len(lat) * 0.99) - 1],
        "max_ms": 1000 * lat[-1], "stats_panel_visible": still_streaming,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
