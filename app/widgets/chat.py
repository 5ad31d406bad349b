"""Chat widgets: one Markdown view per message, and the prompt box (Enter sends, Shift+Enter/Ctrl+J newline)."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Markdown, TextArea


class MessageView(Markdown):
    """A chat message rendered as Markdown (code blocks syntax-highlighted)."""

    DEFAULT_CSS = """
    MessageView { margin: 0 1 1 1; padding: 0 1; }
    MessageView.user { border-left: thick $accent; }
    MessageView.assistant { border-left: thick $primary; }
    MessageView.notice { color: $text-muted; border-left: thick $warning; }
    MessageView.cancelled { border-left: thick $error; }
    """

    def __init__(self, role: str, text: str = "", message_id: int | None = None, **kwargs) -> None:
        super().__init__(text, classes=role, **kwargs)
        self.role = role
        self.text = text
        self.message_id = message_id


HEIGHT_STEP = 8


class StreamingReply(Widget):
    """A reply while it streams: plain text, repainted at the chunk rate without a layout pass. When
    the reply ends it is replaced by a MessageView, rendered as Markdown once."""

    DEFAULT_CSS = """
    StreamingReply { margin: 0 1 1 1; padding: 0 1; border-left: thick $primary; height: 8; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    def render(self) -> Text:
        return Text(self.text)

    def append(self, fragment: str) -> bool:
        """Add text; True when the widget grew (the caller may scroll to follow it)."""
        self.text += fragment
        # Grow in steps of HEIGHT_STEP rows: a height change re-lays out the whole screen, which costs
        # far more than repainting this widget (and competes with generation for the CPU).
        width = max(self.content_size.width, 20)
        rows = sum(max(1, -(-len(line) // width)) for line in self.text.split("\n"))
        height = -(-(rows + 1) // HEIGHT_STEP) * HEIGHT_STEP
        if self.styles.height is None or self.styles.height.value != height:
            self.styles.height = height
            return True
        self.refresh()
        return False


class PromptInput(TextArea):
    """Multi-line prompt. Enter submits; Shift+Enter and Ctrl+J insert a newline."""

    DEFAULT_CSS = """
    PromptInput { height: auto; min-height: 3; max-height: 10; }
    """

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.post_message(self.Submitted(text))
                self.clear()
            return
        if event.key in ("shift+enter", "ctrl+j", "newline"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)
