"""Request validation for the OpenAI and Anthropic endpoints, and the OpenAPI document that matches it."""

from __future__ import annotations

import json
import re
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
    tools: tuple[dict, ...] = ()  # OpenAI function-tool form, as chat templates take them
    top_k: int = 0  # sample among the k likeliest tokens (Anthropic; an OpenAI extension vLLM takes); 0: all
    presence_penalty: float = 0.0  # OpenAI's, on the tokens generated so far
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias -100..100)
    tool_choice: str = "auto"  # "auto", "none", "required" (Anthropic "any") or "named"
    tool_name: str | None = None  # the named tool
    max_tokens_given: bool = True  # False: OpenAI's max_tokens left out, the reply may take the context's rest
    continue_final: bool = False  # the last message is the reply's start (Anthropic's assistant prefill)

    @property
    def template_tools(self) -> list[dict] | None:
        """The tools offered to the chat template (none with tool_choice "none")."""
        return list(self.tools) if self.tools and self.tool_choice != "none" else None

    @property
    def uses_tools(self) -> bool:
        """Tools offered, or tool calls and results in the history: the model must support tool calling."""
        return bool(self.template_tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in self.messages)


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


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"token id": bias from -100 to 100}."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > 1024:
        raise BadRequest("'logit_bias' must be an object of at most 1024 token ids (as strings) and biases",
                         "logit_bias")
    bias = []
    for key, number in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise BadRequest(f"'logit_bias': {key!r} is not a token id", "logit_bias")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not -100 <= number <= 100:
            raise BadRequest(f"'logit_bias': the bias of {key} must be a number from -100 to 100", "logit_bias")
        bias.append((int(key), float(number)))
    return tuple(bias)


def _one_choice_no_logprobs(body: dict) -> None:
    """Refuse what a client would otherwise silently not get: several choices, log probabilities, JSON mode."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise BadRequest("'n' must be 1: this server returns one choice per request", "n")
    for key in ("logprobs", "top_logprobs"):
        if body.get(key) not in (None, False, 0):
            raise BadRequest(f"'{key}' is not supported by this server", key)
    form = body.get("response_format")
    if form is not None and (not isinstance(form, dict) or form.get("type") != "text"):
        raise BadRequest("'response_format': only {\"type\": \"text\"} is supported by this server (no JSON mode: "
                         "ask for JSON in the prompt)", "response_format")


def parse_openai(body: Any, max_tokens_cap: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    tools = openai_tools(body.get("tools"))
    names = {t["function"]["name"] for t in tools}
    tool_choice, tool_name = openai_tool_choice(body.get("tool_choice"), names)
    parsed = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}]: role must be system, developer, user, assistant or tool",
                             f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        if role == "tool" or (role == "assistant" and m.get("tool_calls")):
            parsed.append(_openai_tool_message(m, i, names, call_ids))
        else:
            parsed.append({"role": role, "content": _text(m.get("content"), f"messages[{i}].content")})
    _one_choice_no_logprobs(body)
    limit = body.get("max_completion_tokens")
    if limit is None:  # absent or null: max_tokens, if given
        limit = body.get("max_tokens")
    # Left out: as OpenAI and vLLM, the reply may take what the prompt leaves of the context (up to the cap).
    max_tokens = _int({"max_tokens": limit}, "max_tokens", max_tokens_cap, 1, max_tokens_cap)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return ChatRequest(
        messages=parsed, max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0), top_k=max(_int(body, "top_k", 0, -1, 2**31 - 1), 0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body.get("logit_bias")), stop=_stops(body.get("stop"), "stop"),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1), stream=_bool(body, "stream"),
        include_usage=bool(options.get("include_usage")), tools=tools, tool_choice=tool_choice, tool_name=tool_name,
        max_tokens_given=limit is not None,
    )


ANTHROPIC_FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
                    "stream", "metadata", "tools", "tool_choice"}
# Fields of the current Messages API this server accepts and ignores (no effect on a local model).
ANTHROPIC_IGNORED = {"service_tier", "speed", "inference_geo", "cache_control", "container", "diagnostics",
                     "output_config", "user_profile_id", "workspace_id", "thinking"}


def parse_anthropic(body: Any, max_tokens_cap: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(body) - ANTHROPIC_FIELDS - ANTHROPIC_IGNORED)
    if unknown:
        raise BadRequest(f"{unknown[0]}: Extra inputs are not permitted", unknown[0])
    if body.get("max_tokens") is None:
        raise BadRequest("max_tokens: Field required (an integer)", "max_tokens")
    output = body.get("output_config")
    if isinstance(output, dict) and output.get("format") is not None:  # structured output: a promise not kept
        raise BadRequest("output_config.format: structured output (a JSON schema) is not supported by this server",
                         "output_config")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: must be a non-empty list", "messages")
    parsed = []
    system = body.get("system")
    if system is not None:
        parsed.append({"role": "system", "content": _text(system, "system")})
    tools = anthropic_tools(body.get("tools"))
    names = {t["function"]["name"] for t in tools}
    tool_choice, tool_name = anthropic_tool_choice(body.get("tool_choice"), names)
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: must be 'user' or 'assistant'", f"messages.{i}")
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") in ("tool_use", "tool_result")
                                             for b in content):
            parsed += _anthropic_tool_turn(m["role"], content, i, names, call_ids)
        else:
            parsed.append({"role": m["role"], "content": _text(content, f"messages.{i}.content")})
    last = parsed[-1]
    prefill = last["role"] == "assistant" and not last.get("tool_calls")  # the reply goes on from its text
    if prefill:
        if last["content"] != last["content"].rstrip():  # as Anthropic's API: the model would go on oddly
            raise BadRequest(f"messages.{len(messages) - 1}: final assistant content cannot end with trailing "
                             "whitespace", f"messages.{len(messages) - 1}")
        if not last["content"]:
            parsed.pop()  # nothing to go on from: an ordinary reply
            prefill = False
            if not any(m["role"] != "system" for m in parsed):
                raise BadRequest("messages: an empty assistant message alone leaves nothing to reply to", "messages")
        elif tool_choice in ("required", "named"):
            raise BadRequest("tool_choice: a reply forced to call a tool cannot go on from a final assistant "
                             "message", "tool_choice")
    return ChatRequest(
        messages=parsed, max_tokens=_int(body, "max_tokens", None, 1, max_tokens_cap), continue_final=prefill,
        temperature=_number(body, "temperature", 1.0, 0.0, 1.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_int(body, "top_k", 0, 0, 2**31 - 1),
        stop=_stops(body.get("stop_sequences"), "stop_sequences"), seed=None, stream=_bool(body, "stream"),
        tools=tools, tool_choice=tool_choice, tool_name=tool_name,
    )


# ---------------------------------------------------------------- tools (both APIs to the chat template's form)

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _schema(value: Any, where: str) -> dict:
    """A tool's parameters: a JSON Schema object describing an object."""
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: must be a JSON Schema object", where)
    if value.get("type", "object") != "object":
        raise BadRequest(f"{where}: the schema's type must be 'object'", where)
    properties = value.get("properties")
    if properties is not None and not (isinstance(properties, dict)
                                       and all(isinstance(p, dict) for p in properties.values())):
        raise BadRequest(f"{where}.properties: must map each parameter's name to its schema (an object)", where)
    required = value.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise BadRequest(f"{where}.required: must be a list of parameter names", where)
    return value


def _tool(name: Any, description: Any, parameters: dict, where: str) -> dict:
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise BadRequest(f"{where}.name: must be 1 to 64 letters, digits, '_' or '-'", where)
    if description is not None and not isinstance(description, str):
        raise BadRequest(f"{where}.description: must be a string", where)
    function: dict[str, Any] = {"name": name}
    if description:
        function["description"] = description
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def _unique(tools: list[dict], key: str) -> tuple[dict, ...]:
    seen: set[str] = set()
    for tool in tools:
        name = tool["function"]["name"]
        if name in seen:
            raise BadRequest(f"{key}: tool {name!r} is defined twice", key)
        seen.add(name)
    return tuple(tools)


def openai_tools(value: Any) -> tuple[dict, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest("'tools' must be a list", "tools")
    tools = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise BadRequest(f"{where}: must be {{\"type\": \"function\", \"function\": {{...}}}}", where)
        function = tool["function"]
        parameters = _schema(function.get("parameters", {"type": "object", "properties": {}}),
                             f"{where}.function.parameters")
        tools.append(_tool(function.get("name"), function.get("description"), parameters, f"{where}.function"))
    return _unique(tools, "tools")


def openai_tool_choice(value: Any, names: set[str]) -> tuple[str, str | None]:
    if value is None or value == "auto":
        return "auto", None
    if value in ("none", "required"):
        if value == "required" and not names:
            raise BadRequest("tool_choice 'required' needs tools", "tool_choice")
        return value, None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if name not in names:
            raise BadRequest(f"tool_choice: unknown tool {name!r} (not in tools)", "tool_choice")
        return "named", name
    raise BadRequest("'tool_choice' must be 'auto', 'none', 'required' or "
                     "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")


def _arguments(value: Any, where: str) -> dict:
    """A call's arguments as the chat template takes them: an object (OpenAI sends it as a JSON string)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"{where}: arguments are not valid JSON ({exc})", where) from exc
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: arguments must be a JSON object", where)
    return value


def _openai_tool_message(m: dict, i: int, names: set[str], call_ids: set[str]) -> dict:
    """A `tool` message (answering an earlier call by its id) or an assistant message with `tool_calls`."""
    if m["role"] == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or call_id not in call_ids:
            raise BadRequest(f"messages[{i}].tool_call_id: {call_id!r} answers no earlier tool call",
                             f"messages[{i}]")
        return {"role": "tool", "tool_call_id": call_id, "content": _text(m.get("content"), f"messages[{i}].content")}
    calls = m["tool_calls"]
    if not isinstance(calls, list):
        raise BadRequest(f"messages[{i}].tool_calls: must be a list", f"messages[{i}]")
    parsed = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        if (not isinstance(call, dict) or call.get("type", "function") != "function"
                or not isinstance(call.get("function"), dict)):
            raise BadRequest(f"{where}: must be {{\"id\": ..., \"type\": \"function\", \"function\": {{...}}}}",
                             where)
        function = call["function"]
        name, call_id = function.get("name"), call.get("id")
        if name not in names:
            raise BadRequest(f"{where}: unknown tool {name!r} (not in tools)", where)
        if not isinstance(call_id, str) or not call_id:
            raise BadRequest(f"{where}.id: must be a non-empty string", where)
        call_ids.add(call_id)
        parsed.append({"id": call_id, "type": "function",
                       "function": {"name": name, "arguments": _arguments(function.get("arguments"), where)}})
    content = m.get("content")
    text = "" if content is None else _text(content, f"messages[{i}].content")
    return {"role": "assistant", "content": text, "tool_calls": parsed}


def anthropic_tools(value: Any) -> tuple[dict, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest("tools: must be a list", "tools")
    tools = []
    for i, tool in enumerate(value):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise BadRequest(f"{where}: must be an object", where)
        if tool.get("type", "custom") not in ("custom", None):
            raise BadRequest(f"{where}.type: only custom tools (name, description, input_schema) are supported, "
                             f"not {tool.get('type')!r}", where)
        if "input_schema" not in tool:
            raise BadRequest(f"{where}.input_schema: Field required", where)
        parameters = _schema(tool["input_schema"], f"{where}.input_schema")
        tools.append(_tool(tool.get("name"), tool.get("description"), parameters, where))
    return _unique(tools, "tools")


def anthropic_tool_choice(value: Any, names: set[str]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("auto", "none"):
        return kind, None
    if kind == "any":
        if not names:
            raise BadRequest("tool_choice: 'any' needs tools", "tool_choice")
        return "required", None
    if kind == "tool":
        if value.get("name") not in names:
            raise BadRequest(f"tool_choice.name: unknown tool {value.get('name')!r} (not in tools)", "tool_choice")
        return "named", value["name"]
    raise BadRequest("tool_choice: type must be 'auto', 'any', 'tool' or 'none'", "tool_choice")


def _anthropic_tool_turn(role: str, blocks: list, i: int, names: set[str], call_ids: set[str]) -> list[dict]:
    """An assistant turn with tool_use blocks (one message with tool_calls), or a user turn with tool_result
    blocks (a tool message per result, then its text as a user message)."""
    texts: list[str] = []
    calls: list[dict] = []
    results: list[dict] = []
    for j, block in enumerate(blocks):
        where = f"messages.{i}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            name, call_id, arguments = block.get("name"), block.get("id"), block.get("input", {})
            if name not in names:
                raise BadRequest(f"{where}: unknown tool {name!r} (not in tools)", where)
            if not isinstance(call_id, str) or not call_id:
                raise BadRequest(f"{where}.id: must be a non-empty string", where)
            if not isinstance(arguments, dict):
                raise BadRequest(f"{where}.input: must be an object", where)
            call_ids.add(call_id)
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        elif kind == "tool_result" and role == "user":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or call_id not in call_ids:
                raise BadRequest(f"{where}.tool_use_id: {call_id!r} answers no earlier tool_use", where)
            content = block.get("content")
            text = "" if content is None else _text(content, f"{where}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": call_id, "content": text})
        else:
            allowed = "text and tool_use" if role == "assistant" else "text and tool_result"
            raise BadRequest(f"{where}: only {allowed} blocks are supported in {role} turns", where)
    if role == "assistant":
        return [{"role": "assistant", "content": "".join(texts), "tool_calls": calls}]
    return results + ([{"role": "user", "content": "".join(texts)}] if texts else [])


def openapi(max_tokens_cap: int) -> dict:
    text_parts = {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
        "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}
    content = {"oneOf": [{"type": "string"}, text_parts]}
    name = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
    parameters = {"type": "object", "properties": {"type": {"type": "string", "enum": ["object"]},
                                                   "properties": {"type": "object"}}}
    function = {"type": "object", "required": ["name"], "properties": {
        "name": name, "description": {"type": "string"}, "parameters": parameters}}
    openai_call = {"type": "object", "required": ["id", "type", "function"], "properties": {
        "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "required": ["name", "arguments"], "properties": {
            "name": name, "arguments": {"type": "string"}}}}}
    blocks = {"type": "array", "items": {"oneOf": [
        text_parts["items"],
        {"type": "object", "required": ["type", "id", "name", "input"], "properties": {
            "type": {"type": "string", "enum": ["tool_use"]}, "id": {"type": "string"}, "name": name,
            "input": {"type": "object"}}},
        {"type": "object", "required": ["type", "tool_use_id"], "properties": {
            "type": {"type": "string", "enum": ["tool_result"]}, "tool_use_id": {"type": "string"},
            "content": content, "is_error": {"type": "boolean"}}}]}}
    stop = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16},
                      {"type": "null"}]}
    error = {"description": "invalid request", "content": {"application/json": {"schema": {"type": "object"}}}}
    ok_json = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}},
                                                "text/event-stream": {"schema": {"type": "string"}}}}
    chat_body = {"type": "object", "required": ["messages"], "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"],
                     "properties": {"role": {"type": "string",
                                             "enum": ["system", "developer", "user", "assistant", "tool"]},
                                    "content": {"oneOf": [*content["oneOf"], {"type": "null"}]},
                                    "tool_calls": {"type": "array", "items": openai_call},
                                    "tool_call_id": {"type": "string"}}}},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": max_tokens_cap},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": max_tokens_cap},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "top_k": {"type": ["integer", "null"], "minimum": -1, "description": "Extension (as vLLM): sample among "
                  "the k likeliest tokens; 0 or -1: all."},
        "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
        "logit_bias": {"type": ["object", "null"], "additionalProperties": {"type": "number", "minimum": -100,
                                                                           "maximum": 100}},
        "stop": stop, "seed": {"type": ["integer", "null"]}, "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
        "tools": {"type": ["array", "null"], "items": {"type": "object", "required": ["type", "function"],
                  "properties": {"type": {"type": "string", "enum": ["function"]}, "function": function}}},
        "tool_choice": {"oneOf": [{"type": "string", "enum": ["auto", "none", "required"]}, {
            "type": "object", "required": ["type", "function"], "properties": {
                "type": {"type": "string", "enum": ["function"]},
                "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}},
            {"type": "null"}]},
        "parallel_tool_calls": {"type": ["boolean", "null"]},
    }}
    messages_body = {"type": "object", "required": ["model", "messages", "max_tokens"],
                     "additionalProperties": False, "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
                     "properties": {"role": {"type": "string", "enum": ["user", "assistant"]},
                                    "content": {"oneOf": [{"type": "string"}, blocks]}}}},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": max_tokens_cap},
        "system": content, "stop_sequences": stop,
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1}, "top_k": {"type": "integer", "minimum": 0},
        "stream": {"type": "boolean"}, "metadata": {"type": "object"},
        **{name: {} for name in sorted(ANTHROPIC_IGNORED)},
        "tools": {"type": "array", "items": {"type": "object", "required": ["name", "input_schema"], "properties": {
            "name": name, "description": {"type": "string"}, "input_schema": parameters}}},
        "tool_choice": {"type": "object", "required": ["type"], "properties": {
            "type": {"type": "string", "enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"},
            "disable_parallel_tool_use": {"type": "boolean"}}},
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
            "/v1/messages/count_tokens": {"post": {
                "summary": "Anthropic: the prompt's tokens (input_tokens) for a messages request without max_tokens",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    **messages_body, "required": ["messages"]}}}},
                "responses": {"200": ok_json, "400": error, "401": error, "413": error}}},
            "/tokenize": {"post": {
                "summary": "vLLM: the prompt's token ids and count for chat messages (the assistant's turn opened), "
                           "and the context window (max_model_len)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "properties": {
                        "model": {"type": "string"}, "messages": chat_body["properties"]["messages"],
                        "tools": chat_body["properties"]["tools"],
                        "prompt": {"type": "string", "description": "a text counted as it is (no messages)"}}}}}},
                "responses": {"200": ok_json, "400": error, "401": error, "413": error}}},
            "/v1/models": get("models served, each with its context window (max_model_len)"),
            "/v1/models/{name}": {**get("the model served, if it is `name`"), "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]},
            "/health": get("liveness and queue depth"),
            "/v1/stats": get("the current expert-cache snapshot"),
            "/v1/stats/stream": {"get": {"summary": "snapshots as server-sent events", "parameters": [
                {"name": "hz", "in": "query", "schema": {"type": "number", "minimum": 0.1, "maximum": 10}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}],
                "responses": {"200": {"description": "OK", "content": {"text/event-stream": {
                    "schema": {"type": "string"}}}}, "400": error}}},
            "/v1/stats/miss-curve": {"get": {
                "summary": "hit rate of every policy and Belady's MIN at each capacity, replayed on the routing trace",
                "parameters": [
                    {"name": "capacities", "in": "query", "schema": {"type": "string"},
                     "description": "comma-separated experts per layer (default: about two dozen from 1 to all)"},
                    {"name": "last_steps", "in": "query", "schema": {"type": "string"},
                     "description": "the trace's last N steps, or 'all' (default 1024)"},
                    {"name": "layers", "in": "query", "schema": {"type": "string"},
                     "description": "replay N MoE layers spread evenly, or 'all' (default 8)"}],
                "responses": {"200": ok_json, "400": error, "409": error, "503": error}}},
            "/metrics": get("Prometheus metrics", "text/plain"),
        },
    }
