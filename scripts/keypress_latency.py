"""Keypress-to-screen latency in a real terminal (tmux) while a reply streams. Prints JSON.

    python scripts/keypress_latency.py [MODEL] [--keys 100] [--thread] [--history 400] [--pause 2]

Starts `moe` in a tmux session and attaches to it as a tmux control-mode client, which receives
everything the app writes to its terminal as `%output` notifications, as tmux gets it. Each key is a
character that appears nowhere else on screen, typed with `send-keys` through the same client; its
latency is the time until the app's output contains that character: key in, screen update out.
Nothing polls, so the measurement adds almost no CPU load of its own.

Only keys typed while a reply streams count: the script reads the app's chat database to see whether
the newest reply is still partial. Keys that overlapped a reply's end (and its one full Markdown
render) are reported apart. The demo model's replies are short, so the script sends the next prompt
whenever one ends.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

PROMPTS = ["Write a long Python module with many functions",
           "Write a Python class `Table` with methods to add, remove, sort and print rows.",
           "Write a Python module that parses command-line options and reads a config file."]
# Characters the demo model does not write and the screen does not show otherwise, one per key.
MARKERS = "абвгдежзийклмнопрстуфхцчшщэюя"
HISTORY_REPLY = "Here is one way:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nIt adds `a` and `b`.\n"
OCTAL = re.compile(rb"\\([0-7]{3})")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


class ControlClient:
    """A `tmux -C` client: sends commands, and timestamps the pane output it is notified of."""

    def __init__(self, session: str) -> None:
        self.proc = subprocess.Popen(["tmux", "-C", "attach-session", "-t", session],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.output: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.command("refresh-client -C 120x40")

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(b"%output "):
                data = OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), line.split(b" ", 2)[2].rstrip(b"\n"))
                self.output.put((time.perf_counter(), data.decode("utf-8", "replace")))

    def command(self, text: str) -> None:
        self.proc.stdin.write(text.encode() + b"\n")

    def drain(self) -> None:
        while not self.output.empty():
            self.output.get_nowait()

    def wait_for(self, text: str, timeout: float) -> float | None:
        """The time the pane's output first contains `text`, or None."""
        deadline = time.perf_counter() + timeout
        while (left := deadline - time.perf_counter()) > 0:
            try:
                at, data = self.output.get(timeout=left)
            except queue.Empty:
                return None
            if text in data:
                return at
        return None

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=5)


def newest_reply(db_path: str) -> tuple[int, str]:
    """The id and status ('partial' while it streams) of the newest reply in the app's store."""
    try:
        with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT id, status FROM messages WHERE role='assistant' "
                             "ORDER BY id DESC LIMIT 1").fetchone()
    except sqlite3.Error:  # not created yet, or busy for a moment
        return 0, ""
    return row or (0, "")


def clear_prompt(client: ControlClient, session: str) -> None:
    """Empty the prompt box (Ctrl+U), and wait until no marker is left on screen."""
    client.command(f"send-keys -t {session} C-u")
    deadline = time.monotonic() + 5
    while any(m in tmux("capture-pane", "-t", session, "-p") for m in MARKERS):
        if time.monotonic() > deadline:
            raise SystemExit("could not clear the prompt:\n" + tmux("capture-pane", "-t", session, "-p"))
        time.sleep(0.05)


def send_prompt(client: ControlClient, session: str, db_path: str, text: str) -> None:
    """Clear the prompt box, send `text`, and wait until its reply is in the store."""
    last = newest_reply(db_path)[0]
    clear_prompt(client, session)
    client.command(f"send-keys -t {session} -l '{text}'")
    client.command(f"send-keys -t {session} Enter")
    deadline = time.monotonic() + 30
    while newest_reply(db_path)[0] == last:
        if time.monotonic() > deadline:
            raise SystemExit("no reply started:\n" + tmux("capture-pane", "-t", session, "-p"))
        time.sleep(0.02)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(1000 * values[min(len(values) - 1, max(0, int(len(values) * q) - 1))], 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="")
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--moe", default=str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "moe"))
    parser.add_argument("--thread", action="store_true", help="inference thread in the UI's process")
    parser.add_argument("--history", type=int, default=0, help="messages already in the chat (a long session)")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds between a reply's end and the next prompt (a person reading)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="moe-latency-")
    session = f"moe-latency-{os.getpid()}"
    Path(tmp, "config.toml").write_text("max_tokens = 2000\ntemperature = 0.8\n"
                                        f"inference_process = {'false' if args.thread else 'true'}\n")
    db_path = f"{tmp}/data/chats.sqlite3"
    if args.history:
        from moe_tui.app.store import ChatStore

        store = ChatStore(Path(db_path))
        chat = store.create_chat()
        for i in range(args.history):
            role, text = ("user", PROMPTS[0]) if i % 2 == 0 else ("assistant", HISTORY_REPLY)
            store.add_message(chat.id, role, text)
        store.close()
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40",
         f"MOE_CONFIG={tmp}/config.toml {args.moe} chat {args.model} --data-dir {tmp}/data")
    latencies: list[float] = []
    at_reply_end: list[float | None] = []
    missed = replies = typed = 0
    reply_started = 0.0
    slowest: list[tuple[float, float]] = []  # (latency, seconds since the prompt was sent)
    client = None
    try:
        deadline = time.monotonic() + 120
        while "experts per layer" not in tmux("capture-pane", "-t", session, "-p"):
            if time.monotonic() > deadline:
                raise SystemExit("the app did not start")
            time.sleep(0.2)
        client = ControlClient(session)
        while len(latencies) < args.keys:
            if newest_reply(db_path)[1] != "partial":  # no reply streaming: start the next one
                time.sleep(args.pause)
                send_prompt(client, session, db_path, PROMPTS[replies % len(PROMPTS)])
                replies += 1
                typed = 0
                reply_started = time.perf_counter()
                time.sleep(0.3)
                continue
            if typed == len(MARKERS):  # every marker is in the prompt box: clear it
                clear_prompt(client, session)
                typed = 0
            marker = MARKERS[typed]
            typed += 1
            client.drain()
            started = time.perf_counter()
            client.command(f"send-keys -t {session} -l {marker}")
            shown = client.wait_for(marker, timeout=2.0)
            latency = None if shown is None else shown - started
            if newest_reply(db_path)[1] != "partial":
                at_reply_end.append(latency)
            elif latency is None:
                missed += 1
            else:
                latencies.append(latency)
                slowest = sorted([*slowest, (latency, started - reply_started)], reverse=True)[:5]
            time.sleep(0.03)
    finally:
        if client is not None:
            client.close()
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)  # the app's config and chat database
    print(json.dumps({
        "keys_while_streaming": len(latencies), "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99), "max_ms": percentile(latencies, 1.0),
        "not_shown_within_2s": missed, "replies": replies,
        "slowest_ms_and_s_after_prompt": [[round(1000 * lat, 1), round(t, 2)] for lat, t in slowest],
        "keys_at_reply_end_ms": [None if x is None else round(1000 * x, 1) for x in at_reply_end],
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
