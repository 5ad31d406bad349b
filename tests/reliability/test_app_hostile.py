"""Hostile input to the app: bad paths, a full disk, default answers, odd numbers, huge or blocking files, two
instances on one data dir. Each must end in a one-line notice, never a traceback or a frozen screen."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading

import pytest
from moe_tui.app.textual_compat import notifications
from moe_tui.app.widgets.chat import PromptInput

from ..helpers import dialog_open, replies, send, wait_until

SIZE = (120, 40)
REPLY_WITH_CODE = "Here:\n```python\ndef a():\n    return 1\n```"


def errors(app) -> list[str]:
    return [text for text, severity in notifications(app) if severity == "error"]


def user_messages(app) -> list[str]:
    return [m.content for m in app.store.messages(app.chat_id) if m.role == "user"]


async def test_bad_at_paths_are_a_notice_and_the_message_stays_in_the_prompt(make_app, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "blob.bin").write_bytes(b"\0\1\2")
    monkeypatch.chdir(project)
    app = make_app(inference_process=False)
    async with app.run_test(size=SIZE) as pilot:
        for typed in ("explain @~nosuchuser/file.py please", f"explain @{'a' * 300}.py please", "what is @blob.bin"):
            before = len(errors(app))
            await send(pilot, app, typed)
            await pilot.pause(0.1)
            assert app.is_running
            assert len(errors(app)) == before + 1 and "\n" not in errors(app)[-1]
            assert app.query_one(PromptInput).text == typed  # not sent: the user can fix it
            assert user_messages(app) == []


async def test_bad_paths_in_commands_are_a_notice(make_app, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "adir").mkdir()
    (project / "[").mkdir()
    (project / "[" / "]x.py").write_text("old\n")
    monkeypatch.chdir(project)
    app = make_app(inference_process=False)
    async with app.run_test(size=SIZE) as pilot:
        app.store.add_message(app.chat_id, "user", "code please")
        app.store.add_message(app.chat_id, "assistant", REPLY_WITH_CODE)
        for line in ("/add ~nosuchuser/x", "/save 1 ~nosuchuser/x", "/export md ~nosuchuser/x", "/save 1 adir",
                     "/switch 99999999999999999999999", f"/add {'b' * 300}"):
            before = len(errors(app))
            await send(pilot, app, line)
            await pilot.pause(0.1)
            assert app.is_running, line
            assert len(errors(app)) == before + 1, line
            assert "\n" not in errors(app)[-1] and "Traceback" not in errors(app)[-1], line
        assert not (project / "adir" / "a").exists() and app.attachments == []
        # A path holding Rich markup, shown in the overwrite question and the diff: drawn as written.
        await send(pilot, app, "/save 1 [/]x.py")
        await wait_until(pilot, lambda: dialog_open(app))
        assert "[/]x.py" in app.screen.question
        await pilot.press("y")
        await pilot.pause(0.1)
        assert app.is_running and (project / "[" / "]x.py").read_text() == "def a():\n    return 1\n"


def disk_full(*args, **kwargs):
    raise sqlite3.OperationalError("database or disk is full")


async def test_a_full_disk_when_sending_keeps_the_typed_text(make_app):
    app = make_app(inference_process=False, max_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.store.add_message = disk_full
        await send(pilot, app, "words worth keeping")
        await pilot.pause(0.1)
        assert app.is_running and not app.generating
        assert app.query_one(PromptInput).text == "words worth keeping"
        assert any("could not save" in e and "disk full" in e for e in errors(app))
        assert "words worth keeping" not in "".join(errors(app))


async def test_a_full_disk_while_a_reply_streams_keeps_the_reply_on_screen(make_app, monkeypatch):
    from moe_tui.app.widgets.chat import MessageView

    monkeypatch.setattr("moe_tui.app.reply.SAVE_INTERVAL", 0.0)  # every chunk is a write
    app = make_app(inference_process=False, max_tokens=16)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.store.update_message = disk_full
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: not app.generating)
        await pilot.pause(0.2)
        assert app.is_running
        assert any("could not save" in e and "disk full" in e for e in errors(app))
        shown = [v.text for v in app.query(MessageView) if v.role in ("assistant", "cancelled")]
        assert shown and shown[-1]  # the reply is on screen; its row holds what was saved last
        assert replies(app)[-1].status == "partial"


async def test_a_bare_enter_or_escape_answers_no(make_app):
    from moe_tui.app.widgets.confirm import ConfirmScreen

    app = make_app(inference_process=False)
    async with app.run_test(size=SIZE) as pilot:
        for key in ("enter", "escape"):
            answers = []
            app.push_screen(ConfirmScreen("Overwrite everything?", "-old\n+new\n"), answers.append)
            await wait_until(pilot, lambda: dialog_open(app))
            await pilot.press(key)
            await pilot.pause(0.1)
            assert answers == [False], key
            assert not isinstance(app.screen, ConfirmScreen)
        answers = []
        app.push_screen(ConfirmScreen("Overwrite everything?"), answers.append)
        await wait_until(pilot, lambda: dialog_open(app))
        await pilot.press("y")
        await pilot.pause(0.1)
        assert answers == [True]
        answers = []
        app.push_screen(ConfirmScreen("Overwrite everything?"), answers.append)
        await wait_until(pilot, lambda: dialog_open(app))
        app.screen.query_one("#yes").focus()  # chosen on purpose: Enter on Yes is a yes
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert answers == [True]


async def test_temp_refuses_what_is_not_a_temperature(make_app):
    app = make_app(inference_process=False, temperature=0.7)
    async with app.run_test(size=SIZE) as pilot:
        for value in ("nan", "-1", "inf", "-inf", "2.5", "1e400", "abc"):
            before = len(errors(app))
            app.run_command(f"/temp {value}")
            await pilot.pause()
            assert len(errors(app)) == before + 1, value
            assert "temperature" not in app.store.chat(app.chat_id).settings, value
        app.run_command("/temp")  # the value in use, and how to change it
        await pilot.pause()
        shown = notifications(app)[-1][0]
        assert "0.7" in shown and "/temp" in shown
        app.run_command("/temp 0")
        app.run_command("/temp 2")
        assert app.store.chat(app.chat_id).settings["temperature"] == 2.0


class FifoWatch:
    """Opens the FIFO's write end without blocking, over and over: that succeeds only while someone has its read
    end open (the app, stuck in open() or read()), and then it lets that reader go, with an empty file."""

    def __init__(self, path) -> None:
        self.path, self.opened, self.stop = path, False, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
                self.opened = True
            except OSError:  # ENXIO: no reader, as it should be
                pass


async def test_save_onto_a_huge_file_asks_without_a_diff(make_app, tmp_path, monkeypatch):
    from moe_tui.app import coding

    project = tmp_path / "project"
    project.mkdir()
    big = project / "big.py"
    big.write_text("x = 1\n" * (5 * 1024 * 1024 // 6))
    diffed: list[int] = []
    diff = coding.diff

    def measured(old, new, path):
        diffed.append(len(old))
        assert len(old) <= 1024 * 1024, "a 5 MB file diffed on the UI thread"
        return diff(old, new, path)

    monkeypatch.setattr(coding, "diff", measured)
    monkeypatch.chdir(project)
    app = make_app(inference_process=False)

    async def steps(pilot) -> None:
        app.store.add_message(app.chat_id, "assistant", REPLY_WITH_CODE)
        await send(pilot, app, "/save 1 big.py")
        await wait_until(pilot, lambda: dialog_open(app), timeout=10)
        assert app.screen.diff == "" and "MB" in app.screen.question
        await pilot.press("y")
        await wait_until(pilot, lambda: big.stat().st_size < 100, timeout=10)

    async with app.run_test(size=SIZE) as pilot:
        await asyncio.wait_for(steps(pilot), 60)
    assert big.read_text() == "def a():\n    return 1\n" and diffed == []


async def test_a_fifo_is_never_opened(make_app, tmp_path, monkeypatch):
    from moe_tui.app.widgets.confirm import ConfirmScreen

    project = tmp_path / "project"
    project.mkdir()
    os.mkfifo(project / "pipe.py")
    monkeypatch.chdir(project)
    watch = FifoWatch(project / "pipe.py")
    app = make_app(inference_process=False)

    async def steps(pilot) -> None:
        app.store.add_message(app.chat_id, "assistant", REPLY_WITH_CODE)
        for line in ("/save 1 pipe.py", "/export md pipe.py", "/add pipe.py", "look at @pipe.py"):
            before = len(errors(app))
            await send(pilot, app, line)
            await pilot.pause(0.2)
            assert app.is_running and not isinstance(app.screen, ConfirmScreen), line
            assert len(errors(app)) == before + 1 and "regular file" in errors(app)[-1], line

    try:
        async with app.run_test(size=SIZE) as pilot:
            await asyncio.wait_for(steps(pilot), 60)
    finally:
        watch.stop.set()
    assert not watch.opened


def test_a_long_diff_is_cut_for_the_dialog():
    from moe_tui.app.widgets.confirm import MAX_DIFF_LINES, shown_diff

    diff = "".join(f"-line {i}\n" for i in range(MAX_DIFF_LINES + 50))
    shown = shown_diff(diff)
    assert shown.count("\n") == MAX_DIFF_LINES + 1 and "50 more lines" in shown
    assert shown_diff("-a\n+b\n") == "-a\n+b\n"


async def test_a_second_app_on_the_same_data_dir_refuses_to_start(make_app, tmp_path, capsys):
    from moe_tui.app import cli

    app = make_app(inference_process=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        # Both would write into one chat, and /clear in one would delete what the other shows.
        with pytest.raises(ValueError, match="--data-dir") as refused:
            make_app(inference_process=False)
        message = str(refused.value)
        assert str(tmp_path / "data") in message and "\n" not in message
    from moe_tui.app.store import DataDirLock

    held = DataDirLock(tmp_path / "data" / "chats.sqlite3")  # as by an app in another process
    held.acquire()
    try:
        assert cli.main(["chat", app.spec.model, "--data-dir", str(tmp_path / "data")]) == 2
    finally:
        held.release()
    assert "in use by another moe-tui" in capsys.readouterr().err
    again = make_app(inference_process=False)  # the first one is gone: its lock with it
    async with again.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert again.is_running


def test_the_data_dir_lock(tmp_path):
    from moe_tui.app.store import DataDirLock, StoreInUse

    first = DataDirLock(tmp_path / "chats.sqlite3")
    first.acquire()
    second = DataDirLock(tmp_path / "chats.sqlite3")
    with pytest.raises(StoreInUse, match=str(os.getpid())):
        second.acquire()
    assert (tmp_path / "chats.sqlite3.lock").exists()
    first.release()
    second.acquire()
    second.release()
