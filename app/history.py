"""The prompt's history: Up/Down bring back what was sent before, like a shell's."""

from __future__ import annotations

HISTORY_LIMIT = 200  # entries kept: the chat's own user messages and what was typed this session


class PromptHistory:
    """Entries oldest first; a position walks them. The text being written when the walk starts (the
    draft) comes back after the newest entry."""

    def __init__(self, entries: list[str] | tuple[str, ...] = ()) -> None:
        self.reset(entries)

    def reset(self, entries: list[str] | tuple[str, ...]) -> None:
        self.entries: list[str] = []
        for entry in entries:
            self.add(entry)
        self.position = len(self.entries)
        self.draft = ""

    def add(self, text: str) -> None:
        """Remember `text` (sent); the walk starts again from the newest entry."""
        text = text.strip("\n")
        if text.strip() and (not self.entries or self.entries[-1] != text):
            self.entries.append(text)
            del self.entries[:-HISTORY_LIMIT]
        self.position = len(self.entries)
        self.draft = ""

    def older(self, current: str) -> str | None:
        """The entry before the one shown (None at the oldest); `current` is kept as the draft."""
        if self.position == 0:
            return None
        if self.position == len(self.entries):
            self.draft = current
        self.position -= 1
        return self.entries[self.position]

    def newer(self) -> str | None:
        """The entry after the one shown, the draft after the newest, None when already at the draft."""
        if self.position >= len(self.entries):
            return None
        self.position += 1
        return self.draft if self.position == len(self.entries) else self.entries[self.position]
