"""The cache dashboard: titled boxes (Experts, Hit rate, Speed, Memory, I/O, Miss curve) that reflow with the
terminal's size: one column when narrow, two side by side when the panel is wide."""

from __future__ import annotations

import time
from dataclasses import replace

from moe_tui.inference.telemetry import CacheSnapshot
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll

from .. import dashboard as text
from ..heatmap import HeatmapStyle
from .charts import Chart, Figure, MissCurveChart, Series
from .gauges import Readout
from .heatmap import HeatmapView
from .sizing import widest

PERCENT_TICKS = (0.0, 25.0, 50.0, 75.0, 100.0)
PLOT_INTERVAL = 1.0  # seconds between two redraws of the plots over time (each costs a build and a repaint)
WIDE = 90  # columns of panel from which the boxes stand in two columns
OPTIMUM_WINDOW = 1024  # steps the engine's idle replay covers (inference.session.OPTIMUM_WINDOW)


class Box(Vertical):
    """A titled, rounded box (btop's look); its border lights up while something inside has the focus."""

    DEFAULT_CSS = """
    Box {
        height: auto; border: round $divider; border-title-color: $foreground; border-title-style: bold;
        border-subtitle-color: $text-muted; padding: 0 1;
    }
    Box:focus-within { border: round $accent; border-title-color: $accent; }
    """

    def __init__(self, title: str, *children, **kwargs) -> None:
        super().__init__(*children, **kwargs)
        self.border_title = title


class Dashboard(VerticalScroll, can_focus=False):
    """The right-hand column: the expert heatmap and the cache's numbers and plots; it scrolls when short. Not a
    focus stop of its own (Tab goes from the prompt to the heatmap): it scrolls with the wheel and follows the
    focused heatmap or miss curve."""

    DEFAULT_CSS = """
    Dashboard { scrollbar-size-vertical: 1; }
    Dashboard #boxes { height: auto; layout: vertical; }
    Dashboard #boxes > Vertical { height: auto; width: 1fr; }
    Dashboard.wide #boxes { layout: horizontal; }
    Dashboard Chart { height: 9; }
    Dashboard.wide Chart { height: 11; }
    Dashboard #miss-curve:focus { background: $boost; }
    """
    HELP = """
## Cache dashboard

**Experts**: the heatmap (Tab focuses it; arrows, `+`/`-` zoom, `[`/`]` scroll). **Hit rate**: the ready
rate (needed experts resident when their layer ran), the demand rate (the same without reads ahead) and
Belady's optimum replayed at this capacity, over time. **Speed**: decode tok/s over time. **Memory**: the
expert cache against its budget, its slots, the process against the machine's RAM. **I/O**: the decoder's
wait on expert reads, bytes per token and the tok/s the reads alone allow. **Miss curve**: hit rate against
capacity for every policy and Belady; Left/Right move its cursor, Enter sets `/capacity` there.
`/help cache` explains every number. The mouse wheel scrolls the panel.
"""

    def __init__(self, style: HeatmapStyle | None = None, unicode: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heat_style = style or HeatmapStyle(unicode=unicode)
        self.unicode = unicode
        self.snapshot: CacheSnapshot | None = None
        self.replay: text.Replay | None = None
        self.history = text.History()
        self.curve: text.MissCurve | None = None
        self._curve_asked: int | None = None  # steps of the trace the last miss-curve request covered
        self._plotted_at = 0.0  # monotonic time of the last redraw of the plots over time
        self._plot_timer = None  # a redraw waiting for PLOT_INTERVAL to pass
        self._reserved_for: tuple | None = None  # what the readouts' reserved rows were drawn for

    def compose(self) -> ComposeResult:
        u = self.unicode
        yield Box("Experts", HeatmapView(self.heat_style, id="heatmap"), id="experts-box")
        with Horizontal(id="boxes"):
            with Vertical(id="col-left"):
                yield Box("Hit rate", Readout(steady=True, id="hits"), Chart(u, id="hit-chart"), id="hit-box")
                yield Box("Speed", Readout(steady=True, id="speed"), Chart(u, id="speed-chart"), id="speed-box")
            with Vertical(id="col-right"):
                yield Box("Memory", Readout(steady=True, id="memory"), id="memory-box")
                yield Box("I/O", Readout(steady=True, id="io"), id="io-box")
                yield Box("Miss curve", MissCurveChart(u, id="miss-curve"), Readout(id="curve-text"),
                          id="curve-box")

    def on_mount(self) -> None:
        self._plot_history()  # empty plots say what they wait for, rather than a blank box
        self._plotted_at = 0.0  # the first data is drawn at once all the same
        self._plot_curve()

    def on_resize(self) -> None:
        self.set_class(self.size.width >= WIDE, "wide")
        if self.snapshot is not None:
            self.call_after_refresh(self._show_numbers)  # gauges fill the boxes' new width

    # ---------------------------------------------------------------- data in

    def show(self, snap: CacheSnapshot, optimum: dict | None) -> None:
        old = self.snapshot
        if old is not None and (snap.steps < old.steps or snap.tokens_generated < old.tokens_generated):
            self.reset()  # /reset: every statistic and plot starts again
        self.snapshot = snap
        self.query_one(HeatmapView).snapshot = snap
        if optimum and "belady" in optimum:
            self.replay = text.Replay(dict(optimum), snap.steps, min(snap.trace_length, OPTIMUM_WINDOW))
        elif optimum is None and old is not None and snap.steps < old.steps:
            self.replay = None
        plotted = self.history.add(snap, self.replay)  # first: the Speed box's avg and max take this speed in
        self._show_numbers()
        if plotted:
            self._plot_soon()
        self._ask_for_curve(snap)

    def _plot_soon(self) -> None:
        """Redraw the plots over time now, or once PLOT_INTERVAL has passed since the last redraw."""
        wait = self._plotted_at + PLOT_INTERVAL - time.monotonic()
        if wait <= 0:
            self._plot_history()
        elif self._plot_timer is None:
            self._plot_timer = self.set_timer(wait, self._plot_history)

    def reset(self) -> None:
        self.replay, self.curve, self._curve_asked = None, None, None
        self.history = text.History()
        self.query_one(HeatmapView).reset_history()
        self._plot_history()
        self._plot_curve()

    def show_remote(self, remote) -> None:
        """Throughput and latency measured by this client (servers without expert telemetry)."""
        last = remote.decode_tps[-1] if remote.decode_tps else 0.0
        avg = sum(remote.decode_tps) / len(remote.decode_tps) if remote.decode_tps else 0.0
        ttft = remote.ttft_s[-1] * 1000 if remote.ttft_s else 0.0
        top = max(remote.decode_tps, default=0)
        self.query_one("#speed", Readout).show(Text("\n").join([
            text.row("decode", f"{last:.1f} tok/s", f"avg {avg:.1f}  max {top:.1f} tok/s"),
            text.row("TTFT", f"{ttft:.0f} ms", f"min {min(remote.ttft_s, default=0) * 1000:.0f} ms"),
            text.row("replies", f"{remote.replies}", f"{remote.tokens} tokens"),
        ]))
        self.query_one("#memory", Readout).show("memory: on the server (it sends no telemetry)")
        xs = tuple(float(i + 1) for i in range(len(remote.decode_tps)))
        self.query_one("#speed-chart", Chart).figure = Figure(
            "decode speed per reply", "reply", "tok/s", (Series("decode", xs, tuple(remote.decode_tps)),))

    def show_miss_curve(self, curve: text.MissCurve) -> None:
        if not curve.capacities:  # the server has none
            self.curve = curve
            self._plot_curve()
            return
        if not curve.window and self.snapshot is not None:
            curve = replace(curve, window=min(self.snapshot.trace_length, OPTIMUM_WINDOW))
        self.curve = curve
        chart = self.query_one(MissCurveChart)
        chart.capacities = curve.capacities
        if chart.cursor is None or chart.cursor >= len(curve.capacities):
            snap = self.snapshot
            current = snap.capacity if snap is not None else curve.capacities[0]
            chart.cursor = min(range(len(curve.capacities)), key=lambda i: abs(curve.capacities[i] - current))
        self._plot_curve()

    # ---------------------------------------------------------------- drawing

    def _width(self, readout_id: str) -> int:
        width = self.query_one(readout_id).size.width
        return width if width > 0 else max(self.size.width - 4, 30)

    def _show_numbers(self) -> None:
        snap = self.snapshot
        if snap is None:
            return
        u = self.unicode
        self._reserve(snap)
        self.query_one("#hits", Readout).show(Text("\n").join(text.hit_rows(snap, self.replay, u)))
        self.query_one("#speed", Readout).show(Text("\n").join(text.speed_rows(snap, self.history.decode_tps)))
        self.query_one("#memory", Readout).show(Text("\n").join(text.memory_rows(snap, self._width("#memory"), u)))
        self.query_one("#io", Readout).show(Text("\n").join(text.io_rows(snap, u)))
        chart = self.query_one(MissCurveChart)
        self.query_one("#curve-text", Readout).show(
            Text("\n").join(text.curve_rows(self.curve, snap, chart.cursor_capacity, u)))

    def _reserve(self, snap: CacheSnapshot) -> None:
        """Give the readouts the rows their widest numbers take (sizing.widest), once per model shape, setting
        and width, so their heights stay put while a reply streams."""
        width = self._width("#memory")
        key = (snap.layer_ids, snap.num_experts, snap.capacity, snap.policy, width, self.unicode)
        if key == self._reserved_for:
            return
        self._reserved_for = key
        u, samples = self.unicode, widest(snap)
        rates = {"belady": 0.996, snap.policy: 0.996}
        replay = text.Replay(rates, samples[0].steps, samples[0].trace_length)
        for readout, rows in (
                ("#hits", [text.hit_rows(s, r, u) for s in samples for r in (replay, None)]),
                ("#speed", [text.speed_rows(s, [s.decode_tps]) for s in samples]),
                ("#memory", [text.memory_rows(s, width, u) for s in samples]),
                ("#io", [text.io_rows(s, u) for s in samples])):
            self.query_one(readout, Readout).reserve(*(Text("\n").join(r) for r in rows))

    def _plot_history(self) -> None:
        self._plotted_at, self._plot_timer = time.monotonic(), None
        h = self.history
        steps = tuple(float(s) for s in h.steps)
        hit_series = [Series("ready", steps, tuple(100 * r for r in h.ready), "primary"),
                      Series("demand", steps, tuple(100 * r for r in h.demand), "secondary")]
        if h.belady:
            hit_series.append(Series("Belady", tuple(float(s) for s, _ in h.belady),
                                     tuple(100 * r for _, r in h.belady), "success", scatter=True))
            policy = self.snapshot.policy if self.snapshot is not None else "policy"
            hit_series.append(Series(f"{policy} replay", tuple(float(s) for s, _ in h.replayed),
                                     tuple(100 * r for _, r in h.replayed), "warning", scatter=True))
        self.query_one("#hit-chart", Chart).figure = Figure(
            "hit rate since last refresh", "engine step", "%", tuple(hit_series), ylim=(0, 100),
            yticks=PERCENT_TICKS, empty="waiting for steps", integer_x=True)
        tokens = tuple(float(t) for t in h.tokens)
        self.query_one("#speed-chart", Chart).figure = Figure(
            "decode tok/s (prefill excluded)", "tokens generated", "tok/s",
            (Series("decode", tokens, tuple(h.decode_tps), "primary"),), empty="waiting for a reply", integer_x=True)

    def _plot_curve(self) -> None:
        curve, snap = self.curve, self.snapshot
        chart = self.query_one(MissCurveChart)
        if curve is None or snap is None or not curve.capacities:
            chart.figure = Figure("hit rate vs capacity", "experts per layer", "%", empty=text.curve_placeholder(curve))
        else:
            xs = tuple(float(c) for c in curve.capacities)
            colours = {"lru": "primary", "lfu": "secondary", "decay": "warning", "lrfu": "accent", "markov": "error",
                       "belady": "success"}
            series = tuple(Series(name, xs, tuple(100 * r for r in curve.rates[name]), colours.get(name, "error"))
                           for name in text.curve_names(curve))
            cursor = chart.cursor_capacity
            if cursor is not None:
                there = curve.at(cursor)
                series += (Series("cursor", (float(cursor),) * len(there), tuple(100 * r for r in there.values()),
                                  "foreground", scatter=True, marker="◆"),)
            chart.figure = Figure(f"hit rate vs capacity (line: now, {snap.capacity})", "experts per layer",
                                  "%", series, ylim=(0, 100), xlim=(1, max(snap.num_experts, 2)),
                                  vlines=((float(snap.capacity), "accent"),), yticks=PERCENT_TICKS, integer_x=True)
        if snap is not None or curve is not None:
            self.query_one("#curve-text", Readout).show(
                Text("\n").join(text.curve_rows(curve, snap, chart.cursor_capacity, self.unicode)))

    # ---------------------------------------------------------------- the miss curve's replay

    def _ask_for_curve(self, snap: CacheSnapshot) -> None:
        """While idle, ask the engine to replay its trace at every capacity when the trace has grown."""
        backend = getattr(self.app, "backend", None)
        if (backend is None or not getattr(backend.capabilities, "miss_curve", False)
                or getattr(self.app, "generating", False) or not snap.trace_length or not snap.num_moe_layers):
            return
        if self._curve_asked == snap.steps or (self.curve is not None and self.curve.steps == snap.steps):
            return
        from moe_tui.inference.events import MissCurveRequest

        self._curve_asked = snap.steps
        backend.miss_curve(MissCurveRequest(text.curve_capacities(snap.num_experts, snap.capacity),
                                            last_steps=OPTIMUM_WINDOW, layers=text.MISS_CURVE_LAYERS))

    def on_miss_curve_chart_cursor_moved(self) -> None:
        self._plot_curve()

    def on_miss_curve_chart_picked(self, event: MissCurveChart.Picked) -> None:
        run = getattr(self.app, "run_command", None)
        if run is not None:
            run(f"/capacity {event.capacity}")

