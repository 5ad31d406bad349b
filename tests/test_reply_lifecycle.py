"""Changing chats while a reply streams: the reply is cancelled (or, for a chat that is cleared or deleted,
dropped) cleanly, and the app keeps working."""

from __future__ import annotations

import time

import pytest

from tests.helpers import dialog_open, finished, replies, reply_shown, send, wait_until


async def start_long_reply(pilot, app) -> int:
    await wait_until(pilot, lambda: app.last_snapshot is not None)
    await send(pilot, app, "for i in range(10):")
    await wait_until(pilot, lambda: app.reply_text != "")
    return app.chat_id


def demo_app(tmp_path, monkeypatch):
    """The demo model: its replies stream for seconds. (The tests' tiny random model could end a reply before
    the test acted mid-reply: full-suite runs timed out waiting for its text.)"""
    from moe_tui.app.main import MoeApp
    from moe_tui.app.settings import Settings
    from moe_tui.app.worker import EngineSpec
    from moe_tui.inference import Engine
    from moe_tui.inference.demo_paths import DEMO_CAPACITY, DEMO_MODEL

    from tests.helpers import watched

    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    # Paced: on a fast machine the demo's whole reply could end before the test acted mid-reply, and the wait for
    # its streaming text timed out.
    stream = Engine.stream

    def paced(self, *args, **kwargs):
        for event in stream(self, *args, **kwargs):
            time.sleep(0.02)
            yield event

    monkeypatch.setattr(Engine, "stream", paced)
    return watched(MoeApp(EngineSpec(model=str(DEMO_MODEL), capacity=DEMO_CAPACITY),
                          Settings(data_dir=str(tmp_path / "data"), max_tokens=4000, inference_process=False)))


@pytest.mark.parametrize("action", ["/clear", "/delete", "/new", "switch-and-back", "ctrl+n"])
async def test_changing_chats_mid_reply_ends_it_cleanly(tmp_path, monkeypatch, action):
    app = demo_app(tmp_path, monkeypatch)
    async with app.run_test(size=(120, 40)) as pilot:
        other = app.store.create_chat(title="other").id
        streaming = await start_long_reply(pilot, app)
        if action == "switch-and-back":
            app.run_command(f"/switch {other}")
            await wait_until(pilot, lambda: not app.generating)  # the reply ends while the other chat is shown
            app.run_command(f"/switch {streaming}")
        elif action == "ctrl+n":
            await pilot.press("ctrl+n")
        else:
            app.run_command(action)
            if action in ("/clear", "/delete"):  # destructive: asked first (the reply streams meanwhile)
                await wait_until(pilot, lambda: dialog_open(app))
                await pilot.press("y")
        # The old reply's end has been handled; its chunks came before it (one worker posts them in order).
        await wait_until(pilot, lambda: not app.generating)
        stored = {c.id for c in app.store.chats()}
        if action in ("/clear", "/delete"):
            assert streaming not in stored or not app.store.messages(streaming)
        else:
            old = [m for m in app.store.messages(streaming) if m.role == "assistant"]
            assert len(old) == 1 and old[0].status == "cancelled" and old[0].content
        app.settings.max_tokens = 6
        await send(pilot, app, "import os")
        await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]) and reply_shown(app))
        assert app.is_running
