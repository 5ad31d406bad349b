"""Helpers for app tests: waiting on the app's own messages, sending a prompt, reading replies back."""

from __future__ import annotations

import asyncio
import time

from moe_tui.app.textual_compat import notification_texts
from moe_tui.app.widgets.chat import PromptInput, StreamingReply
from moe_tui.app.widgets.confirm import ConfirmScreen
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
    """A yes/no question is on screen and mounted, so its y/n keys reach it."""
    return isinstance(app.screen, ConfirmScreen) and app.screen.is_mounted


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
