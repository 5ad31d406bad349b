"""The prompt's completion list: shown above the prompt while there is something to complete."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import work
from textual.widgets import OptionList, TextArea
from textual.widgets.option_list import Option

from ..completion import Candidate, Completion, command_candidates, completion_at, mention_form, path_candidates
from ..sanitize import terminal_safe


class CompletionList(OptionList, can_focus=False):
    """Never focused: the prompt keeps the keys and drives it (Tab takes, Up/Down move, Esc closes)."""

    DEFAULT_CSS = """
    CompletionList { display: none; height: auto; max-height: 8; margin: 0 1; border: none;
                     background: $surface; }
    CompletionList.shown { display: block; }
    """
    cwd: Path | None = None  # paths complete from here (the app's working directory, given with each change)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.completion: Completion | None = None
        self.candidates: list[Candidate] = []

    @property
    def shown(self) -> bool:
        return self.has_class("shown")

    def update_for(self, prompt: TextArea, cwd: Path) -> None:
        """List what the word at the prompt's cursor can become: a command, or a path after @ or /add."""
        self.cwd = cwd
        wanted = wanted_at(prompt)
        if wanted is None:
            self.hide()
        elif wanted.kind == "command":
            self.offer(prompt, wanted, command_candidates(wanted.word))
        else:
            self.list_paths(prompt, wanted, cwd)

    @work(thread=True, exclusive=True, group="complete")
    def list_paths(self, prompt: TextArea, wanted: Completion, cwd: Path) -> None:
        """Directory listings off the UI thread (a slow or network file system must not hold the keys)."""
        candidates = path_candidates(wanted.word, cwd)
        self.app.call_from_thread(self.offer, prompt, wanted, candidates)

    def catch_up(self, prompt: TextArea) -> bool:
        """Before Tab takes a completion: list the word at the cursor now, on this thread, if the list does not
        show it yet (a Tab typed in the same burst as the word comes before the list: paths are listed off the
        UI thread, and the prompt's change is handled after the key). True when the list shows it."""
        wanted = wanted_at(prompt)
        if wanted is None:
            return False
        if not (self.shown and self.completion == wanted):
            cwd = self.cwd or Path.cwd()
            found = command_candidates(wanted.word) if wanted.kind == "command" else path_candidates(wanted.word, cwd)
            self.offer(prompt, wanted, found)
        return self.shown

    def offer(self, prompt: TextArea, wanted: Completion, candidates: list[Candidate]) -> None:
        if wanted != wanted_at(prompt):  # typed on meanwhile
            return
        if wanted.mention:
            candidates = [mention_form(c, wanted.quoted) for c in candidates]
        candidates = [c for c in candidates if c.insert.rstrip() != wanted.typed]  # what is typed already
        self.show(wanted, candidates) if candidates else self.hide()

    def show(self, completion: Completion, candidates: list[Candidate]) -> None:
        self.completion, self.candidates = completion, candidates
        self.clear_options()
        # File names are untrusted text: never markup, never raw control characters.
        self.add_options([Option(self._one_row(c.label)) for c in candidates])
        self.highlighted = 0 if candidates else None
        self.set_class(bool(candidates), "shown")

    def _one_row(self, label: str) -> Text:
        """A label cut to one row (the list would wrap it): the chat column less margins and scrollbar."""
        text = Text(terminal_safe(label))
        text.truncate(max(self.parent.size.width - 6, 10), overflow="ellipsis")
        return text

    def hide(self) -> None:
        self.completion, self.candidates = None, []
        self.remove_class("shown")

    def move(self, step: int) -> None:
        if self.candidates:
            self.highlighted = ((self.highlighted or 0) + step) % len(self.candidates)

    def chosen(self) -> Candidate | None:
        if not self.shown or self.highlighted is None:
            return None
        return self.candidates[self.highlighted]


def wanted_at(prompt: TextArea) -> Completion | None:
    row, column = prompt.cursor_location
    return completion_at(prompt.document.get_line(row)[:column], row == 0)
