"""The prompt's completion list: shown above the prompt while there is something to complete."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from ..completion import Candidate, Completion
from ..sanitize import terminal_safe


class CompletionList(OptionList, can_focus=False):
    """Never focused: the prompt keeps the keys and drives it (Tab takes, Up/Down move, Esc closes)."""

    DEFAULT_CSS = """
    CompletionList { display: none; height: auto; max-height: 8; margin: 0 1; border: none;
                     background: $surface; }
    CompletionList.shown { display: block; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.completion: Completion | None = None
        self.candidates: list[Candidate] = []

    @property
    def shown(self) -> bool:
        return self.has_class("shown")

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
