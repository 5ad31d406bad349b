"""The heatmap renderer is a pure function of a snapshot: binning, marks, legend, glyph fallback.
The widget draws it on the theme's background."""

from __future__ import annotations

import numpy as np
from moe_tui.app import heatmap as hm
from moe_tui.inference.telemetry import CacheSnapshot, MemorySample
from rich.color import Color


def snapshot(layers=3, experts=8, **arrays) -> CacheSnapshot:
    zeros = np.zeros((layers, experts))
    base = dict(resident=zeros.astype(bool), pinned=zeros.astype(bool), just_missed=zeros.astype(bool),
                requests=zeros.astype(int), hits=zeros.astype(int), misses=zeros.astype(int),
                fallbacks=zeros.astype(int), loads=zeros.astype(int), evictions=zeros.astype(int), recent=zeros)
    base.update(arrays)
    return CacheSnapshot.build(
        model="m", mode="exact", policy="lru", capacity=4, num_experts=experts, top_k=2,
        layer_ids=tuple(range(1, layers + 1)), bytes_read=0, load_seconds=0.0,
        memory=MemorySample(1, 1, 1, 0, 1, 2, 1, 1), decode_tps=0.0, prefill_tps=0.0, ttft_s=0.0,
        tokens_generated=0, steps=0, trace_length=0, **base)


def text(line) -> str:
    return "".join(seg.text for seg in line)


def test_one_column_per_expert_with_marks_and_hit_rate():
    resident = np.zeros((3, 8), bool)
    resident[0, [1, 2]] = True
    pinned = np.zeros((3, 8), bool)
    pinned[0, 2] = True
    missed = np.zeros((3, 8), bool)
    missed[0, 5] = True
    hits = np.zeros((3, 8), int)
    misses = np.zeros((3, 8), int)
    hits[0, 1], misses[0, 5] = 3, 1
    snap = snapshot(resident=resident, pinned=pinned, just_missed=missed, hits=hits, misses=misses)
    lines = hm.render(snap, hm.View(width=40, widen=False))
    assert len(lines) == 3
    row = text(lines[0])
    assert row.startswith("L1 ")
    cells = row[hm.LABEL_WIDTH : hm.LABEL_WIDTH + 8]
    assert cells == " •◆  ×  "
    assert row.endswith(" 75%")  # 3 hits, 1 miss


def test_wide_models_are_binned_to_fit():
    experts = 512
    recent = np.zeros((2, experts))
    recent[0, 500] = 10.0
    snap = snapshot(layers=2, experts=experts, recent=recent)
    view = hm.View(width=74)
    per, cols = hm.columns_for(experts, view, hm.HeatmapStyle())
    assert cols <= 74 - hm.LABEL_WIDTH - hm.RATE_WIDTH and per * cols >= experts
    cells = hm.binned(snap, view, hm.HeatmapStyle())
    assert cells["heat"].shape == (2, cols)
    assert cells["heat"][0, 500 // per] == 1.0 and cells["heat"].sum() == 1.0
    assert all(len(text(line)) <= 74 for line in hm.render(snap, view))


def test_zoom_and_scroll_select_a_range():
    snap = snapshot(layers=1, experts=512)
    view = hm.View(width=40, first_expert=256, experts_per_column=2)
    per, cols = hm.columns_for(512, view, hm.HeatmapStyle())
    assert per == 2 and cols == 40 - hm.LABEL_WIDTH - hm.RATE_WIDTH
    assert "experts 260-261" in hm.describe(snap, view, hm.HeatmapStyle(), 0, 2)


def test_half_blocks_draw_two_layers_per_row():
    snap = snapshot(layers=5)
    lines = hm.render(snap, hm.View(width=40, half_blocks=True, widen=False))
    assert len(lines) == 3
    assert set(text(lines[0])[hm.LABEL_WIDTH : hm.LABEL_WIDTH + 8]) == {"▀"}


def test_ascii_fallback_uses_plain_glyphs_and_no_colour():
    resident = np.zeros((1, 4), bool)
    resident[0, 0] = True
    recent = np.array([[4.0, 0.0, 2.0, 0.0]])
    snap = snapshot(layers=1, experts=4, resident=resident, recent=recent)
    style = hm.HeatmapStyle(unicode=False)
    line = hm.render(snap, hm.View(width=40, widen=False), style)[0]
    cells = text(line)[hm.LABEL_WIDTH : hm.LABEL_WIDTH + 8]
    assert cells == "@o  =   "
    assert all(ord(c) < 128 for c in text(line))
    assert all(seg.style is None or seg.style.color is None and seg.style.bgcolor is None for seg in line)
    assert all(ord(c) < 128 for c in text(hm.legend(style)))


def test_cursor_is_a_frame_not_a_colour_and_its_row_is_marked():
    requests = np.zeros((3, 8), int)
    requests[1, 3] = 7
    snap = snapshot(requests=requests)
    view = hm.View(width=40, cursor=(1, 3))  # 8 experts in 30 columns: 3 cells each
    assert hm.cell_width(8, view, hm.HeatmapStyle()) == 3
    plain = hm.render(snap, hm.View(width=40))[1]
    line = hm.render(snap, view)[1]
    assert text(line).startswith("▸2 ")
    cell = line[1 + 3]
    assert cell.text == "▕ ▏"
    assert cell.style == plain[1 + 3].style  # the same colour as without the cursor: a frame, not a highlight
    assert not cell.style.reverse


def test_narrow_cells_underline_the_cursor_and_keep_its_colour():
    snap = snapshot()
    cell = hm.render(snap, hm.View(width=40, cursor=(1, 3), widen=False))[1][1 + 3]
    assert cell.style.underline and not cell.style.reverse
    assert cell.style.bgcolor == hm.render(snap, hm.View(width=40, widen=False))[1][1 + 3].style.bgcolor


def test_cell_details_name_the_same_fields_for_every_cell():
    requests = np.zeros((3, 8), int)
    requests[1, 3] = 7
    loads = np.zeros((3, 8), int)
    loads[1, 3] = 2
    resident = np.zeros((3, 8), bool)
    resident[1, 3] = True
    snap = snapshot(requests=requests, loads=loads, resident=resident)
    last = np.full((3, 8), -1)
    last[1, 3] = 12
    one = hm.describe(snap, hm.View(width=40), hm.HeatmapStyle(), 1, 3, last)
    assert one == ("layer 2 expert 3: routings 7, hits 0, misses 0, loads 2, evictions 0, resident yes, pinned no, "
                   "last used step 12 of 0")
    group = hm.describe(snap, hm.View(width=40, experts_per_column=4), hm.HeatmapStyle(), 1, 0, last)
    fields = [part.split(" ")[0] for part in group.split(": ", 1)[1].split(", ")]
    assert fields == ["routings", "hits", "misses", "loads", "evictions", "resident", "pinned", "last"]
    assert "resident 1/4" in group and "last used step 12" in group
    assert "last used never" in hm.describe(snap, hm.View(width=40), hm.HeatmapStyle(), 0, 0, last)


def test_few_experts_get_wide_cells_and_an_expert_axis():
    snap = snapshot(layers=2, experts=16)
    view = hm.View(width=90)
    width = hm.cell_width(16, view, hm.HeatmapStyle())
    assert width == (90 - hm.LABEL_WIDTH - hm.RATE_WIDTH) // 16 == 5  # not 16 columns in a 90-column box
    rows = hm.render(snap, view)
    assert text(rows[0])[hm.LABEL_WIDTH + 16 * width:] == "  0%"  # the cells fill the row up to the hit rate
    assert hm.row_width(16, view, hm.HeatmapStyle()) == hm.LABEL_WIDTH + 16 * width + hm.RATE_WIDTH
    axis = text(hm.axis(snap, view))
    assert axis.startswith("#")
    assert axis[hm.LABEL_WIDTH:].split() == [str(e) for e in range(16)]
    assert axis.index(" 15") + 1 == hm.LABEL_WIDTH + 15 * width  # each number over its column
    panned = text(hm.axis(snapshot(layers=1, experts=512), hm.View(width=60, first_expert=256, experts_per_column=2)))
    assert panned[hm.LABEL_WIDTH:].split()[0] == "256"  # after panning the axis says which experts are shown


def test_legend_wraps_instead_of_being_cut():
    rows = hm.legend_lines(hm.HeatmapStyle(), 30)
    assert len(rows) > 1 and all(sum(len(seg.text) for seg in row) <= 30 for row in rows)
    joined = " ".join(text(row) for row in rows)
    for entry in ("• cached", "◆ pinned", "× missed", "% = layer hit rate"):
        assert entry in joined


def test_dense_model_message():
    snap = snapshot(layers=0, experts=0)
    assert "dense" in text(hm.render(snap, hm.View(width=40))[0])


def test_gradient_endpoints():
    stops = ("#000000", "#ffffff")
    assert hm.gradient_color(stops, 0.0).get_truecolor() == (0, 0, 0)
    assert hm.gradient_color(stops, 1.0).get_truecolor() == (255, 255, 255)
    assert abs(hm.gradient_color(stops, 0.5).get_truecolor().red - 127.5) <= 255 / hm.LEVELS / 2 + 1  # a step away


async def test_the_widget_draws_on_the_theme_background():
    from moe_tui.app.widgets.heatmap import HeatmapView
    from textual.app import App

    class Host(App):
        def compose(self):
            yield HeatmapView()

    app = Host()
    async with app.run_test(size=(60, 12)) as pilot:
        app.theme = "textual-light"
        view = app.query_one(HeatmapView)
        view.snapshot = snapshot()
        await pilot.pause()
        background = view.rich_style.bgcolor
        assert background is not None
        row = view.render_line(2)  # "L2" (under the axis and the cursor row), the cells, the rate, the rest
        assert row.cell_length == view.size.width
        label = next(segment for segment in row if segment.text.strip().startswith("L"))
        assert label.style.bgcolor == background


def test_marks_stand_out_on_light_and_dark_cells():
    light = hm.HeatmapStyle(gradient=("#f7fbff", "#08306b"))  # the pale end of a light theme's blues
    snap = snapshot(layers=1, experts=2, recent=np.array([[0.0, 1.0]]), resident=np.array([[True, True]]))
    row = hm.render(snap, hm.View(width=40), light)[0]
    pale, dark = [segment for segment in row if segment.text.strip() == "•"]
    assert pale.style.color.get_truecolor() == (0, 0, 0) and dark.style.color.get_truecolor() == (255, 255, 255)
    assert hm.mark_color_on(Color.parse("#e0b000")) == "#000000"  # the dark theme's yellow: black marks


def test_layer_hit_rates_match_each_layers_own():
    hits = np.array([[3, 1, 0, 0], [0, 0, 0, 0], [5, 0, 0, 2]])
    misses = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    snap = snapshot(layers=3, experts=4, hits=hits, misses=misses)
    assert snap.layer_hit_rates == [snap.layer(i).hit_rate for i in range(3)] == [4 / 6, 0.0, 1.0]
