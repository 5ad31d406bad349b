"""One reply's life in the app: its stored row, its text so far, and the streaming widget showing it while
its chat is on screen. Chunks and the end go through it, so a reply whose chat was switched away,
cleared or deleted meanwhile can never write to a widget or a row that is gone."""

from __future__ import annotations

import itertools
import time

from .store import ChatStore
from .widgets.chat import StreamingReply

SAVE_INTERVAL = 1.0  # seconds between saves of a reply in progress (it survives the app being killed)
_tags = itertools.count(1)


class Reply:
    def __init__(self, store: ChatStore, chat_id: int, view: StreamingReply) -> None:
        self.store = store
        self.chat_id = chat_id
        self.tag = next(_tags)  # the request's tag: events of other (older) replies are ignored
        self.message_id = store.add_message(chat_id, "assistant", "", status="partial")
        self.view: StreamingReply | None = view
        self.text = ""
        self.saved_at = time.monotonic()
        self.discarded = False  # its chat was cleared or deleted: nothing more is stored

    def add(self, text: str) -> None:
        self.text += text
        if not self.discarded and time.monotonic() - self.saved_at >= SAVE_INTERVAL:
            self.store.update_message(self.message_id, self.text, "partial")
            self.saved_at = time.monotonic()
        if self.view is not None and self.view.is_attached:
            self.view.append(text)  # the anchored chat follows it as it grows

    def detach(self) -> None:
        """Its chat is no longer shown: the reply goes on being stored, but not drawn."""
        self.view = None

    def discard(self) -> None:
        """Its chat's messages are gone: neither stored nor drawn any more."""
        self.discarded = True
        self.view = None

    def finish(self, text: str, status: str) -> None:
        self.text = text
        if not self.discarded:
            self.store.update_message(self.message_id, text, status)
