"""Chat widgets: one Markdown view per message, and the prompt box (Enter sends, Shift+Enter/Ctrl+J newline)."""

from __future__ import annotations

from textual import events
from textual.message import Message
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
