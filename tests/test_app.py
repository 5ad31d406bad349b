"""Pilot tests of the app on a tiny model: streaming, cancel, regenerate, persistence, live settings."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.main import MoeApp
from app.settings import Settings
from app.widgets.chat import MessageView, PromptInput
from app.widgets.heatmap import HeatmapView
from app.worker import EngineSpec


@pytest.fixture
def make_app(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    model = str(checkpoint("qwen3_moe"))

    def build(**settings):
        spec = EngineSpec(model=model, capacity=4)
        return MoeApp(spec, Settings(data_dir=str(tmp_path / "data"), refresh_hz=4, **settings))

    return build


async def wait_until(pilot, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


async def send(pilot, app, text: str) -> None:
    app.query_one(PromptInput).text = text
    app.query_one(PromptInput).focus()
    await pilot.press("enter")


def replies(app):
    return [m for m in app.store.messages(app.chat_id) if m.role == "assistant"]


async def test_send_message_streams_a_reply_and_fills_the_heatmap(make_app):
    app = make_app(max_tokens=24)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: replies(app) and replies(app)[-1].status == "complete")
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
        await wait_until(pilot, lambda: not app.generating)
        reply = replies(app)[-1]
        assert reply.status == "cancelled"
        assert len(reply.content) > 0


async def test_regenerate_replaces_the_last_reply(make_app):
    app = make_app(max_tokens=8)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "import os")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        first_id = replies(app)[-1].id
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: replies(app) and replies(app)[-1].id != first_id and not app.generating)
        assert len(replies(app)) == 1 and replies(app)[-1].status == "complete"


async def test_session_survives_restart(make_app):
    app = make_app(max_tokens=8)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "class Cache:")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        chat_id, expected = app.chat_id, [(m.role, m.content) for m in app.store.messages(app.chat_id)]
    again = make_app()
    async with again.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.1)
        assert again.chat_id == chat_id
        assert [(m.role, m.content) for m in again.store.messages(chat_id)] == expected
        assert [v.role for v in again.query(MessageView)] == ["user", "assistant"]


async def test_capacity_change_from_palette_reaches_engine(make_app):
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        for ch in "Capacity: 50%":
            await pilot.press(ch if ch != " " else "space")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.last_snapshot.capacity == 4 and app.worker.engine.capacity == 4)
        app.run_command("/capacity 2")
        await wait_until(pilot, lambda: app.worker.engine.capacity == 2 and app.last_snapshot.capacity == 2)
        app.run_command("/mode fast")
        await wait_until(pilot, lambda: app.worker.engine.mode == "fast")
        app.run_command("/policy lfu")
        await wait_until(pilot, lambda: app.last_snapshot.policy == "lfu")
        assert "fast · lfu · 2/8" in app.sub_title


async def test_small_terminal_and_theme_switch(make_app, tmp_path):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.run_command("/theme moe-colorblind")
        await pilot.pause(0.1)
        assert app.theme == "moe-colorblind"
        assert "moe-colorblind" in (tmp_path / "config.toml").read_text()
        await pilot.press("f2")
        assert app.query_one("#side").has_class("hidden")
    _ = asyncio  # pilot tests run on pytest-asyncio's loop
