"""One engine session: the thread that owns every MLX call, its job queue and the events it emits.

The app (in a thread or a child process) and the server are adapters over a `Session`: they submit
jobs, cancel them, ask for token counts, and receive frozen events through a sink (a callable run on
the session's thread). A failing job ends with a `JobFailed` event; the thread goes on.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError
from .events import (
    Configure,
    ContextOverflow,
    Delta,
    Event,
    Generate,
    JobDone,
    JobFailed,
    JobStarted,
    MissCurveDone,
    MissCurveRequest,
    ModelInfo,
    Notice,
    Progress,
    SessionFailed,
    SessionReady,
    Snapshot,
    Tokenize,
    ToolCall,
    ToolCalled,
    fit_messages,
    reply_reserve,
)
from .oracle import sampled_layers
from .telemetry import CacheSnapshot, GenerationDone
from .tools import ToolCallSplitter, ToolFormat, forced_opening, tool_format

log = logging.getLogger("moe_tui.session")
OPTIMUM_WINDOW = 1024  # the idle optimum replay covers the last this-many steps of each layer's trace


class QueueFull(Exception):
    """Too many jobs waiting; a server answers 429."""


class SessionClosed(Exception):
    """The session has stopped (or its thread died): it takes no more work."""


@dataclass
class Job:
    """A submitted generation: its request, its own cancel flag, and where its events go."""

    id: int
    request: Generate
    emit: Callable[[Event], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class Session:
    """Owns the engine and the one thread that runs it.

    Args:
        load: builds the engine, called on the session's thread (MLX streams are per thread).
        sink: receives every event not routed to a job's own sink (called on the session's thread).
        stats_interval: seconds between `Snapshot` events, idle or generating.
        chunk_interval: seconds over which a reply's text is gathered into one `Delta` (0: every token).
        max_queue: jobs that may wait (0: no bound); `submit` raises QueueFull beyond it.
        replay_optimum: while idle, replay the recent routing under every policy and Belady's MIN.
        tool_parser: the mlx-lm tool-call parser for jobs offered tools; None: the one inferred from the tokenizer.
    """

    def __init__(self, load: Callable[[], Any], sink: Callable[[Event], None], stats_interval: float = 0.5,
                 chunk_interval: float = 0.0, max_queue: int = 0, replay_optimum: bool = False,
                 tool_parser: str | None = None) -> None:
        self._load = load
        self.tool_parser = tool_parser
        self.tool_format: ToolFormat | str = "the model is not loaded"  # the format, or why there is none
        self._sink = sink
        self.stats_interval = stats_interval
        self.chunk_interval = chunk_interval
        self.replay_optimum = replay_optimum
        # Unbounded: it also carries Configure requests and wake-ups (None), which must never take a job's place.
        self._jobs: queue.Queue[Job | Configure | MissCurveRequest | None] = queue.Queue()
        self.max_queue = max_queue
        self._waiting = 0  # jobs queued, not yet started (the bound applies to these alone)
        self._waiting_lock = threading.Lock()
        self._tokenize_requests: queue.Queue[tuple[Tokenize, Future]] = queue.Queue()
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe-inference", daemon=True)
        self.ready = threading.Event()
        self.engine: Any = None
        self.info: ModelInfo | None = None
        self.error: str | None = None
        self.current: Job | None = None
        # Jobs the thread has finished, by outcome: "completed" (stop, length or tool call), "cancelled", "failed".
        self.outcomes = {"completed": 0, "cancelled": 0, "failed": 0}
        self.snapshot: CacheSnapshot | None = None  # the latest, for readers on other threads
        self._optimum: dict[str, float] | None = None
        self._optimum_for: tuple[int, int] | None = None  # (traced steps, capacity) the optimum replayed
        self._last_snapshot = 0.0

    # ---------------------------------------------------------------- any thread

    @property
    def state(self) -> str:
        """"loading", "ready", "failed" (the model did not load), "stopped", or "dead" (the thread died)."""
        if self.error is not None:
            return "failed"
        if self._thread.ident is None or self._thread.is_alive():
            return "ready" if self.ready.is_set() else "loading"
        return "stopped" if self._stopping.is_set() else "dead"

    @property
    def stopping(self) -> bool:
        """stop() was called: no job or replay will start any more."""
        return self._stopping.is_set()

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Generate, sink: Callable[[Event], None] | None = None) -> Job:
        """Queue a generation; its events go to `sink` (default: the session's).

        Raises:
            QueueFull: `max_queue` jobs are already waiting. SessionClosed: the session has stopped.
        """
        self._check_open()
        job = Job(next(self._ids), request, sink or self._sink)
        with self._waiting_lock:
            if self.max_queue and self._waiting >= self.max_queue:
                raise QueueFull
            self._waiting += 1
        self._jobs.put(job)
        return job

    def configure(self, request: Configure) -> None:
        """Change capacity, mode or policy, or reset the statistics, between jobs (a `Notice` reports it)."""
        self._check_open()
        self._jobs.put(request)

    def miss_curve(self, request: MissCurveRequest) -> None:
        """Replay the routing trace at each of `request.capacities` between jobs (a `MissCurveDone` answers)."""
        self._check_open()
        self._jobs.put(request)

    def cancel(self, job_id: int | None = None) -> None:
        """End job `job_id` (default: the running one) after its current token; a queued one never starts."""
        job = self.current
        if job is not None and job_id in (None, job.id):
            job.cancel.set()
        if job_id is not None:
            for waiting in list(self._jobs.queue):
                if isinstance(waiting, Job) and waiting.id == job_id:
                    waiting.cancel.set()

    def tokenize(self, request: Tokenize) -> Future:
        """A Future of the prompt's token ids, tokenized on the session's thread (between two tokens of a
        running reply, or at once when idle)."""
        future: Future = Future()
        try:
            self._check_open()
        except SessionClosed as exc:
            future.set_exception(exc)
            return future
        self._tokenize_requests.put((request, future))
        self._jobs.put(None)  # wakes an idle loop
        return future

    def waiting(self) -> int:
        return self._waiting

    def stop(self) -> None:
        """Cancel the running job and every queued one (each still gets its final event), then exit."""
        self._stopping.set()
        job = self.current
        if job is not None:
            job.cancel.set()
        self._jobs.put(None)  # wakes an idle loop

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _check_open(self) -> None:
        if self._stopping.is_set() or self.state in ("failed", "dead"):
            raise SessionClosed("the inference session has stopped")

    # ---------------------------------------------------------------- the session's thread

    def _emit(self, event: Event) -> None:
        try:
            self._sink(event)
        except Exception:  # noqa: BLE001 - a broken sink must not take the engine down with it
            log.exception("session sink failed on %s", type(event).__name__)

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except Exception:  # noqa: BLE001 - e.g. the client's event loop has closed: the job goes on to its end
            log.exception("job %d: its sink failed on %s", job.id, type(event).__name__)

    def _run(self) -> None:
        try:
            self.engine = self._load()
        except (ModelLoadError, ValueError, OSError) as exc:
            self._fail(str(exc))
            return
        except BaseException as exc:  # noqa: BLE001 - shown to the user rather than dying silently
            log.exception("the model failed to load")
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        # The model and its imports live as long as this loop: keep them out of the cycle collector,
        # whose full passes over them would otherwise pause generation.
        gc.freeze()
        self.tool_format = self._tool_format()
        fmt = self.tool_format
        self.info = ModelInfo.of(self.engine, *((fmt.name, "") if isinstance(fmt, ToolFormat) else ("", fmt)))
        self.ready.set()
        self._emit(SessionReady(self.info))
        for text, severity in self.engine.experts.load_notes():  # e.g. `moe pack` would make misses faster
            self._emit(Notice(text, severity))
        self._publish(force=True)
        while True:
            try:
                if not self._serve_one():
                    break
            except Exception:  # noqa: BLE001 - e.g. EMFILE while taking a snapshot: log it, keep serving
                log.exception("inference session: error outside a job")
                time.sleep(0.05)
        self._drain_queue()
        try:
            self.engine.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the engine")

    def _tool_format(self) -> ToolFormat | str:
        try:
            return tool_format(getattr(self.engine, "tokenizer", None), self.tool_parser)
        except Exception as exc:  # noqa: BLE001 - a tokenizer mlx-lm cannot read for tools is a model without them
            return f"its tool-call format could not be read ({type(exc).__name__}: {exc})"

    def _fail(self, error: str) -> None:
        self.error = error
        self.ready.set()
        self._emit(SessionFailed(error))

    def _serve_one(self) -> bool:
        """Wait for and handle one item; False when the session should end."""
        self._answer_tokenize()
        try:
            item = self._jobs.get(timeout=self.stats_interval)
        except queue.Empty:
            if self._stopping.is_set():
                return False
            self._idle()
            return True
        if item is None:
            return not self._stopping.is_set()
        if isinstance(item, Configure):
            self._configure(item)
        elif isinstance(item, MissCurveRequest):
            self._miss_curve(item)
        else:
            self._dequeued(item)
            self.current = item
            outcome = "failed"
            try:
                outcome = self._generate(item)
            finally:
                self.current = None
                self.outcomes[outcome] += 1
        self._publish(force=True)
        return True

    def _dequeued(self, job: Job) -> None:
        with self._waiting_lock:
            self._waiting -= 1

    def _idle(self) -> None:
        if self.replay_optimum:
            self._refresh_optimum()
        self._publish()

    def _drain_queue(self) -> None:
        """After stop: queued jobs end with a cancelled final event, counts with an error."""
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                self._dequeued(item)
                self._send(item, JobDone(item.id, item.request.tag, _cancelled()))
        while True:
            try:
                _, future = self._tokenize_requests.get_nowait()
            except queue.Empty:
                break
            future.set_exception(SessionClosed("the inference session has stopped"))

    def _answer_tokenize(self) -> None:
        while True:
            try:
                request, future = self._tokenize_requests.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.engine.encode(request.prompt, request.tools, request.continue_final))
            except Exception as exc:  # noqa: BLE001 - e.g. a chat template refusing a role order
                future.set_exception(exc)

    def _configure(self, request: Configure) -> None:
        engine = self.engine
        try:
            if request.capacity is not None:
                engine.set_capacity(request.capacity)
                self._optimum = None  # of the old capacity: replayed at the new one when idle
                self._emit(Notice(f"capacity {engine.capacity} experts per layer"))
            if request.mode is not None:
                engine.set_mode(request.mode)
                self._emit(Notice(f"mode {engine.mode}"))
            if request.policy is not None:
                engine.set_policy(request.policy)
                self._emit(Notice(f"policy {engine.policy}"))
            if request.reset_stats:
                engine.reset_stats()
                self._optimum, self._optimum_for = None, None
                self._emit(Notice("statistics reset"))
        except (ValueError, ModelLoadError) as exc:
            self._emit(Notice(str(exc), "error"))

    def _fit(self, job: Job, tools: Sequence[dict] | None = None, opening: int = 0) -> tuple[list[int], int, int]:
        """The prompt's token ids (the chat template given `tools`), how many oldest messages were dropped to fit
        the context (to leave the reply its `reply_reserve`), and the reply's token
        budget (shortened when even the newest turns leave less room than
        max_tokens, or where `opening` tokens forced after the prompt leave less).

        Raises:
            ContextOverflow: (fit_context) the last message alone leaves less than MIN_REPLY tokens.
        """
        request = job.request
        messages = request.messages

        def encode(messages):
            return self.engine.encode(messages, tools=tools) if tools else self.engine.encode(messages)

        tokens = encode(messages)
        context = self.engine.context_length
        limit = context - reply_reserve(request.max_tokens, context) - opening
        if not request.fit_context or len(tokens) <= limit or not messages or not isinstance(messages[0], dict):
            return tokens, 0, max(1, min(request.max_tokens, context - len(tokens) - opening))
        tokens, _, dropped, budget = fit_messages(messages, encode, context, request.max_tokens, opening,
                                                  encoded=tokens)
        return tokens, dropped, budget

    def _splitter(self, request: Generate) -> tuple[ToolCallSplitter | None, str]:
        """For a job offered tools: what splits its reply into text and calls, and the text its reply is made to
        start with to obey its tool_choice.

        Raises:
            ValueError: the model has no tool-call format (the message says why).
        """
        if not request.tools or request.tool_choice == "none":
            return None, ""
        fmt = self.tool_format
        if isinstance(fmt, str):
            raise ValueError(f"the model does not support tool calling: {fmt}")
        splitter = ToolCallSplitter(fmt, request.tools, request.call_id_prefix)
        opening = forced_opening(fmt, request.tool_choice, request.tool_name)
        splitter.feed(opening)  # inside a call: nothing comes out until the model ends it
        return splitter, opening

    def _generate(self, job: Job) -> str:
        """Run one job to its final event; its outcome ("completed", "cancelled" or "failed")."""
        request = job.request
        if job.cancel.is_set() or self._stopping.is_set():
            self._send(job, JobDone(job.id, request.tag, _cancelled()))
            return "cancelled"
        pending, sent, last_chunk = "", "", time.monotonic()
        calls: list[ToolCall] = []

        def take(parts: list[str | ToolCall]) -> None:
            nonlocal pending, sent
            for part in parts:
                if isinstance(part, str):
                    pending += part
                    continue
                if pending:  # the text before the call goes first
                    self._send(job, Delta(job.id, request.tag, pending, None))
                    sent, pending = sent + pending, ""
                calls.append(part)
                self._send(job, ToolCalled(job.id, request.tag, part))

        try:
            splitter, opening = self._splitter(request)
            opening_ids = list(self.engine.tokenizer.encode(opening, add_special_tokens=False)) if opening else []
            # token ids: the engine does not tokenize again
            prompt, dropped, max_tokens = self._fit(job, request.tools if splitter else None, len(opening_ids))
            prompt = prompt + opening_ids
            self._send(job, JobStarted(job.id, request.tag, len(prompt), dropped, max_tokens, request.max_tokens))
            done: GenerationDone | None = None
            started = time.monotonic()

            def progress(done: int, total: int) -> None:
                self._answer_tokenize()
                self._send(job, Progress(job.id, request.tag, done, total, time.monotonic() - started))

            for event in self.engine.stream(prompt, max_tokens=max_tokens, temperature=request.temperature,
                                            top_p=request.top_p, top_k=request.top_k, seed=request.seed,
                                            presence_penalty=request.presence_penalty,
                                            frequency_penalty=request.frequency_penalty,
                                            logit_bias=dict(request.logit_bias), stop=request.stop,
                                            cancel=job.cancel, progress=progress):
                if isinstance(event, GenerationDone):
                    done = event
                    break
                self._answer_tokenize()
                take(splitter.feed(event.text) if splitter else [event.text])
                now = time.monotonic()
                if now - last_chunk >= self.chunk_interval:
                    snapshot = self._due_snapshot(now)
                    if pending or snapshot is not None:  # (inside a call there may be no text yet)
                        self._send(job, Delta(job.id, request.tag, pending, snapshot))
                        sent, pending = sent + pending, ""
                    last_chunk = now
            if splitter is not None:
                take(splitter.finish())
        except ContextOverflow as exc:  # the user's message does not fit: said as it is, not logged as a bug
            log.info("job %d refused: %s", job.id, exc)
            self._send(job, JobFailed(job.id, request.tag, sent + pending, str(exc)))
            return "failed"
        except Exception as exc:  # noqa: BLE001 - the job fails; the thread goes on serving
            log.error("job %d failed:\n%s", job.id, traceback.format_exc())
            self._send(job, JobFailed(job.id, request.tag, sent + pending, f"{type(exc).__name__}: {exc}"))
            return "failed"
        if pending:
            self._send(job, Delta(job.id, request.tag, pending, None))
        done = done or _cancelled()
        if splitter is not None:
            done = dataclasses.replace(done, text=sent + pending)
        self._send(job, JobDone(job.id, request.tag, done, tuple(calls)))
        return "cancelled" if done.finish_reason == "cancelled" else "completed"

    def _due_snapshot(self, now: float, force: bool = False) -> CacheSnapshot | None:
        """A fresh snapshot (kept for readers on other threads) when one is due, else None."""
        if not force and now - self._last_snapshot < self.stats_interval:
            return None
        self._last_snapshot = now
        self.snapshot = self.engine.snapshot()
        return self.snapshot

    def _publish(self, force: bool = False) -> None:
        if (snapshot := self._due_snapshot(time.monotonic(), force)) is not None:
            self._emit(Snapshot(snapshot, self._optimum))

    def _job_waiting(self) -> bool:
        """Whether idle work (a replay) should stop now: a job waits, or the session is stopping."""
        return bool(self._waiting) or self._stopping.is_set()

    def _refresh_optimum(self) -> None:
        """Replay the recent trace under every policy and Belady's MIN (idle only: it costs CPU)."""
        engine = self.engine
        steps = engine.traced_steps
        if not steps or (steps, engine.capacity) == self._optimum_for or not engine.layout.moe_layers:
            return
        rates = engine.hit_rates_vs_optimum(last_steps=OPTIMUM_WINDOW, should_stop=self._job_waiting)
        if rates is None:
            return  # a job came first: replayed at the next idle moment
        self._optimum = {name: r["hit_rate"] for name, r in rates.items()}
        self._optimum_for = (steps, engine.capacity)
        self._publish(force=True)

    def _miss_curve(self, request: MissCurveRequest) -> None:
        engine = self.engine
        if not engine.traced_steps or not engine.layout.moe_layers:
            return
        rates: dict[str, list[float]] = {}
        layers = sampled_layers(len(engine.layout.moe_layers), request.layers)
        for capacity in request.capacities:
            replayed = engine.hit_rates_vs_optimum(capacity, request.last_steps, should_stop=self._job_waiting,
                                                   layers=layers)
            if replayed is None:
                return  # a job goes first; the caller asks again when idle
            for name, r in replayed.items():
                rates.setdefault(name, []).append(r["hit_rate"])
        self._emit(MissCurveDone(tuple(request.capacities), {k: tuple(v) for k, v in rates.items()},
                                 engine.traced_steps))


def _cancelled() -> GenerationDone:
    return GenerationDone("", "cancelled", 0, 0, 0, 0.0, 0.0, 0.0)

