"""`moe serve` against the real openai and anthropic SDKs, on 127.0.0.1 only, with a tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import uvicorn
from moe_tui.inference import Engine
from moe_tui.inference.server import serve
from moe_tui.inference.server.app import ServerConfig, build_app
from moe_tui.inference.server.runner import EngineRunner

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, model: Path, host: str = "127.0.0.1", api_key: str | None = None, max_queue: int = 16,
                 max_body_bytes: int = 1 << 20, capacity: int | float = 4, max_tokens_cap: int = 256,
                 port: int | None = None) -> None:
        self.runner = EngineRunner(lambda: Engine.load(model, capacity=capacity), max_queue=max_queue)
        self.runner.start()
        self.runner.ready.wait()
        self.port = port or free_port()
        app = build_app(self.runner, ServerConfig("tiny", api_key=api_key, max_tokens_cap=max_tokens_cap,
                                                  max_body_bytes=max_body_bytes))
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://{host}:{self.port}"
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
def server(tmp_path_factory):
    from moe_tui.inference.synthetic import make_checkpoint

    model = make_checkpoint(tmp_path_factory.mktemp("srv") / "m", "qwen3_moe", router_scale=4.0,
                            max_position_embeddings=512)
    live = LiveServer(model)
    yield live
    live.close()


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


MSG = [{"role": "user", "content": "def add(a, b):"}]
T0 = {"temperature": 0}  # the anthropic SDK 2.x has no temperature argument; the API field still works


def test_openai_non_stream_and_stream_agree(oai):
    full = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    again = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == full.choices[0].message.content  # temperature 0 repeats
    chunks = list(oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_openai_max_tokens_and_stop(oai):
    one = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
    long = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=30, temperature=0).choices[0]
    text = long.message.content
    stop = text[3:5]
    assert len(stop) == 2
    cut = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)]
    seeded = [oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=10, temperature=1.0, seed=5)
              .choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_top_k_is_honoured_by_both_apis(server, oai, claude):
    """Anthropic's top_k (and the OpenAI extension vLLM takes) was accepted and ignored: top_k 1 sampled at
    temperature 1 anyway."""
    greedy = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, temperature=0)
    text = greedy.choices[0].message.content
    for seed in (1, 2, 3):
        one = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, temperature=1.0, seed=seed,
                                          extra_body={"top_k": 1})
        assert one.choices[0].message.content == text
    sampled = {oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, temperature=1.0, seed=seed)
               .choices[0].message.content for seed in (1, 2, 3)}
    assert sampled != {text}  # the model is random enough that sampling without top_k differs
    claude_one = claude.messages.create(model="tiny", max_tokens=16, messages=MSG,
                                        extra_body={"temperature": 1.0, "top_k": 1})  # SDK 2.x: no argument
    claude_greedy = claude.messages.create(model="tiny", max_tokens=16, messages=MSG, extra_body=T0)
    assert claude_one.content[0].text == claude_greedy.content[0].text
    bad = httpx.post(server.url + "/v1/messages", json={"model": "x", "messages": MSG, "max_tokens": 4, "top_k": -2})
    assert bad.status_code == 400
    # At or above the vocabulary (512 here) top_k leaves every token, as "no limit" (mlx-lm raised: a 500).
    wide = [oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=1.0, seed=4,
                                        extra_body=extra).choices[0].message.content
            for extra in ({"top_k": 512}, {"top_k": 100000}, {})]
    assert wide[0] == wide[1] == wide[2]


def test_logit_bias_and_penalties_are_honoured(server, oai):
    """They were accepted and ignored."""
    tokenizer = server.runner.engine.tokenizer

    def reply(**extra) -> str:
        return oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0,
                                           extra_body=extra).choices[0].message.content

    token = 300
    assert reply(logit_bias={str(token): 100}) == tokenizer.decode([token] * 8)
    # Each penalty counts the tokens generated so far: a token pushed up by 3 comes once, then the others do.
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        text = reply(logit_bias={str(token): 3}, **penalty)
        assert text.startswith(tokenizer.decode([token])) and text != tokenizer.decode([token] * 8), penalty
    for bad in ({"logit_bias": {"x": 1}}, {"logit_bias": {"5": 101}}, {"logit_bias": {"100000": 1}},
                {"logit_bias": {"9" * 30: 1}}, {"presence_penalty": 3}, {"frequency_penalty": "a"}):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] in bad, bad


def test_anthropic_non_stream_and_stream(claude):
    msg = claude.messages.create(model="tiny", max_tokens=12, messages=MSG, system="You write Python.",
                                 extra_body=T0)
    assert msg.role == "assistant" and msg.content[0].type == "text"
    assert msg.stop_reason in ("max_tokens", "end_turn") and msg.usage.output_tokens <= 12
    again = claude.messages.create(model="tiny", max_tokens=12, messages=MSG, system="You write Python.",
                                   extra_body=T0)
    assert again.content[0].text == msg.content[0].text
    with claude.messages.stream(model="tiny", max_tokens=12, messages=MSG, system="You write Python.",
                                extra_body=T0) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == msg.content[0].text and final.stop_reason == msg.stop_reason
    text = claude.messages.create(model="tiny", max_tokens=30, messages=MSG, extra_body=T0).content[0].text
    stop = text[3:5]
    cut = claude.messages.create(model="tiny", max_tokens=30, messages=MSG, extra_body=T0, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.find(stop)]


def test_models_health_openapi(server, oai):
    assert [m.id for m in oai.models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["queued"] == 0
    doc = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/messages", "/v1/stats", "/metrics"} <= set(doc["paths"])


def test_stats_json_sse_and_prometheus_change_with_generation(server, oai):
    before = httpx.get(server.url + "/v1/stats").json()
    metrics_before = httpx.get(server.url + "/metrics").text
    oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0)
    time.sleep(1.2)
    after = httpx.get(server.url + "/v1/stats").json()
    assert sum(map(sum, after["requests"])) > sum(map(sum, before["requests"]))
    assert after["tokens_generated"] > before["tokens_generated"] and 0 <= after["hit_rate"] <= 1
    assert after["model"] == "tiny"  # the served name, not the model's path on this machine

    def total(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    metrics_after = httpx.get(server.url + "/metrics").text
    assert "# TYPE moe_expert_hits_total counter" in metrics_after
    assert total(metrics_after, "moe_tokens_generated_total") > total(metrics_before, "moe_tokens_generated_total")
    events = []
    with httpx.stream("GET", server.url + "/v1/stats/stream", params={"hz": 10, "limit": 3}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert len(events) == 3 and all("resident" in e for e in events)
    assert httpx.get(server.url + "/v1/stats/stream", params={"hz": "fast"}).status_code == 400


def test_eight_concurrent_clients_get_complete_unmixed_answers(server, oai):
    prompts = [[{"role": "user", "content": f"print({i} * {i})"}] for i in range(8)]
    alone = [oai.chat.completions.create(model="tiny", messages=p, max_tokens=16, temperature=0)
             .choices[0].message.content for p in prompts]

    def ask(p):
        chunks = oai.chat.completions.create(model="tiny", messages=p, max_tokens=16, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_full_queue_answers_429_with_retry_after(tmp_path):
    from moe_tui.inference.synthetic import make_checkpoint

    live = LiveServer(make_checkpoint(tmp_path / "m", "olmoe", max_position_embeddings=4096), max_queue=1)
    try:
        body = {"messages": MSG, "max_tokens": 200, "temperature": 0}

        def post(_):
            return httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 1 and 429 in codes
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.headers["retry-after"] and busy.json()["error"]["type"] == "rate_limit_error"
    finally:
        live.close()


def test_disconnect_mid_stream_cancels_and_server_keeps_serving(server, oai):
    health_before = httpx.get(server.url + "/health").json()
    done_before = server.runner.finished
    body = {"messages": MSG, "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break
    deadline = time.monotonic() + 20
    while server.runner.finished == done_before:
        assert time.monotonic() < deadline, "generation was not cancelled"
        time.sleep(0.05)
    assert server.runner.snapshot.tokens_generated >= 0
    # The cancelled generation is counted as cancelled, not as completed.
    health = httpx.get(server.url + "/health").json()
    assert health["cancelled"] == health_before["cancelled"] + 1
    assert health["completed"] == health_before["completed"]
    reply = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4
    health = httpx.get(server.url + "/health").json()
    assert health["completed"] == health_before["completed"] + 1
    metrics = httpx.get(server.url + "/metrics").text
    assert f'moe_requests_total{{outcome="cancelled"}} {health["cancelled"]}' in metrics
    assert f'moe_requests_total{{outcome="completed"}} {health["completed"]}' in metrics


@pytest.mark.parametrize("path,body,status,field", [
    ("/v1/chat/completions", b"{not json", 400, "error"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "error"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": "ten"}, 400, "error"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 100000}, 400, "error"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": 3}, 400, "error"),
    ("/v1/chat/completions", {"messages": MSG, "n": 2}, 400, "error"),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True}, 400, "error"),
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 3}, 400, "error"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "error"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": "json"}, 400, "error"),
    ("/v1/messages", b"[1, 2", 400, "type"),
    ("/v1/messages", {"model": "x", "messages": MSG}, 400, "type"),
    ("/v1/messages", {"model": "x", "messages": MSG, "max_tokens": 5, "bogus": 1}, 400, "type"),
    ("/v1/messages", {"model": "x", "messages": [{"role": "system", "content": "x"}], "max_tokens": 5}, 400, "type"),
    # Structured output was answered with plain text, as if asked for nothing.
    ("/v1/messages", {"model": "x", "messages": MSG, "max_tokens": 5,
                      "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, 400, "type"),
    ("/v1/messages/count_tokens", {"model": "x", "messages": "hi"}, 400, "type"),
    ("/tokenize", {"model": "x"}, 400, "error"),
])
def test_bad_input_gets_each_apis_error_format(server, path, body, status, field):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status
    data = r.json()
    if field == "error":
        assert data["error"]["type"] == "invalid_request_error" and data["error"]["message"]
    else:
        assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"


def test_the_model_list_says_the_context_window_and_a_model_can_be_retrieved(server, oai):
    """`moe attach` could not learn the context window (so it never dropped old turns, and one long message broke
    the chat for good), and the SDKs' models.retrieve got a 404."""
    (entry,) = oai.models.list().data
    assert entry.id == "tiny" and entry.model_extra["max_model_len"] == 512  # vLLM's field
    assert oai.models.retrieve("tiny").model_extra["max_model_len"] == 512
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        oai.models.retrieve("other")


def test_token_counts_are_the_prompts_a_reply_sees(server, oai, claude):
    """vLLM's POST /tokenize and Anthropic's POST /v1/messages/count_tokens (404 before): the counts a reply's
    usage reports for the same messages."""
    chat = [{"role": "system", "content": "Be brief."}, *MSG]
    counted = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": chat,
                                                          "add_generation_prompt": True}).json()
    reply = oai.chat.completions.create(model="tiny", messages=chat, max_tokens=1)
    assert counted["count"] == len(counted["tokens"]) == reply.usage.prompt_tokens
    assert counted["max_model_len"] == 512
    text = httpx.post(server.url + "/tokenize", json={"prompt": "def add(a, b):"}).json()  # a text as it is
    assert 0 < text["count"] == len(text["tokens"]) < counted["count"]
    counted = claude.messages.count_tokens(model="tiny", system="Be brief.", messages=MSG)
    reply = claude.messages.create(model="tiny", system="Be brief.", messages=MSG, max_tokens=1)
    assert counted.input_tokens == reply.usage.input_tokens


def test_token_counts_run_beside_the_inference_thread_and_are_bounded(server, monkeypatch):
    """Counts were tokenized on the inference thread between two tokens of a reply, without limit: one client
    looping over 1 MiB counts stalled every reply (a 40-token stream went from 0.22 s to 4.6 s)."""
    from moe_tui.inference.server import runner as runner_module

    started, release = threading.Event(), threading.Event()
    real = server.runner._count_now

    def slow(request):
        started.set()
        release.wait(30)
        return real(request)

    monkeypatch.setattr(server.runner, "_count_now", slow)
    counting = threading.Thread(target=httpx.post, args=(server.url + "/tokenize",),
                                kwargs={"json": {"messages": MSG}, "timeout": 60})
    counting.start()
    try:
        assert started.wait(10)
        # The count holds its own thread, not the inference thread: a reply is made meanwhile.
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        monkeypatch.setattr(runner_module, "MAX_COUNTS", 1)  # the one under way is all there may be
        r = httpx.post(server.url + "/v1/messages/count_tokens", json={"model": "x", "messages": MSG})
        assert r.status_code == 429 and r.json()["type"] == "error" and r.headers["retry-after"]
    finally:
        release.set()
        counting.join(30)
    for body in ({"model": "x", "max_tokens": 4, "messages": [{"role": "assistant", "content": ""}]},):
        r = httpx.post(server.url + "/v1/messages", json=body)  # nothing left to reply to: 400, not a 500
        assert r.status_code == 400 and "nothing to reply to" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 3,
                                                               "max_completion_tokens": None})
    assert r.json()["usage"]["completion_tokens"] <= 3  # a null max_completion_tokens leaves max_tokens


def test_max_tokens_left_out_lets_the_reply_take_the_rest_of_the_context(server):
    """Left out, max_tokens was 512 (at most the cap): a long prompt got a 400 naming a max_tokens the client
    never sent. Now the reply may take what the prompt leaves (OpenAI's and vLLM's default), up to the cap."""
    words = 40
    while True:  # a prompt longer than the context minus the cap (512 - 256), with room for a reply
        messages = [{"role": "user", "content": "word " * words}]
        count = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["count"]
        if count > 300:
            break
        words += 40
    assert count < 500
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == count and usage["total_tokens"] <= 512
    messages = [{"role": "user", "content": "word " * (words * 3)}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400 and "no room for a reply" in r.json()["error"]["message"]
    assert "max_tokens" not in r.json()["error"]["message"]


def test_an_anthropic_assistant_prefill_is_continued(server, claude):
    """A final assistant message is where the reply goes on (Anthropic's prefill): the server closed it as a
    finished turn and opened a new one, so the model started over."""
    from moe_tui.inference.prompts import encode_messages

    tokenizer = server.runner.session.engine.tokenizer
    messages = [*MSG, {"role": "assistant", "content": "    return a"}]
    expected = encode_messages(tokenizer, messages, continue_final=True)
    assert tokenizer.decode(expected).endswith("    return a")  # the prompt ends with the prefill's own text
    reply = claude.messages.create(model="tiny", messages=messages, max_tokens=2)
    assert reply.usage.input_tokens == len(expected)
    assert claude.messages.count_tokens(model="tiny", messages=messages).input_tokens == len(expected)
    r = httpx.post(server.url + "/v1/messages", json={"model": "x", "max_tokens": 2, "messages": [
        *MSG, {"role": "assistant", "content": "    return a "}]})
    assert r.status_code == 400 and "trailing whitespace" in r.json()["error"]["message"]


def test_one_choice_and_no_logprobs_are_refused_only_when_asked_otherwise(server):
    ok = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": MSG, "max_tokens": 2, "n": 1, "logprobs": False, "top_logprobs": None,
        "response_format": {"type": "text"}})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1
    two = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, "n": 2})
    assert two.json()["error"]["param"] == "n" and "one choice" in two.json()["error"]["message"]
    logprobs = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG, "logprobs": True})
    assert logprobs.json()["error"]["param"] == "logprobs" and "not supported" in logprobs.json()["error"]["message"]


def test_unknown_paths_and_methods_get_json_errors(server):
    """Starlette answered them in plain text ('Not Found'), which SDKs cannot read."""
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, server.url + path)
        assert r.status_code == status and r.json()["error"]["message"], (method, path)
    r = httpx.get(server.url + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error" and "POST" in r.headers["allow"]


def test_prompt_longer_than_context_and_oversized_body(server):
    long = [{"role": "user", "content": "word " * 2000}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": long, "max_tokens": 10})
    assert r.status_code == 400 and "context window of 512 tokens" in r.json()["error"]["message"]
    assert "tokens" in r.json()["error"]["message"].split("and")[0]
    r = httpx.post(server.url + "/v1/messages", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_max_tokens_over_the_context_names_the_context(tmp_path):
    from moe_tui.inference.synthetic import make_checkpoint

    live = LiveServer(make_checkpoint(tmp_path / "m", "qwen3_moe", max_position_embeddings=512), max_tokens_cap=4000)
    try:
        for path, extra in (("/v1/chat/completions", {}), ("/v1/messages", {"model": "x"})):
            r = httpx.post(live.url + path, json={"messages": MSG, "max_tokens": 4000, **extra})
            assert r.status_code == 400
            # The bound is the context (512 tokens, one left for the prompt), not only --max-tokens-cap.
            assert "between 1 and 511" in r.json()["error"]["message"]
    finally:
        live.close()


def test_api_key_required_off_loopback_and_enforced(tmp_path):
    from moe_tui.inference.synthetic import make_checkpoint

    model = make_checkpoint(tmp_path / "m", "mixtral")
    with pytest.raises(ValueError, match="API key"):
        serve(str(model), host="0.0.0.0", port=free_port())
    live = LiveServer(model, host="127.0.0.2", api_key="s3cret")
    try:
        body = {"messages": MSG, "max_tokens": 2}
        assert httpx.post(live.url + "/v1/chat/completions", json=body).status_code == 401
        wrong = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        ok = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        r = httpx.post(live.url + "/v1/messages", json={"model": "m", "max_tokens": 2, "messages": MSG},
                       headers={"x-api-key": "s3cret"})
        assert r.status_code == 200
        assert httpx.get(live.url + "/v1/stats").status_code == 401
        client = anthropic.Anthropic(base_url=live.url, api_key="s3cret", max_retries=0)
        assert client.messages.create(model="m", max_tokens=2, messages=MSG).usage.output_tokens == 2
    finally:
        live.close()


def serve_process(model: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """`moe serve MODEL` in its own process (signals reach it as a user's would), once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moe_tui.app.cli", "serve", str(model), "--port", str(port),
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError("server did not start")
        time.sleep(0.2)


def test_sigterm_ends_streams_with_a_final_event(tmp_path):
    from moe_tui.inference.synthetic import make_checkpoint

    model = make_checkpoint(tmp_path / "m", "olmoe", max_position_embeddings=4096)
    proc, port = serve_process(model, "--capacity", "1.0")
    try:
        lines = []
        body = {"model": "m", "max_tokens": 3000, "messages": MSG, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/messages", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 8:
                    proc.send_signal(signal.SIGTERM)
        # The reply was cut by the server: an error event says so, and no stop_reason claims a clean end.
        assert "event: error" in lines and any("shutting down" in line for line in lines)
        assert not any("end_turn" in line for line in lines)
        # uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Finished server process" in proc.stdout.read().decode()
    finally:
        proc.kill()


def test_ctrl_c_with_a_stats_stream_open_exits_at_once_without_a_traceback(tmp_path):
    """`moe attach` keeps /v1/stats/stream open: Ctrl+C waited 10 s for it (uvicorn's graceful timeout), then
    printed tracebacks, and even without clients uvicorn's re-raised SIGINT ended in a KeyboardInterrupt one."""
    from moe_tui.inference.synthetic import make_checkpoint

    model = make_checkpoint(tmp_path / "m", "olmoe")
    proc, port = serve_process(model)
    try:
        events = 0
        with httpx.stream("GET", f"http://127.0.0.1:{port}/v1/stats/stream", params={"hz": 5}, timeout=30) as r:
            for line in r.iter_lines():  # ends cleanly when the server closes it
                if line.startswith("data: "):
                    events += 1
                    if events == 2:  # once: a second Ctrl+C is uvicorn's force quit
                        started = time.monotonic()
                        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130  # not killed by the SIGINT uvicorn raises again
        assert time.monotonic() - started < 5  # not uvicorn's 10 s graceful timeout
        output = proc.stdout.read().decode()
        assert "Finished server process" in output and "Traceback" not in output, output[-2000:]
    finally:
        proc.kill()


def test_a_second_ctrl_c_quits_at_once_without_tracebacks(tmp_path):
    """Ctrl+C twice (uvicorn's force quit) printed a traceback for each open request and one for the lifespan."""
    from moe_tui.inference.synthetic import make_checkpoint

    model = make_checkpoint(tmp_path / "m", "olmoe", max_position_embeddings=4096)
    proc, port = serve_process(model, "--capacity", "1.0")
    try:
        body = {"model": "m", "max_tokens": 3000, "messages": MSG, "stream": True}
        with contextlib.suppress(httpx.TransportError), httpx.stream(
                "POST", f"http://127.0.0.1:{port}/v1/messages", json=body, timeout=30) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n == 8:
                    proc.send_signal(signal.SIGINT)
                    time.sleep(0.05)  # the first one handled: the server is shutting down
                    proc.send_signal(signal.SIGINT)
                    break
        assert proc.wait(timeout=30) == 130
        output = proc.stdout.read().decode()
        assert "Forced quit" in output and "Traceback" not in output, output[-3000:]
    finally:
        proc.kill()


def slow_replays(engine, seconds: float) -> threading.Event:
    """Make each capacity's miss-curve replay take `seconds` longer; the event is set when one starts."""
    real, replaying = engine.hit_rates_vs_optimum, threading.Event()

    def slow(*args, **kwargs):
        replaying.set()
        time.sleep(seconds)
        return real(*args, **kwargs)

    engine.hit_rates_vs_optimum = slow
    return replaying


def test_a_miss_curve_waiting_when_the_server_stops_is_answered_at_once(tmp_path):
    from moe_tui.inference.synthetic import make_checkpoint

    live = LiveServer(make_checkpoint(tmp_path / "m", "qwen3_moe", router_scale=4.0, max_position_embeddings=512))
    try:
        reply = {"messages": MSG, "max_tokens": 8, "temperature": 0}
        assert httpx.post(live.url + "/v1/chat/completions", json=reply, timeout=60).status_code == 200
        replaying = slow_replays(live.runner.engine, 1.0)
        with ThreadPoolExecutor(1) as pool:
            curve = pool.submit(httpx.get, live.url + "/v1/stats/miss-curve", params={"capacities": "1,2,3,4,5"},
                                timeout=60)
            assert replaying.wait(30)
            started = time.monotonic()
            live.runner.stop()  # as on SIGINT: the session stops after the replay under way
            answer = curve.result()
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
        assert time.monotonic() - started < 5
    finally:
        live.close()


def stop_strings(text: str) -> list[str]:
    return sorted({text[i : i + n] for n in (1, 2, 4) for i in range(0, len(text) - n, 5)})


def test_stop_strings_stream_exactly_the_non_streamed_text(server, oai, claude):
    full = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=40, temperature=0)
    reference = full.choices[0].message.content
    for stop in stop_strings(reference)[:12]:
        plain = oai.chat.completions.create(model="tiny", messages=MSG, max_tokens=40, temperature=0, stop=[stop])
        streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=40, temperature=0, stop=[stop], stream=True) if c.choices)
        assert plain.choices[0].message.content == streamed == reference[: reference.find(stop)], stop
        with claude.messages.stream(model="tiny", messages=MSG, max_tokens=40, extra_body=T0,
                                    stop_sequences=[stop]) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        assert text == final.content[0].text == streamed and final.stop_sequence == stop, stop


def test_a_non_streaming_client_that_leaves_stops_its_generation(tmp_path):
    from moe_tui.inference.synthetic import make_checkpoint

    model = make_checkpoint(tmp_path / "m", "olmoe", max_position_embeddings=8192)
    live = LiveServer(model, max_tokens_cap=4000)
    try:
        before = live.runner.snapshot.tokens_generated
        body = {"messages": MSG, "max_tokens": 4000, "temperature": 0, "stop": ["\u2603"]}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(live.url + "/v1/chat/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 60
        while live.runner.busy or live.runner.finished == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert live.runner.outcomes == {"completed": 0, "cancelled": 1, "failed": 0}
        generated = live.runner.snapshot.tokens_generated - before
        assert 0 < generated < 2000, generated
    finally:
        live.close()


def test_health_says_when_the_inference_thread_is_gone(tmp_path):
    from moe_tui.inference.synthetic import make_checkpoint

    live = LiveServer(make_checkpoint(tmp_path / "m", "olmoe"))
    try:
        assert httpx.get(live.url + "/health").status_code == 200
        live.runner.stop()
        live.runner.join(10)
        r = httpx.get(live.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "stopped"
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4})
        assert r.status_code == 503
    finally:
        live.close()


def test_a_prompt_far_over_the_context_is_refused_without_tokenizing(server, monkeypatch):
    tokenized = []
    real = server.runner.tokenize

    async def counting(prompt, *args):
        tokenized.append(1)
        return await real(prompt, *args)

    monkeypatch.setattr(server.runner, "tokenize", counting)
    huge = [{"role": "user", "content": "x" * 800_000}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": huge, "max_tokens": 10})
    assert r.status_code == 400 and "context window of 512" in r.json()["error"]["message"]
    assert tokenized == []
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
    assert r.status_code == 200 and tokenized == [1]


def test_a_reply_cut_by_shutdown_is_not_reported_as_finished(tmp_path):
    from moe_tui.inference.synthetic import make_checkpoint

    live = LiveServer(make_checkpoint(tmp_path / "m", "olmoe", max_position_embeddings=8192), max_tokens_cap=4000)
    try:
        body = {"messages": MSG, "max_tokens": 4000, "temperature": 0, "stop": ["\u2603"]}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, live.url + "/v1/chat/completions", json=body, timeout=60)
            deadline = time.monotonic() + 30
            while not live.runner.busy:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            live.runner.stop()
            r = pending.result()
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    finally:
        live.close()


def test_the_miss_curve_is_the_engines_replay_and_a_reply_goes_first(tmp_path):
    from moe_tui.inference.oracle import curve_capacities
    from moe_tui.inference.session import OPTIMUM_WINDOW
    from moe_tui.inference.synthetic import make_checkpoint

    live = LiveServer(make_checkpoint(tmp_path / "m", "qwen3_moe", router_scale=4.0, max_position_embeddings=512))
    url = live.url + "/v1/stats/miss-curve"
    reply = {"messages": MSG, "max_tokens": 8, "temperature": 0}
    try:
        assert httpx.get(url).status_code == 409  # nothing routed yet
        assert "/v1/stats/miss-curve" in httpx.get(live.url + "/openapi.json").json()["paths"]
        assert httpx.post(live.url + "/v1/chat/completions", json=reply, timeout=60).status_code == 200
        data = httpx.get(url, params={"capacities": "1,2,4,8"}, timeout=60).json()
        assert data["capacities"] == [1, 2, 4, 8] and data["last_steps"] == OPTIMUM_WINDOW
        assert data["layers"] is None  # all of this model's 2 layers were replayed, not "8"
        assert httpx.get(url, params={"layers": "1"}, timeout=60).json()["layers"] == 1
        engine = live.runner.engine  # idle: its trace stands still while this thread replays it
        for i, capacity in enumerate(data["capacities"]):
            expected = engine.hit_rates_vs_optimum(capacity, OPTIMUM_WINDOW)
            assert {name: rates[i] for name, rates in data["rates"].items()} == {
                name: r["hit_rate"] for name, r in expected.items()}, capacity
        assert httpx.get(url, timeout=60).json()["capacities"] == list(curve_capacities(8, 4))  # the panel's
        assert httpx.get(url, params={"last_steps": "all"}, timeout=60).json()["last_steps"] is None
        for bad in ({"capacities": "0,2"}, {"capacities": "9"}, {"capacities": "two"}, {"last_steps": "0"}):
            r = httpx.get(url, params=bad)
            assert r.status_code == 400 and r.json()["error"]["message"], bad

        # A slow replay (made slow here) holds neither the event loop nor a reply that comes meanwhile.
        replaying = slow_replays(engine, 0.5)
        with ThreadPoolExecutor(1) as pool:
            curve = pool.submit(httpx.get, url, params={"capacities": "1,2,3,4,5,6,7,8"}, timeout=60)
            assert replaying.wait(30)
            started = time.monotonic()
            assert httpx.get(live.url + "/health").status_code == 200
            assert time.monotonic() - started < 0.3  # the event loop is free
            assert httpx.post(live.url + "/v1/chat/completions", json=reply, timeout=60).status_code == 200
            assert time.monotonic() - started < 3.0  # it went before the 8 x 0.5 s replay would have ended
            busy = curve.result()
        assert busy.status_code == 503 and busy.headers["Retry-After"] and "idle" in busy.json()["error"]["message"]
        assert httpx.get(url, params={"capacities": "3"}, timeout=60).status_code == 200  # asked again when idle
    finally:
        live.close()
