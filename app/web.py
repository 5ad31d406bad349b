"""`moe web`: the app served to a browser by textual-serve; each browser connection runs `moe chat` as a child."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from textual_serve.app_service import AppService
from textual_serve.server import Server

LOOPBACK_NAMES = ("localhost",)
WEB_ONLY = ("host", "port", "public_url")  # `moe web`'s own options: not passed on to `moe chat`
log = logging.getLogger("moe web")
SESSION_WAIT = 10.0  # seconds a new connection waits for the previous session's app to exit (a page reload)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def chat_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The `moe chat` arguments that parse back to `args` (options at their default are left out).

    Raises:
        ValueError: an option of a kind this does not know how to write back (a new one needs a case here).
    """
    options: list[str] = []
    positionals: list[str] = []
    for action in parser._actions:  # argparse has no public list of a parser's actions
        if isinstance(action, argparse._HelpAction) or action.dest in WEB_ONLY:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        if not action.option_strings:
            positionals.append(str(value))
        elif isinstance(action, argparse.BooleanOptionalAction):
            options.append(action.option_strings[0 if value else 1])
        elif isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            options.append(action.option_strings[0])
        elif isinstance(action, argparse._StoreAction) and action.nargs is None:
            options += [action.option_strings[0], str(value)]
        else:
            raise ValueError(f"moe web: cannot pass {action.option_strings[0]} on to the app")
    return [*options, "--", *positionals] if positionals else options


def app_command(chat_args: list[str]) -> str:
    """The shell command textual-serve runs per connection: this Python's `moe chat`, so a checkout, a venv
    and a wheel install each run their own (`moe` on PATH may be another install, or none)."""
    return shlex.join([sys.executable, "-m", "moe_tui.app.cli", "chat", *chat_args])


class MoeWebServer(Server):
    """textual-serve's server, with two guards: only pages from this server may open a session (WebSockets
    are not bound by the same-origin policy, so any site open in the browser could otherwise drive the app,
    which runs commands), and one session at a time (a second app would find the chats in use, and a second
    copy of the model may not fit)."""

    def __init__(self, command: str, host: str, port: int, public_url: str | None, title: str,
                 session_wait: float = SESSION_WAIT) -> None:
        super().__init__(command, host=host, port=port, title=title, public_url=public_url)
        self.session_wait = session_wait
        self.allowed_origins = {origin_of(self.public_url)}
        if is_loopback(host):
            self.allowed_origins |= {f"http://{name}:{port}" for name in ("localhost", "127.0.0.1", "[::1]")}
        self.busy = False
        self.free = asyncio.Event()
        self.sockets: set[web.WebSocketResponse] = set()

    def initialize_logging(self) -> None:
        super().initialize_logging()
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # a line per request drowns what matters

    async def on_startup(self, app: web.Application) -> None:
        print(f"moe web: serving the app on {self.public_url}  (Ctrl+C stops it)", flush=True)
        print(f"moe web: each browser session runs: {self.command}", flush=True)

    async def on_shutdown(self, app: web.Application) -> None:
        # Closing the sockets ends each session the way a closed tab does: its app is asked to quit.
        for socket in list(self.sockets):
            await socket.close(code=1001, message=b"moe web is shutting down")

    async def _process_messages(self, websocket: web.WebSocketResponse, app_service: AppService) -> None:
        self.sockets.add(websocket)  # textual-serve makes the session's socket in its handler: kept here for shutdown
        try:
            await super()._process_messages(websocket, app_service)
        finally:
            self.sockets.discard(websocket)

    async def handle_websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() not in self.allowed_origins:
            return web.Response(status=403, text=f"moe web: pages from {origin} may not open the app\n")
        deadline = asyncio.get_running_loop().time() + self.session_wait
        while self.busy:
            try:
                await asyncio.wait_for(self.free.wait(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                return await self.refuse(request)
        self.busy = True
        self.free.clear()
        log.info("session from %s: the app starts", request.remote)
        try:
            return await super().handle_websocket(request)
        finally:
            log.info("session from %s: ended", request.remote)
            self.busy = False
            self.free.set()

    async def refuse(self, request: web.Request) -> web.WebSocketResponse:
        """Another tab has the app: say so in this tab's terminal (a closed socket would only show "Session
        ended.") and keep the socket open until the tab goes."""
        socket = web.WebSocketResponse(heartbeat=15)
        await socket.prepare(request)
        self.sockets.add(socket)
        try:
            await socket.send_bytes(b"\x1b[2J\x1b[H\r\nmoe web: another browser tab has the app open (one session "
                                    b"at a time).\r\nClose that tab, then reload this one.\r\n")
            async for message in socket:
                if message.type == WSMsgType.ERROR:
                    break
        finally:
            self.sockets.discard(socket)
        return socket


def page_url(host: str, port: int, public_url: str | None) -> str | None:
    """--public-url, else textual-serve's own http://HOST:PORT, with an IPv6 address in brackets (a bare one
    would give the page a WebSocket address it cannot parse)."""
    if public_url is None and ":" in host and not host.startswith("["):
        return f"http://[{host}]:{port}"
    return public_url


def serve(chat_args: list[str], host: str, port: int, public_url: str | None, title: str) -> None:
    """Serve until Ctrl+C (or SIGTERM)."""
    server = MoeWebServer(app_command(chat_args), host=host, port=port, public_url=page_url(host, port, public_url),
                          title=title)
    try:
        server.serve()
    except OSError as exc:  # the address is taken or not ours: a one-line error, as for other bad options
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from exc


def prepare(args: argparse.Namespace) -> str | None:
    """Checks `moe web`'s own options; returns a warning to print, if any.

    Raises:
        ValueError: a wildcard address without --public-url (the page would tell browsers to connect to it).
    """
    if is_wildcard(args.host) and not args.public_url:
        raise ValueError(f"--host {args.host or repr('')} listens on every address, but the page must tell the "
                         f"browser which one to connect back to: add --public-url http://NAME:{args.port} with the "
                         "name or address the browser uses")
    if args.public_url and urlsplit(args.public_url).scheme not in ("http", "https"):
        raise ValueError(f"--public-url {args.public_url}: an address starts with http:// or https://")
    if is_loopback(args.host):
        return None
    return (f"moe web: WARNING: listening on {args.host}, not on loopback: anyone who can reach this address can "
            "use the app, which reads and writes files and runs commands in this folder, with your rights. "
            "There is no login; prefer the default 127.0.0.1 and an SSH tunnel (ssh -L PORT:127.0.0.1:PORT).")


def absolute(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser().resolve()


def resolve_paths(args: argparse.Namespace, model: str | None) -> None:
    """The child runs in this folder, but absolute paths keep it independent of that."""
    if model is not None and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    args.model = model
    args.profile = absolute(args.profile)
    args.data_dir = absolute(args.data_dir)
