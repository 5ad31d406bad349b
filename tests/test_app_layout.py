"""The app at small sizes and in terminals with few colours or no Unicode: nothing clipped, nothing invisible."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from moe_tui.app.messages import SnapshotReady
from moe_tui.app.widgets.chat import PromptInput
from moe_tui.app.widgets.gauges import Readout
from moe_tui.app.widgets.heatmap import HeatmapView
from moe_tui.inference.telemetry import IOStats
from rich.color import ColorSystem

from tests.helpers import fixed_snapshot, notified, screen_rows, wait_until


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
    async with app.run_test(size=(80, 150)) as pilot:  # 80 wide; tall enough that the panel does not scroll
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        side = app.query_one("#side")
        await pilot.pause()
        text = "\n".join(row[side.region.x:] for row in screen_rows(app))
        for shown in ("high", "• cached", "◆ pinned", "× missed", "layer hit rate", "max 42.5", "knowing the future",
                      "ms/token", "tok/s", "KiB/token"):
            assert shown in text, shown
        assert "…" not in text


def contrast(one, two) -> float:
    """WCAG contrast ratio of two Rich colours."""

    def luminance(color) -> float:
        def linear(v: int) -> float:
            c = v / 255
            return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

        r, g, b = color.get_truecolor()
        return 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)

    high, low = sorted((luminance(one), luminance(two)), reverse=True)
    return (high + 0.05) / (low + 0.05)


@pytest.mark.parametrize("theme", ["moe-dark", "moe-light", "moe-colorblind"])
async def test_the_divider_and_the_unfocused_prompt_border_survive_256_and_16_colours(fake_app, theme):
    """tmux with TERM=screen-256color and no COLORTERM gets 256 colours: Rich rounds each colour to that
    palette (bluish dark greys became colour 17 or black, on black)."""
    app = fake_app(theme=theme)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None and app.theme == theme)
        app.query_one(HeatmapView).focus()  # the prompt unfocused
        await pilot.pause()
        side, prompt = app.query_one("#side"), app.query_one(PromptInput)
        pairs = {
            "divider": (side.styles.border_left[1], side.background_colors[0]),
            "prompt border": (prompt.styles.border_left[1], prompt.background_colors[0]),
        }
        for name, (line, under) in pairs.items():
            line = line.blend(under, 0) if line.a < 1 else line  # noqa: PLW2901
            line, under = line.rich_color, under.rich_color
            for system in (ColorSystem.EIGHT_BIT, ColorSystem.STANDARD):
                shown, behind = line.downgrade(system), under.downgrade(system)
                assert shown.number != behind.number, (name, system)
            assert contrast(line.downgrade(ColorSystem.EIGHT_BIT), under.downgrade(ColorSystem.EIGHT_BIT)) >= 1.6, name
            assert contrast(line, under) >= 1.6, name  # and in truecolor


@pytest.mark.parametrize("size", [(120, 40), (80, 24), (70, 24)])
async def test_ascii_glyphs_put_nothing_but_ascii_on_the_screen(fake_app, size):
    app = fake_app(glyphs="ascii")
    chat = app.store.create_chat(title="glyphs")
    app.store.add_message(chat.id, "user", "Lists — and “quotes”… café")
    app.store.add_message(chat.id, "assistant", "# Title\n\n- one\n- two\n\n> quoted\n\n---\n\n| a | b |\n|---|---|\n"
                          "| 1 | 2 |\n\n```python\nprint('→ ✓')\n```\n" + "more\n\n" * 30 + "café — “end”…")
    async with app.run_test(size=size) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        app.notice("a toast · with a middle dot")
        await pilot.pause(0.3)
        rows = screen_rows(app)
        bad = {(y, char) for y, row in enumerate(rows) for char in row if not char.isascii()}
        assert not bad, bad
        assert 'cafe - "end".' in "\n".join(rows)  # the chat's text is on screen, as ASCII


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 60)])
async def test_the_dashboard_keeps_its_height_while_its_numbers_grow(fake_app, size):
    """A box that grows a row lays out the whole screen again (18-50 ms at 120x40, while a key typed meanwhile
    waits): from a fresh engine's first snapshot on, the boxes hold the rows their widest numbers take."""
    app = fake_app()
    async with app.run_test(size=size) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        full = fixed_snapshot()
        zero = np.zeros_like(full.hits)
        fresh = replace(full, requests=zero, hits=zero, misses=zero, loads=zero, evictions=zero, bytes_read=0,
                        load_seconds=0.0, decode_tps=0.0, prefill_tps=0.0, ttft_s=0.0, tokens_generated=0, steps=1,
                        trace_length=1, io=IOStats(guesses=(0,) * full.num_moe_layers,
                                                   guess_hits=(0,) * full.num_moe_layers,
                                                   guess_needed=(0,) * full.num_moe_layers))
        app.post_message(SnapshotReady(fresh, None))
        await pilot.pause(0.2)

        def heights() -> dict:  # the miss curve's text changes with a replay, which runs while idle
            heatmap = app.query_one(HeatmapView)
            return {w.id: w.size.height for w in (*app.query(Readout), heatmap) if w.id != "curve-text"} | {
                "heatmap virtual size": heatmap.virtual_size}  # a change of it is a layout pass too

        before = heights()
        grown = replace(full, requests=full.requests * 997, hits=full.hits * 997, misses=full.misses * 991,
                        loads=full.loads * 991, evictions=full.evictions * 991, bytes_read=37 << 30,
                        load_seconds=1234.5, decode_tps=123.4, prefill_tps=4567.8, ttft_s=12.3,
                        tokens_generated=123_456, steps=234_567, trace_length=234_567,
                        capacities=(4,) + (full.num_experts,) * (full.num_moe_layers - 1),  # the budget moved slots
                        io=replace(full.io, decode_steps=123_456, decode_stall_seconds=987.6, decode_bytes=3 << 40,
                                   prefetches=98_765, prefetch_hits=76_543, prefetch_wasted=12_345, prefetch=False,
                                   uncached_reads=True))
        app.post_message(SnapshotReady(grown, {"lru": 0.612, "belady": 0.781}))
        await pilot.pause(0.2)
        assert heights() == before


async def test_the_keys_panel_does_not_cover_the_chat(fake_app):
    """F1's panel took the right third, and the chat and the cache panel kept their widths beneath it: the
    chat's lines were cut at its edge."""
    from textual.widgets import HelpPanel

    app = fake_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await pilot.press("f1")
        await wait_until(pilot, lambda: bool(app.screen.query(HelpPanel))
                         and app.query_one("#main").has_class("narrow"))
        await pilot.pause()
        panel = app.screen.query_one(HelpPanel)
        assert app.query_one("#chat").region.right <= panel.region.x
        await pilot.press("f1")
        await wait_until(pilot, lambda: not app.screen.query(HelpPanel))
        await wait_until(pilot, lambda: not app.query_one("#main").has_class("narrow"))
        assert app.query_one("#side").region.width > 0


async def test_panning_and_zooming_the_heatmap_keep_it_full(fake_app):
    """With all 16 experts in view, ] still scrolled (to '# 8 10 12 14', the right half blank), and zooming out
    after a scroll kept the offset: each - showed fewer experts."""
    app = fake_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        heatmap = app.query_one(HeatmapView)
        heatmap.focus()
        await pilot.press("right_square_bracket")
        assert heatmap.first_expert == 0  # everything is in view: nothing to scroll to
        await pilot.press("plus", "plus", "plus", "right_square_bracket", "right_square_bracket")
        assert heatmap.first_expert > 0
        await pilot.press("minus", "minus", "minus")
        assert heatmap.first_expert == 0  # zoomed out to all of them: the view starts at expert 0 again
