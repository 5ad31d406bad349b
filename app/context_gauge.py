"""The context gauge under the chat: tokens of the model's context window taken by the system prompt, the files
attached to the next message and the chat so far, and the room left for the reply; it warns when the next
message would make the session drop the oldest turns."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from moe_tui.inference.events import reply_reserve
from rich.text import Text
from textual.widgets import Static


@dataclass(frozen=True)
class ContextBudget:
    context: int
    """The model's context window in tokens (0: unknown, e.g. a server that does not say)."""
    system: int
    files: int
    """Files and command output attached to the next message."""
    history: int
    """The chat so far, as its chat template renders it (the system prompt left out)."""
    reply: int
    """The reply's budget (max_tokens)."""
    exact: bool = True
    """Counted with the model's tokenizer (else estimated)."""

    @property
    def used(self) -> int:
        return self.system + self.files + self.history

    @property
    def over(self) -> int:
        """Tokens beyond the window once the reply's reserve is added, as the session fits a chat (0 when it
        fits or is unknown)."""
        return max(0, self.used + reply_reserve(self.reply, self.context) - self.context) if self.context else 0

    @property
    def room(self) -> int:
        return max(0, self.context - self.used)


SEGMENTS = (("system", "magenta"), ("files", "cyan"), ("history", "blue"))
MIN_BAR = 6  # cells: below this the bar says nothing and the numbers get the row


def render(budget: ContextBudget | None, width: int, unicode: bool = True) -> Text:
    """One line: a bar of the window (system, files, chat, reply, free) and the numbers."""
    if budget is None:
        return Text("context: counting...", style="dim")
    approx = "" if budget.exact else "≈" if unicode else "~"
    total = f" {approx}{budget.used:,}/" + (f"{budget.context:,}" if budget.context else "?")
    reply = min(budget.reply, budget.room) if budget.context else budget.reply
    parts = (("system", budget.system), ("files", budget.files), ("chat", budget.history), ("reply", reply))
    dot = " · " if unicode else " - "
    # The longest form that fits beside a bar of MIN_BAR cells: the numbers are what the row is for.
    forms = [total + "".join(f"{dot}{name} {n:,}" for name, n in parts),
             total + "".join(f"{dot}{name[0]} {n:,}" for name, n in parts),
             total + " " + " ".join(f"{name[0]}{n:,}" for name, n in parts), total]
    warning = ""
    if budget.over:
        if budget.system + budget.files >= budget.context:  # no turn dropped makes room for these
            dropped = "the files alone fill it: /drop one"
        else:
            dropped = "the oldest turns will be dropped" if budget.history else "the reply will be cut short"
        warning = f"{dot}{budget.over:,} over: {dropped}"
    if not budget.context:  # said in full where it fits; "/?" says it where it does not
        unknown = f"{dot}context window unknown"
        room = width - len("context ")
        numbers = next((f + unknown for f in forms if len(f + unknown) <= room),
                       next((f for f in forms if len(f) <= room), forms[-1]))
        line = Text("context ", no_wrap=True, overflow="ellipsis", end="")
        line.append(numbers.lstrip(), style="dim")
        return line
    room = width - len("context ") - len(warning)
    numbers = next((f for f in forms if len(f) + MIN_BAR <= room), forms[-1])
    line = Text("context ", no_wrap=True, overflow="ellipsis", end="")
    if budget.context and len(numbers) + MIN_BAR <= room:
        bar_width = max(MIN_BAR, min(24, room - len(numbers) - 4))
        full, reply_cell, empty = ("█", "▒", "░") if unicode else ("#", "=", ".")
        cells, taken = [], 0
        for name, colour in SEGMENTS:
            share = round(getattr(budget, name) * bar_width / budget.context)
            share = min(bar_width - taken, share if share or not getattr(budget, name) else 1)
            cells.append((full * share, colour))
            taken += share
        reply = min(bar_width - taken, round(min(budget.reply, budget.room) * bar_width / budget.context))
        cells.append((reply_cell * reply, "green" if not budget.over else "yellow"))
        cells.append((empty * (bar_width - taken - reply), "dim"))
        for text, style in cells:
            line.append(text, style=style)
    line.append(numbers)
    if warning:
        line.append(warning, style="bold yellow")
    return line


class ContextGauge(Static):
    """Shows the latest ContextBudget; the app counts (`count`) and this widget draws."""

    DEFAULT_CSS = """
    ContextGauge { height: 1; padding: 0 1; color: $text-muted; }
    ContextGauge.over { color: $warning; }
    """

    def __init__(self, unicode: bool = True, **kwargs) -> None:
        super().__init__("", markup=False, **kwargs)
        self.unicode = unicode
        self.budget: ContextBudget | None = None

    def show(self, budget: ContextBudget) -> None:
        self.budget = budget
        self.set_class(bool(budget.over), "over")
        self.update(render(budget, self.size.width or 80, self.unicode), layout=False)  # one row, always

    def on_resize(self) -> None:
        if self.budget is not None:
            self.update(render(self.budget, self.size.width, self.unicode), layout=False)


def deliver(app, future: Future, callback: Callable[[Future], None]) -> None:
    """Run `callback(future)` on the app's thread once `future` is done: at once when it is done already (an
    estimate), else from whichever thread completes it (call_from_thread refuses the app's own thread)."""

    def done(finished: Future) -> None:
        if threading.get_ident() == app._thread_id:
            callback(finished)
        elif app.is_running:
            try:
                app.call_from_thread(callback, finished)
            except RuntimeError:  # the app closed meanwhile
                pass

    future.add_done_callback(done)


def count(app, backend, messages: list[dict], system: str, files: int, reply: int, context: int,
          shown: Callable[[ContextBudget], None]) -> None:
    """Count the prompt `messages` would make (and its system prompt alone) through the backend's tokenizer,
    then call `shown` with the budget on the app's thread. A count that fails shows nothing."""
    exact = backend.capabilities.exact_token_counts
    total = backend.count_tokens(messages) if messages else _done(0)
    alone = backend.count_tokens([{"role": "system", "content": system}]) if system else _done(0)
    both: dict[str, int] = {}

    def counted(name: str, future: Future) -> None:
        if future.exception() is not None:
            return
        both[name] = future.result()
        if len(both) == 2:
            system_tokens = min(both["system"], both["total"])
            shown(ContextBudget(context, system_tokens, files, both["total"] - system_tokens, reply, exact))

    deliver(app, total, lambda f: counted("total", f))
    deliver(app, alone, lambda f: counted("system", f))


def _done(value: int) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
