"""Agent mode, on both backends: a scripted OpenAI-compatible server on loopback answering in the real tool-call
wire format, and the local session on the demo model with its continuation forced (tests/forcing.py), its calls
read by the session with the demo template's own parser. Read a file, propose an edit, apply it after a yes, run
a command, answer; /undo restores the file."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from moe_tui.app.main import MoeApp
from moe_tui.app.remote import RemoteWorker
from moe_tui.app.settings import Settings
from moe_tui.app.worker import EngineSpec
from moe_tui.inference.demo_paths import DEMO_MODEL
from moe_tui.inference.events import JobDone

from tests.forcing import Script
from tests.forcing import call as written_call
from tests.helpers import dialog_open, notified, replies, send, wait_until, watched


def call(call_id: str, name: str, arguments: dict) -> dict:
    """An assistant turn holding one tool call, as OpenAI's chat completions API sends it."""
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


class ScriptedServer:
    """/v1/models and /v1/chat/completions (non-streaming) answering with `script`, one turn per request."""

    def __init__(self, script: list[dict]) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def stream(self, text: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for delta, finish in (({"role": "assistant", "content": text}, None), ({}, "stop")):
                    chunk = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 0, "model": "scripted",
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self.answer(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
                else:
                    self.answer(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                message = owner.script.pop(0)
                finish = "tool_calls" if message.get("tool_calls") else "stop"
                if body.get("stream"):  # a plain reply (agent mode off): its text as server-sent events
                    self.stream(message["content"])
                    return
                self.answer(200, {"id": f"chatcmpl-{len(owner.requests)}", "object": "chat.completion",
                                  "created": 0, "model": "scripted",
                                  "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                                  "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def agent_app(tmp_path, url: str) -> MoeApp:
    settings = Settings(data_dir=str(tmp_path / "data"), glyphs="unicode")
    return watched(MoeApp(EngineSpec(model=url), settings,
                          worker_factory=lambda app: RemoteWorker(app, url, telemetry=False)))


async def yes(pilot, app, expect: str) -> str:
    """Wait for the question that contains `expect`, answer yes; its diff."""
    await wait_until(pilot, lambda: dialog_open(app) and expect in app.screen.question)
    diff = app.screen.diff
    await pilot.press("y")
    await wait_until(pilot, lambda: not dialog_open(app) or expect not in app.screen.question)
    return diff


async def agree_to_read_edit_and_run(pilot, app) -> None:
    """Agent mode on, the request sent, and a yes to each of the model's three steps (the edit's diff checked)."""
    app.run_command("/agent on")
    await wait_until(pilot, lambda: notified(app, "agent mode on"))
    await send(pilot, app, "make twice use addition")
    await yes(pilot, app, "The model wants to read file")
    diff = await yes(pilot, app, "The model wants to edit util.py")
    assert "-    return 2 * x" in diff and "+    return x + x" in diff
    await yes(pilot, app, "The model wants to run")


def twice_project(tmp_path, monkeypatch) -> tuple[Path, str]:
    """A project folder (made the working directory) with util.py's twice(x) = 2 * x, and a command checking it."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "util.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    return project, f"{sys.executable} -c 'import util; print(util.twice(21))'"


async def test_an_agent_reads_edits_after_a_yes_runs_a_command_and_answers(tmp_path, monkeypatch):
    project, check = twice_project(tmp_path, monkeypatch)
    server = ScriptedServer([
        call("call_1", "read_file", {"path": "util.py"}),
        call("call_2", "apply_edit", {"path": "util.py", "search": "    return 2 * x", "replace": "    return x + x"}),
        call("call_3", "run_command", {"command": check}),
        {"role": "assistant", "content": "twice now adds; it returns 42 for 21."},
    ])
    app = agent_app(tmp_path, server.url)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.context_length == 0 and app.sub_title == "remote server")
            await agree_to_read_edit_and_run(pilot, app)
            await wait_until(pilot, lambda: replies(app) and "returns 42" in replies(app)[-1].content)
            assert (project / "util.py").read_text() == "def twice(x):\n    return x + x\n"

            first, second, third, last = server.requests
            assert {t["function"]["name"] for t in first["tools"]} == {
                "read_file", "list_files", "search_files", "apply_edit", "run_command"}
            assert first["messages"][-1] == {"role": "user", "content": "make twice use addition"}
            assert second["messages"][-2]["tool_calls"][0]["id"] == "call_1"
            assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1",
                                              "content": "def twice(x):\n    return 2 * x\n"}
            assert third["messages"][-1]["content"] == "applied to util.py"
            assert last["messages"][-1]["tool_call_id"] == "call_3"
            assert last["messages"][-1]["content"] == "exit status 0\n42\n"
            tool_rows = [m.content for m in app.store.messages(app.chat_id) if m.role == "tool"]
            assert len(tool_rows) == 3 and "run_command" in tool_rows[2] and "42" in tool_rows[2]

            app.run_command("/undo")
            await yes(pilot, app, "Undo the last apply")
            await wait_until(pilot, lambda: notified(app, "restored 1 file(s)"))
            assert (project / "util.py").read_text() == "def twice(x):\n    return 2 * x\n"
    finally:
        server.close()


async def test_a_refused_call_is_told_to_the_model_and_reads_can_be_always_allowed(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "a.py").write_text("print('a')\n")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    server = ScriptedServer([
        call("c1", "list_files", {"pattern": "*.py"}),
        call("c2", "run_command", {"command": "touch ran.txt"}),
        {"role": "assistant", "content": "I did not run it."},
    ])
    app = agent_app(tmp_path, server.url)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.sub_title == "remote server")
            app.run_command("/agent on")
            app.run_command("/agent reads")
            await send(pilot, app, "run it")
            await wait_until(pilot, lambda: dialog_open(app) and "wants to run" in app.screen.question)
            await pilot.press("n")
            await wait_until(pilot, lambda: replies(app) and "did not run" in replies(app)[-1].content)
            assert server.requests[1]["messages"][-1]["content"] == "a.py"  # listed without a question
            assert server.requests[2]["messages"][-1]["content"] == "the user refused to run it"
            assert not (project / "ran.txt").exists()
    finally:
        server.close()


def local_agent_app(tmp_path, scripts: list[Script]) -> MoeApp:
    """The app on the local session (its thread in this process) with the demo model, whose replies follow the
    script appended to `scripts` once the model has loaded."""
    spec = EngineSpec(model=str(DEMO_MODEL), capacity=8)
    load = spec.load

    def scripted_load():
        engine = load()
        scripts.append(Script(engine))
        return engine

    spec.load = scripted_load
    return watched(MoeApp(spec, Settings(data_dir=str(tmp_path / "data"), glyphs="unicode", inference_process=False)))


async def test_an_agent_on_the_local_session_reads_edits_after_a_yes_runs_a_command_and_answers(tmp_path, monkeypatch):
    project, check = twice_project(tmp_path, monkeypatch)
    scripts: list[Script] = []
    app = local_agent_app(tmp_path, scripts)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.model_info is not None, timeout=60)
        (script,) = scripts
        script.queue("Let me look.\n" + written_call("read_file", path="util.py"),
                     written_call("apply_edit", path="util.py", search="    return 2 * x", replace="    return x + x"),
                     written_call("run_command", command=check),
                     "twice now adds; it returns 42 for 21.")
        await agree_to_read_edit_and_run(pilot, app)
        await wait_until(pilot, lambda: replies(app) and replies(app)[-1].content.startswith("twice"), timeout=60)
        assert replies(app)[-1].content == "twice now adds; it returns 42 for 21."
        assert (project / "util.py").read_text() == "def twice(x):\n    return x + x\n"
        tool_rows = [m.content for m in app.store.messages(app.chat_id) if m.role == "tool"]
        assert len(tool_rows) == 3 and "read_file" in tool_rows[0] and "42" in tool_rows[2]

        # What the model was shown, through the demo's chat template: the tools, then its own calls and their
        # results as tool turns.
        first, *_, last = [script.engine.tokenizer.decode(prompt) for prompt in script.prompts]
        assert len(script.prompts) == 4
        assert '"name": "run_command"' in first and first.endswith("make twice use addition<|im_end|>\n"
                                                                    "<|im_start|>assistant\n")
        assert written_call("read_file", path="util.py") in last
        assert "<tool_response>\ndef twice(x):\n    return 2 * x\n\n</tool_response>" in last
        assert "<tool_response>\napplied to util.py\n</tool_response>" in last
        assert last.endswith("<tool_response>\nexit status 0\n42\n\n</tool_response><|im_end|>\n"
                             "<|im_start|>assistant\n")

        app.run_command("/undo")
        await yes(pilot, app, "Undo the last apply")
        await wait_until(pilot, lambda: notified(app, "restored 1 file(s)"))
        assert (project / "util.py").read_text() == "def twice(x):\n    return 2 * x\n"


async def test_agent_mode_on_a_local_model_that_cannot_call_tools_says_why(make_app):
    app = make_app()  # a tiny checkpoint whose chat template renders no tools, in the inference process
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.model_info is not None, timeout=60)
        app.run_command("/agent on")
        await wait_until(pilot, lambda: notified(app, "agent mode needs a model that can call tools"))
        assert notified(app, "cannot: its chat template does not render tools")
        assert not app.agent_on


async def test_esc_stops_the_local_models_turn_on_the_session(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    scripts: list[Script] = []
    app = local_agent_app(tmp_path, scripts)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.model_info is not None, timeout=60)
        (script,) = scripts
        script.queue("def f(x):\n    return x\n" * 60)  # a long turn, cut by Esc
        session = app.backend.session
        ends: list[JobDone] = []
        sink = session._sink

        def recording(event) -> None:
            if isinstance(event, JobDone):
                ends.append(event)
            sink(event)

        session._sink = recording
        app.run_command("/agent on")
        await send(pilot, app, "go")
        await wait_until(pilot, lambda: session.current is not None)
        await pilot.press("escape")
        await wait_until(pilot, lambda: notified(app, "agent stopped") and ends)
        (end,) = ends
        assert end.tag[0] == "agent" and end.done.finish_reason == "cancelled"
        assert end.done.generated_tokens < len(script.ids)
        assert not replies(app) and not app.agent_turns


async def test_a_read_outside_the_project_is_refused_without_asking(tmp_path):
    """The user was asked to allow reading ../../etc/passwd, and after yes the tool refused it anyway."""
    from moe_tui.app.agent import Tools

    (tmp_path / "inside.py").write_text("x = 1\n")
    asked: list[str] = []

    async def ask(question: str, diff: str) -> bool:
        asked.append(question)
        return True

    tools = Tools(tmp_path, ask, reads_allowed=False, record_apply=lambda written: None)
    for name, arguments in (("read_file", {"path": "../../etc/passwd"}), ("list_files", {"path": ".."}),
                            ("search_files", {"text": "root", "path": "/etc"})):
        step = await tools.call(name, arguments)
        assert "outside the project folder" in step.result and asked == [], name
    step = await tools.call("read_file", {"path": "inside.py"})
    assert step.result == "x = 1\n" and len(asked) == 1  # inside: asked, as before


async def test_search_files_does_not_follow_a_link_out_of_the_project(tmp_path):
    """read_file refused a symlink to /etc/passwd; search_files read it and gave its lines back."""
    from moe_tui.app.agent import Tools

    project, secret = tmp_path / "proj", tmp_path / "secret.txt"
    project.mkdir()
    secret.write_text("root:x:0:0:root\n")
    (project / "outside_link").symlink_to(secret)
    (project / "inside.py").write_text("root = 1\n")

    async def ask(question: str, diff: str) -> bool:
        return True

    tools = Tools(project, ask, reads_allowed=True, record_apply=lambda written: None)
    step = await tools.call("search_files", {"text": "root"})
    assert "inside.py:1: root = 1" in step.result and "root:x" not in step.result
