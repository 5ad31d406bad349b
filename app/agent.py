"""Agent mode's tools and loop: the model is offered tools (read a file, list and search the working directory,
apply an edit, run a command); each call is run here, its result sent back, until the model answers in text.
The model is the local session's (tool calls parsed on its thread) or an OpenAI-compatible server's (chat
completions with `tools`): the loop takes either as a `Model`. Writes and commands ask first (`ask`), reads ask
unless the chat always allows them. No widgets here: the app passes in how to ask and how to show a step."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from moe_tui.inference.events import Generate

from . import coding, edits, runner

if TYPE_CHECKING:
    import httpx

    from .messages import ReplyDone

AGENT_PROMPT = """You are a coding agent working in the user's project folder. Use the tools to look at the \
project (list_files, search_files, read_file), to change files (apply_edit) and to run commands such as tests \
(run_command); the user approves each change and command. When done, answer briefly with what you did."""
MAX_STEPS = 12  # model turns in one agent reply: a model that keeps calling tools is stopped here
MAX_RESULT_CHARS = 16_000  # of a tool's result sent back to the model
MAX_LISTED = 200
SKIPPED_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}

TOOLS = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a text file of the project.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "relative path"}},
                       "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "list_files", "description": "List the project's files under a folder (recursively), optionally "
                                             "only those matching a glob such as *.py.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "pattern": {"type": "string"}},
                       "required": []}}},
    {"type": "function", "function": {
        "name": "search_files", "description": "Find the lines of the project's text files that contain a string.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}, "path": {"type": "string"}},
                       "required": ["text"]}}},
    {"type": "function", "function": {
        "name": "apply_edit", "description": "Change a file: replace the exact lines `search` with `replace` "
                                             "(an empty search creates a new file), or give its whole new `content`.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "search": {"type": "string"}, "replace": {"type": "string"},
            "content": {"type": "string"}}, "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "run_command", "description": "Run a shell command in the project folder; returns its exit status "
                                              "and output.",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}},
]
READS = {"read_file", "list_files", "search_files"}


class AgentError(Exception):
    """The agent loop cannot go on (the server failed or answered out of format); the message says why."""


@dataclass
class Step:
    """One tool call, as shown and recorded in the chat."""

    name: str
    arguments: dict
    result: str
    allowed: bool = True

    def summary(self) -> str:
        shown = ", ".join(f"{k}={coding.shorten(str(v), 60)!r}" for k, v in self.arguments.items()
                          if k not in ("content", "replace", "search"))
        return f"{self.name}({shown})" + ("" if self.allowed else ": refused by the user")


# Asks the user a question (with a diff, maybe); True for yes.
Ask = Callable[[str, str], Awaitable[bool]]


class Tools:
    """The tools' implementations, in the working directory `cwd`."""

    def __init__(self, cwd: Path, ask: Ask, reads_allowed: bool, record_apply: Callable[[list[edits.Written]], None]):
        self.cwd = cwd
        self.ask = ask
        self.reads_allowed = reads_allowed
        self.record_apply = record_apply

    async def call(self, name: str, arguments: dict) -> Step:
        if name not in {t["function"]["name"] for t in TOOLS}:
            return Step(name, arguments, f"error: no tool named {name!r}")
        path = arguments.get("path")
        if name in READS and isinstance(path, str) and self._outside(path):  # refused without asking the user
            return Step(name, arguments, f"error: {path}: outside the project folder; not allowed")
        if name in READS and not self.reads_allowed:
            question = f"The model wants to {name.replace('_', ' ')}: {json.dumps(arguments)[:200]}. Allow?"
            if not await self.ask(question, ""):
                return Step(name, arguments, "the user refused this call", allowed=False)
        try:
            result = await getattr(self, name)(**{k: v for k, v in arguments.items() if isinstance(k, str)})
        except TypeError as exc:
            result = f"error: bad arguments for {name}: {exc}"
        except coding.PathError as exc:
            result = f"error: {exc}"
        if isinstance(result, Step):
            return result
        return Step(name, arguments, result[:MAX_RESULT_CHARS])

    def _outside(self, path: str) -> bool:
        """Whether `path` (a file or folder) lies outside the working directory; False when it cannot be told
        (the tool then says what is wrong with it)."""
        try:
            return not (self.cwd / Path(path).expanduser()).resolve().is_relative_to(self.cwd.resolve())
        except (RuntimeError, ValueError, OSError):
            return False

    def _path(self, path: str) -> Path:
        resolved, outside = coding.resolve(path, self.cwd)
        if outside:
            raise coding.PathError(f"{path}: outside the project folder; not allowed")
        return resolved

    async def read_file(self, path: str) -> str:
        return coding.read_text_file(self._path(path))

    async def list_files(self, path: str = ".", pattern: str = "") -> str:
        root = (self.cwd / path).resolve()
        if self._outside(path) or not root.is_dir():
            return f"error: {path}: not a folder of the project"
        found = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
            for name in sorted(files):
                relative = str((Path(folder) / name).relative_to(self.cwd.resolve()))
                if not pattern or fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(relative, pattern):
                    found.append(relative)
                if len(found) >= MAX_LISTED:
                    return "\n".join(found) + f"\n(stopped at {MAX_LISTED} files)"
        return "\n".join(found) or "(no files)"

    async def search_files(self, text: str, path: str = ".") -> str:
        hits = []
        for relative in (await self.list_files(path)).splitlines():
            try:  # through the same containment as read_file: a link out of the project is not read
                content = coding.read_text_file(self._path(relative))
            except coding.PathError:
                continue
            hits += [f"{relative}:{n}: {line.strip()[:200]}" for n, line in enumerate(content.splitlines(), 1)
                     if text in line]
            if len(hits) >= MAX_LISTED:
                break
        return "\n".join(hits[:MAX_LISTED]) or f"(no line contains {text!r})"

    async def apply_edit(self, path: str, search: str | None = None, replace: str = "",
                         content: str | None = None) -> str:
        if content is not None:
            edit = edits.Edit(0, path, content if content.endswith("\n") else content + "\n")
        else:
            edit = edits.Edit(0, path, None, (((search or "").rstrip("\n"), replace.rstrip("\n")),))
        changes, problems = edits.plan([edit], self.cwd, {})
        if problems:
            return "error: " + "; ".join(p.removeprefix("[0] ") for p in problems)
        change = changes[0]
        if change.outside:
            return f"error: {path}: outside the project folder; not allowed"
        if change.new == change.old:
            return f"{path} already holds this"
        if not await self.ask(f"The model wants to edit {path}. Apply?", change.diff):
            return Step("apply_edit", {"path": path}, "the user refused this edit", allowed=False)
        written, failed = edits.write_changes([change])
        if written:
            self.record_apply(written)
        return f"error: {failed[0]}" if failed else f"applied to {path}"

    async def run_command(self, command: str) -> str:
        if not await self.ask(f"The model wants to run, in {self.cwd}:\n\n$ {command}", ""):
            return Step("run_command", {"command": command}, "the user refused to run it", allowed=False)
        result = await runner.run_shell(command, str(self.cwd), timeout=runner.RUN_TIMEOUT)
        return f"{result.status_text}\n{result.output}"


@dataclass(frozen=True)
class Turn:
    """One model turn: its text, and its calls as (id, name, arguments), arguments that are not a JSON object
    being the error text to send back."""

    content: str
    calls: list[tuple[str, str, dict | str]] = field(default_factory=list)


# The model: its next turn given the chat so far (chat-template form: calls' arguments are objects), tools offered.
Model = Callable[[list[dict]], Awaitable[Turn]]


def session_model(generate: Callable[[Generate], Awaitable[ReplyDone]], max_tokens: int,
                  temperature: float) -> Model:
    """The local session's model: `generate` submits a request (the session renders the chat template with
    `TOOLS` and parses the calls) and returns its ReplyDone."""

    async def turn(messages: list[dict]) -> Turn:
        done = await generate(Generate(messages, max_tokens, temperature, fit_context=True, tools=tuple(TOOLS)))
        if done.error:
            raise AgentError(f"generation failed: {done.error}")
        if done.done is None or done.done.finish_reason == "cancelled":
            raise AgentError("the model's turn was cancelled")
        return Turn(done.text, [(call.id, call.name, call.arguments) for call in done.tool_calls])

    return turn


def server_model(client: httpx.AsyncClient, model: str, max_tokens: int, temperature: float) -> Model:
    """An OpenAI-compatible server's model, through non-streaming chat completions with `TOOLS`."""

    async def turn(messages: list[dict]) -> Turn:
        message = await complete(client, model, [wire_message(m) for m in messages], max_tokens, temperature)
        return Turn(message.get("content") or "", tool_calls(message))

    return turn


def wire_message(message: dict) -> dict:
    """A message as chat completions take it: a call's arguments as a JSON string."""
    if not message.get("tool_calls"):
        return message
    calls = [{**call, "function": {**call["function"], "arguments": json.dumps(call["function"]["arguments"])}}
             for call in message["tool_calls"]]
    return {**message, "content": message["content"] or None, "tool_calls": calls}


async def complete(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int,
                   temperature: float) -> dict:
    """One non-streaming chat completion with the tools: the assistant message (content and tool_calls)."""
    import httpx

    body = {"model": model, "messages": messages, "tools": TOOLS, "tool_choice": "auto", "max_tokens": max_tokens,
            "temperature": temperature, "stream": False}
    try:
        response = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        raise AgentError(f"the server did not answer: {exc}") from None
    if response.status_code != 200:
        raise AgentError(f"the server answered {response.status_code}: {response.text[:300]}")
    try:
        message = response.json()["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise AgentError(f"not a chat completion: {response.text[:200]}") from None
    if not isinstance(message, dict):
        raise AgentError("the completion's message is not an object")
    return message


def tool_calls(message: dict) -> list[tuple[str, str, dict | str]]:
    """(id, name, arguments) of each call; arguments that are not a JSON object come back as the error text."""
    calls = []
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict):
            continue
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        raw = function.get("arguments") or "{}"
        try:
            arguments = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(arguments, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            arguments = f"error: the arguments are not a JSON object ({exc})"
        calls.append((str(call.get("id") or f"call_{len(calls)}"), str(function.get("name") or ""), arguments))
    return calls


async def run(model: Model, messages: list[dict], tools: Tools, shown: Callable[[Step], None]) -> str:
    """The loop: ask, run the calls, send their results, until the model answers without calls. Its answer."""
    messages = list(messages)
    for _ in range(MAX_STEPS):
        turn = await model(messages)
        if not turn.calls:
            return turn.content
        messages.append({"role": "assistant", "content": turn.content, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": arguments if isinstance(arguments, dict) else {}}}
            for call_id, name, arguments in turn.calls]})
        for call_id, name, arguments in turn.calls:
            if isinstance(arguments, str):
                step = Step(name, {}, arguments)
            else:
                step = await tools.call(name, arguments)
            shown(step)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": step.result})
    return f"(stopped after {MAX_STEPS} model turns of tool calls)"
