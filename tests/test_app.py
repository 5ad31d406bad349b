"""Pilot tests of the app on a tiny model: streaming, cancel, regenerate, persistence, live settings."""

from __future__ import annotations

import asyncio
import gc
import threading

from moe_tui.app.main import MoeApp
from moe_tui.app.settings import Settings
from moe_tui.app.textual_compat import notification_texts
from moe_tui.app.widgets.chat import HEIGHT_STEP, MessageView, PromptInput
from moe_tui.app.widgets.confirm import ConfirmScreen
from moe_tui.app.widgets.heatmap import HeatmapView
from moe_tui.app.worker import EngineSpec

from tests.helpers import (
    dialog_closed,
    dialog_open,
    finished,
    notified,
    palette_offers,
    palette_open,
    replies,
    reply_shown,
    send,
    wait_until,
    watched,
)


async def test_send_message_streams_a_reply_and_fills_the_heatmap(make_app):
    app = make_app(max_tokens=24)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]))
        await wait_until(pilot, lambda: reply_shown(app))
        reply = replies(app)[-1]
        assert reply.content
        views = [v for v in app.query(MessageView) if v.role == "assistant"]
        assert views and views[-1].text == reply.content
        await wait_until(pilot, lambda: app.last_snapshot.requests.sum() > 0)
        heatmap = app.query_one(HeatmapView)
        assert heatmap.snapshot.requests.sum() > 0
        assert "experts per layer" in app.sub_title


async def test_escape_cancels_and_keeps_partial_text(make_app):
    app = make_app(max_tokens=4000)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "for i in range(10):")
        await wait_until(pilot, lambda: app.reply_text != "")
        await pilot.press("escape")
        await wait_until(pilot, lambda: reply_shown(app))
        reply = replies(app)[-1]
        assert reply.status == "cancelled"
        assert len(reply.content) > 0
        await pilot.pause()
        view = app.query(MessageView).last()  # the partial text, marked cancelled on screen only
        assert view.role == "cancelled" and view.text == reply.content
        assert any("(cancelled)" in view.render_line(y).text for y in range(view.content_size.height))


async def test_regenerate_sets_the_last_reply_aside_and_restore_brings_it_back(make_app):
    app = make_app(max_tokens=8)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "import os")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        first = replies(app)[-1]
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: replies(app)[-1].id != first.id and not app.generating)
        old, new = replies(app)
        assert old.id == first.id and old.status == "replaced" and finished(new)
        # The mark names no key: the regenerate key may be remapped ([keymap] app.regenerate).
        view = app.query(MessageView)[1]  # the user's message, the reply set aside, the new one
        shown = " ".join(" ".join(view.render_line(y).text.split()) for y in range(view.content_size.height))
        assert "(set aside when regenerated" in shown and "Ctrl+R" not in shown
        assert [m["content"] for m in app.history() if m["role"] == "assistant"] == [new.content]
        app.run_command("/restore")
        await wait_until(pilot, lambda: replies(app)[0].status == "complete")
        assert replies(app)[1].status == "replaced"
        assert [m["content"] for m in app.history() if m["role"] == "assistant"] == [first.content]
        # /apply, /edits, /save, /copy act on the reply in the conversation, not the newer one set aside.
        assert app.last_reply() == first.content != replies(app)[1].content


async def test_session_survives_restart(make_app):
    app = make_app(max_tokens=8)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "class Cache:")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        chat_id, expected = app.chat_id, [(m.role, m.content) for m in app.store.messages(app.chat_id)]
    again = make_app()
    async with again.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: len(again.query(MessageView)) == len(expected))  # the chat reopened
        assert again.chat_id == chat_id
        assert [(m.role, m.content) for m in again.store.messages(chat_id)] == expected
        assert [v.role for v in again.query(MessageView)] == ["user", "assistant"]


async def test_capacity_change_from_palette_reaches_engine(make_app):
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: palette_open(app))
        for ch in "Capacity: 50%":
            await pilot.press(ch if ch != " " else "space")
        await wait_until(pilot, lambda: palette_offers(app, "Capacity: 50%"))
        await pilot.press("enter")
        # Snapshots are built by the engine itself (in the inference process): they show what it runs with.
        await wait_until(pilot, lambda: app.last_snapshot.capacity == 4)
        app.run_command("/capacity 2")
        await wait_until(pilot, lambda: app.last_snapshot.capacity == 2)
        app.run_command("/policy lfu")
        await wait_until(pilot, lambda: app.last_snapshot.policy == "lfu")
        assert "exact · lfu · 2/8" in app.sub_title


async def test_small_terminal_and_theme_switch(make_app, tmp_path):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/theme moe-colorblind")
        config = tmp_path / "config.toml"
        await wait_until(pilot, lambda: app.theme == "moe-colorblind" and config.exists()
                         and "moe-colorblind" in config.read_text())
        assert app.theme == "moe-colorblind"
        assert "moe-colorblind" in (tmp_path / "config.toml").read_text()
        await pilot.press("f2")
        assert app.query_one("#side").has_class("hidden")
    _ = asyncio  # pilot tests run on pytest-asyncio's loop


async def test_add_attaches_file_with_token_count(make_app, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "util.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.chdir(project)
    app = make_app(max_tokens=4)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/add util.py")
        assert [a.path.name for a in app.attachments] == ["util.py"]
        await wait_until(pilot, lambda: app.attachments[0].tokens > 0)  # counted on the inference thread
        app.run_command("/add missing.py")
        assert len(app.attachments) == 1  # the error is a notice; nothing is lost
        await send(pilot, app, "explain @util.py please")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        user = [m for m in app.store.messages(app.chat_id) if m.role == "user"][-1]
        assert "File `" in user.content and "return 2 * x" in user.content
        assert user.content.count("def twice") == 1  # /add and @ of the same file attach it once
        assert app.store.chat(app.chat_id).title == "explain @util.py please"
        assert app.attachments == []


async def test_file_outside_cwd_needs_confirmation(make_app, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "secret.txt").write_text("outside")
    monkeypatch.chdir(project)
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/add ../secret.txt")
        await wait_until(pilot, lambda: dialog_open(app))
        await pilot.press("n")
        await wait_until(pilot, lambda: dialog_closed(app))
        # No observable sign of a "no" (it attaches nothing, says nothing): the answer's callback, queued
        # on the app as the dialog closed, runs during this pause (it waits for pending messages).
        await pilot.pause()
        assert app.attachments == []
        app.run_command("/add ../secret.txt")
        await wait_until(pilot, lambda: dialog_open(app))
        await pilot.press("y")
        await wait_until(pilot, lambda: len(app.attachments) == 1)


async def test_save_code_block_asks_before_overwriting(make_app, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.store.add_message(app.chat_id, "user", "two functions")
        reply = "First:\n```python\ndef a():\n    return 1\n```\nThen:\n```python\ndef b():\n    return 2\n```"
        app.store.add_message(app.chat_id, "assistant", reply)
        app.run_command("/save 2 out/b.py")
        await wait_until(pilot, lambda: notified(app, "saved code block 2"))
        assert (project / "out" / "b.py").read_text() == "def b():\n    return 2\n"
        app.run_command("/save 1 out/b.py")  # exists: a diff and a question
        await wait_until(pilot, lambda: dialog_open(app))
        assert isinstance(app.screen, ConfirmScreen)
        assert "-    return 2" in app.screen.diff and "+    return 1" in app.screen.diff
        await pilot.press("n")
        await wait_until(pilot, lambda: dialog_closed(app) and notified(app, "not saved"))
        assert "return 2" in (project / "out" / "b.py").read_text()
        app.run_command("/save 1 out/b.py")
        await wait_until(pilot, lambda: dialog_open(app))
        await pilot.press("y")
        await wait_until(pilot, lambda: dialog_closed(app) and notified(app, "saved code block 1"))
        assert (project / "out" / "b.py").read_text() == "def a():\n    return 1\n"
        app.run_command("/save 3 out/c.py")
        assert not (project / "out" / "c.py").exists()
        app.run_command("/copy 2")
        assert app.clipboard == "def b():\n    return 2"
        assert (tmp_path / "data" / "clipboard.txt").read_text() == "def b():\n    return 2"


async def test_full_context_drops_oldest_turns_with_notice(make_app):
    # Reaches into the session's engine; a 200-token window leaves no room for the built-in coding prompt.
    app = make_app(inference_process=False, max_tokens=50, coding_prompt=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.backend.session.engine.config["max_position_embeddings"] = 200
        for i in range(6):
            app.store.add_message(app.chat_id, "user", f"question {i} " + "word " * 30)
            app.store.add_message(app.chat_id, "assistant", "answer " * 30)
        await send(pilot, app, "last")
        await wait_until(pilot, lambda: any("dropped" in text for text in notification_texts(app)))
        await wait_until(pilot, lambda: finished(replies(app)[-1]))
        assert 0 < app.last_done.prompt_tokens <= 150


async def test_a_message_too_long_for_the_context_says_why_in_the_chat(make_app):
    """The reply showed '(failed)' alone; the numbers were in a toast that went after 4 s."""
    from moe_tui.app.widgets.chat import MessageView

    app = make_app(inference_process=False, max_tokens=50, coding_prompt=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.backend.session.engine.config["max_position_embeddings"] = 200
        await send(pilot, app, "word " * 400)
        await wait_until(pilot, lambda: any("even without older turns" in v.text for v in app.query(MessageView)
                                            if v.has_class("notice")), timeout=20)
        assert replies(app)[-1].status == "failed"


async def test_keymap_from_settings_and_palette_prefill(make_app):
    app = make_app(keymap={"app.new_chat": "ctrl+b"})
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        first = app.chat_id
        await pilot.press("ctrl+b")
        await wait_until(pilot, lambda: app.chat_id != first)
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: palette_open(app))
        for ch in "/rename":
            await pilot.press(ch)
        await wait_until(pilot, lambda: palette_offers(app, "Rename this chat…"))
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.query_one(PromptInput).text == "/rename ")
        await pilot.press(*"sorting", "enter")
        await wait_until(pilot, lambda: app.store.chat(app.chat_id).title == "sorting")


async def test_belady_optimum_is_shown_after_a_reply(make_app):
    app = make_app(max_tokens=8)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        await wait_until(pilot, lambda: app.last_optimum is not None)  # replayed while idle
        assert {"lru", "lfu", "decay", "belady"} <= set(app.last_optimum)  # and any other policy the engine has
        assert 0 <= app.last_optimum["belady"] <= 1
        await wait_until(pilot, lambda: any("Belady" in line.plain for line in app.query_one("#hits").lines))
        assert any("Belady" in line.plain for line in app.query_one("#hits").lines)


async def test_inference_runs_in_its_own_process_and_its_death_is_reported(make_app):
    import os

    from moe_tui.app.worker import INFERENCE_NICE, InferenceProcess

    app = make_app(max_tokens=400)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        assert isinstance(app.backend, InferenceProcess) and app.backend.process.pid != os.getpid()
        if hasattr(os, "getpriority"):  # it yields the CPU to the UI: keys typed mid-reply do not wait behind it
            ours = os.getpriority(os.PRIO_PROCESS, 0)
            assert os.getpriority(os.PRIO_PROCESS, app.backend.process.pid) == min(ours + INFERENCE_NICE, 19)
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: app.reply_text)
        app.backend.process.kill()  # e.g. the OOM killer, mid-reply
        await wait_until(pilot, lambda: not app.generating)
        assert app.sub_title == "inference stopped"
        assert any("engine stopped" in v.text for v in app.query(MessageView) if v.role == "notice")
        reply = replies(app)[-1]
        assert reply.status == "failed" and reply.content  # the partial reply is kept, marked failed
        assert "inference.log" in next(v.text for v in app.query(MessageView) if "engine stopped" in v.text)


async def test_a_model_that_fails_to_load_is_reported_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    app = watched(MoeApp(EngineSpec(model=str(tmp_path / "missing")), Settings(data_dir=str(tmp_path / "data"))))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.sub_title == "model failed to load")
        # "Once": nothing more about the failure may follow. A round trip through the inference process (a
        # token count, which the failed session refuses at once) comes back through the same pipe after
        # everything the process sent before it; its reader posts those to the app before the answer.
        answered = app.backend.count_tokens("x")
        await wait_until(pilot, answered.done)
        await pilot.pause()  # what the reader posted before the answer is handled
        notices = [v.text for v in app.query(MessageView) if v.role == "notice"]
        assert len(notices) == 1 and "missing" in notices[0]
        assert "did not load" in app.query_one(HeatmapView).placeholder  # not "loading the model..." for good
    assert (tmp_path / "data" / "inference.log").exists()  # the child's output went there, not to the screen


async def test_startup_objects_are_kept_out_of_the_cycle_collector(make_app):
    gc.unfreeze()
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await wait_until(pilot, lambda: gc.get_freeze_count() > 0, timeout=5)
        # The screen built at startup is among them: full collections no longer walk it.
        assert gc.get_freeze_count() > 10_000


def stored_chat(tmp_path, texts: list[str]) -> None:
    """A chat already in the app's data dir: user and assistant taking turns."""
    from moe_tui.app.store import ChatStore

    (tmp_path / "data").mkdir()
    store = ChatStore(tmp_path / "data" / "chats.sqlite3")
    chat = store.create_chat()
    for i, text in enumerate(texts):
        store.add_message(chat.id, "user" if i % 2 == 0 else "assistant", text)
    store.close()


async def test_a_long_chat_keeps_only_its_newest_messages_on_screen(make_app, tmp_path):
    from moe_tui.app.main import MESSAGE_WINDOW
    from moe_tui.app.widgets.chat import EarlierMessages

    stored_chat(tmp_path, [f"message {i}" for i in range(100)])
    app = make_app(max_tokens=8)
    async with app.run_test(size=(120, 40)) as pilot:
        def shown():
            return [v.text for v in app.query("#messages > MessageView")]

        earlier = app.query_one(EarlierMessages)
        await wait_until(pilot, lambda: len(shown()) == MESSAGE_WINDOW)
        assert shown()[-1] == "message 99" and earlier.display and earlier.hidden == 100 - MESSAGE_WINDOW
        app.query_one("#messages").scroll_home(animate=False)  # the reader scrolls up to the button
        await pilot.pause()
        await pilot.click(EarlierMessages)
        await wait_until(pilot, lambda: len(shown()) == MESSAGE_WINDOW * 3 // 2)
        assert shown()[0] == f"message {100 - MESSAGE_WINDOW * 3 // 2}"
        assert earlier.hidden == 100 - MESSAGE_WINDOW * 3 // 2 and "earlier messages" in str(earlier.label)
        app.run_command("/earlier")  # the same from the prompt (and the palette)
        await wait_until(pilot, lambda: len(shown()) == MESSAGE_WINDOW * 2)
        # Back at the bottom, the next message unmounts the oldest ones again (they stay stored).
        from moe_tui.app.main import _at_bottom

        box = app.query_one("#messages")
        # /earlier keeps the reader's place: the last row it revealed is at the top, what they read below.
        revealed = next(v for v in app.query("#messages > MessageView") if v.text == "message 39")
        await wait_until(pilot, lambda: abs(box.scroll_y - revealed.virtual_region.y) <= 1)
        box.scroll_end(animate=False)
        await wait_until(pilot, lambda: _at_bottom(box) and app.last_snapshot is not None)
        await send(pilot, app, "hi")
        await wait_until(pilot, lambda: reply_shown(app) and finished(replies(app)[-1]))
        assert len(shown()) == MESSAGE_WINDOW + 2 and shown()[-2] == "hi"
        assert earlier.hidden == 100 - MESSAGE_WINDOW and len(app.store.messages(app.chat_id)) == 102


async def test_the_chat_follows_a_reply_only_while_the_reader_is_at_the_bottom(make_app, tmp_path):
    stored_chat(tmp_path, [f"message {i}\n\nmore of it" for i in range(30)])
    app = make_app(max_tokens=1000)  # long enough to grow past its first page
    async with app.run_test(size=(120, 40)) as pilot:
        box = app.query_one("#messages")
        await wait_until(pilot, lambda: app.last_snapshot is not None and box.max_scroll_y > 0)
        await send(pilot, app, "hi")
        await wait_until(pilot, lambda: reply_shown(app) and finished(replies(app)[-1]))
        await pilot.pause()
        assert box.scroll_y == box.max_scroll_y  # the end of the reply in view, as it ended
        assert app.query(MessageView).last().size.height > HEIGHT_STEP  # it did grow while streaming
        await send(pilot, app, "again")
        await pilot.pause()
        await pilot.pause()
        box.scroll_to(y=5, animate=False, immediate=True)  # the reader scrolls up to read something
        await wait_until(pilot, lambda: reply_shown(app) and finished(replies(app)[-1]))
        await pilot.pause()
        assert box.scroll_y == 5 < box.max_scroll_y  # the reply's growth and its final render left them there


async def test_full_collections_wait_while_a_reply_streams(make_app):
    default = gc.get_threshold()
    app = make_app(max_tokens=400)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "hi")
        assert app.generating and gc.get_threshold()[2] > 1_000_000
        await wait_until(pilot, lambda: not app.generating and finished(replies(app)[-1]))
        assert gc.get_threshold() == default
        collections = gc.get_stats()[2]["collections"]
        await wait_until(pilot, lambda: gc.get_stats()[2]["collections"] > collections, timeout=5)  # when idle
    assert gc.get_threshold() == default


async def test_a_finished_reply_is_rendered_off_the_ui_thread(make_app, monkeypatch):
    calls = []
    prerender = MessageView.prerender

    def recording(view, *args):
        calls.append((view.role, threading.current_thread() is threading.main_thread()))
        prerender(view, *args)

    monkeypatch.setattr(MessageView, "prerender", recording)
    app = make_app(max_tokens=40)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        calls.clear()
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: reply_shown(app) and finished(replies(app)[-1]))
        await pilot.pause()
        view = app.query(MessageView).last()
        assert view.role == "assistant" and view.text == replies(app)[-1].content
        # Rendered once, on the worker thread, for the width it is shown at (the user's message: on the UI).
        assert [call for call in calls if call[0] == "assistant"] == [("assistant", False)]


async def test_edit_last_works_from_the_prompt_and_deletes_nothing_until_sent(make_app):
    app = make_app(max_tokens=6, inference_process=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "import os")
        await wait_until(pilot, lambda: replies(app) and reply_shown(app))
        before = [(m.role, m.content) for m in app.store.messages(app.chat_id)]
        app.query_one(PromptInput).focus()
        await pilot.press("ctrl+e")  # from the prompt, where the text area binds ctrl+e itself
        await wait_until(pilot, lambda: app.query_one(PromptInput).text == "import os")
        assert [(m.role, m.content) for m in app.store.messages(app.chat_id)] == before  # nothing deleted yet
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.query_one(PromptInput).text == "")
        assert [(m.role, m.content) for m in app.store.messages(app.chat_id)] == before
        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: app.query_one(PromptInput).text == "import os")
        app.query_one(PromptInput).text = "import sys"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(replies(app)) == 1 and finished(replies(app)[0])
                         and reply_shown(app))
        users = [m.content for m in app.store.messages(app.chat_id) if m.role == "user"]
        assert users == ["import sys"]


async def test_a_reply_cut_by_max_tokens_is_marked(make_app):
    app = make_app(max_tokens=5, inference_process=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: replies(app) and replies(app)[-1].status == "truncated" and reply_shown(app))
        view = app.query(MessageView).last()
        assert view.role == "assistant"
        assert any("max_tokens" in view.render_line(y).text for y in range(view.content_size.height))


async def test_destructive_commands_ask_first_and_default_to_no(make_app):
    app = make_app(max_tokens=4, inference_process=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "import os")
        await wait_until(pilot, lambda: replies(app) and reply_shown(app))
        chat, before = app.chat_id, len(app.store.messages(app.chat_id))
        for command in ("/clear", "/delete"):
            app.run_command(command)
            await wait_until(pilot, lambda: dialog_open(app))
            await pilot.press("enter")  # the default answer: No
            await wait_until(pilot, lambda: notified(app, "nothing deleted") and dialog_closed(app))
            assert app.chat_id == chat and len(app.store.messages(chat)) == before
        app.run_command("/system You write Python.")
        app.run_command("/system")
        await wait_until(pilot, lambda: notified(app, "You write Python."))
        app.run_command("/system --clear")
        await wait_until(pilot, lambda: dialog_open(app))
        await pilot.press("y")
        await wait_until(pilot, lambda: app.store.chat(chat).system_prompt == "")
        app.run_command("/clear")
        await wait_until(pilot, lambda: dialog_open(app))
        await pilot.press("y")
        await wait_until(pilot, lambda: app.store.messages(chat) == [])


async def test_page_up_and_down_scroll_the_chat_from_the_prompt(make_app):
    app = make_app(inference_process=False)
    async with app.run_test(size=(100, 24)) as pilot:
        for i in range(12):
            app.store.add_message(app.chat_id, "user", f"question {i}\n\nwith a second paragraph")
        app.open_chat(app.chat_id)
        box = app.query_one("#messages")
        await wait_until(pilot, lambda: box.max_scroll_y > 0 and box.scroll_y == box.max_scroll_y)
        app.query_one(PromptInput).focus()
        bottom = box.scroll_y
        await pilot.press("pageup")
        await wait_until(pilot, lambda: box.scroll_y < bottom)
        assert app.focused is app.query_one(PromptInput)
        await pilot.press("pagedown")
        await wait_until(pilot, lambda: box.scroll_y == bottom)
