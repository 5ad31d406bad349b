"""`moe chat --base-url` against a server that sends unexpected JSON or goes silent: no reply or key wedges."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import uvicorn
from moe_tui.app.textual_compat import notifications
from moe_tui.app.widgets.chat import MessageView
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.helpers import replies, send, wait_until
from tests.test_remote_app import remote_app
from tests.test_server import free_port

SIZE = (120, 40)
GOOD_TEXT = "Hello world"
SILENCE = 600.0  # seconds a "silent" stream waits after its first chunk: far past any test's patience
DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON that json.loads refuses with RecursionError, not ValueError


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def chunk(content: str | None = None, finish: str | None = None) -> dict:
    delta = {} if content is None else {"content": content}
    return {"id": "c", "object": "chat.completion.chunk", "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


GOOD_STREAM = [sse(chunk("Hello")), sse(chunk(" world")), sse(chunk(finish="stop")),
               sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}), "data: [DONE]\n\n"]

JUNK_LINES = {  # /v1/chat/completions streams this one line, then [DONE]
    "chunk is a list": "[1,2]",
    "choices null": '{"choices": null}',
    "delta null": '{"choices": [{"delta": null}]}',
    "content a number": '{"choices": [{"delta": {"content": 5}}]}',
    "chunk is a string": '"text"',
    "chunk not json": "{not json",
    "chunk nested too deep": DEEP,
}

MODEL_LISTS = {"a JSON list": [{"id": "fake"}], "data null": {"data": None}, "data of numbers": {"data": [1, 2]},
               "nested too deep": DEEP}


class FakeServer:
    """An OpenAI-compatible server on loopback whose answers a test switches while the app talks to it."""

    def __init__(self) -> None:
        self.models: object = {"object": "list", "data": [{"id": "fake"}]}
        self.chat = "good"
        self.telemetry = "none"
        self.release = threading.Event()  # ends a silent stream early (at teardown)
        self.disconnected = threading.Event()  # a silent stream noticed that the client went away
        self.waiting = threading.Event()  # a silent request has arrived
        self.port = free_port()
        app = Starlette(routes=[Route("/v1/models", self.list_models), Route("/v1/stats", self.stats),
                                Route("/v1/stats/stream", self.stats_stream),
                                Route("/v1/chat/completions", self.completions, methods=["POST"])])
        # "critical": the mid-stream abort below is an exception uvicorn would log with its traceback
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.05)

    def reset(self) -> None:
        self.models = {"object": "list", "data": [{"id": "fake"}]}
        self.chat, self.telemetry = "good", "none"
        for event in (self.release, self.disconnected, self.waiting):
            event.clear()

    def close(self) -> None:
        self.release.set()
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def list_models(self, request: Request) -> Response:
        if isinstance(self.models, str):
            return Response(self.models, media_type="application/json")
        return JSONResponse(self.models)

    async def stats(self, request: Request) -> Response:
        if self.telemetry == "junk stream":  # enough to pass for `moe serve` telemetry; the stream behind it is junk
            return JSONResponse({"resident": [1]})
        if self.telemetry == "nested too deep":
            return Response(DEEP, media_type="application/json")
        return JSONResponse({"error": "none"}, 404)

    async def stats_stream(self, request: Request) -> Response:
        async def junk():
            for _ in range(200):
                yield sse([1, 2]) + sse({"resident": "lots"}) + sse("x") + "data: {nope\n\n"
                await asyncio.sleep(0.05)
        return StreamingResponse(junk(), media_type="text/event-stream")

    async def completions(self, request: Request) -> Response:
        await request.body()
        mode = self.chat
        if mode == "good":
            return StreamingResponse(iter(GOOD_STREAM), media_type="text/event-stream")
        if mode in JUNK_LINES:
            return StreamingResponse(iter([f"data: {JUNK_LINES[mode]}\n\n", "data: [DONE]\n\n"]),
                                     media_type="text/event-stream")
        if mode == "with a junk chunk":
            return StreamingResponse(iter([GOOD_STREAM[0], sse({"choices": None}), *GOOD_STREAM[1:]]),
                                     media_type="text/event-stream")
        if mode == "no space after data:":
            return StreamingResponse(iter(line.replace("data: ", "data:") for line in GOOD_STREAM),
                                     media_type="text/event-stream")
        if mode == "error list":
            return JSONResponse([{"message": "boom"}, 2], status_code=500)
        if mode == "not a stream":
            return Response("<html><body>Welcome to nginx!</body></html>\n", media_type="text/html")
        if mode == "cut":
            return StreamingResponse(self.cut(), media_type="text/event-stream")
        if mode == "ends early":
            return StreamingResponse(iter([sse(chunk("Hel"))]), media_type="text/event-stream")
        if mode == "silent":
            return StreamingResponse(self.silent(request), media_type="text/event-stream")
        if mode == "no headers":
            self.waiting.set()
            await self.wait(request)
            return StreamingResponse(iter(GOOD_STREAM), media_type="text/event-stream")
        raise AssertionError(mode)

    async def cut(self):
        yield sse(chunk("Hel"))
        await asyncio.sleep(0.05)
        raise ConnectionAbortedError("the fake server drops the connection mid-reply")

    async def silent(self, request: Request):
        yield sse(chunk("Hel"))
        self.waiting.set()
        try:
            await self.wait(request)
        except asyncio.CancelledError:  # starlette cancels the stream when it sees the client leave
            self.disconnected.set()
            raise
        yield "data: [DONE]\n\n"

    async def wait(self, request: Request) -> None:
        """Say nothing for SILENCE seconds, until released, or until the client goes away."""
        deadline = time.monotonic() + SILENCE
        while time.monotonic() < deadline and not self.release.is_set():
            if await request.is_disconnected():
                self.disconnected.set()
                return
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def server():
    live = FakeServer()
    yield live
    live.close()


@pytest.fixture
def fake(server):
    server.reset()
    yield server
    server.release.set()  # a silent stream the test left open ends now


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that killed a thread (the remote worker's, in the old bug) during the test."""
    caught: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: caught.append(args.exc_value))
    return caught


def finished(app) -> bool:
    return not app.generating and bool(replies(app)) and replies(app)[-1].status != "partial"


def errors(app) -> list[str]:
    return [text for text, severity in notifications(app) if severity in ("error", "warning")]


async def ready(pilot, app) -> None:
    await wait_until(pilot, lambda: app.sub_title in ("remote server", "model failed to load"), timeout=20)
    assert app.sub_title == "remote server"


async def recovers(pilot, app, fake: FakeServer) -> None:
    """The server behaves again: the next message gets a whole reply."""
    fake.chat = "good"
    before = len(replies(app))
    await send(pilot, app, "and now?")
    await wait_until(pilot, lambda: len(replies(app)) > before and finished(app), timeout=15)
    assert replies(app)[-1].status == "complete" and replies(app)[-1].content == GOOD_TEXT


@pytest.mark.parametrize("mode", [*JUNK_LINES, "error list", "not a stream", "cut", "ends early"])
async def test_a_bad_stream_ends_the_reply_with_an_error(fake, mode, tmp_path, monkeypatch, thread_errors):
    app = remote_app(tmp_path, monkeypatch, fake.url + "/v1", telemetry=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        fake.chat = mode
        await send(pilot, app, "hello")
        await wait_until(pilot, lambda: finished(app), timeout=15)
        assert replies(app)[-1].status == "failed"  # an error keeps what came, marked failed
        assert any("generation failed" in e for e in errors(app)), errors(app)
        assert not any("Traceback" in e for e in errors(app))
        await recovers(pilot, app, fake)
        assert app.backend.is_alive()
    assert thread_errors == []


async def test_the_good_server_gives_a_whole_reply(fake, tmp_path, monkeypatch, thread_errors):
    app = remote_app(tmp_path, monkeypatch, fake.url, telemetry=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await recovers(pilot, app, fake)
        assert app.last_done.generated_tokens == 2 and app.last_done.prompt_tokens == 3
        assert not errors(app)
    assert thread_errors == []


@pytest.mark.parametrize(("mode", "warned"), [("with a junk chunk", True), ("no space after data:", False)])
async def test_a_stream_with_its_text_intact_is_a_reply(fake, mode, warned, tmp_path, monkeypatch, thread_errors):
    app = remote_app(tmp_path, monkeypatch, fake.url, telemetry=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        fake.chat = mode
        await send(pilot, app, "hello")
        await wait_until(pilot, lambda: finished(app), timeout=15)
        assert replies(app)[-1].status == "complete" and replies(app)[-1].content == GOOD_TEXT
        assert [e for e in errors(app) if "skipped stream chunks" in e] == (
            ['skipped stream chunks not in the OpenAI format: 1 chunk, the first {"choices": null}'] if warned else [])
    assert thread_errors == []


@pytest.mark.parametrize("stats", ["junk stream", "nested too deep"])
async def test_junk_telemetry_is_ignored(fake, stats, tmp_path, monkeypatch, thread_errors):
    fake.telemetry = stats
    app = remote_app(tmp_path, monkeypatch, fake.url, telemetry=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await recovers(pilot, app, fake)
        await pilot.pause(0.5)  # the stats stream keeps sending junk meanwhile
        assert app.last_snapshot is None and app.is_running
    assert thread_errors == []


@pytest.mark.parametrize(("mode", "key"), [("silent", "escape"), ("silent", "ctrl+n"), ("no headers", "escape")])
async def test_a_silent_server_is_cancelled_at_once(fake, mode, key, tmp_path, monkeypatch, thread_errors):
    app = remote_app(tmp_path, monkeypatch, fake.url, telemetry=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        fake.chat = mode
        await send(pilot, app, "hello")
        await wait_until(pilot, fake.waiting.is_set, timeout=10)
        pressed = time.monotonic()
        await pilot.press(key)
        await wait_until(pilot, lambda: not app.generating, timeout=10)
        assert time.monotonic() - pressed < 3
        assert fake.disconnected.wait(5)  # the connection was closed: a real server stops generating
        if key == "escape":
            assert replies(app)[-1].status == "cancelled"
            assert replies(app)[-1].content == ("Hel" if mode == "silent" else "")  # what came is kept
            assert not errors(app)  # the user cancelled: no error to report
        await recovers(pilot, app, fake)
    assert thread_errors == []


@pytest.mark.parametrize("name", MODEL_LISTS)
async def test_a_junk_model_list_fails_to_load_without_a_traceback(fake, name, tmp_path, monkeypatch,
                                                                   thread_errors):
    fake.models = MODEL_LISTS[name]
    app = remote_app(tmp_path, monkeypatch, fake.url, telemetry=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.sub_title == "model failed to load", timeout=20)
        await wait_until(pilot, lambda: not app.backend.is_alive(), timeout=5)
        shown = "\n".join(v.text for v in app.query(MessageView))
        assert "Could not load the model" in shown and "Traceback" not in shown
    assert thread_errors == []
