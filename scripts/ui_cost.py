"""CPU the UI thread spends per second while a reply streams, with no inference running: a scripted
worker posts text chunks at the real worker's rate and cache snapshots at the stats rate, from its own
thread, exactly as the inference thread does. On a 2-core machine every UI millisecond is taken from
generation (the GIL), so this is the number to drive down; it is steadier than the tok/s ratio.

    python scripts/ui_cost.py [--seconds 6] [--size 120x40] [--profile out.pstats]

`--message` measures instead the UI CPU of showing one finished reply (a paragraph, a code block, a
list): from mounting its view until the screen is idle again, what each reply's end and each sent
message cost, in a chat that already shows a few messages.

    python scripts/ui_cost.py --message [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time

import numpy as np
from moe_tui.app.backend import estimated_tokens
from moe_tui.app.main import MoeApp
from moe_tui.app.messages import EngineInfo, EngineReady, ReplyChunk, ReplyDone, SnapshotReady
from moe_tui.app.settings import Settings
from moe_tui.app.widgets.chat import MessageView, PromptInput
from moe_tui.app.worker import CHUNK_INTERVAL, LOCAL, EngineSpec
from moe_tui.inference.events import Generate
from moe_tui.inference.telemetry import CacheSnapshot, MemorySample

LAYERS, EXPERTS, TOKENS_PER_SECOND = 4, 16, 150
CODE = "def merge(a, b):\n    out = []\n    while a and b:\n        out.append((a if a[0] < b[0] else b).pop(0))\n"


def snapshot(step: int) -> CacheSnapshot:
    rng = np.random.default_rng(step)
    recent = rng.gamma(0.6, 4.0, size=(LAYERS, EXPERTS))
    resident = recent > np.median(recent, axis=1, keepdims=True)
    requests = rng.integers(0, 50, size=(LAYERS, EXPERTS))
    hits = requests * resident
    zeros = np.zeros_like(hits)
    return CacheSnapshot.build(
        model="demo", mode="exact", policy="lru", capacity=8, num_experts=EXPERTS, top_k=2,
        layer_ids=tuple(range(LAYERS)), resident=resident, pinned=np.zeros_like(resident),
        just_missed=np.zeros_like(resident), requests=requests, hits=hits, misses=requests - hits,
        fallbacks=zeros, loads=requests - hits, evictions=zeros, recent=recent, bytes_read=step << 16,
        load_seconds=0.01 * step, memory=MemorySample(900 << 20, 300 << 20, 420 << 20, 12 << 20, 8 << 20,
                                                      16 << 20, 6 << 30, 10 << 30),
        decode_tps=150.0 + step % 7, prefill_tps=900.0, ttft_s=0.02, tokens_generated=step, steps=step,
        trace_length=step)


class ScriptedWorker:
    """A Backend posting what the inference session would post during a reply, at the same rates."""

    capabilities = LOCAL

    def __init__(self, app, seconds: float, stats_interval: float) -> None:
        self.app, self.seconds, self.stats_interval = app, seconds, stats_interval
        self.engine = None
        self.streaming = threading.Event()  # set while chunks flow (the final Markdown render is excluded)

    def start(self) -> None:
        self.app.post_message(EngineReady(EngineInfo("demo", "qwen3_moe", LAYERS, tuple(range(LAYERS)), EXPERTS,
                                                     2, 1 << 20, 10 << 20, 2048)))
        self.app.post_message(SnapshotReady(snapshot(0), None))

    def submit(self, request) -> None:
        if isinstance(request, Generate):
            threading.Thread(target=self._reply, args=(request.tag,), daemon=True).start()

    def configure(self, request) -> None:
        pass

    def count_tokens(self, text: str):
        return estimated_tokens(text)

    def _reply(self, tag) -> None:
        self.streaming.set()
        start = last_stats = time.monotonic()
        text, step = "", 0
        while time.monotonic() - start < self.seconds:
            time.sleep(CHUNK_INTERVAL)
            step += int(TOKENS_PER_SECOND * CHUNK_INTERVAL)
            chunk = CODE[: 4 * int(TOKENS_PER_SECOND * CHUNK_INTERVAL)]
            text += chunk
            stats = None
            if time.monotonic() - last_stats >= self.stats_interval:  # as the worker does: with the text
                stats, last_stats = SnapshotReady(snapshot(step), None), time.monotonic()
            self.app.post_message(ReplyChunk(tag, chunk, stats))
        self.streaming.clear()
        time.sleep(0.2)
        self.app.post_message(ReplyDone(tag, text, None))

    def cancel(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def join(self, timeout=None) -> None:
        pass


def scripted_app(seconds: float, refresh_hz: float) -> tuple[MoeApp, list[ScriptedWorker]]:
    """The app in a fresh data dir, with a ScriptedWorker (in the list once the app has made it)."""
    data = tempfile.mkdtemp(prefix="moe-ui-cost-")
    os.environ["MOE_CONFIG"] = os.path.join(data, "config.toml")
    worker: list[ScriptedWorker] = []
    app = MoeApp(EngineSpec(model="demo"), Settings(data_dir=data, refresh_hz=refresh_hz),
                 worker_factory=lambda a: worker.append(ScriptedWorker(a, seconds, 1.0 / refresh_hz)) or worker[0])
    return app, worker


async def measure(seconds: float, size: tuple[int, int], refresh_hz: float, profile: str | None) -> dict:
    app, worker = scripted_app(seconds, refresh_hz)
    async with app.run_test(size=size) as pilot:
        while app.last_snapshot is None:
            await pilot.pause(0.05)
        app.query_one(PromptInput).text = "Write merge(a, b)"
        await pilot.press("enter")
        while not worker[0].streaming.is_set():
            await asyncio.sleep(0.001)
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile(time.thread_time)
            profiler.enable()
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        while worker[0].streaming.is_set():
            await asyncio.sleep(0.05)
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        while app.generating:
            await asyncio.sleep(0.05)
    return {"ui_cpu_s": cpu, "wall_s": wall, "ui_cpu_fraction": cpu / wall}


REPLY = (f"Here is a function that merges two sorted lists:\n\n```python\n{CODE * 3}    return out + a + b\n```\n\n"
         "It runs in **linear** time. Call it as `merge(a, b)`:\n\n- `a`, `b`: sorted lists\n- returns a new list\n")


async def measure_message(repeats: int, size: tuple[int, int]) -> list[float]:
    """UI-thread CPU milliseconds from mounting a reply's view until the screen has settled, per reply."""
    app, _ = scripted_app(0.0, Settings.refresh_hz)
    costs = []
    async with app.run_test(size=size) as pilot:
        while app.last_snapshot is None:
            await pilot.pause(0.05)
        await pilot.pause(0.5)
        for _ in range(repeats):
            cpu0 = time.thread_time()
            app.add_view(MessageView("assistant", REPLY))
            await pilot.pause()
            await pilot.pause(0.2)  # the screen's updates and anything they schedule
            costs.append((time.thread_time() - cpu0) * 1000)
    return costs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--size", default="120x40")
    parser.add_argument("--refresh-hz", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", help="write a cProfile (thread CPU time) of the last run here")
    parser.add_argument("--message", action="store_true", help="the cost of showing one finished reply")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.message:
        costs = sorted(asyncio.run(measure_message(max(args.repeats, 3), size)))
        print(f"UI thread CPU to show one finished reply ({args.size}, {len(costs)} replies): median "
              f"{costs[len(costs) // 2]:.1f} ms, min {costs[0]:.1f}, max {costs[-1]:.1f} (an idle screen's "
              f"updates for the 0.2 s waited included)")
        return 0
    runs = [asyncio.run(measure(args.seconds, size, args.refresh_hz,
                                args.profile if i == args.repeats - 1 else None)) for i in range(args.repeats)]
    fractions = sorted(r["ui_cpu_fraction"] for r in runs)
    print(f"UI thread CPU while streaming ({args.size}, text every {CHUNK_INTERVAL * 1000:.0f} ms, stats at "
          f"{args.refresh_hz:g} Hz): median {fractions[len(fractions) // 2]:.1%} of one core "
          f"(runs: {', '.join(f'{f:.1%}' for f in fractions)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
