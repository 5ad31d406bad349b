"""A yes/no modal, optionally showing a diff (used before overwriting files or reading outside the cwd)."""

from __future__ import annotations

import re
import time

from rich.syntax import Syntax
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from ..sanitize import revealed

ARM_DELAY = 0.4  # seconds a question ignores keys and clicks after it opens: what was typed ahead is not an answer
MAX_DIFF_LINES = 400  # highlighting is slow (a megabyte of diff held the UI for seconds): the rest is counted


def shown_question(question: str) -> str:
    """The question with each run of blank lines shown as one line that counts them: a command padded with
    newlines hid its end below the box."""
    def counted(match: re.Match) -> str:
        return f"\n⋯ {match.group(0).count(chr(10)) - 1} blank lines ⋯\n"

    return re.sub(r"\n(?:[ \t]*\n){2,}", counted, question)


def shown_diff(diff: str) -> str:
    lines = diff.splitlines(keepends=True)
    if len(lines) <= MAX_DIFF_LINES:
        return diff
    return "".join(lines[:MAX_DIFF_LINES]) + f"... {len(lines) - MAX_DIFF_LINES} more lines of diff not shown\n"


class ConfirmScreen(ModalScreen[bool]):
    """The question and the diff are shown as plain text: they hold file names and file contents."""

    # No is the default: it has the focus, so a bare Enter (typed on, from the prompt) answers No, as does
    # Enter with the focus on the diff; Yes takes `y` or Enter on its button.
    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape,enter", "answer(False)", "no"),
                # The question and its diff scroll with the keys at once (they went to the chat behind the box,
                # and the box scrolled only after Tab had moved the focus into it).
                *(Binding(key, f"scroll_box('{how}')", show=False) for key, how in (
                    ("up", "up"), ("down", "down"), ("pageup", "page_up"), ("pagedown", "page_down"),
                    ("home", "home"), ("end", "end")))]
    AUTO_FOCUS = "#no"
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 90%; height: auto; max-height: 90%; border: thick $warning; padding: 1 2;
                               background: $surface; }
    ConfirmScreen Label { width: 1fr; }  /* wraps: a long path must not hide the end of the question */
    ConfirmScreen VerticalScroll { height: auto; max-height: 24; }
    ConfirmScreen VerticalScroll > Label { margin-bottom: 1; }
    ConfirmScreen Horizontal { height: auto; align: right middle; }
    ConfirmScreen Button { margin-left: 2; }
    """

    def __init__(self, question: str, diff: str = "") -> None:
        super().__init__()
        self.question = question
        self.diff = diff
        self.opened = time.monotonic()

    def on_mount(self) -> None:
        self.opened = time.monotonic()

    @property
    def armed(self) -> bool:
        """Keys answer it: ARM_DELAY has passed since it opened (the 'y' of '.py', typed on while a command's
        question opened, answered Yes)."""
        return time.monotonic() - self.opened >= ARM_DELAY

    def compose(self) -> ComposeResult:
        with Vertical():
            # Not markup: a path like `[/]x.py` raised MarkupError. Rich keeps ESC, so a file's OSC 52 would act.
            # Revealed, not terminal_safe: what is approved is shown whole, escape sequences' insides too. The
            # question scrolls with the diff: a long one (a command of many lines) must not push the end of
            # either, or the buttons, off the box.
            with VerticalScroll():
                yield Label(revealed(shown_question(self.question)), markup=False)
                if self.diff:
                    yield Static(Syntax(revealed(shown_diff(self.diff)), "diff", word_wrap=True))
            with Horizontal():
                yield Button("Yes (y)", variant="warning", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_resize(self) -> None:
        self.call_after_refresh(self.fit_diff)

    def fit_diff(self) -> None:
        """The question and the diff get the rows the box has left once the buttons are shown: a long diff
        pushed the buttons off the screen and could not be scrolled to its end."""
        if not self.is_mounted:
            return
        box, scroll = self.query_one(Vertical), self.query_one(VerticalScroll)
        around = box.styles.gutter.height + self.query_one(Horizontal).outer_size.height
        room = max(3, int(self.size.height * 0.9) - around)
        if scroll.styles.max_height is None or scroll.styles.max_height.value != room:
            scroll.styles.max_height = room

    def action_scroll_box(self, how: str) -> None:
        getattr(self.query_one(VerticalScroll), f"scroll_{how}")(animate=False)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if self.armed:
            self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        if self.armed:
            self.dismiss(answer)
