"""The app's local backends: the engine session in a thread of the UI's process, or in a child process.

Both run the same `inference.session.Session` and turn its events into the app's messages with one
function, `to_message`. By default the session runs in a child process (spawned, sharing nothing with
the UI's interpreter): the UI's Python work and generation's then share only the CPU, not the GIL.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from moe_tui.inference.cache import DEFAULT_POLICY
from moe_tui.inference.events import (
    Configure,
    Delta,
    Event,
    Generate,
    JobDone,
    JobFailed,
    JobStarted,
    MissCurveDone,
    MissCurveRequest,
    Notice,
    Progress,
    SessionFailed,
    SessionReady,
    Snapshot,
    Tokenize,
)

from .backend import Capabilities
from .messages import (
    EngineFailed,
    EngineNotice,
    EngineReady,
    MissCurveReady,
    PrefillProgress,
    ReplyChunk,
    ReplyDone,
    SnapshotReady,
    context_notice,
)

CHUNK_INTERVAL = 0.2  # seconds between text chunks posted to the UI (5 a second: each costs a repaint)
# The inference process yields the CPU to the UI when both want it: where MLX's threads fill every core, a key typed
# mid-reply otherwise waits its turn behind them (figures: docs/performance.md, "Keys typed while a reply streams").
INFERENCE_NICE = 5
LOCAL = Capabilities(remote=False, telemetry=True, configurable=True, exact_token_counts=True, miss_curve=True,
                     tool_calls=True)


@dataclass
class EngineSpec:
    model: str
    capacity: int | float | None = None
    mode: str = "exact"
    policy: str = DEFAULT_POLICY
    profile: str | None = None
    pin: bool = True  # pin the profile's universal experts (else it only warms the cache)
    kv_bits: int | None = None
    context: int | None = None  # tokens of context (KV memory kept free); None: the model's
    prefetch: bool | None = None  # read predicted experts ahead; None: while it makes decoding faster
    extra: dict[str, Any] = field(default_factory=dict)

    def load(self):
        from moe_tui.inference.engine import Engine

        return Engine.load(self.model, capacity=self.capacity, mode=self.mode, policy=self.policy,
                           profile=self.profile, pin=self.pin, kv_bits=self.kv_bits, context=self.context,
                           prefetch=self.prefetch)


def to_message(event: Event, replies: dict[Any, str]):
    """The app message for a session event (None for events the UI does not show). `replies` keeps each
    running reply's text so far, by tag: a reply cut short by the inference process's death keeps it."""
    if isinstance(event, Delta):
        replies[event.tag] = replies.get(event.tag, "") + event.text
        stats = SnapshotReady(event.snapshot, None) if event.snapshot is not None else None
        return ReplyChunk(event.tag, event.text, stats)
    if isinstance(event, JobDone):
        replies.pop(event.tag, None)
        return ReplyDone(event.tag, event.done.text, event.done, None, event.tool_calls)
    if isinstance(event, JobFailed):
        replies.pop(event.tag, None)
        return ReplyDone(event.tag, event.text, None, event.error)
    if isinstance(event, JobStarted):
        return context_notice(event.dropped_messages, event.max_tokens, event.requested_max_tokens)
    if isinstance(event, Progress):
        return PrefillProgress(event.tag, event.done, event.total, event.seconds)
    if isinstance(event, Snapshot):
        return SnapshotReady(event.snapshot, event.optimum)
    if isinstance(event, Notice):
        return EngineNotice(event.text, event.severity)
    if isinstance(event, SessionReady):
        return EngineReady(event.info)
    if isinstance(event, MissCurveDone):
        return MissCurveReady(event.capacities, event.rates, event.steps)
    if isinstance(event, SessionFailed):
        return EngineFailed(event.error)
    return None


def _session(spec: EngineSpec, sink, stats_interval: float):
    from moe_tui.inference.session import Session

    return Session(spec.load, sink, stats_interval=stats_interval, chunk_interval=CHUNK_INTERVAL,
                   replay_optimum=True)


class InferenceWorker:
    """The session in a thread of the UI's process."""

    capabilities = LOCAL

    def __init__(self, app, spec: EngineSpec, stats_interval: float = 0.5) -> None:
        self.app = app
        self.spec = spec
        self._replies: dict[Any, str] = {}
        self.session = _session(spec, self._post, stats_interval)

    def _post(self, event: Event) -> None:
        message = to_message(event, self._replies)
        if message is not None:
            self.app.post_message(message)

    def start(self) -> None:
        self.session.start()

    def submit(self, request: Generate) -> None:
        self.session.submit(request)

    def configure(self, request: Configure) -> None:
        self.session.configure(request)

    def miss_curve(self, request: MissCurveRequest) -> None:
        self.session.miss_curve(request)

    def cancel(self) -> None:
        self.session.cancel()

    def count_tokens(self, text: str | list[dict]) -> Future:
        counted: Future = Future()
        tokens = self.session.tokenize(Tokenize(text))
        tokens.add_done_callback(lambda f: counted.set_exception(f.exception()) if f.exception()
                                 else counted.set_result(len(f.result())))
        return counted

    def stop(self) -> None:
        self.session.stop()

    def join(self, timeout: float | None = None) -> None:
        self.session.join(timeout)


def _serve(spec: EngineSpec, stats_interval: float, conn, control, log_path: str | None) -> None:
    """The inference process: the session, its events sent to the UI, its controls read from `control`."""
    if hasattr(os, "nice"):
        os.nice(INFERENCE_NICE)
    if log_path:  # the terminal belongs to the UI: anything written here (warnings, tracebacks) goes to a file
        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    lock = threading.Lock()

    def send(item) -> None:
        with lock:
            conn.send(item)

    session = _session(spec, send, stats_interval)
    session.start()

    def answer(request_id: int, future: Future) -> None:
        error = future.exception()
        send(("tokens", request_id, None if error else len(future.result()), None if not error else str(error)))

    try:
        while True:
            kind, *args = control.get()
            if kind == "stop":
                break
            if kind == "submit":
                session.submit(args[0])
            elif kind == "configure":
                session.configure(args[0])
            elif kind == "miss_curve":
                session.miss_curve(args[0])
            elif kind == "cancel":
                session.cancel()
            elif kind == "count":
                request_id, text = args
                session.tokenize(Tokenize(text)).add_done_callback(lambda f, i=request_id: answer(i, f))
    finally:
        session.stop()
        session.join(10)
        conn.close()


class InferenceProcess:
    """The session in a child process; a reader thread posts what it sends as the app's messages."""

    capabilities = LOCAL

    def __init__(self, app, spec: EngineSpec, stats_interval: float = 0.5, log_path: str | None = None) -> None:
        self.app = app
        self.spec = spec
        self.log_path = log_path
        ctx = multiprocessing.get_context("spawn")
        self._control = ctx.Queue()
        self._recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_serve, name="moe-inference", daemon=True,
                                   args=(spec, stats_interval, send, self._control, log_path))
        self._send = send
        self._reader = threading.Thread(target=self._read, name="moe-inference-reader", daemon=True)
        self._replies: dict[Any, str] = {}
        self._counts: dict[int, Future] = {}
        self._count_ids = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> None:
        self.process.start()
        self._send.close()  # the child holds the sending end now: EOF here when it exits
        self._reader.start()

    def submit(self, request: Generate) -> None:
        self._control.put(("submit", request))

    def configure(self, request: Configure) -> None:
        self._control.put(("configure", request))

    def miss_curve(self, request: MissCurveRequest) -> None:
        self._control.put(("miss_curve", request))

    def cancel(self) -> None:
        self._control.put(("cancel",))

    def count_tokens(self, text: str | list[dict]) -> Future:
        future: Future = Future()
        with self._lock:
            self._count_ids += 1
            self._counts[self._count_ids] = future
            self._control.put(("count", self._count_ids, text))
        return future

    def stop(self) -> None:
        self._stopping.set()
        self._control.put(("stop",))

    def _read(self) -> None:
        failed = False
        while True:
            try:
                item = self._recv.recv()
            except (EOFError, OSError):
                break
            if isinstance(item, tuple) and item[0] == "tokens":
                _, request_id, count, error = item
                with self._lock:
                    future = self._counts.pop(request_id, None)
                if future is not None:
                    future.set_exception(RuntimeError(error)) if error else future.set_result(count)
                continue
            failed = failed or isinstance(item, SessionFailed)
            message = to_message(item, self._replies)
            if message is not None:
                self.app.post_message(message)
        self.process.join(timeout=5)
        with self._lock:
            for future in self._counts.values():
                future.set_exception(RuntimeError("the inference process has exited"))
            self._counts.clear()
        if not self._stopping.is_set() and not failed:
            where = f"; its output is in {self.log_path}" if self.log_path else ""
            self.app.post_message(EngineFailed(
                f"the inference process exited unexpectedly (exit code {self.process.exitcode}){where}"))
            for tag, text in list(self._replies.items()):  # replies cut short keep their text
                self.app.post_message(ReplyDone(tag, text, None, "the inference process exited"))

    def join(self, timeout: float | None = None) -> None:
        if self.process.pid is None:
            return
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(1)
