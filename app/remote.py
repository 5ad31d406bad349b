"""A worker that talks to a server instead of running MLX: `moe attach URL` (a `moe serve`, with cache
telemetry from /v1/stats/stream and the miss curve from /v1/stats/miss-curve) or `moe chat --base-url URL`
(any OpenAI-compatible server: vLLM, SGLang, llama.cpp...; no expert telemetry, so the panels show
client-measured throughput and latency). Same interface and messages as `InferenceWorker`.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import httpx
from moe_tui.inference.events import Configure, ContextOverflow, Generate, MissCurveRequest, fit_messages
from moe_tui.inference.telemetry import CacheSnapshot, GenerationDone

from .backend import Capabilities, estimated_tokens
from .messages import (
    ConnectionChanged,
    EngineFailed,
    EngineInfo,
    EngineNotice,
    EngineReady,
    MissCurveReady,
    ReplyChunk,
    ReplyDone,
    SnapshotReady,
    context_notice,
)

CHUNK_INTERVAL = 0.2  # seconds between text chunks posted to the UI
ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error answer read for its message: a server may send one without end
CURVE_TIMEOUT = 620.0  # seconds to wait for a miss curve: `moe serve` gives its replay up to 600 s between jobs


class BadReply(Exception):
    """The server answered with something that is not what its API promises."""


class RemoteStats:
    """Client-side measurements for servers without telemetry (shown in place of the cache panels)."""

    def __init__(self) -> None:
        self.replies = 0
        self.decode_tps: list[float] = []
        self.ttft_s: list[float] = []
        self.tokens = 0


class RemoteWorker(threading.Thread):
    """The backend for `moe attach` (telemetry) and `moe chat --base-url` (none): a thread doing HTTP."""

    def __init__(self, app, base_url: str, model: str | None = None, api_key: str | None = None,
                 telemetry: bool = True, stats_hz: float = 2.0) -> None:
        super().__init__(name="moe-remote", daemon=True)
        self.app = app
        self.requests: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._stopping = threading.Event()
        self.capabilities = Capabilities(remote=True, telemetry=telemetry, configurable=False,
                                         exact_token_counts=False, tool_calls=True, miss_curve=telemetry)
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.want_telemetry = telemetry
        self.stats_hz = stats_hz
        self.heartbeat = 5.0  # seconds between checks of a server without telemetry, while it answers
        self.first_backoff = 1.0  # seconds before the first retry of a lost server; doubles each time
        self.max_backoff = 30.0
        self._up = True  # as far as we know: EngineReady is only posted once the server answered
        self._failures = 0
        self.remote = RemoteStats()
        # No keep-alive: each reply opens its own connection, so the trace below always sees the socket that
        # `cancel` must shut (a reused connection reports no connect event).
        self.client = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=httpx.Timeout(10, read=300),
                                   limits=httpx.Limits(max_keepalive_connections=0))
        self._open_lock = threading.Lock()
        self._open_stream = None  # the network stream of the reply being read, if any
        self._curve_requests: queue.Queue[MissCurveRequest | None] = queue.Queue()
        # The latest miss curve's capacities and rates, and the trace length it saw: the hit-rate box's Belady
        # figure at the snapshot's capacity, as the local session sends with its snapshots.
        self._curve: tuple[tuple[int, ...], dict[str, tuple[float, ...]]] | None = None
        self._trace_length = 0
        self.context_length = 0  # the model's window, where /v1/models says it (max_model_len, as vLLM does)
        self._counter: ThreadPoolExecutor | None = None  # the UI's token counts by /tokenize, where the server has it

    # ---- the Backend contract (called from the UI thread)
    def submit(self, request: Generate) -> None:
        self.requests.put(request)

    def configure(self, request: Configure) -> None:
        self.requests.put(request)

    def cancel(self) -> None:
        self._cancel.set()
        self._interrupt()

    def miss_curve(self, request: MissCurveRequest) -> None:
        self._curve_requests.put(request)

    def count_tokens(self, text: str | list[dict]) -> Future:
        if self._counter is None:
            return estimated_tokens(text)
        return self._counter.submit(self._count, text)

    def _count(self, text: str | list[dict]) -> int:
        """Tokens of a text, or of chat messages as the chat template makes them, by the server's /tokenize;
        estimated when the server has none or it fails."""
        counted = self._server_count(text) if self._counter is not None else None
        return counted if counted is not None else estimated_tokens(text).result()

    def _server_count(self, text: str | list[dict]) -> int | None:
        """The server's /tokenize count of a text or chat messages; None when it gives none."""
        body = {"model": self.model, **({"prompt": text} if isinstance(text, str) else {"messages": list(text)})}
        try:
            r = self.client.post("/tokenize", json=body)
            count = r.json().get("count") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, RecursionError, AttributeError):  # unreachable, or junk
            return None
        return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None

    def _fit(self, request: Generate) -> tuple[list[dict], int] | None:
        """The request's messages fitted to the server's context window where it is known (the oldest turns
        dropped, said), and the reply's budget; None when even the last message does not fit (said)."""
        messages = list(request.messages)
        if not (self.context_length and request.fit_context and messages and isinstance(messages[0], dict)):
            return messages, request.max_tokens
        try:
            _, kept, dropped, budget = fit_messages(messages, self._count, self.context_length, request.max_tokens,
                                                    size=lambda n: n)
        except ContextOverflow as exc:
            self.app.post_message(ReplyDone(request.tag, "", None, str(exc)))
            return None
        if (notice := context_notice(dropped, budget, request.max_tokens)) is not None:
            self.app.post_message(notice)
        return kept, budget

    def stop(self) -> None:
        if self._counter is not None:
            self._counter.shutdown(wait=False, cancel_futures=True)
        self._stopping.set()
        self._cancel.set()
        self._interrupt()
        self.requests.put(None)
        self._curve_requests.put(None)

    def _interrupt(self) -> None:
        """Shut the open reply's socket. The reading thread checks the cancel flag only when a line arrives,
        so a server that goes silent (or never sends its headers) would hold the reply until the read timeout;
        a shut socket ends that read at once, and the server sees the client leave."""
        with self._open_lock:  # held so that the stream cannot be released (and its socket reused) meanwhile
            stream = self._open_stream
            if stream is None:
                return
            try:
                sock = stream.get_extra_info("socket")
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by either side
                pass

    def _trace(self, event: str, info: dict) -> None:
        """httpcore's trace hook for a reply's request: keeps the connection's stream for `_interrupt`."""
        if event in ("connection.connect_tcp.complete", "connection.connect_unix_socket.complete",
                     "connection.start_tls.complete") and info.get("return_value") is not None:
            with self._open_lock:
                self._open_stream = info["return_value"]
            if self._cancel.is_set():  # cancelled while connecting
                self._interrupt()

    # ---- the thread
    def run(self) -> None:
        try:
            models = self.client.get("/v1/models")
            models.raise_for_status()
            names = _model_names(models.json())
        except Exception as exc:  # noqa: BLE001 - anything (RecursionError from nested JSON too) is a failed start
            self.app.post_message(EngineFailed(f"{self.base_url}: cannot list models ({_short(exc)})"))
            return
        if not self.model:
            if not names:
                self.app.post_message(EngineFailed(f"{self.base_url}: the server lists no models; pass --model"))
                return
            self.model = names[0]
        self.context_length = _context_length(models.json(), self.model)
        # The server counts chat tokens (POST /tokenize, as `moe serve` and vLLM do): exact counts, else estimates.
        if self.context_length and self._server_count([{"role": "user", "content": "hello"}]) is not None:
            self._counter = ThreadPoolExecutor(1, thread_name_prefix="moe-remote-count")
            self.capabilities = replace(self.capabilities, exact_token_counts=True)
        telemetry = self.want_telemetry and self._has_telemetry()
        self.app.post_message(EngineReady(EngineInfo(
            model=f"{self.model} @ {self.base_url}", model_type="remote", num_layers=0, moe_layers=(),
            num_experts=0, top_k=0, expert_bytes=0, dense_bytes=0, context_length=self.context_length)))
        watch = self._stream_stats if telemetry else self._heartbeat
        threading.Thread(target=watch, name="moe-remote-watch", daemon=True).start()
        if telemetry:
            threading.Thread(target=self._answer_curves, name="moe-remote-curve", daemon=True).start()
        else:
            self._no_curve()
            self.app.post_message(EngineNotice("this server gives no expert telemetry: the panels show "
                                               "throughput and latency measured here"))
        while not self._stopping.is_set():
            request = self.requests.get()
            if request is None:
                break
            if isinstance(request, Generate):
                try:
                    self._generate(request)
                except Exception as exc:  # noqa: BLE001 - a reply fails; the thread keeps serving
                    self.app.post_message(ReplyDone(request.tag, "", None, f"{type(exc).__name__}: {exc}"))
            elif isinstance(request, Configure):
                self.app.post_message(EngineNotice("capacity, mode and policy are set where the server runs "
                                                   "(moe serve --capacity/--mode/--policy)", "warning"))
        self.client.close()

    def _has_telemetry(self) -> bool:
        try:
            r = self.client.get("/v1/stats")
            data = r.json()
            return r.status_code == 200 and isinstance(data, dict) and "resident" in data
        except Exception:  # noqa: BLE001 - unreachable, or junk (RecursionError too): no telemetry
            return False

    def _stream_stats(self) -> None:
        """Snapshots from /v1/stats/stream; the stream doubles as the connection's heartbeat. A line that is
        not a snapshot is skipped: junk telemetry is not a lost server."""
        while not self._stopping.is_set():
            try:
                with self.client.stream("GET", "/v1/stats/stream", params={"hz": self.stats_hz}) as r:
                    if r.status_code >= 500:
                        raise BadReply(f"the stats stream answered {r.status_code}")
                    self._connected(True)
                    for line in r.iter_lines():
                        if self._stopping.is_set():
                            return
                        if line.startswith("data: "):
                            try:
                                snap = CacheSnapshot.from_dict(json.loads(line[6:]))
                            except Exception:  # noqa: BLE001 - not a snapshot (of this version): skip it
                                continue
                            self.app.post_message(SnapshotReady(snap, self._optimum(snap)))
                raise BadReply("the server closed the stats stream")
            except (httpx.TransportError, BadReply) as exc:  # gone, restarting, or refusing: back off, retry
                self._connected(False, _short(exc))
                self._stopping.wait(self._backoff())
            except Exception:  # noqa: BLE001 - anything else from a server sending nonsense: retry quietly
                self._stopping.wait(self._backoff())

    def _optimum(self, snap: CacheSnapshot) -> dict[str, float] | None:
        """Every policy's and Belady's rate at the snapshot's capacity on the latest miss curve; None before one,
        or after the server's statistics were reset (its trace started again)."""
        if snap.trace_length < self._trace_length:
            self._curve = None
        self._trace_length = snap.trace_length
        curve = self._curve
        if curve is None or snap.capacity not in curve[0]:
            return None
        i = curve[0].index(snap.capacity)
        return {name: rates[i] for name, rates in curve[1].items()}

    def _answer_curves(self) -> None:
        """Miss-curve requests, the newest of those waiting, one at a time: the server replays its engine's trace."""
        while True:
            request = self._curve_requests.get()
            while request is not None and not self._curve_requests.empty():
                request = self._curve_requests.get_nowait()
            if request is None or self._stopping.is_set():
                return
            if not self.capabilities.miss_curve:
                self._no_curve()
                continue
            try:
                self._fetch_curve(request)
            except Exception:  # noqa: BLE001 - unreachable (the stats stream says so) or nonsense: no curve this time
                pass

    def _fetch_curve(self, request: MissCurveRequest) -> None:
        params = {"capacities": ",".join(str(c) for c in request.capacities)}
        if request.last_steps is not None:
            params["last_steps"] = str(request.last_steps)
        params["layers"] = "all" if request.layers is None else str(request.layers)
        r = self.client.get("/v1/stats/miss-curve", params=params, timeout=httpx.Timeout(10, read=CURVE_TIMEOUT))
        if self._stopping.is_set():  # nothing is posted once the app has stopped us
            return
        if r.status_code in (404, 405):  # an older moe serve
            self._no_curve()
            return
        if r.status_code != 200:  # nothing routed yet, or a reply came first: the panel asks again after more steps
            return
        data = _object(r.json(), "the miss curve")
        capacities = tuple(_int(c, 0) for c in data.get("capacities", ()))
        rates = {str(name): tuple(float(v) for v in values)
                 for name, values in _object(data.get("rates"), "the miss curve's rates").items()}
        if capacities != tuple(request.capacities) or any(len(v) != len(capacities) for v in rates.values()):
            raise BadReply("the miss curve does not match the capacities asked for")
        self._curve = (capacities, rates)
        self.app.post_message(MissCurveReady(capacities, rates, _int(data.get("steps"), 0)))

    def _no_curve(self) -> None:
        """The server replays no routing trace (another server, or a `moe serve` older than the miss curve)."""
        self.capabilities = replace(self.capabilities, miss_curve=False)
        self.app.post_message(MissCurveReady((), {}, 0))  # no capacities: the panel says the server has none

    def _heartbeat(self) -> None:
        """Without telemetry: ask for the model list now and then, to notice a server that went away."""
        while not self._stopping.wait(self.heartbeat if self._up else self._backoff()):
            try:
                self.client.get("/v1/models", timeout=5.0).raise_for_status()
                self._connected(True)
            except Exception as exc:  # noqa: BLE001 - any failure means the server cannot serve us now
                self._connected(False, _short(exc))

    def _backoff(self) -> float:
        """Seconds before the next retry: first_backoff after one failure, doubling, at most max_backoff."""
        return min(self.max_backoff, self.first_backoff * 2 ** max(self._failures - 1, 0))

    def _connected(self, up: bool, reason: str = "") -> None:
        """Post a ConnectionChanged when the state changes (and count failures for the backoff)."""
        self._failures = 0 if up else self._failures + 1
        if up != self._up:
            self._up = up
            self.app.post_message(ConnectionChanged(up, reason, 0.0 if up else self._backoff()))

    def _generate(self, request: Generate) -> None:
        self._cancel.clear()
        fitted = self._fit(request)
        if fitted is None:
            return
        messages, max_tokens = fitted
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": request.temperature, "top_p": request.top_p, "stream": True,
                "stream_options": {"include_usage": True}}
        text, pending, last_post = "", "", time.monotonic()
        started = time.perf_counter()
        first = None
        tokens, prompt_tokens, finish = 0, 0, "stop"
        kind, data_lines, finished = "", 0, False  # finished: [DONE] or a finish_reason came
        skipped, example = 0, ""  # chunks that are JSON objects but carry nothing in the OpenAI format; the first
        error = None
        try:
            with self.client.stream("POST", "/v1/chat/completions", json=body,
                                    extensions={"trace": self._trace}) as r:
                kind = r.headers.get("content-type", "")
                if r.status_code != 200:
                    raise RuntimeError(_error_text(r.status_code, _head(r)))
                for line in r.iter_lines():
                    if self._cancel.is_set():
                        break  # leaving the block closes the connection: the server cancels
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].removeprefix(" ")  # SSE drops one space after the colon
                    data_lines += 1
                    if data == "[DONE]":
                        finished = True
                        break  # a server may keep the connection open after it
                    chunk = _object(json.loads(data), "a stream chunk")
                    if "error" in chunk:
                        raise BadReply(f"the server reported an error: {_message(chunk['error'])}")
                    usage = chunk.get("usage")
                    if isinstance(usage, dict):
                        tokens = _int(usage.get("completion_tokens"), tokens)
                        prompt_tokens = _int(usage.get("prompt_tokens"), 0)
                    choices = chunk.get("choices")
                    if not isinstance(choices, list):
                        if choices is not None or not isinstance(usage, dict):  # a usage-only chunk is fine
                            skipped, example = skipped + 1, example or data
                        continue
                    for choice in choices:
                        choice = _object(choice, "a choice")
                        delta = choice.get("delta")
                        content = delta.get("content") if isinstance(delta, dict) else None
                        reason = choice.get("finish_reason")
                        if isinstance(reason, str):
                            finish, finished = reason, True
                        if isinstance(content, str):
                            if content:
                                first = first or time.perf_counter()
                                tokens += 0 if usage else 1
                                pending += content
                        elif content is not None or not (isinstance(delta, dict) or isinstance(reason, str)):
                            skipped, example = skipped + 1, example or data
                    now = time.monotonic()
                    if pending and now - last_post >= CHUNK_INTERVAL:
                        self.app.post_message(ReplyChunk(request.tag, pending))
                        text, pending, last_post = text + pending, "", now
        except (httpx.HTTPError, RuntimeError, ValueError, RecursionError, BadReply) as exc:
            error = _short(exc)
        finally:
            with self._open_lock:
                self._open_stream = None
        if self._cancel.is_set() and (error is not None or not finished):
            finish, error = "cancelled", None  # the user's doing: whatever the read ended with, no error to show
        elif error is None and not data_lines:
            error = f"the server's answer is not an event stream ({kind or 'no content type'})"
        elif error is None and skipped and not text + pending:
            error = f"the server's stream has no text in the OpenAI format: {_sample(skipped, example)}"
        elif error is None and not finished:
            error = "the server closed the stream before the reply ended"
        if error is not None:
            self.app.post_message(ReplyDone(request.tag, text + pending, None, error))
            return
        if skipped:
            self.app.post_message(EngineNotice("skipped stream chunks not in the OpenAI format: "
                                               f"{_sample(skipped, example)}", "warning"))
        if pending:
            self.app.post_message(ReplyChunk(request.tag, pending))
        ended = time.perf_counter()
        ttft = (first or ended) - started
        decode = (tokens - 1) / (ended - first) if first and tokens > 1 and ended > first else 0.0
        done = GenerationDone(text + pending, finish, prompt_tokens, prompt_tokens, tokens, 0.0, decode, ttft)
        self.remote.replies += 1
        self.remote.tokens += tokens
        self.remote.decode_tps.append(decode)
        self.remote.ttft_s.append(ttft)
        self.app.post_message(ReplyDone(request.tag, done.text, done))


def _head(response: httpx.Response) -> bytes:
    """The start of an answer's body, at most ERROR_BODY_LIMIT bytes."""
    body = b""
    for part in response.iter_bytes():
        body += part
        if len(body) >= ERROR_BODY_LIMIT:
            break
    return body[:ERROR_BODY_LIMIT]


def _sample(count: int, example: str) -> str:
    return f"{count} chunk{'s' if count > 1 else ''}, the first {example[:80]}"


def _short(exc: BaseException) -> str:
    return str(exc)[:300] or type(exc).__name__


def _error_text(status: int, body: bytes) -> str:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    message = _message(data.get("error")) if isinstance(data, dict) else None
    return f"server answered {status}: {message or body[:200].decode(errors='replace')}"


def _message(error) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return str(error)[:200]


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise BadReply(f"{what} is not a JSON object: {str(value)[:80]}")
    return value


def _int(value, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _context_length(data, model: str | None) -> int:
    """The context window /v1/models gives for `model` (vLLM's `max_model_len`; some servers say
    `context_length` or `context_window`), or 0."""
    models = data.get("data") if isinstance(data, dict) else None
    for entry in models if isinstance(models, list) else ():
        if isinstance(entry, dict) and entry.get("id") == model:
            for key in ("max_model_len", "context_length", "context_window"):
                value = entry.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return 0


def _model_names(data) -> list[str]:
    """Model ids from a /v1/models answer ({"data": [{"id": ...}, ...]})."""
    models = _object(data, "the model list").get("data")
    if not isinstance(models, list):
        raise BadReply("the model list has no 'data' array")
    return [m["id"] for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)]
