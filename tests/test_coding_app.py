"""Pilot tests of the coding commands: edits applied from replies, /undo, /run, /diff, /drop, the context gauge."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from moe_tui.app import coding, runner
from moe_tui.app.context_gauge import ContextGauge
from moe_tui.app.main import MoeApp
from moe_tui.app.messages import ReplyDone
from moe_tui.app.settings import Settings
from moe_tui.app.widgets.chat import MessageView, PromptInput
from moe_tui.app.worker import EngineSpec

from tests.helpers import (
    FakeWorker,
    dialog_closed,
    dialog_open,
    finished,
    notified,
    replies,
    screen_rows,
    send,
    wait_until,
    watched,
)

EDIT_REPLY = """Use the helper:

util.py
```python
<<<<<<< SEARCH
    return 2 * x
=======
    return x + x
>>>>>>> REPLACE
```

and a test for it:

```python test_util.py
from util import twice

assert twice(2) == 4
```
"""


class ScriptedWorker(FakeWorker):
    """A FakeWorker whose every reply is the next of `script` (the last one repeats)."""

    script = [EDIT_REPLY]

    def __init__(self, app) -> None:
        super().__init__(app)
        self.sent: list = []

    def submit(self, request) -> None:
        self.sent.append(request)
        text = self.script[min(len(self.sent), len(self.script)) - 1]
        self.app.post_message(ReplyDone(request.tag, text, None))


def scripted_app(tmp_path, **settings) -> MoeApp:
    settings.setdefault("glyphs", "unicode")
    return watched(MoeApp(EngineSpec(model="demo"), Settings(data_dir=str(tmp_path / "data"), **settings),
                          worker_factory=ScriptedWorker))


def scripted_app_in(tmp_path, monkeypatch, **settings) -> MoeApp:
    """A scripted app working in `tmp_path` (its folder, its config)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    return scripted_app(tmp_path, **settings)


def notices(app) -> str:
    return "\n".join(v.text for v in app.query(MessageView) if v.role == "notice")


async def answer(pilot, app, key: str) -> None:
    await wait_until(pilot, lambda: dialog_open(app))
    await pilot.press(key)
    await wait_until(pilot, lambda: dialog_closed(app))
    await pilot.pause()  # the answer's callback runs


async def test_an_estimated_token_count_reaches_the_attachment(fake_app, tmp_path, monkeypatch):
    """A backend that estimates counts (a server, the fake) answers at once, on the UI thread itself."""
    (tmp_path / "util.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.chdir(tmp_path)
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/add util.py")
        await wait_until(pilot, lambda: notified(app, "attached"))
        assert app.attachments[0].tokens > 0


async def test_a_replys_edits_are_listed_applied_after_a_yes_and_undone_after_a_restart(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "util.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    app = scripted_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "make twice use addition @util.py")
        await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]))
        # The default system prompt asks for the formats; the reply's edits are announced with their numbers.
        assert "<<<<<<< SEARCH" in app.backend.sent[0].messages[0]["content"]
        await wait_until(pilot, lambda: notified(app, "proposes 2 edit(s)"))
        assert notified(app, "1] util.py, \\[2] test_util.py")  # markup-escaped brackets
        app.run_command("/edits")
        await wait_until(pilot, lambda: "-    return 2 * x" in notices(app))
        assert "+    return x + x" in notices(app) and "+assert twice(2) == 4" in notices(app)
        assert "(new file)" in notices(app)

        app.run_command("/apply")
        await wait_until(pilot, lambda: dialog_open(app))
        assert "-    return 2 * x" in app.screen.diff and "+from util import twice" in app.screen.diff
        await pilot.press("enter")  # No is the default
        await wait_until(pilot, lambda: notified(app, "no file changed"))
        assert (project / "util.py").read_text() == "def twice(x):\n    return 2 * x\n"
        assert not (project / "test_util.py").exists()

        app.run_command("/apply 2")  # code block 2 alone
        await answer(pilot, app, "y")
        await wait_until(pilot, lambda: notified(app, "applied to 1 file(s): test_util.py"))
        assert (project / "util.py").read_text() == "def twice(x):\n    return 2 * x\n"
        app.run_command("/apply 1")
        await answer(pilot, app, "y")
        await wait_until(pilot, lambda: notified(app, "applied to 1 file(s): util.py"))
        assert (project / "util.py").read_text() == "def twice(x):\n    return x + x\n"

    restarted = scripted_app(tmp_path)
    async with restarted.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: restarted.last_snapshot is not None)
        restarted.run_command("/undo")  # the last apply: util.py
        await wait_until(pilot, lambda: dialog_open(restarted))
        assert "+    return 2 * x" in restarted.screen.diff
        await pilot.press("y")
        await wait_until(pilot, lambda: notified(restarted, "restored 1 file(s)"))
        assert (project / "util.py").read_text() == "def twice(x):\n    return 2 * x\n"
        assert (project / "test_util.py").exists()
        restarted.run_command("/undo")  # the one before: test_util.py, which it created
        await answer(restarted_pilot := pilot, restarted, "y")
        await wait_until(restarted_pilot, lambda: not (project / "test_util.py").exists())
        restarted.run_command("/undo")
        await wait_until(pilot, lambda: notified(restarted, "nothing to undo"))


async def test_apply_asks_first_outside_the_project_and_for_files_changed_since_attached(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "util.py").write_text("x = 1\n")
    (project / "image.png").write_bytes(b"\x89PNG\0\0\0")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    ScriptedWorker.script = ["util.py\n```\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n```\n"
                             "```text ../notes.txt\nhello\n```\n```text image.png\nnot an image\n```\n"]
    app = scripted_app(tmp_path)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.last_snapshot is not None)
            await send(pilot, app, "@util.py")
            await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]))
            (project / "util.py").write_text("# edited by hand\nx = 1\n")  # after it was attached
            app.run_command("/apply")
            await wait_until(pilot, lambda: dialog_open(app))
            question = app.screen.question
            assert f"{tmp_path / 'notes.txt'} is outside {project}" in question
            assert "util.py changed on disk since it was attached" in question
            assert not app.screen.diff  # a question of its own, before the diff
            await pilot.press("n")
            await wait_until(pilot, lambda: notified(app, "no file changed"))
            app.run_command("/apply")
            await wait_until(pilot, lambda: dialog_open(app))
            await pilot.press("y")
            await wait_until(pilot, lambda: dialog_open(app) and app.screen.diff)  # then the diff
            assert "image.png: looks binary; only text files are edited" in app.screen.question
            await pilot.press("y")
            await wait_until(pilot, lambda: notified(app, "applied to 2 file(s)"))
            assert (project / "util.py").read_text() == "# edited by hand\nx = 2\n"
            assert (tmp_path / "notes.txt").read_text() == "hello\n"
            assert (project / "image.png").read_bytes() == b"\x89PNG\0\0\0"
    finally:
        ScriptedWorker.script = [EDIT_REPLY]


async def test_run_asks_then_runs_without_blocking_and_attaches_its_output(fake_app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/run echo hi > ran.txt")
        await answer(pilot, app, "n")
        assert not (tmp_path / "ran.txt").exists() and notified(app, "not run")

        app.run_command("/run sleep 1; echo out; echo err >&2; exit 3")
        await answer(pilot, app, "y")
        started = time.monotonic()
        await pilot.press(*"typing")  # the UI goes on while the command runs
        assert app.query_one(PromptInput).text == "typing" and time.monotonic() - started < 0.9
        await wait_until(pilot, lambda: app.attachments)
        output = app.attachments[-1]
        assert output.label == "Output of `sleep 1; echo out; echo err >&2; exit 3` (exit status 3)"
        assert output.text == "out\nerr\n"
        assert "exit status 3" in notices(app) and "out\nerr" in notices(app)
        app.query_one(PromptInput).text = ""
        await send(pilot, app, "why does it fail?")
        user = [m for m in app.store.messages(app.chat_id) if m.role == "user"][-1]
        assert user.content.startswith("Output of `sleep 1;") and user.content.endswith("why does it fail?")
        assert coding.typed_part(user.content) == "why does it fail?"


async def test_run_stops_at_its_time_limit_and_on_escape_and_caps_its_output(fake_app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "RUN_TIMEOUT", 1.0)
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/run echo start; sleep 30")
        await answer(pilot, app, "y")
        await wait_until(pilot, lambda: app.attachments, timeout=10)
        assert "start" in app.attachments[0].text and "stopped after 1 s (time limit)" in app.attachments[0].label
        monkeypatch.setattr(runner, "RUN_TIMEOUT", 60.0)
        app.run_command("/run sleep 30")
        await answer(pilot, app, "y")
        await pilot.pause(0.3)
        await pilot.press("escape")
        await wait_until(pilot, lambda: notified(app, "stopped: sleep 30"), timeout=10)
        assert len(app.attachments) == 1
        app.run_command("/run python3 -c \"print('x' * 100000)\"")
        await answer(pilot, app, "y")
        await wait_until(pilot, lambda: len(app.attachments) == 2)
        text = app.attachments[1].text
        assert len(text) < runner.HEAD_BYTES + runner.TAIL_BYTES + 100 and "bytes of output cut" in text


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
async def test_diff_attaches_git_diff_and_drop_removes_attachments(fake_app, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (repo / "a.py").write_text("a = 1\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "a.py"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], cwd=repo, check=True)
    monkeypatch.chdir(tmp_path)
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/diff")
        await wait_until(pilot, lambda: notified(app, "is not in a git repository"))
        app.cwd = repo
        app.run_command("/diff")
        await wait_until(pilot, lambda: notified(app, "git diff: no changes"))
        (repo / "a.py").write_text("a = 2\n")
        app.run_command("/diff")
        await wait_until(pilot, lambda: app.attachments)
        assert "-a = 1" in app.attachments[0].text and "+a = 2" in app.attachments[0].text
        app.run_command("/add a.py")
        await wait_until(pilot, lambda: len(app.attachments) == 2)
        app.run_command("/drop nothing.py")
        await wait_until(pilot, lambda: notified(app, "nothing.py is not attached"))
        assert len(app.attachments) == 2
        app.run_command("/drop a.py")
        assert [a.label for a in app.attachments] == ["Output of `git diff` (exit status 0)"]
        app.run_command("/drop git diff")
        assert app.attachments == []


async def test_the_context_gauge_splits_the_window_and_warns_before_turns_are_dropped(fake_app, tmp_path, monkeypatch):
    (tmp_path / "big.py").write_text("x = 1\n" * 800)  # 4800 characters: ~1200 estimated tokens
    monkeypatch.chdir(tmp_path)
    app = fake_app(max_tokens=512)
    async with app.run_test(size=(120, 40)) as pilot:
        gauge = app.query_one(ContextGauge)
        await wait_until(pilot, lambda: gauge.budget is not None and gauge.budget.context == 2048)
        budget = gauge.budget
        assert budget.system > 50 and budget.history == 0 and budget.files == 0 and budget.reply == 512
        for i in range(3):
            app.store.add_message(app.chat_id, "user", f"question {i} " + "word " * 60)
            app.store.add_message(app.chat_id, "assistant", "answer " * 60)
        app.open_chat(app.chat_id)
        await wait_until(pilot, lambda: gauge.budget.history > 300)
        assert not gauge.has_class("over")
        line = str(gauge.render())
        assert "system" in line and "files" in line and "chat" in line and "reply" in line
        app.run_command("/add big.py")
        await wait_until(pilot, lambda: gauge.budget.files > 1000)
        line = str(gauge.render())  # the warning takes the room of the split (the row holds it all, not cut)
        assert f"{gauge.budget.used:,}/2,048" in line and len(line) <= gauge.size.width
        assert gauge.has_class("over") and "oldest turns will be dropped" in line
        app.run_command("/drop big.py")
        await wait_until(pilot, lambda: gauge.budget.files == 0 and not gauge.has_class("over"))


async def test_the_gauge_counts_with_the_models_own_tokenizer(make_app):
    app = make_app(inference_process=False, max_tokens=8)  # reaches into the session's engine
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]) and not app.generating)
        gauge = app.query_one(ContextGauge)
        engine = app.backend.session.engine
        expected = len(engine.encode(app.history()))
        await wait_until(pilot, lambda: gauge.budget is not None and gauge.budget.used == expected)
        assert gauge.budget.exact and gauge.budget.context == engine.context_length
        assert gauge.budget.system == len(engine.encode([app.history()[0]]))


@pytest.mark.parametrize("width", [30, 44, 50, 60, 75, 120])
def test_the_context_gauge_fits_its_row_and_keeps_the_numbers(width):
    """At 80x24 the chat is ~44 columns: the gauge lost 'files', 'chat' and 'reply' off its one row."""
    from moe_tui.app.context_gauge import ContextBudget, render

    budget = ContextBudget(system=183, files=0, history=528, reply=512, context=2048, exact=True)
    line = render(budget, width)
    assert line.cell_len <= width, line.plain
    assert "711/2,048" in line.plain
    if width >= 50:
        assert all(f"{n:,}" in line.plain for n in (183, 528, 512)), line.plain


async def test_adding_a_missing_file_outside_the_project_says_so_without_asking(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    app = scripted_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command(f"/add {tmp_path / 'nowhere.txt'}")
        await wait_until(pilot, lambda: notified(app, "no such file"))
        assert dialog_closed(app) and not app.attachments  # no "is outside ... Attach it?" first


def test_the_context_gauge_says_when_dropping_turns_cannot_help():
    """A file bigger than the window: 'the oldest turns will be dropped' promised what could not help."""
    from moe_tui.app.context_gauge import ContextBudget, render

    line = render(ContextBudget(system=183, files=11_479, history=300, reply=512, context=2048), 160).plain
    assert "/drop" in line and "oldest turns" not in line
    line = render(ContextBudget(system=183, files=400, history=1_600, reply=512, context=2048), 160).plain
    assert "oldest turns will be dropped" in line
    # A reply budget over half the window reserves half of it, as the session does when it drops turns.
    assert ContextBudget(system=183, files=0, history=82, reply=100_000, context=2048).over == 0


async def test_a_command_that_leaves_a_background_process_ends_with_its_shell(tmp_path):
    """`/run sleep 200 & echo bg started` ran until the time limit (the background process held the output pipe
    open), and Esc then dropped 'bg started'."""
    import asyncio
    import time
    from pathlib import Path

    def alive(pid: int) -> bool:
        status = Path(f"/proc/{pid}/status")
        return status.exists() and "State:\tZ" not in status.read_text()

    pidfile = tmp_path / "pid"
    started = time.monotonic()
    result = await runner.run_shell(f"sh -c 'echo $$ > {pidfile}; exec sleep 30' & echo bg started", str(tmp_path),
                                    timeout=20)
    assert time.monotonic() - started < 5
    assert result.exit_status == 0 and "bg started" in result.output
    assert "background" in result.status_text  # it says what became of what the command left running
    pid = int(pidfile.read_text())
    for _ in range(50):  # stopped, not left to write into a closed pipe
        if not alive(pid):
            break
        await asyncio.sleep(0.1)
    assert not alive(pid)


async def test_an_attached_file_is_sent_as_it_is_at_send_time(fake_app, tmp_path, monkeypatch):
    """The text read at /add was sent whatever happened to the file since: edited in another editor, or gone,
    without a word."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edited.py").write_text("old = 1\n")
    (tmp_path / "gone.txt").write_text("vanish\n")
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/add edited.py")
        app.run_command("/add gone.txt")
        await wait_until(pilot, lambda: len(app.attachments) == 2)
        (tmp_path / "edited.py").write_text("new = 2\n")
        (tmp_path / "gone.txt").unlink()
        await send(pilot, app, "look")
        await wait_until(pilot, lambda: any(m.role == "user" for m in app.store.messages(app.chat_id)))
        sent = [m for m in app.store.messages(app.chat_id) if m.role == "user"][-1].content
        assert "new = 2" in sent and "old = 1" not in sent
        assert "vanish" in sent  # gone: what was attached still goes, and it is said
        await wait_until(pilot, lambda: notified(app, "changed since it was attached"))
        await wait_until(pilot, lambda: notified(app, "no such file"))


def test_the_context_gauge_of_an_unknown_window_is_never_cut_mid_word():
    """From a server that does not say its window, the gauge ended '... r 512 · context' in a narrow chat."""
    from moe_tui.app.context_gauge import ContextBudget, render

    budget = ContextBudget(context=0, system=154, files=0, history=1_234, reply=512, exact=False)
    for width in (30, 40, 48, 60, 80, 120):
        line = render(budget, width)
        line.truncate(width - 2)  # the widget's padding
        assert line.plain.rstrip().endswith(("unknown", "512", "?")), (width, line.plain)
    assert "context window unknown" in render(budget, 120).plain


async def test_a_command_that_closes_its_output_is_waited_for_without_spinning(tmp_path):
    """With the output closed and the shell still running, the wait loop returned at once every turn: a core at
    100% until the shell ended (the app's inference thread shares the process)."""
    import time

    cpu, wall = time.process_time(), time.monotonic()
    result = await runner.run_shell("exec >/dev/null 2>&1; sleep 1.5", str(tmp_path), timeout=20)
    assert result.exit_status == 0 and time.monotonic() - wall >= 1.4
    assert time.process_time() - cpu < 0.5


async def test_a_background_process_that_left_the_group_is_said_to_run_on(tmp_path):
    """`setsid sleep 3 & echo hi`: the status said it was stopped while it ran on."""
    if shutil.which("setsid") is None:
        pytest.skip("needs setsid")
    result = await runner.run_shell("setsid sleep 2 & echo hi", str(tmp_path), timeout=20)
    assert "hi" in result.output and "stopped" not in result.status_text
    assert "still running" in result.status_text


async def test_a_refused_send_keeps_the_cursor_at_the_end_and_attaches_nothing(fake_app, tmp_path, monkeypatch):
    """A message naming a file over the attachment limit is refused (fair): the text went back into the prompt
    with the cursor at its start, so what was typed next went in front of it, and the message's other @files
    stayed attached to the next message."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big.py").write_text("x = 1\n" * (coding.MAX_ATTACHMENT_BYTES // 6 + 10))
    (tmp_path / "small.py").write_text("y = 2\n")
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "review @small.py and @big.py")
        await wait_until(pilot, lambda: notified(app, "big.py"))
        prompt = app.query_one(PromptInput)
        assert prompt.text == "review @small.py and @big.py" and app.attachments == []
        await pilot.press("!")
        assert prompt.text == "review @small.py and @big.py!"
        assert not any(m.role == "user" for m in app.store.messages(app.chat_id))


@pytest.mark.parametrize("typed", ['"my file.py"', "'my file.py'", "my\\ file.py", "my file.py"])
def test_a_path_typed_with_quotes_or_escaped_spaces_names_the_file(tmp_path, typed):
    """`/save 1 "my file.py"` wrote a file named with the quotes, and `/add "my file.py"` found no such file."""
    (tmp_path / "my file.py").write_text("x = 1\n")
    assert coding.resolve(typed, tmp_path) == ((tmp_path / "my file.py").resolve(), False)


async def test_editing_a_message_sent_with_files_puts_them_back_as_attachments(tmp_path, monkeypatch):
    """Ctrl+E put the whole stored message, files included, into the prompt: sent again, each file went twice
    (the inline copy as it was then)."""
    (tmp_path / "calc.py").write_text("def mean(xs):\n    return sum(xs) / len(xs)\n")
    app = scripted_app_in(tmp_path, monkeypatch)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "check @calc.py")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        await pilot.press("ctrl+e")
        prompt = app.query_one(PromptInput)
        assert prompt.text == "check @calc.py"
        assert [a.path.name for a in app.attachments] == ["calc.py"]
        prompt.insert(" now")
        await pilot.press("ctrl+e")  # again: what was typed into the edit stays
        assert prompt.text == "check @calc.py now"
        await pilot.press("escape")  # the edit dropped: nothing stays attached for the next message
        assert app.attachments == [] and prompt.text == ""
        await pilot.press("ctrl+e")
        (tmp_path / "calc.py").write_text("def mean(xs):\n    return sum(xs) / max(len(xs), 1)\n")
        await pilot.press("enter")
        await wait_until(pilot, lambda: [m.role for m in app.store.messages(app.chat_id)][-1:] == ["assistant"]
                         and not app.generating)
        sent = [m for m in app.store.messages(app.chat_id) if m.role == "user"]
        assert len(sent) == 1 and sent[0].content.count("def mean") == 1 and "max(len(xs), 1)" in sent[0].content


async def test_a_long_outputs_notice_says_what_was_cut_from_its_middle(fake_app, tmp_path, monkeypatch):
    """`/run seq 1 200000` said "(5343 earlier lines not shown here)": the kept lines, not the 199,000 before."""
    monkeypatch.chdir(tmp_path)
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/run seq 1 200000")
        await answer(pilot, app, "y")
        await wait_until(pilot, lambda: app.attachments, timeout=20)
        await wait_until(pilot, lambda: "bytes cut from the output's middle" in notices(app))


async def test_a_running_command_is_shown_under_the_prompt_until_it_ends(fake_app, tmp_path, monkeypatch):
    """`/run sleep 15` (or a command waiting on an editor) gave no sign after its toast went, about 5 s."""
    monkeypatch.chdir(tmp_path)
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/run sleep 30 # [/] [b]")  # brackets: text, not markup
        await answer(pilot, app, "y")
        prompt = app.query_one(PromptInput)
        shown = "running: sleep 30 # [/] [b] · Esc stops it"
        await wait_until(pilot, lambda: any(shown in row for row in screen_rows(app)))
        await pilot.press("escape")
        await wait_until(pilot, lambda: not prompt.border_subtitle, timeout=10)


async def test_what_was_typed_and_attached_but_not_sent_is_back_after_a_restart(fake_app, tmp_path, monkeypatch):
    """Quitting with a half-typed message, a file and a command's output attached lost all three."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calc.py").write_text("x = 1\n")
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/add calc.py")
        app.run_command("/run echo pending-output")
        await answer(pilot, app, "y")
        await wait_until(pilot, lambda: len(app.attachments) == 2, timeout=10)
        app.query_one(PromptInput).text = "half typed draft"
        app.exit()
    again = fake_app()
    async with again.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: len(again.attachments) == 2)
        assert again.query_one(PromptInput).text == "half typed draft"
        assert [a.path.name for a in again.attachments if not a.label] == ["calc.py"]
        assert "pending-output" in [a for a in again.attachments if a.label][0].text
        await wait_until(pilot, lambda: notified(again, "from the last session (and 2 attachment(s)) is back"))
        again.query_one(PromptInput).text = ""
        again.attachments = []
        first_chat = again.chat_id
        again.run_command("/new")
        again.store.add_message(first_chat, "user", "a later message")  # the first chat is now the latest
        await wait_until(pilot, lambda: again.chat_id != first_chat)
        left_in = again.chat_id
        again.exit()
    third = fake_app()  # nothing left to bring back: nothing is, but the app opens the chat it was left in
    async with third.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: third.last_snapshot is not None)
        assert third.query_one(PromptInput).text == "" and third.attachments == []
        assert third.chat_id == left_in


def test_a_file_with_longer_fences_is_read_back_whole_from_its_message(tmp_path):
    """A README with a 4-backtick block was cut at that block when Ctrl+E read the message back: the rest of
    the file went into the prompt as typed text (found in review)."""
    text = "# docs\n````markdown\n```python\nx = 1\n```\n````\n\nmore docs\n"
    message = coding.Attachment(tmp_path / "README.md", text, 0).as_prompt() + "\n\nfix the readme"
    attached, typed = coding.split_message(message, tmp_path)
    assert typed == "fix the readme" and [a.text for a in attached] == [text]


async def test_editing_a_message_does_not_read_a_file_outside_the_project_again(tmp_path, monkeypatch):
    """A `File `PATH`:` block at the start of a message was read again from disk at the edit's send, outside
    the project and without a question (found in review)."""
    project, secret = tmp_path / "proj", tmp_path / "secret.txt"
    project.mkdir()
    secret.write_text("TOP SECRET\n")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    app = scripted_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, f"File `{secret}`:\n```\n(example)\n```\n\nwhat does this mean?")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        await pilot.press("ctrl+e")
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(replies(app)) == 1 and not app.generating
                         and [m.role for m in app.store.messages(app.chat_id)][-1] == "assistant")
        sent = [m for m in app.store.messages(app.chat_id) if m.role == "user"][-1].content
        assert "TOP SECRET" not in sent and "(example)" in sent


async def test_dropping_an_edit_gives_back_what_was_typed_before_it(tmp_path, monkeypatch):
    """Esc in an edit, or quitting during one, lost the draft typed before Ctrl+E (its attachments came back,
    its words did not)."""
    (tmp_path / "app.py").write_text("x = 1\n")
    app = scripted_app_in(tmp_path, monkeypatch)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "hi")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        app.run_command("/add app.py")
        prompt = app.query_one(PromptInput)
        prompt.text = "draft two"
        await pilot.press("ctrl+e")
        assert prompt.text == "hi"
        await pilot.press("escape")
        assert prompt.text == "draft two" and [a.path.name for a in app.attachments] == ["app.py"]
        await pilot.press("ctrl+e")
        prompt.insert(" EDITED")
        app.exit()  # quitting drops the edit as Esc does, and keeps the draft from before it
    again = scripted_app(tmp_path)
    async with again.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: again.query_one(PromptInput).text == "draft two")
        await wait_until(pilot, lambda: [a.path.name for a in again.attachments] == ["app.py"])


async def test_an_edit_sent_or_left_for_another_chat_gives_back_the_draft_from_before_it(tmp_path, monkeypatch):
    """Found in review: sending an edit lost the draft typed before Ctrl+E and sent the draft's files inside the
    edited message; Ctrl+N during an edit carried the edit into the new chat and lost the draft; Ctrl+E under
    an open question made its Yes send the prompt as the edit, deleting the exchange before it."""
    (tmp_path / "app.py").write_text("x = 1\n")
    (tmp_path.parent / "out.txt").write_text("outside\n")
    app = scripted_app_in(tmp_path, monkeypatch)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "first question")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        app.run_command("/add app.py")
        prompt = app.query_one(PromptInput)
        prompt.text = "long draft two"
        await pilot.press("ctrl+e")
        assert prompt.text == "first question" and app.attachments == []
        prompt.text = "first question, edited"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(replies(app)) == 1 and not app.generating
                         and [m.role for m in app.store.messages(app.chat_id)][-1] == "assistant")
        sent = [m.content for m in app.store.messages(app.chat_id) if m.role == "user"]
        assert sent == ["first question, edited"]  # the draft's file did not go with the edit
        assert prompt.text == "long draft two" and [a.path.name for a in app.attachments] == ["app.py"]
        await pilot.press("ctrl+e")
        await pilot.press("ctrl+n")  # another chat: the edit stays behind, the draft comes back
        await wait_until(pilot, lambda: not app.store.messages(app.chat_id))
        assert app.editing is None and prompt.text == "long draft two"
        assert [a.path.name for a in app.attachments] == ["app.py"]
        app.attachments = []
        await send(pilot, app, "look @../out.txt")  # asks first: outside the project
        await wait_until(pilot, lambda: dialog_open(app))
        await pilot.press("ctrl+e")  # under the question: nothing
        assert app.editing is None
        await pilot.press("n")


async def test_a_draft_file_outside_the_project_comes_back_as_it_was_attached(fake_app, tmp_path, monkeypatch):
    """Found in review: a file outside the project in the draft was read again at the next start, without the
    question it had been attached after."""
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.chdir(project)
    outside = tmp_path / "outside.txt"
    outside.write_text("as attached\n")
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command(f"/add {outside}")
        await answer(pilot, app, "y")  # outside the project: asked first
        await wait_until(pilot, lambda: app.attachments)
        app.exit()
    outside.write_text("changed since\n")
    again = fake_app()
    async with again.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: again.attachments)
        assert [a.text for a in again.attachments] == ["as attached\n"] and again.attachments[0].frozen
