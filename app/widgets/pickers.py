"""Lists to pick from (/chats, /search): arrow keys move, Enter opens, Esc closes."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from ..sanitize import terminal_safe

SNIPPET_CONTEXT = 40  # characters shown on each side of a search match


@dataclass(frozen=True)
class Pick:
    chat_id: int
    message_id: int | None = None  # a search hit: the message to show


def snippet(content: str, query: str, context: int = SNIPPET_CONTEXT) -> Text:
    """The part of `content` around the first match of `query`, on one line, the match highlighted."""
    flat = " ".join(terminal_safe(content).split())
    at = flat.lower().find(query.lower())
    if at < 0:
        return Text(flat[: 2 * context] + ("…" if len(flat) > 2 * context else ""))
    start, end = max(0, at - context), min(len(flat), at + len(query) + context)
    text = Text(("…" if start else "") + flat[start:end] + ("…" if end < len(flat) else ""))
    offset = at - start + (1 if start else 0)
    text.stylize("bold reverse", offset, offset + len(query))
    return text


def one_row(label: Text, width: int) -> Text:
    label = label.copy()
    label.truncate(width, overflow="ellipsis")
    return label


class ChatPicker(ModalScreen[Pick | None]):
    """Entries are (Pick, label); labels are Rich Text (chat titles and message text are not markup)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "close")]
    DEFAULT_CSS = """
    ChatPicker { align: center middle; }
    ChatPicker > Vertical { width: 90%; max-width: 120; height: auto; max-height: 80%; border: round $primary;
                            background: $surface; padding: 0 1; }
    ChatPicker Label { width: 1fr; color: $text-muted; }
    ChatPicker OptionList, ChatPicker OptionList:focus { height: auto; max-height: 30; border: none; }
    """

    def __init__(self, heading: str, entries: list[tuple[Pick, Text]], highlighted: int = 0) -> None:
        super().__init__()
        self.heading = heading
        self.entries = entries
        self.highlighted = highlighted

    @staticmethod
    def row_width(screen_width: int) -> int:
        """Cells an entry's row has: one row each (a wrapped snippet reads as two entries), the box's width
        less its frame."""
        return max(min(screen_width * 9 // 10, 120) - 6, 20)

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(terminal_safe(self.heading) + "  (arrows move, Enter opens, Esc closes)"))
            width = self.row_width(self.app.size.width)
            yield OptionList(*[Option(one_row(label, width), id=str(i)) for i, (_, label) in enumerate(self.entries)])

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.highlighted = min(self.highlighted, max(len(self.entries) - 1, 0))
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.entries[int(event.option.id)][0])
