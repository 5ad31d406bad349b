"""Helpers for app tests: waiting on the app's own messages, sending a prompt, reading replies back."""

from __future__ import annotations

import asyncio
import time

from moe_tui.app.widgets.chat import PromptInput, StreamingReply

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


