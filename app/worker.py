"""The one long-lived inference thread: loads the engine, generates, and posts results to the UI.

MLX streams are thread-local, so every MLX call happens here. The UI talks to it only through
`submit(...)` (a queue) and `cancel()` (an Event); the thread never touches widgets.

By default the app runs that thread in a child process (`InferenceProcess`): the same loop, with the
queue, the cancel flag and the messages crossing the process boundary. In one process the UI's Python
work and generation's Python work take turns on the GIL; in two processes they only share the CPU.
Measured on 2 cores (scripts/contention.py, paired runs), the app's UI streaming a scripted reply
(~6% of a core) from another process: 0.99x and 1.00x decode speed. Which placement suffers less
from other load is not settled there: a 12%-of-a-core Python loop cost 0.82x from a thread and 0.88x
from another process in one run, 0.96x and 0.80x in another; scripts/bench_app.py compares both.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from moe_tui.inference import Engine, GenerationDone, ModelLoadError

from .messages import EngineFailed, EngineInfo, EngineNotice, EngineReady, ReplyChunk, ReplyDone, SnapshotReady

CHUNK_INTERVAL = 0.2  # seconds between text chunks posted to the UI (5 a second: each costs a repaint)
OPTIMUM_WINDOW = 1024  # replay the last this-many steps of each layer's trace


@dataclass(frozen=True)
class Generate:
    chat_id: int
    messages: list[dict]
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95


@dataclass(frozen=True)
class Configure:
    """Live engine changes: any field left None is unchanged."""

    capacity: int | float | None = None
    mode: str | None = None
    policy: str | None = None
    reset_stats: bool = False


@dataclass
class EngineSpec:
    model: str
    capacity: int | float | None = None
    mode: str = "exact"
    policy: str = "lru"
    profile: str | None = None
    pin: bool = True  # pin the profile's universal experts (else it only warms the cache)
    kv_bits: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Controls:
    """What the UI calls on a worker: a request queue, a cancel flag and a stop flag."""

    requests: queue.Queue
    _cancel: threading.Event
    _stopping: threading.Event

    def submit(self, request: Generate | Configure) -> None:
        self.requests.put(request)

    def cancel(self) -> None:
        self._cancel.set()

    def stop(self) -> None:
        self._stopping.set()
        self._cancel.set()
        self.requests.put(None)


class RequestThread(Controls, threading.Thread):
    """A daemon thread the UI drives through a request queue and a cancel flag (local or remote worker)."""

    def __init__(self, app, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.app = app
        self.requests = queue.Queue()
        self._cancel = threading.Event()
        self._stopping = threading.Event()


class InferenceWorker(RequestThread):
    def __init__(self, app, spec: EngineSpec, stats_interval: float = 0.5) -> None:
        super().__init__(app, "moe-inference")
        self.spec = spec
        self.stats_interval = stats_interval
        self.engine: Engine | None = None
        self.context_length = 4096
        self._last_stats = 0.0
        self._optimum_steps = 0
        self._optimum: dict | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer if self.engine is not None else None

    def run(self) -> None:
        try:
            s = self.spec
            self.engine = Engine.load(s.model, capacity=s.capacity, mode=s.mode, policy=s.policy,
                                      profile=s.profile, pin=s.pin, kv_bits=s.kv_bits)
        except (ModelLoadError, ValueError, OSError) as exc:
            self.app.post_message(EngineFailed(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - shown to the user rather than killing the thread silently
            self.app.post_message(EngineFailed(f"{type(exc).__name__}: {exc}"))
            return
        # The model and its imports live as long as this loop: keep them out of the cycle collector,
        # whose full passes over them otherwise pause generation for tens of milliseconds at a time.
        gc.freeze()
        layout = self.engine.layout
        context = self.context_length = int(self.engine.config.get("max_position_embeddings") or 4096)
        self.app.post_message(EngineReady(EngineInfo(
            model=s.model, model_type=layout.model_type, num_layers=layout.num_layers,
            moe_layers=layout.moe_layers, num_experts=layout.num_experts, top_k=layout.top_k,
            expert_bytes=layout.expert_bytes, dense_bytes=layout.dense_bytes, context_length=context)))
        self._post_stats(force=True)
        while not self._stopping.is_set():
            try:
                request = self.requests.get(timeout=self.stats_interval)
            except queue.Empty:
                self._refresh_optimum()
                self._post_stats()
                continue
            if request is None:
                break
            if isinstance(request, Generate):
                self._generate(request)
            elif isinstance(request, Configure):
                self._configure(request)
            self._post_stats(force=True)
        if self.engine is not None:
            self.engine.close()

    def _configure(self, request: Configure) -> None:
        engine = self.engine
        try:
            if request.capacity is not None:
                engine.set_capacity(request.capacity)
                self.app.post_message(EngineNotice(f"capacity {engine.capacity} experts per layer"))
            if request.mode is not None:
                engine.set_mode(request.mode)
                self.app.post_message(EngineNotice(f"mode {engine.mode}"))
            if request.policy is not None:
                engine.set_policy(request.policy)
                self.app.post_message(EngineNotice(f"policy {engine.policy}"))
            if request.reset_stats:
                engine.reset_stats()
                self.app.post_message(EngineNotice("statistics reset"))
        except (ValueError, ModelLoadError) as exc:
            self.app.post_message(EngineNotice(str(exc), "error"))

    def _fit_context(self, request: Generate) -> list[dict]:
        """Drop the oldest turns (never the system prompt or the last message) until the prompt fits."""
        messages = list(request.messages)
        limit = self.context_length - request.max_tokens
        dropped = 0
        while len(self.engine.encode(messages)) > limit:
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if len(messages) - first <= 1:
                break
            del messages[first]
            dropped += 1
        if dropped:
            self.app.post_message(EngineNotice(
                f"context window full: dropped the {dropped} oldest message(s) from the prompt", "warning"))
        return messages

    def _generate(self, request: Generate) -> None:
        self._cancel.clear()
        messages = self._fit_context(request)
        text, pending, last_post = "", "", time.monotonic()
        done: GenerationDone | None = None
        try:
            for event in self.engine.stream(messages, max_tokens=request.max_tokens,
                                            temperature=request.temperature, top_p=request.top_p,
                                            cancel=self._cancel):
                if isinstance(event, GenerationDone):
                    done = event
                    break
                pending += event.text
                now = time.monotonic()
                if now - last_post >= CHUNK_INTERVAL:  # due stats ride along: one repaint for both
                    self.app.post_message(ReplyChunk(request.chat_id, pending, self._due_stats()))
                    text += pending
                    pending, last_post = "", now
        except Exception as exc:  # noqa: BLE001 - the reply shows the error; the thread keeps serving
            traceback.print_exc()
            self.app.post_message(ReplyDone(request.chat_id, text + pending, None, f"{type(exc).__name__}: {exc}"))
            return
        if pending:
            self.app.post_message(ReplyChunk(request.chat_id, pending))
        self.app.post_message(ReplyDone(request.chat_id, done.text if done else text + pending, done))

    def _due_stats(self, force: bool = False) -> SnapshotReady | None:
        """A fresh snapshot when one is due (every stats_interval), else None."""
        now = time.monotonic()
        if not force and now - self._last_stats < self.stats_interval:
            return None
        self._last_stats = now
        return SnapshotReady(self.engine.snapshot(), self._optimum)

    def _post_stats(self, force: bool = False) -> None:
        if (stats := self._due_stats(force)) is not None:
            self.app.post_message(stats)

    def _refresh_optimum(self) -> None:
        """Replay the recent trace under every policy and Belady's MIN; only while idle (it costs CPU)."""
        trace = self.engine.trace  # idle: every routing record is already folded in (stream() drains)
        steps = len(trace[0]) if trace else 0
        if not steps or steps == self._optimum_steps or not self.engine.layout.moe_layers:
            return
        rates = self.engine.hit_rates_vs_optimum(last_steps=OPTIMUM_WINDOW)
        self._optimum = {name: r["hit_rate"] for name, r in rates.items()}
        self._optimum_steps = steps
        self._post_stats(force=True)


class _PipeApp:
    """Stands in for the App inside the inference process: posting a message sends it to the UI."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def post_message(self, message) -> bool:
        with self.lock:
            self.conn.send(message)
        return True


def _serve(spec: EngineSpec, stats_interval: float, conn, requests, cancel, stopping, log_path: str | None) -> None:
    """The inference process: the worker loop in its main thread, fed by the UI's queue and flags."""
    if log_path:  # the terminal belongs to the UI: anything written here (warnings, tracebacks) goes to a file
        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    worker = InferenceWorker(_PipeApp(conn), spec, stats_interval=stats_interval)
    worker.requests, worker._cancel, worker._stopping = requests, cancel, stopping
    try:
        worker.run()
    finally:
        conn.close()


class InferenceProcess(Controls):
    """InferenceWorker's interface, with the inference thread in a child process (spawned, so it shares
    nothing with the UI's interpreter). A reader thread posts what it sends as Textual messages."""

    def __init__(self, app, spec: EngineSpec, stats_interval: float = 0.5, log_path: str | None = None) -> None:
        self.app = app
        self.spec = spec
        self.log_path = log_path
        self.engine = None  # the engine lives in the child
        self._tokenizer = None
        ctx = multiprocessing.get_context("spawn")
        self.requests = ctx.Queue()
        self._cancel = ctx.Event()
        self._stopping = ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_serve, name="moe-inference", daemon=True,
                                   args=(spec, stats_interval, send, self.requests, self._cancel, self._stopping,
                                         log_path))
        self._send = send
        self._reader = threading.Thread(target=self._read, name="moe-inference-reader", daemon=True)

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded here on first use (token counts for attachments)."""
        if self._tokenizer is None:
            from mlx_lm.utils import load_tokenizer
            from moe_tui.inference.engine import resolve_model_path

            try:
                self._tokenizer = load_tokenizer(resolve_model_path(self.spec.model))
            except Exception:  # noqa: BLE001 - no tokenizer here means estimated counts, not a crash
                return None
        return self._tokenizer

    def start(self) -> None:
        self.process.start()
        self._send.close()  # the child holds the sending end now: EOF here when it exits
        self._reader.start()

    def _read(self) -> None:
        failed = False
        while True:
            try:
                message = self._recv.recv()
            except (EOFError, OSError):
                break
            failed = failed or isinstance(message, EngineFailed)
            self.app.post_message(message)
        self.process.join(timeout=5)
        if not self._stopping.is_set() and not failed:
            where = f"; its output is in {self.log_path}" if self.log_path else ""
            self.app.post_message(EngineFailed(
                f"the inference process exited unexpectedly (exit code {self.process.exitcode}){where}"))

    def join(self, timeout: float | None = None) -> None:
        if self.process.pid is None:
            return
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(1)
