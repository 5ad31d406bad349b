"""The server's adapter over the engine session: each request's events land on its own asyncio queue.

Handlers (asyncio) never touch MLX: they tokenize, submit and cancel through the session, whose thread
routes every event of a job to that job's queue, thread-safely.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..events import Event, Generate, Notice, Tokenize
from ..prompts import control_strings, encode_prompt
from ..session import QueueFull, Session, SessionClosed
from ..telemetry import CacheSnapshot
from ..tools import ToolFormat
from .miss_curve import MissCurves

SNAPSHOT_INTERVAL = 0.25  # seconds between snapshots kept for the stats endpoints
MAX_COUNTS = 4  # token counts (/tokenize, count_tokens) under way or waiting at once; beyond: 429

__all__ = ["EngineRunner", "QueueFull", "ServerJob", "SessionClosed"]


@dataclass
class ServerJob:
    """One request's generation: its id and its events, in order, on the handler's event loop."""

    id: int
    session: Session
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def cancel(self) -> None:
        self.session.cancel(self.id)


class EngineRunner:
    """Starts the session on `engine_factory`'s engine and hands requests to it (at most `max_queue` waiting)."""

    def __init__(self, engine_factory: Callable[[], Any], max_queue: int = 16, tool_parser: str | None = None) -> None:
        self.session = Session(engine_factory, self._on_event, stats_interval=SNAPSHOT_INTERVAL, chunk_interval=0.0,
                               max_queue=max_queue, tool_parser=tool_parser)
        self.ready = self.session.ready
        self.miss_curves = MissCurves(self.session)
        self._counter = ThreadPoolExecutor(1, thread_name_prefix="moe-count")
        self._counts = 0
        self._count_tokenizer: Any = None  # a copy of the model's: a fast tokenizer must not be used by two threads
        self._count_lock = threading.Lock()

    def _on_event(self, event: Event) -> None:
        """Events that belong to no job (readiness, snapshots, notices): the stats endpoints read the session;
        miss-curve answers go to the requests waiting for them; notices go to the server's log."""
        if isinstance(event, Notice):
            level = {"error": logging.ERROR, "warning": logging.WARNING}.get(event.severity, logging.INFO)
            logging.getLogger("uvicorn.error").log(level, "%s", event.text)
        self.miss_curves.on_event(event)

    # ---- state, read by the endpoints
    @property
    def state(self) -> str:
        return self.session.state

    @property
    def error(self) -> str | None:
        return self.session.error

    @property
    def engine(self):
        return self.session.engine

    @property
    def tool_format(self) -> ToolFormat | str:
        """The model's tool-call format, or why it has none (once loaded)."""
        return self.session.tool_format

    @property
    def snapshot(self) -> CacheSnapshot | None:
        return self.session.snapshot

    @property
    def busy(self) -> bool:
        return self.session.current is not None

    @property
    def outcomes(self) -> dict[str, int]:
        """Generations finished, by outcome: completed, cancelled, failed."""
        return dict(self.session.outcomes)

    @property
    def finished(self) -> int:
        """Generations finished, whatever their outcome."""
        return sum(self.session.outcomes.values())

    @property
    def context_length(self) -> int:
        return self.session.info.context_length if self.session.info else 0

    @property
    def vocab_size(self) -> int:
        return self.session.info.vocab_size if self.session.info else 0

    @property
    def max_token_bytes(self) -> int:
        return self.session.info.max_token_bytes if self.session.info else 64

    def waiting(self) -> int:
        return self.session.waiting()

    # ---- called from the event loop
    def start(self) -> None:
        self.session.start()

    async def tokenize(self, prompt, tools: list[dict] | None = None, continue_final: bool = False) -> list[int]:
        """The prompt's token ids (`tools` given to the chat template; `continue_final`: the reply goes on from
        the last message), computed on the session's thread (the event loop keeps serving)."""
        return await asyncio.wrap_future(self.session.tokenize(Tokenize(prompt, tools, continue_final)))

    async def count(self, prompt, tools: list[dict] | None = None, continue_final: bool = False) -> list[int]:
        """The token ids of a prompt only counted (/tokenize, count_tokens), as `tokenize` makes them, on a thread
        of its own with a copy of the tokenizer: counting never waits for the inference thread nor holds it (a
        client looping over 1 MiB counts stalled every reply between two tokens).

        Raises:
            QueueFull: MAX_COUNTS counts are under way or waiting already.
        """
        if self._counts >= MAX_COUNTS:
            raise QueueFull(f"{MAX_COUNTS} token counts are under way")
        self._counts += 1
        try:
            request = Tokenize(prompt, tools, continue_final)
            return await asyncio.get_running_loop().run_in_executor(self._counter, self._count_now, request)
        finally:
            self._counts -= 1

    def _count_now(self, request: Tokenize) -> list[int]:
        with self._count_lock:
            if self._count_tokenizer is None:
                tokenizer = copy.deepcopy(self.session.engine.tokenizer)
                self._count_tokenizer = (tokenizer, control_strings(tokenizer))
        tokenizer, markers = self._count_tokenizer
        return encode_prompt(tokenizer, request.prompt, markers, request.tools, request.continue_final)

    def submit(self, request: Generate) -> ServerJob:
        """Queue a generation whose events arrive on the returned job's queue.

        Raises:
            QueueFull: too many requests waiting (the caller answers 429). SessionClosed: shutting down.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event: Event) -> None:
            self.miss_curves.on_job_event(event)
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = self.session.submit(request, sink=sink)
        self.miss_curves.submitted(job.id)
        return ServerJob(job.id, self.session, events)

    @property
    def stopping(self) -> bool:
        """The server is shutting down: long-lived streams end."""
        return self.session.stopping

    def stop(self) -> None:
        """Cancel the running job and any queued ones (each still gets its final event), answer the miss-curve
        requests still waiting (SessionClosed: the replays queued will not run), then exit."""
        self.session.stop()
        self.miss_curves.close()
        self._counter.shutdown(wait=False, cancel_futures=True)

    def join(self, timeout: float | None = None) -> None:
        self.session.join(timeout)
