"""HTTP server (starlette + uvicorn) exposing the engine through OpenAI and Anthropic APIs."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import signal
import socket
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 30.0
KEEP_ALIVE_TIMEOUT = 5
MAX_HEADER_BYTES = 16 * 1024  # h11 answers 400 to request headers larger than this
FD_RESERVE = 64  # descriptors besides connections: model shards, logs, the event loop


def backlog_for(max_connections: int) -> int:
    """The kernel's listen queue, and how many sockets asyncio accepts in one pass of the event loop."""
    return max(max_connections, 16)


def descriptors_needed(max_connections: int) -> int:
    """Open files a server keeping `max_connections` may need under a flood: those connections, the sockets
    accepted before make_room closes the surplus (a backlog per loop pass, two or three passes; four allowed),
    and the process's own files."""
    return max_connections + 1 + 4 * backlog_for(max_connections) + FD_RESERVE


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> list[str] | None:
    """Host headers to accept: on loopback only loopback names (against DNS rebinding) plus `extra`; elsewhere
    any (the API key guards it) unless `extra` names some."""
    extra = list(extra)
    if is_loopback(bind_host) or extra:
        from .guards import LOOPBACK_HOSTS

        return [*LOOPBACK_HOSTS, bind_host, *extra]
    return None


def check_limits(port: int, request_timeout: float, max_connections: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, not {port!r}")
    if not (isinstance(request_timeout, int | float) and math.isfinite(request_timeout) and request_timeout > 0):
        raise ValueError(f"request timeout must be a positive number of seconds, not {request_timeout!r}")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"max connections must be at least 1, not {max_connections!r}")


def addresses(host: str, port: int) -> list[tuple]:
    """(family, type, proto, sockaddr) for each address host:port names; a host that does not resolve is a
    one-line ValueError, before the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"cannot listen on {host!r}: {getattr(exc, 'strerror', None) or exc}") from None
    return list(dict.fromkeys((family, kind, proto, address) for family, kind, proto, _, address in infos))


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind host:port now, before the model loads, so a taken port is a one-line error at once, not minutes later."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in addresses(host, port):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # "localhost" binds ::1 and 127.0.0.1
            sock.bind(address)
            sock.set_inheritable(True)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


def ensure_descriptors(max_connections: int) -> None:
    """Raise the open-file limit if max_connections would not fit in it (macOS starts shells at 256)."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = descriptors_needed(max_connections)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    except (ValueError, OSError):
        raise ValueError(f"{max_connections} connections need about {need} open files, and this process may "
                         f"open {soft} (ulimit -n): lower --max-connections or raise the limit") from None


def uvicorn_config(app: Any, host: str, port: int, request_timeout: float = REQUEST_TIMEOUT,
                   max_connections: int = MAX_CONNECTIONS, access_log: bool = False,
                   log_level: str = "info") -> uvicorn.Config:
    """uvicorn settings for `moe serve` (the app should already be wrapped with guards.guard)."""
    import uvicorn

    from .guards import protocol_class

    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=10,
        http=protocol_class(request_timeout, max_connections),  # h11 always, with header deadline and room-making
        ws="none",  # no websocket routes: no upgrade handling to attack
        # uvicorn counts the connection asking among the open ones: N + 1 lets N requests run, the next gets 503.
        limit_concurrency=max_connections + 1,
        backlog=backlog_for(max_connections), timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def serve(model: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_queue: int = 16, max_tokens_cap: int = 4096, *, allowed_hosts: Sequence[str] = (),
          allowed_origins: Sequence[str] = (), request_timeout: float = REQUEST_TIMEOUT,
          max_connections: int = MAX_CONNECTIONS, access_log: bool = False, tool_parser: str | None = None,
          **engine_kwargs) -> None:
    """Load the model on the inference thread and serve until SIGINT/SIGTERM. `tool_parser` names the mlx-lm
    tool-call parser to use instead of the one inferred from the model's tokenizer."""
    check_limits(port, request_timeout, max_connections)
    if tool_parser is not None:
        from ..tools import load_parser

        load_parser(tool_parser)  # a mistyped name is a one-line error before the model loads
    addresses(host, port)  # a mistyped host is named as such, not as "exposes the server"
    api_key = api_key or os.environ.get("MOE_API_KEY") or None
    if not is_loopback(host) and not api_key:
        raise ValueError(f"binding {host} exposes the server beyond this machine: set an API key "
                         "(--api-key or MOE_API_KEY)")
    ensure_descriptors(max_connections)
    sockets = listen_sockets(host, port)
    try:
        import uvicorn

        from ..engine import Engine
        from ..errors import ModelLoadError
        from .app import ServerConfig, build_app
        from .guards import guard, quiet_floods
        from .runner import EngineRunner

        runner = EngineRunner(lambda: Engine.load(model, **engine_kwargs), max_queue=max_queue, tool_parser=tool_parser)
        runner.start()
        runner.ready.wait()
        if runner.error is not None:  # an exception, or (from the session-based runner) its message
            error = runner.error
            raise error if isinstance(error, BaseException) else ModelLoadError(str(error))
        app = build_app(runner, ServerConfig(model_name=os.path.basename(os.path.normpath(model)) or model,
                                             api_key=api_key, max_tokens_cap=max_tokens_cap))
        app = guard(app, allowed_hosts_for(host, allowed_hosts), allowed_origins, request_timeout)

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                if self.should_exit and sig == signal.SIGINT:
                    # A second Ctrl+C: uvicorn quits without waiting for what is still open, and cancelling
                    # that logged a traceback per request and one for the lifespan. Cut off on purpose: said
                    # once, then no more.
                    log = logging.getLogger("uvicorn.error")
                    log.warning("Forced quit: open requests cut off")
                    log.disabled = True
                # End running generations now, so their streams close with a final event. On a thread: this
                # runs in a signal handler, between two bytecodes of the main thread, which may hold a lock
                # that stop() takes (the miss-curve waiters').
                threading.Thread(target=runner.stop, name="moe-stop", daemon=True).start()
                super().handle_exit(sig, frame)

            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets)
                if self.started:  # uvicorn names the address only for sockets it bound itself
                    shown = f"[{host}]" if ":" in host else host
                    logging.getLogger("uvicorn.error").info(
                        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port)

        config = uvicorn_config(app, host, port, request_timeout, max_connections, access_log)
        quiet_floods()  # after uvicorn.Config, which configures the loggers
        Server(config).run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
