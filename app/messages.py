"""Every message the inference thread posts to the UI. Frozen data only; high-rate ones replace older ones.

They may cross a process boundary (the inference thread runs in its own process by default): each is
pickled as its constructor arguments and built afresh on the UI side."""

from __future__ import annotations

from moe_tui.inference.events import ModelInfo, ToolCall
from moe_tui.inference.telemetry import CacheSnapshot, GenerationDone
from textual.message import Message


class WorkerMessage(Message):
    """A message from the inference thread, picklable as its constructor arguments."""

    def __init__(self, *args) -> None:
        super().__init__()
        self._args = args

    def __reduce__(self):
        return type(self), self._args


EngineInfo = ModelInfo  # shape facts about the loaded model (or the server), shown in headers and panels


class EngineReady(WorkerMessage):
    def __init__(self, info: EngineInfo) -> None:
        super().__init__(info)
        self.info = info


class EngineFailed(WorkerMessage):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class ReplyChunk(WorkerMessage):
    """New reply text since the last chunk (the session batches tokens), with the stats when they are due,
    so that both reach the screen in one repaint. `tag` is the one the reply's request carried."""

    def __init__(self, tag, text: str, stats: SnapshotReady | None = None) -> None:
        super().__init__(tag, text, stats)
        self.tag = tag
        self.text = text
        self.stats = stats


class ReplyDone(WorkerMessage):
    """A reply's end. Offered tools, `text` is the text outside its calls and `tool_calls` the calls."""

    def __init__(self, tag, text: str, done: GenerationDone | None, error: str | None = None,
                 tool_calls: tuple[ToolCall, ...] = ()) -> None:
        super().__init__(tag, text, done, error, tool_calls)
        self.tag = tag
        self.text = text
        self.done = done
        self.error = error
        self.tool_calls = tool_calls


class SnapshotReady(WorkerMessage):
    """A fresh cache snapshot; only the newest one waiting in the queue is kept."""

    def __init__(self, snapshot: CacheSnapshot, optimum: dict | None) -> None:
        super().__init__(snapshot, optimum)
        self.snapshot = snapshot
        self.optimum = optimum

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotReady)


class EngineNotice(WorkerMessage):
    """A one-line notice for the user (setting changed, context trimmed, refused input...)."""

    def __init__(self, text: str, severity: str = "information") -> None:
        super().__init__(text, severity)
        self.text = text
        self.severity = severity


def context_notice(dropped: int, max_tokens: int, requested: int) -> EngineNotice | None:
    """What fitting a chat to the context window did to a reply's prompt and budget, if anything."""
    notes = []
    if dropped:
        notes.append(f"dropped the {dropped} oldest message(s) from the prompt")
    if max_tokens < requested:
        notes.append(f"the reply can take at most {max_tokens} tokens")
    return EngineNotice("context window full: " + "; ".join(notes), "warning") if notes else None


class PrefillProgress(WorkerMessage):
    """How far the reply's prompt has been read (a long prompt takes a while before its first token)."""

    def __init__(self, tag, done: int, total: int, seconds: float) -> None:
        super().__init__(tag, done, total, seconds)
        self.tag = tag
        self.done = done
        self.total = total
        self.seconds = seconds

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, PrefillProgress) and message.tag == self.tag


class ConnectionChanged(WorkerMessage):
    """A remote server stopped answering, or answers again (`moe attach`, `moe chat --base-url`)."""

    def __init__(self, connected: bool, reason: str = "", retry_in: float = 0.0) -> None:
        super().__init__(connected, reason, retry_in)
        self.connected = connected
        self.reason = reason
        self.retry_in = retry_in


class MissCurveReady(WorkerMessage):
    """Hit rate against capacity for every policy and Belady's MIN, replayed on the engine's routing trace."""

    def __init__(self, capacities: tuple[int, ...], rates: dict[str, tuple[float, ...]], steps: int) -> None:
        super().__init__(capacities, rates, steps)
        self.capacities = capacities
        self.rates = rates
        self.steps = steps
