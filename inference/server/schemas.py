"""Request validation for the OpenAI and Anthropic endpoints, and the OpenAPI document that matches it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True)
class ChatRequest:
    """What both APIs boil down to."""

    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool = False


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{key}' must be a number", key)
    if not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be between {lo} and {hi}", key)
    return float(value)


def _int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{key}' must be an integer", key)
    if not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be between {lo} and {hi}", key)
    return value


def _bool(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"'{key}' must be a boolean", key)
    return value


def _stops(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 16:
        return [s for s in value if s]
    raise BadRequest(f"'{key}' must be a string or a list of at most 16 strings", key)


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (both APIs allow it)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}: only text content parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"{where}: content must be a string or a list of text parts", where)


def parse_openai(body: Any, max_tokens_cap: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{i}]: role must be system, developer, user or assistant", f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        parsed.append({"role": role, "content": _text(m.get("content"), f"messages[{i}].content")})
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _int({"max_tokens": limit}, "max_tokens", min(512, max_tokens_cap), 1, max_tokens_cap)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return ChatRequest(
        messages=parsed, max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=_stops(body.get("stop"), "stop"),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1), stream=_bool(body, "stream"),
        include_usage=bool(options.get("include_usage")),
    )


ANTHROPIC_FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
                    "stream", "metadata"}
# Fields of the current Messages API this server accepts and ignores (no effect on a local model).
ANTHROPIC_IGNORED = {"service_tier", "speed", "inference_geo", "cache_control", "container", "diagnostics",
                     "output_config", "user_profile_id", "workspace_id", "thinking", "tool_choice", "tools"}


def parse_anthropic(body: Any, max_tokens_cap: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(body) - ANTHROPIC_FIELDS - ANTHROPIC_IGNORED)
    if unknown:
        raise BadRequest(f"{unknown[0]}: Extra inputs are not permitted", unknown[0])
    if body.get("tools"):
        raise BadRequest("tools: tool use is not supported by this server", "tools")
    if body.get("max_tokens") is None:
        raise BadRequest("max_tokens: Field required (an integer)", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: must be a non-empty list", "messages")
    parsed = []
    system = body.get("system")
    if system is not None:
        parsed.append({"role": "system", "content": _text(system, "system")})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: must be 'user' or 'assistant'", f"messages.{i}")
        parsed.append({"role": m["role"], "content": _text(m.get("content"), f"messages.{i}.content")})
    return ChatRequest(
        messages=parsed, max_tokens=_int(body, "max_tokens", None, 1, max_tokens_cap),
        temperature=_number(body, "temperature", 1.0, 0.0, 1.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=_stops(body.get("stop_sequences"), "stop_sequences"), seed=None, stream=_bool(body, "stream"),
    )


def openapi(max_tokens_cap: int) -> dict:
    text_parts = {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
        "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}
    content = {"oneOf": [{"type": "string"}, text_parts]}
    stop = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                      {"type": "null"}]}
    error = {"description": "invalid request", "content": {"application/json": {"schema": {"type": "object"}}}}
    ok_json = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}},
                                                "text/event-stream": {"schema": {"type": "string"}}}}
    chat_body = {"type": "object", "required": ["messages"], "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
                     "properties": {"role": {"type": "string",
                                             "enum": ["system", "developer", "user", "assistant"]},
                                    "content": content}}},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": max_tokens_cap},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": max_tokens_cap},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "stop": stop, "seed": {"type": ["integer", "null"]}, "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
    }}
    messages_body = {"type": "object", "required": ["model", "messages", "max_tokens"],
                     "additionalProperties": False, "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
                     "properties": {"role": {"type": "string", "enum": ["user", "assistant"]},
                                    "content": content}}},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": max_tokens_cap},
        "system": content, "stop_sequences": stop,
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1}, "top_k": {"type": "integer", "minimum": 0},
        "stream": {"type": "boolean"}, "metadata": {"type": "object"},
        **{name: {} for name in sorted(ANTHROPIC_IGNORED - {"tools"})},
        "tools": {"type": "array", "maxItems": 0},
    }}

    def get(summary: str, media: str = "application/json") -> dict:
        return {"get": {"summary": summary, "responses": {"200": {"description": "OK", "content": {
            media: {"schema": {"type": "object" if media == "application/json" else "string"}}}}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "moe-tui server", "version": "1"},
        "paths": {
            "/v1/chat/completions": {"post": {
                "summary": "OpenAI chat completions", "requestBody": {"required": True, "content": {
                    "application/json": {"schema": chat_body}}},
                "responses": {"200": ok_json, "400": error, "401": error, "413": error, "429": error}}},
            "/v1/messages": {"post": {
                "summary": "Anthropic messages", "requestBody": {"required": True, "content": {
                    "application/json": {"schema": messages_body}}},
                "responses": {"200": ok_json, "400": error, "401": error, "413": error, "429": error}}},
            "/v1/models": get("models served"),
            "/health": get("liveness and queue depth"),
            "/v1/stats": get("the current expert-cache snapshot"),
            "/v1/stats/stream": {"get": {"summary": "snapshots as server-sent events", "parameters": [
                {"name": "hz", "in": "query", "schema": {"type": "number", "minimum": 0.1, "maximum": 10}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}],
                "responses": {"200": {"description": "OK", "content": {"text/event-stream": {
                    "schema": {"type": "string"}}}}, "400": error}}},
            "/metrics": get("Prometheus metrics", "text/plain"),
        },
    }
