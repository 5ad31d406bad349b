"""The contract between the UI and whatever generates its replies: a local engine session (in a thread or
a child process), a `moe serve` it attaches to, or any OpenAI-compatible server.

The UI reads `capabilities`, never a backend's type or the text of its messages. Every backend posts
the messages of app/messages.py to the app and never touches a widget.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from moe_tui.inference.events import Configure, Generate, MissCurveRequest


@dataclass(frozen=True)
class Capabilities:
    remote: bool
    """Replies come from a server over HTTP; there is no engine in this machine's memory."""
    telemetry: bool
    """Cache snapshots arrive (heatmap and gauges have data); else the panels show client-side speeds."""
    configurable: bool
    """/capacity, /policy and /reset reach the engine."""
    exact_token_counts: bool
    """count_tokens uses the model's own tokenizer; else it estimates (~4 characters a token)."""
    miss_curve: bool = False
    """miss_curve replays the engine's routing trace at each capacity (a MissCurveReady answers)."""
    tool_calls: bool = False
    """Agent mode can run on it: locally, `submit` takes a `Generate` with `tools` and its ReplyDone carries the
    parsed calls (when the model has a tool-call format: EngineInfo.tool_parser); remotely, the server takes
    OpenAI `tools` on /v1/chat/completions, and `base_url`, `model` and `headers` say where."""


class Backend(Protocol):
    capabilities: Capabilities

    def start(self) -> None:
        """Begin loading or connecting; EngineReady or EngineFailed follows."""

    def submit(self, request: Generate) -> None:
        """Generate a reply; ReplyChunk messages then one ReplyDone arrive, tagged with `request.tag`."""

    def configure(self, request: Configure) -> None:
        """Change capacity, mode or policy, or reset the statistics; an EngineNotice reports the outcome."""

    def miss_curve(self, request: MissCurveRequest) -> None:
        """(capabilities.miss_curve) Hit rate against capacity on the routing so far; MissCurveReady answers."""

    def cancel(self) -> None:
        """End the running reply after its current token (its ReplyDone says 'cancelled')."""

    def count_tokens(self, text: str | Sequence[dict]) -> Future:
        """A Future of the token count of a text, or of chat messages as the chat template renders them (exact
        or estimated, see capabilities)."""

    def stop(self) -> None:
        """Cancel any reply and shut down; no message is posted after `join` returns."""

    def join(self, timeout: float | None = None) -> None:
        """Wait for the backend's threads or process to end."""


TEMPLATE_CHARACTERS = 16  # a chat message's role markers, estimated as characters (about 4 tokens)


def estimated_tokens(text: str | Sequence[dict]) -> Future:
    """~4 characters a token, for backends without the model's tokenizer."""
    if not isinstance(text, str):
        text = "".join(str(m.get("content") or "") + " " * TEMPLATE_CHARACTERS for m in text)
    future: Future = Future()
    future.set_result(max(1, len(text) // 4))
    return future
