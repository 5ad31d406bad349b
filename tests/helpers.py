"""Helpers for app tests: waiting on the app's own messages, sending a prompt, reading replies back."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from moe_tui.app.backend import estimated_tokens
from moe_tui.app.messages import EngineInfo, EngineReady, MissCurveReady, SnapshotReady
from moe_tui.app.textual_compat import notification_texts
from moe_tui.app.widgets.chat import PromptInput, StreamingReply
from moe_tui.app.widgets.confirm import ConfirmScreen
from moe_tui.app.worker import LOCAL
from moe_tui.inference.telemetry import CacheSnapshot, IOStats, MemorySample
from textual.command import Command, CommandInput, CommandList, CommandPalette

RECHECK = 0.5  # seconds: a condition changed by another thread (the store, a worker) is re-read this often


class MessageWatch:
    """A Textual message hook that wakes whoever waits on the app: conditions are re-checked when the app
    handles a message, not on a polling timer."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()

    def __call__(self, message) -> None:
        self.arrived.set()


def watched(app):
    """`app`, whose run_test() reports every message it handles to `app.message_watch`."""
    app.message_watch = MessageWatch()
    run_test = app.run_test
    app.run_test = lambda *args, **kwargs: run_test(*args, message_hook=app.message_watch, **kwargs)
    return app


async def wait_until(pilot, predicate, timeout: float = 30.0) -> None:
    watch = getattr(pilot.app, "message_watch", None)
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("condition not met in time")
        if watch is None:
            await pilot.pause(0.05)
            continue
        watch.arrived.clear()
        try:
            await asyncio.wait_for(watch.arrived.wait(), min(remaining, RECHECK))
        except TimeoutError:
            pass
        await pilot.pause()  # the message that woke us is handled before the condition is read again


async def send(pilot, app, text: str) -> None:
    app.query_one(PromptInput).text = text
    app.query_one(PromptInput).focus()
    await pilot.press("enter")


def replies(app):
    return [m for m in app.store.messages(app.chat_id) if m.role == "assistant"]


def reply_shown(app) -> bool:
    """The reply has ended and its Markdown (rendered on a thread) has replaced the streaming text."""
    return not app.generating and not app.query(StreamingReply)




def dialog_open(app) -> bool:
    """A yes/no question is on screen, mounted and armed (past the moment it ignores keys typed ahead), so its
    y/n keys answer it."""
    return isinstance(app.screen, ConfirmScreen) and app.screen.is_mounted and app.screen.armed


def dialog_closed(app) -> bool:
    return not isinstance(app.screen, ConfirmScreen)


def palette_open(app) -> bool:
    """The command palette is on screen with its input focused: keys typed now go into its search."""
    return isinstance(app.screen, CommandPalette) and isinstance(app.focused, CommandInput)


def palette_offers(app, title: str) -> bool:
    """The palette's highlighted entry, the one Enter picks, is `title`. Its results come from a worker, a
    search per keystroke (each cancelling the last), so until the search for the whole text typed is back
    the list may be empty or still show an earlier search's entries."""
    if not isinstance(app.screen, CommandPalette):
        return False
    results = app.screen.query_one(CommandList)
    option = results.highlighted_option
    return results.option_count > 0 and isinstance(option, Command) and option.hit.text == title


def notified(app, text: str) -> bool:
    """A toast containing `text` is showing."""
    return any(text in shown for shown in notification_texts(app))


def finished(message) -> bool:
    """A stored reply that ended on its own: complete, or cut at its length limit."""
    return message.status in ("complete", "truncated")


LAYERS, EXPERTS = 6, 48


def fixed_snapshot() -> CacheSnapshot:
    rng = np.random.default_rng(7)
    recent = rng.gamma(0.6, 4.0, size=(LAYERS, EXPERTS))
    resident = np.zeros((LAYERS, EXPERTS), bool)
    for i in range(LAYERS):
        resident[i, np.argsort(-recent[i])[:16]] = True
    pinned = np.zeros_like(resident)
    pinned[:, 3] = True
    resident[:, 3] = True
    missed = np.zeros_like(resident)
    missed[[0, 2, 5], [7, 11, 40]] = True
    hits = (recent * 3).astype(int) * resident
    misses = (recent * 1).astype(int) * ~resident
    return CacheSnapshot.build(
        model="demo", mode="exact", policy="lru", capacity=16, num_experts=EXPERTS, top_k=2,
        layer_ids=tuple(range(LAYERS)), resident=resident, pinned=pinned, just_missed=missed,
        requests=hits + misses, hits=hits, misses=misses, fallbacks=np.zeros_like(hits), loads=misses,
        evictions=misses, recent=recent, bytes_read=48 << 20, load_seconds=0.25,
        memory=MemorySample(rss_bytes=900 << 20, mlx_active_bytes=300 << 20, mlx_peak_bytes=420 << 20,
                            mlx_cache_bytes=12 << 20, expert_cache_bytes=200 << 20,
                            expert_cache_budget_bytes=800 << 20, system_used_bytes=6 << 30,
                            system_available_bytes=10 << 30),
        decode_tps=42.5, prefill_tps=310.0, ttft_s=0.12, tokens_generated=256, steps=300, trace_length=300,
        io=IOStats(decode_steps=256, decode_stall_seconds=1.28, decode_bytes=40 << 20, read_seconds=0.3,
                   prefetches=120, prefetch_hits=90, prefetch_wasted=24, prefetch_bytes=12 << 20,
                   demand_hits=int(hits.sum()) - 90, guesses=(20,) * LAYERS, guess_hits=(15, 14, 16, 12, 15, 18),
                   guess_needed=(24,) * LAYERS, prefetch=True))


def fixed_miss_curve() -> MissCurveReady:
    """Hit rate against capacity, made up but shaped like one (Belady above every policy)."""
    capacities = tuple(range(1, EXPERTS + 1))

    def curve(scale: float) -> tuple[float, ...]:
        return tuple(round(1 - float(np.exp(-c / scale)), 4) for c in capacities)

    return MissCurveReady(capacities, {"lru": curve(12.0), "lfu": curve(11.0), "decay": curve(10.5),
                                       "belady": curve(7.0)}, 300)


class FakeWorker:
    """A Backend that posts one fixed engine state and ignores requests."""

    capabilities = LOCAL

    def __init__(self, app) -> None:
        self.app = app

    def start(self) -> None:
        self.app.post_message(EngineReady(EngineInfo("demo", "qwen3_moe", 6, tuple(range(LAYERS)), EXPERTS, 2,
                                                     1 << 20, 10 << 20, 2048)))
        self.app.post_message(SnapshotReady(fixed_snapshot(), {"lru": 0.61, "lfu": 0.63, "decay": 0.64,
                                                               "belady": 0.78}))

    def submit(self, request) -> None:
        pass

    def configure(self, request) -> None:
        pass

    def miss_curve(self, request) -> None:
        self.app.post_message(fixed_miss_curve())

    def count_tokens(self, text: str):
        return estimated_tokens(text)

    def cancel(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def join(self, timeout=None) -> None:
        pass


def screen_rows(app) -> list[str]:
    """The screen as the terminal would show it, one string per row (toasts and modals included)."""
    return [strip.text for strip in app.screen._compositor.render_strips()]
