"""A worker that talks to a server instead of running MLX: `moe attach URL` (a `moe serve`, with cache
telemetry from /v1/stats/stream) or `moe chat --base-url URL` (any OpenAI-compatible server: vLLM,
SGLang, llama.cpp...; no expert telemetry, so the panels show client-measured throughput and latency).
Same interface and messages as `InferenceWorker`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import Future

import httpx
from moe_tui.inference.events import Configure, Generate
from moe_tui.inference.telemetry import CacheSnapshot, GenerationDone

from .backend import Capabilities, estimated_tokens
from .messages import EngineFailed, EngineInfo, EngineNotice, EngineReady, ReplyChunk, ReplyDone, SnapshotReady

CHUNK_INTERVAL = 0.2  # seconds between text chunks posted to the UI


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
                                         exact_token_counts=False)
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.want_telemetry = telemetry
        self.stats_hz = stats_hz
        self.remote = RemoteStats()
        self.client = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=httpx.Timeout(10, read=300))

    # ---- the Backend contract (called from the UI thread)
    def submit(self, request: Generate) -> None:
        self.requests.put(request)

    def configure(self, request: Configure) -> None:
        self.requests.put(request)

    def cancel(self) -> None:
        self._cancel.set()

    def count_tokens(self, text: str) -> Future:
        return estimated_tokens(text)

    def stop(self) -> None:
        self._stopping.set()
        self._cancel.set()
        self.requests.put(None)

    # ---- the thread
    def run(self) -> None:
        try:
            models = self.client.get("/v1/models")
            models.raise_for_status()
            names = _model_names(models.json())
        except (httpx.HTTPError, ValueError, BadReply) as exc:
            self.app.post_message(EngineFailed(f"{self.base_url}: cannot list models ({exc})"))
            return
        if not self.model:
            if not names:
                self.app.post_message(EngineFailed(f"{self.base_url}: the server lists no models; pass --model"))
                return
            self.model = names[0]
        telemetry = self.want_telemetry and self._has_telemetry()
        self.app.post_message(EngineReady(EngineInfo(
            model=f"{self.model} @ {self.base_url}", model_type="remote", num_layers=0, moe_layers=(),
            num_experts=0, top_k=0, expert_bytes=0, dense_bytes=0, context_length=0)))
        if telemetry:
            threading.Thread(target=self._stream_stats, name="moe-remote-stats", daemon=True).start()
        else:
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
        except (httpx.HTTPError, ValueError):
            return False

    def _stream_stats(self) -> None:
        while not self._stopping.is_set():
            try:
                with self.client.stream("GET", "/v1/stats/stream", params={"hz": self.stats_hz}) as r:
                    for line in r.iter_lines():
                        if self._stopping.is_set():
                            return
                        if line.startswith("data: "):
                            snap = CacheSnapshot.from_dict(json.loads(line[6:]))
                            self.app.post_message(SnapshotReady(snap, None))
            except Exception:  # noqa: BLE001 - server restarting, gone, or sending junk: retry quietly
                time.sleep(1.0)

    def _generate(self, request: Generate) -> None:
        self._cancel.clear()
        body = {"model": self.model, "messages": request.messages, "max_tokens": request.max_tokens,
                "temperature": request.temperature, "top_p": request.top_p, "stream": True,
                "stream_options": {"include_usage": True}}
        text, pending, last_post = "", "", time.monotonic()
        started = time.perf_counter()
        first = None
        tokens, prompt_tokens, finish = 0, 0, "stop"
        try:
            with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise RuntimeError(_error_text(r))
                for line in r.iter_lines():
                    if self._cancel.is_set():
                        finish = "cancelled"
                        break  # leaving the block closes the connection: the server cancels
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = _object(json.loads(line[6:]), "a stream chunk")
                    if "error" in chunk:
                        raise BadReply(f"the server reported an error: {_message(chunk['error'])}")
                    usage = chunk.get("usage")
                    if isinstance(usage, dict):
                        tokens = _int(usage.get("completion_tokens"), tokens)
                        prompt_tokens = _int(usage.get("prompt_tokens"), 0)
                    for choice in chunk.get("choices") or []:
                        choice = _object(choice, "a choice")
                        delta = choice.get("delta")
                        content = delta.get("content") if isinstance(delta, dict) else None
                        if isinstance(content, str) and content:
                            first = first or time.perf_counter()
                            tokens += 0 if usage else 1
                            pending += content
                        if isinstance(choice.get("finish_reason"), str):
                            finish = choice["finish_reason"]
                    now = time.monotonic()
                    if pending and now - last_post >= CHUNK_INTERVAL:
                        self.app.post_message(ReplyChunk(request.tag, pending))
                        text, pending, last_post = text + pending, "", now
        except (httpx.HTTPError, RuntimeError, ValueError, BadReply) as exc:
            self.app.post_message(ReplyDone(request.tag, text + pending, None, str(exc)))
            return
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


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        data = None
    message = _message(data.get("error")) if isinstance(data, dict) else None
    return f"server answered {response.status_code}: {message or response.text[:200]}"


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


def _model_names(data) -> list[str]:
    """Model ids from a /v1/models answer ({"data": [{"id": ...}, ...]})."""
    models = _object(data, "the model list").get("data")
    if not isinstance(models, list):
        raise BadReply("the model list has no 'data' array")
    return [m["id"] for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)]
