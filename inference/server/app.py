"""`moe serve`: OpenAI- and Anthropic-compatible HTTP API over one engine, with live cache telemetry."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NamedTuple

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..events import Delta, Generate, JobDone, JobFailed, ToolCall, ToolCalled
from ..telemetry import GenerationDone
from . import miss_curve as miss_curves
from .errors import anthropic_body, error_body, openai_body
from .metrics import prometheus_text
from .runner import EngineRunner, QueueFull, ServerJob, SessionClosed
from .schemas import BadRequest, ChatRequest, openapi, parse_anthropic, parse_openai

MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL = 0.25  # seconds: how soon a non-streaming request notices its client has gone
STOP_POLL = 0.25  # seconds: how soon a stats stream notices the server is shutting down


class GenerationFailed(Exception):
    """The engine raised while generating this request's reply."""


class ReplyCut(Exception):
    """The server ended this reply itself (it is shutting down): the client is told, not given a clean stop."""

    def __str__(self) -> str:
        return "the server is shutting down: this reply was cut short"


class ServerConfig:
    def __init__(self, model_name: str, api_key: str | None = None, max_tokens_cap: int = 4096,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.model_name = model_name
        self.api_key = api_key
        self.max_tokens_cap = max_tokens_cap
        self.max_body_bytes = max_body_bytes


class Prepared(NamedTuple):
    chat: ChatRequest
    job: ServerJob
    prompt_tokens: int
    tools: bool  # the request offers tools: the session parses the reply's calls


# ---------------------------------------------------------------- errors in each API's own format

def openai_error(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None) -> JSONResponse:
    return JSONResponse(openai_body(message, kind, param), status_code=status, headers=headers)


def anthropic_error(message: str, status: int, kind: str = "invalid_request_error",
                    headers: dict | None = None) -> JSONResponse:
    return JSONResponse(anthropic_body(message, kind), status_code=status, headers=headers)


def error_for(request: Request, message: str, status: int, param: str | None = None,
              headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, message, param), status_code=status, headers=headers)


# ---------------------------------------------------------------- the app

def build_app(runner: EngineRunner, config: ServerConfig) -> Starlette:
    def authorized(request: Request) -> bool:
        if not config.api_key:
            return True
        supplied = request.headers.get("x-api-key", "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            supplied = auth[7:].strip()
        return hmac.compare_digest(supplied.encode(), config.api_key.encode())

    async def read_json(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise BadRequest(f"request body over {config.max_body_bytes} bytes", status=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise BadRequest(f"request body over {config.max_body_bytes} bytes", status=413)
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"malformed JSON: {exc}") from exc

    def engine_or_error(request: Request) -> JSONResponse | None:
        state = runner.state
        if state == "failed":
            return error_for(request, f"the model failed to load: {runner.error}", 503)
        if state == "loading":
            return error_for(request, "the model is still loading", 503, headers={"Retry-After": "5"})
        if state != "ready":
            return error_for(request, f"the inference thread has {state}; restart the server", 503)
        return None

    async def tokenized(request: Request, parse, generating: bool = True, raw: list[str] | None = None
                        ) -> tuple[ChatRequest, list[int]] | JSONResponse:
        """The request parsed and its prompt's token ids, or the error to answer. `generating`: tokenized on the
        inference thread (the ids go to it), a prompt certainly over the context with its reply refused first;
        else only counted (`runner.count`). `raw`: filled by `parse` with a text to count as it is."""
        if not authorized(request):
            return error_for(request, "invalid or missing API key", 401)
        if (problem := engine_or_error(request)) is not None:
            return problem
        try:
            context = runner.context_length
            # A reply leaves at least one token of the context to its prompt.
            cap = min(config.max_tokens_cap, context - 1) if context else config.max_tokens_cap
            chat = parse(await read_json(request), cap)
            if chat.uses_tools and isinstance(runner.tool_format, str):
                return error_for(request, f"model {config.model_name!r} does not support tool calling: "
                                 f"{runner.tool_format}", 400, "tools")
            size = sum(len(m["content"].encode()) for m in chat.messages)
            reply = chat.max_tokens if chat.max_tokens_given else 1
            if generating and context and size > (context - reply) * runner.max_token_bytes:
                # Certainly over the context: refused without spending the inference thread on tokenizing it.
                with_reply = f"with max_tokens {chat.max_tokens} " if chat.max_tokens_given else ""
                return error_for(request, f"the messages take {size} bytes, at least {size // runner.max_token_bytes} "
                                 f"tokens: {with_reply}over the context window of {context} tokens", 400, "messages")
            if generating:  # on the session's thread, not this event loop
                prompt = await runner.tokenize(chat.messages, chat.template_tools, chat.continue_final)
            else:
                prompt = await runner.count(raw[0] if raw else chat.messages, chat.template_tools,
                                            chat.continue_final)
        except BadRequest as exc:
            return error_for(request, str(exc), exc.status, exc.param)
        except QueueFull:
            return error_for(request, "the server is busy: too many token counts under way", 429,
                             headers={"Retry-After": "1"})
        except SessionClosed:
            return error_for(request, "the server is shutting down", 503)
        except ClientDisconnect:
            return error_for(request, "client disconnected", 499)
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template refusing a role order
            return error_for(request, f"could not build the prompt: {exc}", 400)
        return chat, prompt

    async def prepare(request: Request, parse, call_id_prefix: str) -> Prepared | JSONResponse:
        parsed = await tokenized(request, parse)
        if isinstance(parsed, Response):
            return parsed
        chat, prompt = parsed
        context = runner.context_length
        if context and not chat.max_tokens_given:  # left out: what the prompt leaves of the context, up to the cap
            if len(prompt) >= context:
                return error_for(request, f"prompt has {len(prompt)} tokens: no room for a reply in the context "
                                 f"window of {context} tokens", 400, "messages")
            chat = dataclasses.replace(chat, max_tokens=min(chat.max_tokens, context - len(prompt)))
        if context and len(prompt) + chat.max_tokens > context:
            return error_for(request, f"prompt has {len(prompt)} tokens and max_tokens is {chat.max_tokens}: "
                             f"together over the context window of {context} tokens", 400, "messages")
        tools_offered = chat.template_tools
        vocab = runner.vocab_size
        if chat.logit_bias and not vocab:
            return error_for(request, "logit_bias: this model's vocabulary size is unknown", 400, "logit_bias")
        if any(token >= vocab for token, _ in chat.logit_bias):
            return error_for(request, f"logit_bias: token ids must be below {vocab} (the model's vocabulary)", 400,
                             "logit_bias")
        generate = Generate(prompt, chat.max_tokens, chat.temperature, chat.top_p, chat.top_k, tuple(chat.stop),
                            chat.seed, presence_penalty=chat.presence_penalty,
                            frequency_penalty=chat.frequency_penalty, logit_bias=chat.logit_bias,
                            tools=tuple(tools_offered) if tools_offered else None, tool_choice=chat.tool_choice,
                            tool_name=chat.tool_name, call_id_prefix=call_id_prefix)
        try:
            job = runner.submit(generate)  # token ids: the session does not tokenize again
        except QueueFull:
            return error_for(request, "the server is busy: too many requests waiting", 429,
                             headers={"Retry-After": "2"})
        except SessionClosed:
            return error_for(request, "the server is shutting down", 503)
        return Prepared(chat, job, len(prompt), bool(tools_offered))

    async def events(job: ServerJob, request: Request | None) -> AsyncIterator[str | ToolCall | GenerationDone]:
        """The job's reply text, with pieces that queued up meanwhile merged into one (fewer, larger chunks
        when the client or the loop falls behind), and its tool calls in their places (when it was offered
        tools), then its GenerationDone. With a `request`, a client that
        goes away cancels the job within DISCONNECT_POLL; streams notice a disconnect when their write
        fails, which also ends up in `finally`.

        Raises:
            GenerationFailed: the engine raised while generating. ReplyCut: the server is shutting down.
        """
        loop = asyncio.get_running_loop()
        checked = loop.time()
        following = None  # an event read ahead while merging text
        try:
            while True:
                if following is not None:
                    event, following = following, None
                elif request is None:
                    event = await job.events.get()
                else:
                    try:
                        event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL)
                    except TimeoutError:
                        event = None
                    if event is None or loop.time() - checked >= DISCONNECT_POLL:
                        checked = loop.time()
                        if await request.is_disconnected():
                            return
                    if event is None:
                        continue
                if isinstance(event, Delta):
                    text = event.text
                    while following is None and not job.events.empty():
                        following = job.events.get_nowait()
                        if isinstance(following, Delta):
                            text, following = text + following.text, None
                    if text:
                        yield text
                elif isinstance(event, ToolCalled):
                    yield event.call
                elif isinstance(event, JobDone):
                    if event.done.finish_reason == "cancelled":
                        raise ReplyCut  # the client is still here (else we returned above): the server cut it
                    yield event.done
                    return
                elif isinstance(event, JobFailed):
                    raise GenerationFailed(event.error)
        finally:
            job.cancel()  # no-op when finished; stops generation when the client went away

    async def final(job: ServerJob, request: Request) -> GenerationDone | None:
        """A non-streaming request's result; None when the client went away first."""
        done = None
        async for event in events(job, request):
            done = event if isinstance(event, GenerationDone) else done
        return done

    async def final_parts(job: ServerJob, request: Request) -> tuple[GenerationDone | None, str, list[ToolCall]]:
        """A non-streaming request's result, its text and its tool calls; (None, ...) when the client went away."""
        done, text, calls = None, "", []
        async for part in events(job, request):
            if isinstance(part, str):
                text += part
            elif isinstance(part, ToolCall):
                calls.append(part)
            else:
                done = part
        return done, text, calls

    # ---- OpenAI
    async def chat_completions(request: Request) -> Response:
        prepared = await prepare(request, parse_openai, "call_")
        if isinstance(prepared, Response):
            return prepared
        chat, job, prompt_tokens = prepared.chat, prepared.job, prepared.prompt_tokens
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": cid, "created": created, "model": config.model_name}
        if prepared.tools:
            return await openai_with_tools(request, prepared, base)
        if not chat.stream:
            try:
                done = await final(job, request)
            except ReplyCut as exc:
                return openai_error(str(exc), 503, kind="server_error")
            except Exception as exc:  # noqa: BLE001
                return openai_error(f"generation failed: {exc}", 500, kind="server_error")
            if done is None:
                return openai_error("client disconnected", 499)
            return JSONResponse({**base, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": done.text},
                "finish_reason": openai_finish(done)}], "usage": usage(prompt_tokens, done)})

        async def stream() -> AsyncIterator[str]:
            chunk = {**base, "object": "chat.completion.chunk"}
            yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
            done = None
            try:
                async for event in events(job, None):
                    if isinstance(event, str):
                        yield sse({**chunk, "choices": [{"index": 0, "delta": {"content": event},
                                                         "finish_reason": None}]})
                    else:
                        done = event
            except Exception as exc:  # noqa: BLE001 - mid-stream: report in-band; no finish_reason claims a clean end
                for event in openai_stream_failed(exc):
                    yield event
                return
            for event in openai_stream_end(chunk, openai_finish(done) if done else "stop", done,
                                           chat.include_usage, prompt_tokens):
                yield event

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- Anthropic
    async def messages(request: Request) -> Response:
        prepared = await prepare(request, parse_anthropic, "toolu_")
        if isinstance(prepared, Response):
            return prepared
        chat, job, prompt_tokens = prepared.chat, prepared.job, prepared.prompt_tokens
        mid = f"msg_{uuid.uuid4().hex}"
        if prepared.tools:
            return await anthropic_with_tools(request, prepared, mid)
        if not chat.stream:
            try:
                done = await final(job, request)
            except ReplyCut as exc:
                return anthropic_error(str(exc), 503, "overloaded_error")
            except Exception as exc:  # noqa: BLE001
                return anthropic_error(f"generation failed: {exc}", 500, "api_error")
            if done is None:
                return anthropic_error("client disconnected", 499)
            reason, sequence = anthropic_stop(done, chat.stop)
            return JSONResponse(anthropic_message(mid, config.model_name, [{"type": "text", "text": done.text}],
                                                  reason, sequence, prompt_tokens, done.generated_tokens))

        async def stream() -> AsyncIterator[str]:
            yield sse_event("message_start", {"type": "message_start", "message": anthropic_message(
                mid, config.model_name, [], None, None, prompt_tokens, 0)})
            yield sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                    "content_block": {"type": "text", "text": ""}})
            done = None
            try:
                async for event in events(job, None):
                    if isinstance(event, str):
                        yield sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                                "delta": {"type": "text_delta", "text": event}})
                    else:
                        done = event
            except Exception as exc:  # noqa: BLE001 - an error event ends the stream; no stop_reason claims a clean end
                yield anthropic_stream_failed(exc)
                return
            yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
            reason, sequence = anthropic_stop(done, chat.stop) if done else ("end_turn", None)
            for event in anthropic_stream_end(reason, sequence, done):
                yield event

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- tool calling: the same two APIs with the reply split into text and calls
    async def openai_with_tools(request: Request, prepared: Prepared, base: dict) -> Response:
        chat, job, prompt_tokens = prepared.chat, prepared.job, prepared.prompt_tokens

        def finish_reason(done: GenerationDone, calls: int) -> str:
            return "tool_calls" if calls and done.finish_reason != "length" else openai_finish(done)

        if not chat.stream:
            try:
                done, text, calls = await final_parts(job, request)
            except ReplyCut as exc:
                return openai_error(str(exc), 503, kind="server_error")
            except Exception as exc:  # noqa: BLE001
                return openai_error(f"generation failed: {exc}", 500, kind="server_error")
            if done is None:
                return openai_error("client disconnected", 499)
            message: dict = {"role": "assistant", "content": text if text or not calls else None}
            if calls:
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": c.arguments_json}} for c in calls]
            return JSONResponse({**base, "object": "chat.completion", "choices": [{
                "index": 0, "message": message, "finish_reason": finish_reason(done, len(calls))}],
                "usage": usage(prompt_tokens, done)})

        async def stream() -> AsyncIterator[str]:
            chunk = {**base, "object": "chat.completion.chunk"}

            def delta(content: dict) -> str:
                return sse({**chunk, "choices": [{"index": 0, "delta": content, "finish_reason": None}]})

            yield delta({"role": "assistant", "content": ""})
            done, index = None, 0
            try:
                async for part in events(job, None):
                    if isinstance(part, str):
                        yield delta({"content": part})
                    elif isinstance(part, ToolCall):  # id and name first, then the arguments
                        yield delta({"tool_calls": [{"index": index, "id": part.id, "type": "function",
                                                     "function": {"name": part.name, "arguments": ""}}]})
                        yield delta({"tool_calls": [{"index": index, "function": {"arguments": part.arguments_json}}]})
                        index += 1
                    else:
                        done = part
            except Exception as exc:  # noqa: BLE001 - mid-stream: report in-band; no finish_reason claims a clean end
                for event in openai_stream_failed(exc):
                    yield event
                return
            for event in openai_stream_end(chunk, finish_reason(done, index) if done else "stop", done,
                                           chat.include_usage, prompt_tokens):
                yield event

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def anthropic_with_tools(request: Request, prepared: Prepared, mid: str) -> Response:
        chat, job, prompt_tokens = prepared.chat, prepared.job, prepared.prompt_tokens

        def stop_reason(done: GenerationDone, calls: int) -> tuple[str, str | None]:
            if calls and done.finish_reason != "length":
                return "tool_use", None
            return anthropic_stop(done, chat.stop)

        if not chat.stream:
            try:
                done = None
                content: list[dict] = []
                async for part in events(job, request):
                    if isinstance(part, str):
                        if content and content[-1]["type"] == "text":
                            content[-1]["text"] += part
                        else:
                            content.append({"type": "text", "text": part})
                    elif isinstance(part, ToolCall):
                        content.append({"type": "tool_use", "id": part.id, "name": part.name, "input": part.arguments})
                    else:
                        done = part
            except ReplyCut as exc:
                return anthropic_error(str(exc), 503, "overloaded_error")
            except Exception as exc:  # noqa: BLE001
                return anthropic_error(f"generation failed: {exc}", 500, "api_error")
            if done is None:
                return anthropic_error("client disconnected", 499)
            reason, sequence = stop_reason(done, sum(block["type"] == "tool_use" for block in content))
            return JSONResponse(anthropic_message(mid, config.model_name, content or [{"type": "text", "text": ""}],
                                                  reason, sequence, prompt_tokens, done.generated_tokens))

        async def stream() -> AsyncIterator[str]:
            yield sse_event("message_start", {"type": "message_start", "message": anthropic_message(
                mid, config.model_name, [], None, None, prompt_tokens, 0)})
            done, calls = None, 0
            index, text_open = -1, False  # blocks open as their first part arrives: a text block per run of text

            def start(block: dict) -> str:
                return sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                                         "content_block": block})

            def stop() -> str:
                return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})

            try:
                async for part in events(job, None):
                    if isinstance(part, str):
                        if not text_open:
                            index, text_open = index + 1, True
                            yield start({"type": "text", "text": ""})
                        yield sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                                "delta": {"type": "text_delta", "text": part}})
                    elif isinstance(part, ToolCall):
                        if text_open:
                            yield stop()
                        index, text_open, calls = index + 1, False, calls + 1
                        yield start({"type": "tool_use", "id": part.id, "name": part.name, "input": {}})
                        yield sse_event("content_block_delta", {
                            "type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": part.arguments_json}})
                        yield stop()
                    else:
                        done = part
            except Exception as exc:  # noqa: BLE001 - an error event ends the stream; no stop_reason claims a clean end
                yield anthropic_stream_failed(exc)
                return
            if index < 0:  # no part at all: one empty text block, as without tools
                index, text_open = 0, True
                yield start({"type": "text", "text": ""})
            if text_open:
                yield stop()
            reason, sequence = stop_reason(done, calls) if done else ("end_turn", None)
            for event in anthropic_stream_end(reason, sequence, done):
                yield event

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- models, health, stats
    def model_entry() -> dict:
        entry = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "moe-tui"}
        if runner.context_length:  # vLLM's name for the context window, which clients already read
            entry["max_model_len"] = runner.context_length
        return entry

    async def models(request: Request) -> Response:
        if not authorized(request):
            return openai_error("invalid or missing API key", 401, kind="authentication_error")
        return JSONResponse({"object": "list", "data": [model_entry()]})

    async def model(request: Request) -> Response:
        if not authorized(request):
            return openai_error("invalid or missing API key", 401, kind="authentication_error")
        name = request.path_params["name"]
        if name != config.model_name:
            return openai_error(f"the model {name!r} does not exist: this server serves {config.model_name!r}", 404,
                                "model")
        return JSONResponse(model_entry())

    async def tokenize(request: Request) -> Response:
        """vLLM's POST /tokenize: chat `messages` counted as a reply would see them (the chat template with the
        assistant's turn opened, `tools` given to it), or a `prompt` text as it is."""
        text: list[str] = []

        def parse(body, cap):
            if isinstance(body, dict) and "messages" not in body and "prompt" in body:
                if not isinstance(body["prompt"], str):
                    raise BadRequest("'prompt' must be a string", "prompt")
                text.append(body["prompt"])
                body = {"messages": [{"role": "user", "content": body["prompt"]}]}  # checked as a message would be
            return parse_openai(_counted(body, VLLM_TOKENIZE_FIELDS + ("prompt",)), cap)

        parsed = await tokenized(request, parse, generating=False, raw=text)
        if isinstance(parsed, Response):
            return parsed
        prompt = parsed[1]
        return JSONResponse({"count": len(prompt), "max_model_len": runner.context_length or None,
                             "tokens": prompt})

    async def count_tokens(request: Request) -> Response:
        """Anthropic's POST /v1/messages/count_tokens."""
        parsed = await tokenized(request, lambda body, cap: parse_anthropic(_counted(body), cap), generating=False)
        if isinstance(parsed, Response):
            return parsed
        return JSONResponse({"input_tokens": len(parsed[1])})

    async def health(request: Request) -> Response:
        state = runner.state
        status = {"ready": "ok", "loading": "loading", "failed": "error"}.get(state, state)
        return JSONResponse({"status": status, "model": config.model_name, "queued": runner.waiting(),
                             "busy": runner.busy, **runner.outcomes},
                            status_code=200 if state in ("ready", "loading") else 503)

    def snapshot_json() -> dict | None:
        snap = runner.snapshot
        # The served name, not the model's path on this machine.
        return None if snap is None else {**snap.to_dict(), "model": config.model_name}

    async def stats(request: Request) -> Response:
        if not authorized(request):
            return openai_error("invalid or missing API key", 401, kind="authentication_error")
        data = snapshot_json()
        return JSONResponse(data) if data else openai_error("the model is still loading", 503)

    async def stats_stream(request: Request) -> Response:
        if not authorized(request):
            return openai_error("invalid or missing API key", 401, kind="authentication_error")
        try:
            hz = float(request.query_params.get("hz", "2"))
            limit = int(request.query_params["limit"]) if "limit" in request.query_params else None
        except ValueError:
            return openai_error("'hz' must be a number and 'limit' an integer", 400, "hz")
        if not 0.1 <= hz <= 10 or (limit is not None and limit < 1):
            return openai_error("'hz' must be between 0.1 and 10 and 'limit' at least 1", 400, "hz")

        async def stream() -> AsyncIterator[str]:
            sent = 0
            while not runner.stopping:  # shutting down: the stream ends (uvicorn waits for open responses)
                data = snapshot_json()
                if data is not None:
                    yield sse(data)
                    sent += 1
                    if limit is not None and sent >= limit:
                        return
                due = time.monotonic() + 1.0 / hz
                while not runner.stopping and time.monotonic() < due:
                    await asyncio.sleep(min(STOP_POLL, due - time.monotonic()))

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def miss_curve(request: Request) -> Response:
        if not authorized(request):
            return openai_error("invalid or missing API key", 401, kind="authentication_error")
        snap = runner.snapshot
        if snap is None or runner.state != "ready":
            return openai_error("the model is still loading", 503)
        return await miss_curves.respond(runner.miss_curves, request.query_params, snap)

    async def metrics(request: Request) -> Response:
        if not authorized(request):
            return PlainTextResponse("unauthorized\n", status_code=401)
        return PlainTextResponse(prometheus_text(runner.snapshot, runner), media_type="text/plain; version=0.0.4")

    async def openapi_doc(request: Request) -> Response:
        return JSONResponse(openapi(config.max_tokens_cap))

    @asynccontextmanager
    async def lifespan(app):
        yield
        runner.stop()  # in-flight streams end with their final events

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Starlette's own errors (no such path, a method the path does not take) in the API's error format,
        not plain text: SDKs read the JSON."""
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.url.path} does not take {request.method}"}.get(exc.status_code, exc.detail)
        return JSONResponse(error_body(request.url.path, exc.status_code, message), status_code=exc.status_code,
                            headers=exc.headers)

    return Starlette(exception_handlers={HTTPException: http_error}, routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/v1/models", models),
        Route("/v1/models/{name:path}", model),
        Route("/health", health),
        Route("/v1/stats", stats),
        Route("/v1/stats/stream", stats_stream),
        Route("/v1/stats/miss-curve", miss_curve),
        Route("/metrics", metrics),
        Route("/openapi.json", openapi_doc),
    ], lifespan=lifespan)


# vLLM's /tokenize options that do not change a chat prompt's count here (the assistant's turn is always opened).
VLLM_TOKENIZE_FIELDS = ("add_generation_prompt", "add_special_tokens", "return_token_strs", "continue_final_message")


def _counted(body, extra: tuple[str, ...] = ()):
    """A token-count request as its API's generation request: no reply is made, so no max_tokens is needed."""
    if not isinstance(body, dict):
        return body  # the parser says what is wrong
    dropped = ("max_tokens", "max_completion_tokens", "stream", *extra)
    return {k: v for k, v in body.items() if k not in dropped} | {"max_tokens": 1}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def sse_event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def usage(prompt_tokens: int, done: GenerationDone) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done.generated_tokens,
            "total_tokens": prompt_tokens + done.generated_tokens}


def openai_finish(done: GenerationDone) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def anthropic_stop(done: GenerationDone, stops: list[str]) -> tuple[str, str | None]:
    if done.finish_reason == "length":
        return "max_tokens", None
    if done.stop_sequence is not None:
        return "stop_sequence", done.stop_sequence
    return "end_turn", None


def anthropic_message(mid: str, model: str, content: list, stop_reason: str | None, stop_sequence: str | None,
                      input_tokens: int, output_tokens: int) -> dict:
    """An Anthropic Messages API message object (the reply, or the empty one `message_start` opens)."""
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def openai_stream_failed(exc: Exception) -> list[str]:
    """A failure mid-stream, in-band: an error event, then the end marker (no finish_reason claims a clean end)."""
    message = str(exc) if isinstance(exc, ReplyCut) else f"generation failed: {exc}"
    return [sse({"error": {"message": message, "type": "server_error"}}), "data: [DONE]\n\n"]


def openai_stream_end(chunk: dict, finish: str, done: GenerationDone | None, include_usage: bool,
                      prompt_tokens: int) -> list[str]:
    """The last chunks of a chat completion stream: the finish reason, usage if asked, the end marker."""
    events = [sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})]
    if include_usage and done is not None:
        events.append(sse({**chunk, "choices": [], "usage": usage(prompt_tokens, done)}))
    return [*events, "data: [DONE]\n\n"]


def anthropic_stream_failed(exc: Exception) -> str:
    """A failure mid-stream: an error event ends it (no stop_reason claims a clean end)."""
    kind = "overloaded_error" if isinstance(exc, ReplyCut) else "api_error"
    return sse_event("error", {"type": "error", "error": {"type": kind, "message": str(exc)}})


def anthropic_stream_end(reason: str, sequence: str | None, done: GenerationDone | None) -> list[str]:
    """The last events of a Messages stream: the stop reason with the output tokens, then message_stop."""
    return [sse_event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                        "usage": {"output_tokens": done.generated_tokens if done else 0}}),
            sse_event("message_stop", {"type": "message_stop"})]
