"""Both APIs' error bodies: for the request handlers (app.py) and the guards in front of them (guards.py)."""

from __future__ import annotations

ANTHROPIC_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
OPENAI_KINDS = {401: "authentication_error", 429: "rate_limit_error"}


def openai_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def anthropic_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict:
    """The error in the format of the API `path` belongs to (Anthropic for /v1/messages, else OpenAI)."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return anthropic_body(message, ANTHROPIC_KINDS.get(status, "invalid_request_error"))
    kind = OPENAI_KINDS.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return openai_body(message, kind, param)
