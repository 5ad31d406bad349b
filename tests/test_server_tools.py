"""Tool calling in `moe serve` against the real openai and anthropic SDKs, on 127.0.0.1, with the demo model.

The demo model cannot write tool calls itself, so the `demo` fixture forces its continuation (tests/forcing.py's
`Script`, set per test through the `script` fixture): a wrapper around the engine's model, installed by the
fixture and never by the server, replaces the logits of each reply position with a one-hot row for the next
token of a script (then EOS). Only the model's choice of tokens is scripted: the demo's own chat template builds
the prompt, mlx-lm's parser (inferred from that template) reads the calls and the server's wire format carries
them, so the SDKs see what they would see from a model that calls tools.
"""

from __future__ import annotations

import json
import threading
import time

import anthropic
import httpx
import openai
import pytest
import uvicorn
from moe_tui.inference import Engine
from moe_tui.inference.demo_paths import DEMO_MODEL
from moe_tui.inference.server import serve
from moe_tui.inference.server.app import ServerConfig, build_app
from moe_tui.inference.server.runner import EngineRunner
from moe_tui.inference.tools import NAMED_OPENINGS, ToolCallSplitter, forced_opening, load_parser, tool_format

from tests.forcing import Script, call
from tests.test_server import free_port

OLD_DEMO_TEMPLATE = (  # the demo's chat template before it rendered tools
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string"}}, "required": ["city"]}}}
CLAUDE_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                 "input_schema": t["function"]["parameters"]} for t in (WEATHER, TIME)]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
T0 = {"temperature": 0}


class Served:
    def __init__(self, factory, name: str, tool_parser: str | None = None) -> None:
        self.runner = EngineRunner(factory, tool_parser=tool_parser)
        self.runner.start()
        self.runner.ready.wait()
        assert self.runner.error is None, self.runner.error
        self.port = free_port()
        app = build_app(self.runner, ServerConfig(name, max_tokens_cap=256))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.runner.stop()
        self.runner.join(timeout=10)


@pytest.fixture(scope="module")
def demo():
    scripts: list[Script] = []

    def load() -> Engine:
        engine = Engine.load(DEMO_MODEL, capacity=8)
        scripts.append(Script(engine))
        return engine

    served = Served(load, "demo")
    served.script = scripts[0]
    yield served
    served.close()


@pytest.fixture
def script(demo):
    yield demo.script
    demo.script.clear()


@pytest.fixture
def oai(demo):
    return openai.OpenAI(base_url=demo.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def claude(demo):
    return anthropic.Anthropic(base_url=demo.url, api_key="unused", max_retries=0)


# ---------------------------------------------------------------- the demo's template


def test_demo_template_renders_plain_chats_as_before_and_tools_hermes_style():
    engine_tokenizer = Engine.load(DEMO_MODEL, capacity=8).tokenizer
    stock = engine_tokenizer._tokenizer  # the Hugging Face tokenizer under mlx-lm's wrapper
    chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": ""}],
             [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
              {"role": "assistant", "content": "A"}, {"role": "user", "content": "B\n<|im_end|>"}]]
    for chat in chats:
        for prompt in (True, False):
            new = engine_tokenizer.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
            old = stock.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False,
                                            chat_template=OLD_DEMO_TEMPLATE)
            assert new == old
    # mlx-lm infers the Hermes JSON parser and its markers from the template (the vocabulary has no such tokens)
    assert engine_tokenizer.has_tool_calling and engine_tokenizer.tool_call_start == "<tool_call>"
    assert tool_format(engine_tokenizer).name == "json_tools"
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = engine_tokenizer.apply_chat_template(history, tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n") and json.dumps(WEATHER) in text
    assert call("get_weather", city="Paris") + "<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in text


def test_splitter_streams_text_holds_calls_and_returns_unreadable_calls_as_text():
    splitter = ToolCallSplitter(load_parser("json_tools"), [WEATHER])
    reply = "Let me look.\n" + call("get_weather", city="Paris") + "\n" + call("get_time", city="Rome")
    parts = [part for i in range(0, len(reply), 3) for part in splitter.feed(reply[i:i + 3])] + splitter.finish()
    text = "".join(p for p in parts if isinstance(p, str))
    calls = [p for p in parts if not isinstance(p, str)]
    assert text == "Let me look."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                      ("get_time", {"city": "Rome"})]
    broken = "Here: <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {oops}\n</tool_call> done"
    splitter = ToolCallSplitter(load_parser("json_tools"), [WEATHER])
    assert "".join(splitter.feed(broken) + splitter.finish()) == broken and splitter.calls == 0
    unfinished = "<tool_call>\n{\"name\": \"get_weather\", \"argu"  # cut by max_tokens
    splitter = ToolCallSplitter(load_parser("json_tools"), [WEATHER])
    assert "".join(splitter.feed(unfinished) + splitter.finish()) == unfinished
    plain = "no calls here <tool_ but a near miss\n\n"
    splitter = ToolCallSplitter(load_parser("json_tools"), [WEATHER])
    assert "".join(splitter.feed(plain) + splitter.finish()) == plain


FORECAST = {"type": "function", "function": {"name": "forecast", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}}}}}


@pytest.mark.parametrize("parser, reply", [
    # Qwen3-Coder's XML calls: the parser types each value from the tool's schema
    ("qwen3_coder", "Sure.\n<tool_call>\n<function=forecast>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"),
    # Mistral's calls have no end marker: they run to the end of the reply
    ("mistral", 'Sure.[TOOL_CALLS]forecast[ARGS]{"city": "Paris", "days": 3}'),
])
def test_other_parsers_named_with_tool_parser(parser, reply):
    splitter = ToolCallSplitter(load_parser(parser), [FORECAST])
    parts = [part for i in range(0, len(reply), 5) for part in splitter.feed(reply[i:i + 5])] + splitter.finish()
    assert parts[0] == "Sure."
    assert [(c.name, c.arguments) for c in parts[1:]] == [("forecast", {"city": "Paris", "days": 3})]


# ---------------------------------------------------------------- OpenAI


def test_openai_call_result_answer(oai, script):
    script.say("I will check.\n" + call("get_weather", city="Paris"))
    first = oai.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], max_tokens=100, **T0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check."
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather" and json.loads(tool_call.function.arguments) == {"city": "Paris"}
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": tool_call.id, "content": "sunny, 21 C"}]
    script.say("It is sunny in Paris.")
    answer = oai.chat.completions.create(model="demo", messages=history, tools=[WEATHER], max_tokens=100, **T0)
    assert answer.choices[0].message.content == "It is sunny in Paris."
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls


def test_openai_parallel_calls_streamed_and_reassembled_by_the_sdk(oai, script):
    script.say(call("get_weather", city="Paris") + "\n" + call("get_time", city="Paris"))
    with oai.chat.completions.stream(model="demo", messages=ASK, tools=[WEATHER, TIME], max_tokens=120,
                                     **T0) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and not message.content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Paris"})]
    assert len({c.id for c in message.tool_calls}) == 2
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.index, e.name) for e in done] == [(0, "get_weather"), (1, "get_time")]
    # the same reply without streaming
    plain = oai.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER, TIME], max_tokens=120, **T0)
    assert [c.function.arguments for c in plain.choices[0].message.tool_calls] == [
        c.function.arguments for c in message.tool_calls]


def test_openai_stream_wire_format(demo, script):
    script.say("Checking." + call("get_weather", city="Paris"))
    body = {"model": "demo", "messages": ASK, "tools": [WEATHER], "max_tokens": 100, "stream": True, **T0}
    with httpx.stream("POST", demo.url + "/v1/chat/completions", json=body, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    text = "".join(d.get("content") or "" for d in deltas)
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert text == "Checking."
    assert calls[0]["index"] == 0 and calls[0]["id"].startswith("call_") and calls[0]["function"] == {
        "name": "get_weather", "arguments": ""}
    assert "id" not in calls[1] and json.loads(calls[1]["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_unreadable_call_comes_back_as_text(oai, script):
    broken = "<tool_call>\n{\"name\": \"get_weather\", arguments: Paris}\n</tool_call>"
    script.say(broken)
    reply = oai.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], max_tokens=100, **T0)
    assert reply.choices[0].message.content == broken and not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "stop"


# What the model is scripted to write after the opening the session forces for each tool_choice: no call by
# itself (no start marker; for a named tool not even the name), so a call in the response shows the opening was
# forced into the reply, ahead of the model's own tokens.
AFTER_REQUIRED = '\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>'
AFTER_NAMED = ' {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_choice_required_and_named_make_the_reply_a_call(oai, script, stream):
    for choice, after in (("required", AFTER_REQUIRED),
                          ({"type": "function", "function": {"name": "get_time"}}, AFTER_NAMED)):
        script.say(after)
        request = dict(model="demo", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=50, **T0)
        if stream:
            with oai.chat.completions.stream(**request) as events:
                reply = events.get_final_completion()
        else:
            reply = oai.chat.completions.create(**request)
        (tool_call,) = reply.choices[0].message.tool_calls
        assert tool_call.function.name == "get_time" and json.loads(tool_call.function.arguments) == {"city": "Paris"}
        assert not reply.choices[0].message.content and reply.choices[0].finish_reason == "tool_calls"


def test_openai_tool_choice_auto_and_none(oai, script):
    # auto: nothing is forced, a reply without a call is an answer
    script.say(AFTER_NAMED)
    reply = oai.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER, TIME], max_tokens=50, **T0)
    assert reply.choices[0].message.content == AFTER_NAMED.strip() and reply.choices[0].finish_reason == "stop"
    # none: the tools are not offered (the prompt is the plain chat's) and calls are not parsed
    script.clear()
    offered = oai.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], max_tokens=1, **T0)
    plain = oai.chat.completions.create(model="demo", messages=ASK, max_tokens=1, **T0)
    hidden = oai.chat.completions.create(model="demo", messages=ASK, tools=[WEATHER], tool_choice="none",
                                         max_tokens=1, **T0)
    assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens < offered.usage.prompt_tokens


@pytest.mark.parametrize("change, needle", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "type must be 'object'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "JSON Schema object"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [WEATHER, WEATHER]}, "defined twice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "unknown tool"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER], "messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
      "function": {"name": "launch", "arguments": "{}"}}]}]}, "unknown tool 'launch'"),
    ({"tools": [WEATHER], "messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
      "function": {"name": "get_weather", "arguments": "{not json"}}]}]}, "not valid JSON"),
    ({"tools": [WEATHER], "messages": [*ASK, {"role": "tool", "tool_call_id": "nope", "content": "x"}]},
     "answers no earlier tool call"),
    ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "description": "<|im_start|>system"}}]},
     "special-token text"),
])
def test_openai_bad_tools_are_400(demo, change, needle):
    body = {"model": "demo", "messages": ASK, "max_tokens": 5, **change}
    response = httpx.post(demo.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


# ---------------------------------------------------------------- Anthropic


def test_anthropic_call_result_answer_streamed(claude, script):
    script.say("Let me check.\n" + call("get_weather", city="Paris") + "\n" + call("get_time", city="Paris"))
    with claude.messages.stream(model="demo", max_tokens=150, messages=ASK, tools=CLAUDE_TOOLS,
                                extra_body=T0) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use", "tool_use"]
    assert first.content[0].text == "Let me check."
    uses = first.content[1:]
    assert [(u.name, u.input) for u in uses] == [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Paris"})]
    assert all(u.id.startswith("toolu_") for u in uses)
    plain = claude.messages.create(model="demo", max_tokens=150, messages=ASK, tools=CLAUDE_TOOLS, extra_body=T0)
    assert [b.model_dump(exclude={"id"}) for b in plain.content] == [
        b.model_dump(exclude={"id"}) for b in first.content]
    assert plain.stop_reason == "tool_use"
    history = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"},
                   {"type": "tool_result", "tool_use_id": uses[1].id, "content": [{"type": "text", "text": "09:00"}]},
                   {"type": "text", "text": "Thanks"}]}]
    script.say("Sunny, and it is nine.")
    with claude.messages.stream(model="demo", max_tokens=150, messages=history, tools=CLAUDE_TOOLS,
                                extra_body=T0) as stream:
        text = "".join(stream.text_stream)
        answer = stream.get_final_message()
    assert text == "Sunny, and it is nine." and answer.stop_reason == "end_turn"
    assert [b.type for b in answer.content] == ["text"]


def test_anthropic_a_call_without_text(claude, script):
    script.say(call("get_weather", city="Oslo"))
    msg = claude.messages.create(model="demo", max_tokens=100, messages=ASK, tools=CLAUDE_TOOLS, extra_body=T0)
    assert [b.type for b in msg.content] == ["tool_use"] and msg.stop_reason == "tool_use"
    assert msg.content[0].input == {"city": "Oslo"}


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_choice_any_and_tool_make_the_reply_a_call(claude, script, stream):
    for choice, after in (({"type": "any"}, AFTER_REQUIRED), ({"type": "tool", "name": "get_time"}, AFTER_NAMED)):
        script.say(after)
        request = dict(model="demo", max_tokens=100, messages=ASK, tools=CLAUDE_TOOLS, tool_choice=choice,
                       extra_body=T0)
        if stream:
            with claude.messages.stream(**request) as events:
                msg = events.get_final_message()
        else:
            msg = claude.messages.create(**request)
        assert [(b.type, b.name, b.input) for b in msg.content] == [("tool_use", "get_time", {"city": "Paris"})]
        assert msg.stop_reason == "tool_use"


# After each format's forced opening for the tool "forecast": the rest of a call as that format writes it.
CALL_ENDINGS = {
    "json_tools": ' {"city": "Paris"}}\n</tool_call>',
    "qwen3_coder": "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
    "glm47": "<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
    "laguna": "<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
    "longcat": "<longcat_arg_key>city</longcat_arg_key><longcat_arg_value>Paris</longcat_arg_value>"
               "</longcat_tool_call>",
    "kimi_k2": '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>',
    "minimax_m2": '<parameter name="city">Paris</parameter>\n</invoke>\n</minimax:tool_call>',
    "mistral": '{"city": "Paris"}',
    "pythonic": 'city="Paris")]<|tool_call_end|>',
    "function_gemma": "city:<escape>Paris<escape>}<end_function_call>",
    "gemma4": 'city:<|"|>Paris<|"|>}<tool_call|>',
    "minicpm5": '<param name="city">Paris</param></function>',
}


def test_each_named_opening_is_read_by_its_parser_as_a_call_of_that_tool():
    assert set(CALL_ENDINGS) == set(NAMED_OPENINGS)
    for parser, ending in CALL_ENDINGS.items():
        fmt = load_parser(parser)
        opening = forced_opening(fmt, "named", "forecast")
        assert opening.startswith(fmt.start) and "forecast" in opening
        splitter = ToolCallSplitter(fmt, [FORECAST])
        parts = splitter.feed(opening) + splitter.feed(ending) + splitter.finish()
        assert [(c.name, c.arguments) for c in parts] == [("forecast", {"city": "Paris"})], parser
    fmt = load_parser("json_tools")
    assert forced_opening(fmt, "required") == "<tool_call>"
    assert forced_opening(fmt, "auto") == forced_opening(fmt, "none") == ""
    assert forced_opening(load_parser("muse_spark"), "named", "forecast") == "<atem:function_calls>"


@pytest.mark.parametrize("change, needle", [
    ({"tools": [{"name": "f"}]}, "input_schema"),
    ({"tools": [{"name": "f", "input_schema": {"type": "array"}}]}, "type must be 'object'"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "only custom tools"),
    ({"tools": CLAUDE_TOOLS, "tool_choice": {"type": "tool", "name": "launch"}}, "unknown tool"),
    ({"tools": CLAUDE_TOOLS, "messages": [*ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "launch", "input": {}}]}]}, "unknown tool 'launch'"),
    ({"tools": CLAUDE_TOOLS, "messages": [*ASK, {"role": "assistant", "content": "ok"}, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t9", "content": "x"}]}]}, "answers no earlier tool_use"),
])
def test_anthropic_bad_tools_are_400(demo, change, needle):
    body = {"model": "demo", "messages": ASK, "max_tokens": 5, **change}
    response = httpx.post(demo.url + "/v1/messages", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert needle in response.json()["error"]["message"]


# ---------------------------------------------------------------- models without tool support


def test_a_model_without_tool_support_says_so(tmp_path):
    from moe_tui.inference.synthetic import make_checkpoint

    model = make_checkpoint(tmp_path / "m", "qwen3_moe", max_position_embeddings=512)
    served = Served(lambda: Engine.load(model, capacity=4), "tiny", tool_parser="json_tools")
    try:
        body = {"model": "tiny", "messages": ASK, "max_tokens": 5, "tools": [WEATHER]}
        response = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400
        assert response.json()["error"]["message"] == ("model 'tiny' does not support tool calling: its chat "
                                                      "template does not render tools")
        response = httpx.post(served.url + "/v1/messages", json={**body, "tools": CLAUDE_TOOLS}, timeout=30)
        assert response.status_code == 400 and "model 'tiny' does not support" in response.json()["error"]["message"]
        plain = httpx.post(served.url + "/v1/chat/completions", json={**body, "tools": []}, timeout=60)
        assert plain.status_code == 200  # no tools: served as before
    finally:
        served.close()


def test_unknown_tool_parser_is_refused_before_loading():
    with pytest.raises(ValueError, match="unknown tool parser 'hermes2'.*json_tools"):
        serve("no-such-model", port=free_port(), tool_parser="hermes2")
