"""Tool calling, for the session (and so for `moe serve` and the app's agent mode): the model's tool-call format
(one of mlx-lm's parsers), the opening that forces a call, and a reply's text split into plain text and parsed
calls as it streams. Needs mlx-lm only once a request offers tools."""

from __future__ import annotations

import importlib
import json
import pkgutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .events import ToolCall

__all__ = ["ToolCall", "ToolCallSplitter", "ToolFormat", "forced_opening", "load_parser", "tool_format"]


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes a call: text between `start` and `end` (end "": to the end of the reply), read by
    mlx-lm's `parse` for the format `name`."""

    name: str
    start: str
    end: str
    parse: Callable[[str, Any], Any]


# What a call of one named tool starts with, after the format's start marker, as each parser reads it (the
# model writes the rest). Formats missing here force only the start marker: a call, of any tool.
NAMED_OPENINGS = {
    "json_tools": '\n{{"name": "{name}", "arguments":',
    "qwen3_coder": "\n<function={name}>\n",
    "glm47": "{name}",
    "laguna": "{name}",
    "longcat": "{name}",
    "kimi_k2": "<|tool_call_begin|>functions.{name}:0<|tool_call_argument_begin|>",
    "minimax_m2": '\n<invoke name="{name}">\n',
    "mistral": "{name}[ARGS]",
    "pythonic": "[{name}(",
    "function_gemma": "call:{name}{{",
    "gemma4": "call:{name}{{",
    "minicpm5": '"{name}">',
}


def forced_opening(fmt: ToolFormat, choice: str, name: str | None = None) -> str:
    """The text the reply is made to start with so that `tool_choice` is obeyed: "" for "auto" and "none", the
    start marker for "required", the start marker and the call's beginning up to its arguments for "named"
    (the start marker alone where the format's call beginning is not known)."""
    if choice == "required" or (choice == "named" and fmt.name not in NAMED_OPENINGS):
        return fmt.start
    if choice == "named" and name:
        return fmt.start + NAMED_OPENINGS[fmt.name].format(name=name)
    return ""


def parser_names() -> list[str]:
    """mlx-lm's tool-call parsers (the modules in mlx_lm.tool_parsers)."""
    import mlx_lm.tool_parsers

    return sorted(m.name for m in pkgutil.iter_modules(mlx_lm.tool_parsers.__path__) if not m.name.startswith("_"))


def load_parser(name: str) -> ToolFormat:
    """mlx-lm's parser `name` and its call markers.

    Raises:
        ValueError: no such parser (the message lists them).
    """
    names = parser_names()
    if name not in names:
        raise ValueError(f"unknown tool parser {name!r}: one of {', '.join(names)}")
    module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    return ToolFormat(name, module.tool_call_start, module.tool_call_end or "", module.parse_tool_call)


def template_text(tokenizer: Any) -> str | None:
    """The chat template's source (all of them joined where a tokenizer has several), None without one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(t for t in template.values() if isinstance(t, str))
    return template if isinstance(template, str) else None


def tool_format(tokenizer: Any, parser: str | None = None) -> ToolFormat | str:
    """The model's tool-call format, or why it has none (a phrase for an error message).

    The parser is `parser` when given (`moe serve --tool-parser`), else the one mlx-lm's tokenizer wrapper
    inferred from the chat template or vocabulary (`TokenizerWrapper.tool_parser`, its markers
    `tool_call_start` / `tool_call_end`). Either way the template must render `tools`, or the model never sees them.
    """
    template = template_text(tokenizer)
    custom_renderer = template is None and getattr(tokenizer, "has_chat_template", False)
    if template is None and not custom_renderer:
        return "it has no chat template"
    if template is not None and "tools" not in template:
        return "its chat template does not render tools"
    if parser is not None:
        return load_parser(parser)
    if not getattr(tokenizer, "has_tool_calling", False):
        return ("mlx-lm recognises no tool-call format in its chat template or vocabulary "
                "(name one with `moe serve --tool-parser`)")
    init = getattr(tokenizer, "init_kwargs", None)
    name = init.get("tool_parser_type", "inferred") if isinstance(init, dict) else "inferred"
    return ToolFormat(name, tokenizer.tool_call_start, tokenizer.tool_call_end or "", tokenizer.tool_parser)


class ToolCallSplitter:
    """A reply's text in, plain text and `ToolCall`s out, in order.

    Markers are found in the text with mlx-lm's `TextStateMachine` (text, not token ids: a marker need not be
    one token). Text inside a call is held until the call ends, then parsed; a call the parser cannot read
    comes out as text, markers included. Whitespace between text and calls is dropped (it would make empty
    text blocks); a reply without calls comes out exactly as it went in.
    """

    def __init__(self, fmt: ToolFormat, tools: Sequence[dict] | None, id_prefix: str = "call_") -> None:
        from mlx_lm.generate import TextStateMachine

        self._machine = TextStateMachine({"normal": [(fmt.start, "tool")],
                                          "tool": [(fmt.end, "normal")] if fmt.end else []})
        self._split = TextStateMachine.split
        self._flush = TextStateMachine.flush
        self.format = fmt
        self.tools = list(tools) if tools else None
        self.id_prefix = id_prefix
        self._state = self._machine.make_state("normal")
        self._where = "normal"
        self._call_text = ""
        self._held = ""  # trailing whitespace of the text so far, not yet released
        self._after_call = False
        self.calls = 0

    def feed(self, text: str) -> list[str | ToolCall]:
        self._state, segments = self._split(self._state, text)
        return self._take(segments)

    def finish(self) -> list[str | ToolCall]:
        """What is left at the end of the reply: a call without its end marker is parsed as it is."""
        self._state, rest, where = self._flush(self._state)
        out = self._take([(where, rest)])
        if self._where == "tool":
            out += self._end_call(closed=not self.format.end)
            self._where = "normal"
        if self._held and not self._after_call:
            out.append(self._held)
        self._held = ""
        return out

    def _take(self, segments: list[tuple[str, str]]) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        for where, piece in segments:
            if where == "tool":
                if self._where != "tool":
                    self._call_text = ""
                self._call_text += piece
            else:
                if self._where == "tool":
                    out += self._end_call(closed=True)
                out += self._text(piece)
            self._where = where
        return out

    def _text(self, piece: str) -> list[str | ToolCall]:
        if self._after_call:
            piece = piece.lstrip()
            if not piece:
                return []
            self._after_call = False
        text = self._held + piece
        body = text.rstrip()
        self._held = text[len(body):]
        return [body] if body else []

    def _end_call(self, closed: bool) -> list[str | ToolCall]:
        calls = self._parse(self._call_text)
        if calls is None:  # unreadable: the client gets the model's text as it was
            raw = self.format.start + self._call_text + (self.format.end if closed else "")
            return self._text(raw)
        self._held, self._after_call = "", True
        self.calls += len(calls)
        return list(calls)

    def _parse(self, text: str) -> list[ToolCall] | None:
        try:
            parsed = self.format.parse(text, self.tools)
        except Exception:  # noqa: BLE001 - parsers raise what they like on bad text (ValueError, KeyError...)
            return None
        calls = []
        for item in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
                return None
            arguments = item.get("arguments", {})
            if arguments is None:
                arguments = {}
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError:
                    return None
            if not isinstance(arguments, dict):
                return None
            call_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else None
            calls.append(ToolCall(call_id or f"{self.id_prefix}{uuid.uuid4().hex[:24]}", item["name"], arguments))
        return calls or None
