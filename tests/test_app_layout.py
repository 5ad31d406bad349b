"""The app at small sizes and in terminals with few colours or no Unicode: nothing clipped, nothing invisible."""

from __future__ import annotations

from moe_tui.app.widgets.chat import PromptInput
from moe_tui.app.widgets.heatmap import HeatmapView

from tests.helpers import notified, screen_rows, wait_until


async def test_a_narrow_terminal_hides_the_cache_panel_and_f2_shows_it_in_place_of_the_chat(fake_app):
    app = fake_app()
    async with app.run_test(size=(70, 24)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        side, chat = app.query_one("#side"), app.query_one("#chat")
        assert not side.display or side.region.width == 0
        assert chat.region.right <= 70 and chat.region.width >= 60  # the chat has the whole width
        await wait_until(pilot, lambda: notified(app, "F2 shows it"))
        await pilot.press("f2")
        await wait_until(pilot, lambda: side.region.width > 0)
        assert side.region.right <= 70 and chat.region.width == 0
        assert app.focused is app.query_one(HeatmapView)
        await pilot.press("f2")
        await wait_until(pilot, lambda: chat.region.width >= 60)
        assert app.focused is app.query_one(PromptInput)
        await pilot.resize_terminal(120, 40)
        await wait_until(pilot, lambda: side.region.width > 0 and chat.region.width > 0)
        assert side.region.right <= 120


async def test_at_80_columns_the_legend_and_the_decode_line_are_not_cut(fake_app):
    app = fake_app()
    async with app.run_test(size=(80, 50)) as pilot:  # 80 wide; tall enough that the panel does not scroll
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        side = app.query_one("#side")
        await pilot.pause()
        text = "\n".join(row[side.region.x:] for row in screen_rows(app))
        for shown in ("high", "• cached", "◆ pinned", "× missed", "layer hit rate", "max 42.5", "cold start)"):
            assert shown in text, shown
        assert "…" not in text
