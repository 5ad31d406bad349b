"""The server's one inference thread: a bounded FIFO of jobs, one generation at a time.

Handlers (asyncio) submit a `Job` and read its events from an asyncio.Queue filled thread-safely;
they never touch MLX. The latest CacheSnapshot is published for stats endpoints without waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine import Engine
from ..telemetry import CacheSnapshot, GenerationDone, TokenDelta

SNAPSHOT_INTERVAL = 0.25  # seconds between published snapshots while generating


class QueueFull(Exception):
    """Too many requests waiting; the caller answers 429."""


@dataclass
class Job:
    messages: list[dict] | list[int]  # chat messages, or the prompt's token ids already templated
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    id: int = 0

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineRunner(threading.Thread):
    def __init__(self, engine_factory, max_queue: int = 16) -> None:
        super().__init__(name="moe-server-inference", daemon=True)
        self._factory = engine_factory
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.ready = threading.Event()
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self.snapshot: CacheSnapshot | None = None
        self.current: Job | None = None
        self.completed = 0
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._last_snapshot = 0.0

    # ---- called from the event loop
    def submit(self, job: Job) -> Job:
        job.id = next(self._ids)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def waiting(self) -> int:
        return self.jobs.qsize()

    def stop(self) -> None:
        """Cancel the running job and any queued ones (each still gets its final event), then exit."""
        self._stopping.set()
        if self.current is not None:
            self.current.cancel.set()
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass

    # ---- the thread
    def run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as exc:  # noqa: BLE001 - reported by /health and at startup
            self.error = exc
            self.ready.set()
            return
        self.snapshot = self.engine.snapshot()
        self.ready.set()
        while True:
            try:
                job = self.jobs.get(timeout=1.0)
            except queue.Empty:
                self.snapshot = self.engine.snapshot()
                if self._stopping.is_set():
                    break
                continue
            if job is None:
                break
            if self._stopping.is_set():
                job.cancel.set()
            self.current = job
            try:
                self._run_job(job)
            finally:
                self.current = None
                self.completed += 1
        while True:  # drain: queued jobs end with a cancelled final event
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                self._run_job(job)

    def _run_job(self, job: Job) -> None:
        if job.cancel.is_set():
            job.emit(GenerationDone("", "cancelled", 0, 0, 0, 0.0, 0.0, 0.0))
            return
        try:
            for event in self.engine.stream(job.messages, max_tokens=job.max_tokens, temperature=job.temperature,
                                            top_p=job.top_p, seed=job.seed, stop=job.stop, cancel=job.cancel):
                job.emit(event)
                if isinstance(event, TokenDelta):
                    self._publish()
        except Exception as exc:  # noqa: BLE001 - the request gets a 500 in its API's format
            job.emit(exc)
        self._publish(force=True)

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_snapshot >= SNAPSHOT_INTERVAL:
            self.snapshot = self.engine.snapshot()
            self._last_snapshot = now
