"""The cache dashboard: titled boxes that reflow, the I/O numbers, plots, the miss curve and /reset."""

from __future__ import annotations

import dataclasses
import queue

import numpy as np
import pytest
from moe_tui.app import dashboard as text
from moe_tui.inference import Engine
from moe_tui.inference.events import Generate, JobDone, MissCurveDone, MissCurveRequest, SessionReady
from moe_tui.inference.session import OPTIMUM_WINDOW, Session

from tests.helpers import fixed_miss_curve, fixed_snapshot

PROMPT = [{"role": "user", "content": "def add(a, b):"}]


class Recorder:
    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def __call__(self, event) -> None:
        self.events.put(event)

    def until(self, kind, timeout: float = 120.0):
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, kind):
                return event


def test_the_miss_curve_equals_hit_rates_vs_optimum_at_every_capacity(checkpoint):
    sink = Recorder()
    session = Session(lambda: Engine.load(checkpoint("qwen3_moe"), capacity=4), sink, stats_interval=0.1)
    session.start()
    try:
        sink.until(SessionReady)
        session.submit(Generate(PROMPT, max_tokens=12, temperature=0.0))
        sink.until(JobDone)
        experts = session.info.num_experts
        session.miss_curve(MissCurveRequest(tuple(range(1, experts + 1)), last_steps=OPTIMUM_WINDOW))
        curve = sink.until(MissCurveDone)
        assert curve.capacities == tuple(range(1, experts + 1))
        assert {"lru", "lfu", "decay", "belady"} <= set(curve.rates)
        for i, capacity in enumerate(curve.capacities):
            # The session is idle: the engine's trace stands still while the test thread replays it.
            expected = session.engine.hit_rates_vs_optimum(capacity, OPTIMUM_WINDOW)
            for name, rates in curve.rates.items():
                assert rates[i] == expected[name]["hit_rate"], (name, capacity)
        assert curve.rates["belady"][-1] >= curve.rates["belady"][0]
        assert all(b >= p for name in set(curve.rates) - {"belady"}
                   for b, p in zip(curve.rates["belady"], curve.rates[name], strict=True))
    finally:
        session.stop()
        session.join(10)


def test_curve_capacities_cover_every_capacity_of_a_small_model_and_spread_over_a_large_one():
    assert text.curve_capacities(16, 8) == tuple(range(1, 17))
    wide = text.curve_capacities(128, 37)
    assert wide[0] == 1 and wide[-1] == 128 and 37 in wide and len(wide) <= 25


def test_the_io_box_shows_stall_bytes_limit_and_reads_ahead_with_units():
    snap = fixed_snapshot()
    rows = "\n".join(r.plain for r in text.io_rows(snap))
    io = snap.io
    assert f"{io.stall_per_token * 1000:.1f} ms/token" in rows
    assert f"{io.stall_per_token * snap.decode_tps:.0%} of token time" in rows
    assert "160 KiB/token" in rows  # 40 MiB over 256 decode steps
    assert f"{io.io_limit_tps(snap.bytes_read):,.1f} tok/s" in rows and "vs decode 42.5 tok/s" in rows
    assert "used 90 (75%)" in rows and "wasted 24 (20%)" in rows and "pending 6" in rows
    assert f"precision {np.mean(io.prediction_precision):.0%}" in rows


def test_the_hit_rate_box_shows_ready_and_demand_rates_and_explains_belady():
    snap = fixed_snapshot()
    replay = text.Replay({"lru": 0.61, "belady": 0.78}, snap.steps, 300)
    rows = "\n".join(r.plain for r in text.hit_rows(snap, replay))
    assert f"ready    {snap.hit_rate:.1%}" in rows and f"demand   {snap.demand_hit_rate:.1%}" in rows
    assert "Belady   78.0%  vs lru 61.0% on the same replay" in rows
    assert "best any cache could do at this capacity, knowing the future (last 300 steps, empty start)" in rows


def test_the_belady_line_and_the_miss_curve_say_warm_start_where_the_replay_starts_warm():
    from dataclasses import replace

    cold = fixed_snapshot()  # 300 steps traced from an empty cache, all of them replayed
    curve = fixed_miss_curve()
    curve = text.MissCurve(curve.capacities, curve.rates, curve.steps, window=300)
    for snap, window, start in ((cold, 300, "empty start"), (replace(cold, trace_start_warm=True), 300, "warm start"),
                                (cold, 200, "warm start")):  # the last 200 of 300 steps: the cache held the 100th's
        rows = "\n".join(r.plain for r in text.hit_rows(snap, text.Replay({"lru": 0.6, "belady": 0.7}, 300, window)))
        assert f"knowing the future (last {window} steps, {start}" in rows
        shown = "\n".join(r.plain for r in text.curve_rows(replace(curve, window=window), snap, None))
        assert ("from an empty cache" in shown) == (start == "empty start"), shown
        assert ("(warm start)" in shown) == (start == "warm start")


def test_memory_gauges_are_drawn_against_meaningful_totals():
    snap = fixed_snapshot()
    rows = [r.plain for r in text.memory_rows(snap, 60)]
    cache = next(r for r in rows if r.startswith("cache"))
    assert "25%" in cache and "200 MiB / 800 MiB" in cache  # slots' bytes against the cache's budget
    slots = next(r for r in rows if r.startswith("slots"))
    assert f"{int(snap.resident.sum())} / {16 * 6}" in slots
    rss = next(r for r in rows if r.startswith("RSS"))
    assert "900 MiB / 16.0 GiB" in rss and "5%" in rss  # the process against the machine's RAM
    bars = {r.index("█") if "█" in r else r.index("░") for r in rows[:5]}
    assert len(bars) == 1 and all(len(r) <= 60 for r in rows[:5])  # aligned bars within the width


def test_the_experts_row_shows_the_slots_by_layer_once_the_budget_moved_some():
    snap = fixed_snapshot()
    row = next(r.plain for r in text.memory_rows(snap, 120) if r.plain.startswith("experts"))
    assert "by layer" not in row
    c = snap.capacity
    moved = dataclasses.replace(snap, capacities=(c + 2, c - 2) + (c,) * (snap.num_moe_layers - 2))
    row = next(r.plain for r in text.memory_rows(moved, 120) if r.plain.startswith("experts"))
    assert f"{snap.capacity} of {snap.num_experts} per layer cached" in row
    assert f"{snap.capacity - 2}-{snap.capacity + 2} by layer" in row


def test_history_is_per_refresh_and_skips_prefill_only_refreshes():
    history = text.History()
    snap = fixed_snapshot()
    assert history.add(snap, None)  # the decode speed is recorded at once
    assert history.steps == []  # a hit rate needs two refreshes
    later = _advanced(snap, steps=320, hits=30, misses=10)
    assert history.add(later, text.Replay({"lru": 0.5, "belady": 0.7}, 320, 320))
    assert history.steps == [320] and history.ready == [pytest.approx(0.75)]
    assert history.belady == [(320, 0.7)] and history.replayed == [(320, 0.5)]


def _advanced(snap, steps: int, hits: int, misses: int):
    from dataclasses import fields

    from moe_tui.inference.telemetry import CacheSnapshot

    kw = {f.name: getattr(snap, f.name) for f in fields(snap)}
    kw["hits"] = snap.hits.copy()
    kw["misses"] = snap.misses.copy()
    kw["hits"][0, 0] += hits
    kw["misses"][0, 1] += misses
    kw["steps"] = steps
    return CacheSnapshot.build(**kw)


# ---------------------------------------------------------------- in the app (FakeWorker: fixed data)

BOXES = ("Experts", "Hit rate", "Speed", "Memory", "I/O", "Miss curve")


@pytest.mark.parametrize("theme", ["moe-dark", "moe-light", "moe-colorblind"])
@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 60)])
async def test_every_box_is_titled_and_fits_the_panel(fake_app, size, theme):
    from moe_tui.app.widgets.dashboard import Box, Dashboard

    from tests.helpers import wait_until

    app = fake_app(theme=theme)
    async with app.run_test(size=size) as pilot:
        if size[0] < 76:
            await pilot.press("f2")
        await wait_until(pilot, lambda: app.last_snapshot is not None and app.query_one(Dashboard).curve is not None)
        panel = app.query_one(Dashboard)
        boxes = {box.border_title: box for box in panel.query(Box)}
        assert tuple(boxes) == BOXES
        for box in boxes.values():
            assert panel.region.x <= box.region.x and box.region.right <= panel.region.right <= size[0]
        wide = size[0] >= 160
        assert panel.has_class("wide") == wide

        def reflowed() -> bool:  # side by side when wide, else stacked
            left, right = panel.query_one("#col-left").virtual_region, panel.query_one("#col-right").virtual_region
            return (left.y == right.y and left.right <= right.x) if wide else right.y >= left.bottom

        await wait_until(pilot, reflowed, timeout=5)


async def test_the_miss_curve_key_sets_capacity_to_the_point_under_the_cursor(fake_app):
    from moe_tui.app.widgets.charts import MissCurveChart
    from moe_tui.app.widgets.dashboard import Dashboard
    from moe_tui.inference.events import Configure

    from tests.helpers import wait_until

    app = fake_app()
    asked: list = []
    async with app.run_test(size=(200, 60)) as pilot:
        await wait_until(pilot, lambda: app.query_one(Dashboard).curve is not None)
        app.backend.configure = asked.append
        chart = app.query_one(MissCurveChart)
        assert chart.cursor_capacity == 16  # starts at the current capacity
        chart.focus()
        await pilot.press("right", "right", "left", "right")
        assert chart.cursor_capacity == 18
        await wait_until(pilot, lambda: "cursor   18/layer" in _box_text(app, "#curve-text"))
        await pilot.press("enter")
        await wait_until(pilot, lambda: asked)
        assert asked == [Configure(capacity=18)]
        curve = app.query_one(Dashboard).curve
        assert f"belady {curve.at(18)['belady']:.0%}" in _box_text(app, "#curve-text")


async def test_reset_clears_every_plot_and_the_belady_figure(fake_app):
    from moe_tui.app.widgets.dashboard import Dashboard

    from tests.helpers import fixed_snapshot, wait_until

    app = fake_app()
    async with app.run_test(size=(200, 60)) as pilot:
        panel = app.query_one(Dashboard)
        await wait_until(pilot, lambda: panel.curve is not None)
        later = _advanced(fixed_snapshot(), steps=340, hits=40, misses=10)
        panel.show(later, {"lru": 0.6, "belady": 0.8})
        assert panel.history.steps and panel.history.belady and panel.replay is not None
        from dataclasses import fields

        from moe_tui.inference.telemetry import CacheSnapshot

        kw = {f.name: getattr(later, f.name) for f in fields(later)}
        zeros = np.zeros_like(later.hits)
        kw.update(steps=0, tokens_generated=0, hits=zeros, misses=zeros, requests=zeros, decode_tps=0.0)
        panel.show(CacheSnapshot.build(**kw), None)  # what the engine sends after /reset
        assert not panel.history.steps and not panel.history.belady and not panel.history.decode_tps
        assert panel.replay is None and panel.curve is None
        assert "replayed when idle" in _box_text(app, "#hits")


async def test_reset_clears_the_replays_and_those_after_it_start_warm(make_app):
    from moe_tui.app.widgets.dashboard import Dashboard

    from tests.helpers import replies, send, wait_until

    app = make_app(max_tokens=8)
    async with app.run_test(size=(200, 60)) as pilot:
        panel = app.query_one(Dashboard)
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: replies(app) and not app.generating)
        await wait_until(pilot, lambda: panel.curve is not None and panel.replay is not None, timeout=60)
        # Loaded without a profile: the first steps found the cache empty.
        assert "empty start" in _box_text(app, "#hits") and "from an empty cache" in _box_text(app, "#curve-text")
        app.run_command("/reset")
        await wait_until(pilot, lambda: app.last_snapshot.tokens_generated == 0 and panel.curve is None)
        assert panel.replay is None and not panel.history.steps and not panel.history.belady
        assert "replayed when idle" in _box_text(app, "#hits")
        # /reset keeps the cache: the steps after it start with its experts, and so do their replays.
        await send(pilot, app, "import os")
        await wait_until(pilot, lambda: len(replies(app)) == 2 and not app.generating)
        await wait_until(pilot, lambda: panel.curve is not None and panel.replay is not None, timeout=60)
        assert app.last_snapshot.trace_start_warm
        await wait_until(pilot, lambda: "warm start)" in _box_text(app, "#hits"))
        assert "(warm start)" in _box_text(app, "#curve-text")
        assert app.last_optimum["belady"] >= max(v for k, v in app.last_optimum.items() if k != "belady")


async def test_help_cache_explains_every_number(fake_app):
    from moe_tui.app.widgets.chat import MessageView

    from tests.helpers import send, wait_until

    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await send(pilot, app, "/help cache")
        await wait_until(pilot, lambda: any("number by number" in v.text for v in app.query(MessageView)))
    shown = text.CACHE_HELP
    for term in ("ready", "demand", "Belady", "stall", "I/O cap", "slots", "precision", "recall", "Miss curve",
                 "knowing the future", "hits / (hits + misses)"):
        assert term in shown, term


def _box_text(app, selector: str) -> str:
    return "\n".join(line.plain for line in app.query_one(selector).text_lines)


async def test_the_speed_boxs_max_takes_in_the_current_speed(fake_app):
    """A walkthrough saw 'decode 52.8 tok/s avg 48.3 max 50.5' while a reply streamed."""
    from dataclasses import replace

    from moe_tui.app.messages import SnapshotReady
    from moe_tui.app.widgets.gauges import Readout

    from tests.helpers import fixed_snapshot, wait_until

    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        first = fixed_snapshot()
        faster = replace(first, decode_tps=99.7, tokens_generated=first.tokens_generated + 8, steps=first.steps + 8)
        speed = app.query_one("#speed", Readout)
        shown = []
        real_show = speed.show
        speed.show = lambda text: (shown.append(str(text).split("\n")[0]), real_show(text))
        app.post_message(SnapshotReady(faster, None))
        await wait_until(pilot, lambda: any("99.7 tok/s" in line for line in shown))
        first = next(line for line in shown if "99.7 tok/s" in line)  # as the snapshot came, not a later redraw
        assert "max 99.7 tok/s" in first, first


async def test_empty_plots_say_what_they_wait_for(tmp_path, monkeypatch):
    """Before the first reply the Hit rate and Speed plots were blank boxes (found by a tmux walkthrough)."""
    from dataclasses import replace

    import numpy as np
    from moe_tui.app.main import MoeApp
    from moe_tui.app.messages import SnapshotReady
    from moe_tui.app.settings import Settings
    from moe_tui.app.widgets.charts import Chart
    from moe_tui.app.worker import EngineSpec
    from moe_tui.inference.telemetry import IOStats

    from tests.helpers import FakeWorker, fixed_snapshot, wait_until

    class FreshEngine(FakeWorker):
        """A model just loaded: nothing routed, nothing decoded, no replay yet."""

        def start(self) -> None:
            super().start()
            full = fixed_snapshot()
            zero = np.zeros_like(full.hits)
            self.app.post_message(SnapshotReady(replace(
                full, requests=zero, hits=zero, misses=zero, loads=zero, evictions=zero, decode_tps=0.0,
                prefill_tps=0.0, tokens_generated=0, steps=0, trace_length=0, io=IOStats()), None))

        def miss_curve(self, request) -> None:
            pass

    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    app = MoeApp(EngineSpec(model="demo"), Settings(data_dir=str(tmp_path / "data")), worker_factory=FreshEngine)
    async with app.run_test(size=(120, 40)) as pilot:
        hit, speed = app.query_one("#hit-chart", Chart), app.query_one("#speed-chart", Chart)
        await wait_until(pilot, lambda: "waiting for steps" in hit.text and "waiting for a reply" in speed.text)


def test_prediction_is_averaged_over_the_layers_guessed_so_far():
    """A layer with no guess yet (the first layer before its tokens come back) has no precision: it is not a
    0% in the mean, nor the worst layer."""
    import dataclasses

    snap = fixed_snapshot()
    io = dataclasses.replace(snap.io, guesses=(0, *snap.io.guesses[1:]), guess_hits=(0, *snap.io.guess_hits[1:]))
    rows = "\n".join(r.plain for r in text.io_rows(dataclasses.replace(snap, io=io)))
    rest = io.prediction_precision[1:]
    worst = min(range(len(rest)), key=rest.__getitem__) + 1
    assert f"precision {np.mean(rest):.0%}" in rows
    assert f"worst L{snap.layer_ids[worst]} {rest[worst - 1]:.0%}" in rows
