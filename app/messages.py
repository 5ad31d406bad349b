"""Every message the inference thread posts to the UI. Frozen data only; high-rate ones replace older ones."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from inference import CacheSnapshot, GenerationDone


@dataclass(frozen=True)
class EngineInfo:
    model: str
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_bytes: int
    dense_bytes: int
    context_length: int


class EngineReady(Message):
    def __init__(self, info: EngineInfo) -> None:
        super().__init__()
        self.info = info


class EngineFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class ReplyChunk(Message):
    """New reply text since the last chunk (the thread batches tokens: at most ~20 chunks a second)."""

    def __init__(self, chat_id: int, text: str) -> None:
        super().__init__()
        self.chat_id = chat_id
        self.text = text


class ReplyDone(Message):
    def __init__(self, chat_id: int, text: str, done: GenerationDone | None, error: str | None = None) -> None:
        super().__init__()
        self.chat_id = chat_id
        self.text = text
        self.done = done
        self.error = error


class SnapshotReady(Message):
    """A fresh cache snapshot; only the newest one waiting in the queue is kept."""

    def __init__(self, snapshot: CacheSnapshot, optimum: dict | None) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.optimum = optimum

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotReady)


class EngineNotice(Message):
    """A one-line notice for the user (setting changed, context trimmed, refused input...)."""

    def __init__(self, text: str, severity: str = "information") -> None:
        super().__init__()
        self.text = text
        self.severity = severity
