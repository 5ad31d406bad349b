"""The Textual internals app/textual_compat.py relies on still exist and behave as it assumes."""

from __future__ import annotations

import inspect

from moe_tui.app.textual_compat import OnePassResize, layout_passes, notification_texts
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.widget import Widget
from textual.widgets import Static


def test_size_updated_still_takes_a_layout_flag():
    assert "layout" in inspect.signature(Widget._size_updated).parameters


class Host(App):
    def compose(self) -> ComposeResult:
        class Box(OnePassResize, VerticalScroll):
            pass

        with Box():
            yield Static("row")


async def test_layout_passes_are_counted_and_notifications_read():
    app = Host()
    async with app.run_test(size=(40, 10)) as pilot:
        with layout_passes(app.screen) as passes:
            app.query_one(Static).update("\n".join(["row"] * 30))
            await pilot.pause()
            await pilot.pause()
        assert len(passes) >= 1
        app.notify("hello there")
        await pilot.pause()
        assert notification_texts(app) == ["hello there"]
