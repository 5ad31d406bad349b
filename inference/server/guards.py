"""Guards for `moe serve`: Host, Origin and content-type checks, read deadlines, a connection cap, quiet floods."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
JSON_TYPE = "application/json"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
REQUEST_TIMEOUT = 30.0

def encoded_error(path: str, status: int, message: str) -> bytes:
    return json.dumps(error_body(path, status, message)).encode()


async def send_error(send: Send, path: str, status: int, message: str, close: bool = False) -> None:
    body = encoded_error(path, status, message)
    headers = [(b"content-type", JSON_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def host_name(value: str) -> str:
    """'LocalHost:8080' -> 'localhost', '[::1]:8080' -> '::1', 'example.com.' -> 'example.com'."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:value.find("]")] if "]" in value else value
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def origin_name(value: str) -> str:
    return value.strip().lower().rstrip("/")


def media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


class Guard:
    """Pure ASGI, so responses (server-sent events included) pass through message by message, unbuffered."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None, allowed_origins: Iterable[str] = (),
                 request_timeout: float | None = REQUEST_TIMEOUT) -> None:
        hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
        self.hosts = None if hosts is None or "*" in hosts else frozenset(hosts)
        origins = {origin_name(o) for o in allowed_origins}
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.request_timeout = request_timeout
        if origins:
            # Allowed browser origins also need CORS answers (preflights, Access-Control-Allow-Origin) to read replies.
            from starlette.middleware.cors import CORSMiddleware

            app = CORSMiddleware(app, allow_origins=["*"] if self.any_origin else sorted(origins),
                                 allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"], max_age=600)
        self.app = app

    def problem(self, scope: Scope) -> tuple[int, str] | None:
        headers = [(k.lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        if self.hosts is not None:
            for value in (v for k, v in headers if k == b"host"):
                if host_name(value) not in self.hosts:
                    return 421, (f"this server does not answer to host {value!r} (a DNS-rebinding guard); "
                                 "allow it with moe serve --allow-host")
        if not self.any_origin:
            for value in (v for k, v in headers if k == b"origin"):
                if origin_name(value) not in self.origins:
                    return 403, (f"requests from web pages are refused (origin {value!r}); "
                                 "allow one with moe serve --allow-origin")
        if scope["type"] == "http" and scope.get("method") in BODY_METHODS:
            declared = next((v for k, v in headers if k == b"content-type"), None)
            if declared is None or media_type(declared) != JSON_TYPE:
                shown = "none" if declared is None else repr(declared)
                return 415, f"Content-Type must be {JSON_TYPE}, not {shown}"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        problem = self.problem(scope)
        if problem is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await send_error(send, scope.get("path", ""), *problem)
            return
        if scope["type"] != "http" or self.request_timeout is None:
            await self.app(scope, receive, send)
            return
        deadline = ReadDeadline(scope, receive, send, self.request_timeout)
        try:
            await self.app(scope, deadline.receive, deadline.send)
        except Exception:
            if not deadline.timed_out:
                raise
            # The app saw http.disconnect after the 408 (starlette raises ClientDisconnect): the request is over.


class ReadDeadline:
    """The request body must arrive within `timeout` seconds of the headers; else 408 and the connection closes."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, timeout: float) -> None:
        self.path = scope.get("path", "")
        self._receive, self._send = receive, send
        self.timeout = timeout
        self.deadline = asyncio.get_running_loop().time() + timeout
        self.body_done = False
        self.started = False
        self.timed_out = False

    async def receive(self) -> Message:
        if self.timed_out:
            return {"type": "http.disconnect"}
        if self.body_done:
            return await self._receive()  # e.g. a streaming response waiting for a disconnect: no deadline
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), timeout=max(remaining, 0.0))
        except TimeoutError:
            self.timed_out = True
            if not self.started:
                await send_error(self._send, self.path, 408,
                                 f"the request body did not arrive within {self.timeout:g} s", close=True)
            return {"type": "http.disconnect"}
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        if self.timed_out:
            return  # the 408 is the answer; what the app sends after it has nowhere to go
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def guard(app: ASGIApp, allowed_hosts: Iterable[str] | None, allowed_origins: Iterable[str] = (),
          request_timeout: float | None = REQUEST_TIMEOUT) -> Guard:
    """Wrap `app`: Host must be in `allowed_hosts` (None: any; "*" too) else 421; an Origin header must be in
    `allowed_origins` (default none, so browsers are refused; "*" any) else 403; POST/PUT/PATCH need
    Content-Type application/json else 415; a body not fully arrived `request_timeout` s after the headers: 408."""
    return Guard(app, allowed_hosts, allowed_origins, request_timeout)


# ---------------------------------------------------------------- connections (uvicorn's h11 protocol)

REQUEST_TIMEOUT_REPLY = encoded_error("", 408, "the request headers did not arrive in time")
REQUEST_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                            % (len(REQUEST_TIMEOUT_REPLY), REQUEST_TIMEOUT_REPLY))


def protocol_class(request_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol plus what uvicorn lacks: a deadline for each request's headers (uvicorn keeps a
    connection that sends half a request line forever), and at most `max_connections` open connections, making
    room by closing the oldest idle ones (keep-alive, or still sending headers), so idle sockets cannot use up
    the process's file descriptors. Busy connections are never closed: uvicorn's limit_concurrency answers 503."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        opened_at = 0.0
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self.opened_at = self.loop.time()
            self.arm_header_deadline()
            self.make_room()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.arm_header_deadline()  # the next request's headers; a slow body trickle after a reply too

        @property
        def idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def arm_header_deadline(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(request_timeout, self.headers_overdue, self.cycle)

        def headers_overdue(self, cycle: object) -> None:
            if self.cycle is not cycle or self.transport.is_closing():
                return  # a new request began in time
            if self.conn.trailing_data[0]:
                self.transport.write(REQUEST_TIMEOUT_RESPONSE)  # part of a request came: say why we hang up
            self.transport.close()

        def make_room(self) -> None:
            open_now = [c for c in self.connections if not c.transport.is_closing()]
            excess = len(open_now) - max_connections
            if excess <= 0:
                return
            idle = sorted((c for c in open_now if c is not self and getattr(c, "idle", False)),
                          key=lambda c: getattr(c, "opened_at", 0.0))
            for connection in idle[:excess]:
                connection.transport.close()

    return GuardedH11Protocol


# ---------------------------------------------------------------- logs under abuse

RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
NOISY_MESSAGES = ("socket.accept() out of system resource", "Invalid HTTP request received.",
                  "Exceeded concurrency limit.")


class FloodFilter(logging.Filter):
    """At most one line per `interval` seconds for each flood-prone message (accept() out of file descriptors,
    malformed requests, 503s), without its traceback, counting the ones left out."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self.seen: dict[object, tuple[float, int]] = {}
        self.lock = threading.Lock()

    def key(self, record: logging.LogRecord) -> object | None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            return exc.errno
        first = str(record.msg).split("\n", 1)[0]
        return first if first in NOISY_MESSAGES else None

    def filter(self, record: logging.LogRecord) -> bool:
        key = self.key(record)
        if key is None:
            return True
        now = time.monotonic()
        with self.lock:
            last, left_out = self.seen.get(key, (-math.inf, 0))
            if now - last < self.interval:
                self.seen[key] = (last, left_out + 1)
                return False
            self.seen[key] = (now, 0)
        text = record.getMessage().split("\n", 1)[0]
        if record.exc_info and record.exc_info[1] is not None:
            text += f": {record.exc_info[1]}"
        if left_out:
            text += f" ({left_out} more like this in the last {self.interval:g} s)"
        record.msg, record.args, record.exc_info, record.exc_text = text, None, None, None
        return True


def quiet_floods(interval: float = 10.0) -> None:
    """Install FloodFilter on the loggers that repeat under abuse (asyncio reports accept() failures)."""
    for name in ("asyncio", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, FloodFilter) for f in logger.filters):
            logger.addFilter(FloodFilter(interval))
