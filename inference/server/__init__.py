"""HTTP server (starlette + uvicorn) exposing the engine through OpenAI and Anthropic APIs."""

from __future__ import annotations

import ipaddress
import os
import socket


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def serve(model: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_queue: int = 16, max_tokens_cap: int = 4096, **engine_kwargs) -> None:
    """Load the model on the inference thread and serve until SIGINT/SIGTERM."""
    import uvicorn

    from ..engine import Engine
    from .app import ServerConfig, build_app
    from .runner import EngineRunner

    api_key = api_key or os.environ.get("MOE_API_KEY") or None
    if not is_loopback(host) and not api_key:
        raise ValueError(f"binding {host} exposes the server beyond this machine: set an API key "
                         "(--api-key or MOE_API_KEY)")
    runner = EngineRunner(lambda: Engine.load(model, **engine_kwargs), max_queue=max_queue)
    runner.start()
    runner.ready.wait()
    if runner.error is not None:
        raise runner.error
    app = build_app(runner, ServerConfig(model_name=os.path.basename(os.path.normpath(model)) or model,
                                         api_key=api_key, max_tokens_cap=max_tokens_cap))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            runner.stop()  # end running generations now, so their streams close with a final event
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    Server(config).run()
