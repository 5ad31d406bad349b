"""`moe serve` against hostile clients: Host/Origin/content-type guards, read deadlines, connection caps, bad ports."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from moe_tui.inference.server import allowed_hosts_for, descriptors_needed, uvicorn_config
from moe_tui.inference.server.guards import FloodFilter, guard, quiet_floods
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = allowed_hosts_for("127.0.0.1")


class State:
    def __init__(self) -> None:
        self.held = 0
        self.release = threading.Event()
        self.gate = asyncio.Event()


def tiny_app(state: State) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(await request.json())

    async def stream(request: Request) -> StreamingResponse:
        await request.json()

        async def chunks():
            yield b"one\n"
            await state.gate.wait()
            yield b"two\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    async def hold(request: Request) -> JSONResponse:
        state.held += 1
        while not state.release.is_set():
            await asyncio.sleep(0.02)
        return JSONResponse({"held": True})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/chat/completions", echo, methods=["POST"]),
                             Route("/v1/messages", echo, methods=["POST"]),
                             Route("/stream", stream, methods=["POST"]), Route("/hold", hold),
                             Route("/health", health)])


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080")


BODY = {"messages": [{"role": "user", "content": "hi"}]}


# ---------------------------------------------------------------- Host, Origin, Content-Type (ASGI)

async def test_loopback_server_answers_only_loopback_host_names():
    app = guard(tiny_app(State()), [*LOOPBACK, "box.lan"])
    async with client(app) as c:
        for host in ("127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]:9", "box.lan:80"):
            assert (await c.get("/health", headers={"host": host})).status_code == 200, host
        r = await c.get("/health", headers={"host": "evil.example:8080"})
        assert r.status_code == 421 and "evil.example" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = await c.post("/v1/messages", json=BODY, headers={"host": "rebound.example"})
        assert r.status_code == 421 and r.json()["type"] == "error" and r.json()["error"]["message"]
    async with client(guard(tiny_app(State()), None)) as c:  # bound off loopback: the API key guards it
        assert (await c.get("/health", headers={"host": "anything.example"})).status_code == 200


async def test_requests_from_web_pages_are_refused_unless_their_origin_is_allowed():
    async with client(guard(tiny_app(State()), LOOPBACK)) as c:
        # The CORS "simple request" a page can send without a preflight: text/plain, with its Origin.
        r = await c.post("/v1/chat/completions", content=json.dumps(BODY),
                         headers={"origin": "http://evil.example", "content-type": "text/plain"})
        assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"]
        r = await c.post("/v1/messages", json=BODY, headers={"origin": "null"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert (await c.post("/v1/chat/completions", json=BODY)).json() == BODY  # SDKs and curl send no Origin
    app = guard(tiny_app(State()), LOOPBACK, ["http://localhost:3000"])
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json=BODY, headers={"origin": "http://localhost:3000"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        preflight = {"access-control-request-method": "POST", "access-control-request-headers": "content-type"}
        r = await c.options("/v1/chat/completions", headers={"origin": "http://localhost:3000", **preflight})
        assert r.status_code == 200 and "POST" in r.headers["access-control-allow-methods"]
        r = await c.options("/v1/chat/completions", headers={"origin": "http://localhost:4000", **preflight})
        assert r.status_code == 403


async def test_post_bodies_must_be_declared_json():
    async with client(guard(tiny_app(State()), LOOPBACK)) as c:
        for declared in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = await c.post("/v1/chat/completions", content=json.dumps(BODY), headers={"content-type": declared})
            assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], declared
        r = await c.post("/v1/chat/completions", content=json.dumps(BODY))
        assert r.status_code == 415 and "none" in r.json()["error"]["message"]
        r = await c.post("/v1/messages", content=json.dumps(BODY), headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
        r = await c.post("/v1/messages", content=json.dumps(BODY),
                         headers={"content-type": "Application/JSON; charset=utf-8"})
        assert r.status_code == 200 and r.json() == BODY


def scope(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 50000),
            "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json")]}


async def test_streaming_responses_pass_through_chunk_by_chunk():
    state = State()
    app = guard(tiny_app(state), LOOPBACK, request_timeout=0.3)
    requests = [{"type": "http.request", "body": json.dumps(BODY).encode(), "more_body": False}]
    sent: list[dict] = []
    first = asyncio.Event()

    async def receive() -> dict:
        if requests:
            return requests.pop(0)
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message.get("body") == b"one\n":
            first.set()

    task = asyncio.create_task(app(scope("/stream"), receive, send))
    await asyncio.wait_for(first.wait(), 5)
    assert [m.get("body") for m in sent if m["type"] == "http.response.body"] == [b"one\n"]
    await asyncio.sleep(0.6)  # past the read deadline: it covers the request body, not the reply
    state.gate.set()
    await asyncio.wait_for(task, 5)
    assert sent[0]["status"] == 200
    assert [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]] == [b"one\n", b"two\n"]


async def test_a_body_that_stops_arriving_gets_408_and_the_apps_late_reply_is_dropped():
    app = guard(tiny_app(State()), LOOPBACK, request_timeout=0.3)
    parts = [{"type": "http.request", "body": b'{"messages": [', "more_body": True}]
    sent: list[dict] = []

    async def receive() -> dict:
        if parts:
            return parts.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    started = time.monotonic()
    await asyncio.wait_for(app(scope("/v1/messages"), receive, send), 5)
    assert time.monotonic() - started < 2
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    error = json.loads(sent[1]["body"])
    assert error["type"] == "error" and "did not arrive" in error["error"]["message"]


# ---------------------------------------------------------------- a real uvicorn server

class Live:
    def __init__(self, request_timeout: float = 1.0, max_connections: int = 4) -> None:
        self.state = State()
        self.port = free_port()
        app = guard(tiny_app(self.state), LOOPBACK, request_timeout=request_timeout)
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, request_timeout, max_connections,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.state.release.set()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live():
    servers: list[Live] = []

    def start(**kwargs) -> Live:
        servers.append(Live(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket, limit: float = 5.0) -> bytes:
    sock.settimeout(limit)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def hung_up(sock: socket.socket, wait: float = 0.2) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_slow_headers_are_cut_off_at_the_deadline_even_when_trickling(live):
    server = live(request_timeout=1.0)
    started = time.monotonic()
    silent = connect(server.port)
    partial = connect(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    trickle = connect(server.port)
    closed = False
    for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40:
        try:
            trickle.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.1)  # each byte would reset uvicorn's own keep-alive timer
    with silent, partial, trickle:
        assert read_until_closed(silent) == b""  # nothing sent: hung up on without a word
        assert read_until_closed(partial).startswith(b"HTTP/1.1 408 ")
        assert closed or read_until_closed(trickle).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 6
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_slow_body_gets_408_within_the_deadline(live):
    server = live(request_timeout=1.0)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    started = time.monotonic()
    with connect(server.port, head + b'{"messages"') as sock:
        reply = read_until_closed(sock)
    assert time.monotonic() - started < 3
    assert reply.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 s" in reply
    assert httpx.get(server.url + "/health").status_code == 200


def test_requests_beyond_max_connections_get_503_and_the_server_recovers(live):
    server = live(request_timeout=30.0, max_connections=4)
    busy = [connect(server.port, b"GET /hold HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            for _ in range(4)]
    deadline = time.monotonic() + 5
    while server.state.held < 4:
        assert time.monotonic() < deadline, "the held requests did not start"
        time.sleep(0.02)
    for _ in range(6):
        with connect(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") as extra:
            assert read_until_closed(extra).startswith(b"HTTP/1.1 503 ")
    server.state.release.set()
    for sock in busy:
        with sock:
            assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")
    assert httpx.get(server.url + "/health").status_code == 200


def test_idle_sockets_cannot_pile_up_and_health_still_answers(live):
    server = live(request_timeout=30.0, max_connections=4)
    idle = [connect(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(30)]
    try:
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        time.sleep(0.2)
        assert len(server.server.server_state.connections) <= 5
        assert sum(hung_up(sock) for sock in idle) >= 25  # the oldest made room for newer ones
    finally:
        for sock in idle:
            sock.close()


# The open-file limit serve() makes sure of for 4 connections (133), then more idle sockets than that.
CHILD = """
import resource, sys
from moe_tui.inference.server import allowed_hosts_for, descriptors_needed, uvicorn_config
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors_needed(4), hard))
import uvicorn
from moe_tui.inference.server.guards import guard, quiet_floods
from tests.reliability.test_server_guards import State, tiny_app
app = guard(tiny_app(State()), allowed_hosts_for("127.0.0.1"), request_timeout=30)
config = uvicorn_config(app, "127.0.0.1", int(sys.argv[1]), request_timeout=30, max_connections=4)
quiet_floods()
uvicorn.Server(config).run()
"""


IDLE_FLOOD = 160


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")
def test_more_idle_sockets_than_file_descriptors_leave_health_answering_and_the_log_quiet(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(port)], cwd=ROOT, stdout=out, stderr=out,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        for _ in range(IDLE_FLOOD):
            idle.append(connect(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"))
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        time.sleep(1.0)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        text = log.read_text()
        assert "Traceback" not in text and "out of system resource" not in text and len(text) < 4000, text
        assert descriptors_needed(4) < IDLE_FLOOD
    finally:
        for sock in idle:
            sock.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_accept_errors_log_one_line_per_interval_without_tracebacks():
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    logger = logging.getLogger("asyncio")
    kept = logger.filters[:]
    for f in kept:
        logger.removeFilter(f)
    handler = Collect()
    logger.addHandler(handler)
    loop = asyncio.new_event_loop()
    try:
        quiet_floods(interval=60)
        emfile = OSError(errno.EMFILE, "Too many open files")
        with socket.socket() as sock:
            for _ in range(500):  # what asyncio's accept loop reports each time accept() fails
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": emfile, "socket": sock})
        loop.call_exception_handler({"message": "something else"})
    finally:
        loop.close()
        logger.removeHandler(handler)
        for f in logger.filters[:]:
            logger.removeFilter(f)
        for f in kept:
            logger.addFilter(f)
    assert len(lines) == 2 and "\n" not in lines[0] and "Too many open files" in lines[0], lines
    assert lines[1].startswith("something else")
    flood = FloodFilter(interval=0)
    record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "Invalid HTTP request received.",
                               None, None)
    assert flood.filter(record) and flood.filter(record)  # interval 0: each gets through


# ---------------------------------------------------------------- moe serve's own checks

def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_tui.app.cli", "serve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_moe_serve_refuses_a_bad_port_or_host_in_one_line():
    for args, words in ((("--port", "99999"), "99999"), (("--port", "0"), "port"),
                        (("--host", "no-such-host.invalid"), "no-such-host.invalid"),
                        (("--request-timeout", "0"), "timeout"), (("--max-connections", "0"), "connections")):
        done = run_serve(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.startswith("moe: ") and words in done.stderr, args
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_moe_serve_names_a_taken_port_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_serve("--port", str(port))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"moe: cannot listen on 127.0.0.1:{port}") and "Loading" not in done.stdout
