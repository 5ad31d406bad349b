"""Plots with titles, axes and scales: plotext figures (textual-plotext's stateless `Plot`) drawn on a thread.

textual-plotext's own widget builds its figure in `render()`, on the UI thread, at every repaint; a figure
with a few lines costs milliseconds, and keys typed meanwhile would wait. Here a figure is built only when
its data or size changes, on a worker thread, down to the rows of cells (Strips) the widget then hands
out as they are (Line API): turning a plot's Rich text into rows costs more than building it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from rich.segment import Segment
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.color import Color
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget

# plotext keeps some state at module level: two figures built at once on two threads disturbed each other's ticks.
_BUILD = threading.Lock()
# Theme variables the series are drawn in (resolved on the UI thread: the worker never reads the app).
SERIES_COLOURS = ("primary", "success", "warning", "error", "secondary", "accent")


@dataclass(frozen=True)
class Series:
    label: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    colour: str = "primary"  # a theme variable
    scatter: bool = False
    marker: str | None = None  # a scatter's glyph (None: a dot)


@dataclass(frozen=True)
class Figure:
    """Everything one plot shows: pure data, built on the UI thread and drawn on a worker."""

    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...] = ()
    ylim: tuple[float, float] | None = None
    xlim: tuple[float, float] | None = None
    vlines: tuple[tuple[float, str], ...] = ()  # (x, theme variable)
    yticks: tuple[float, ...] | None = None
    integer_x: bool = False  # ticks on whole numbers only (capacities, tokens)
    empty: str = "no data yet"
    extra: dict = field(default_factory=dict, compare=False)


def draw(figure: Figure, width: int, height: int, colours: dict[str, tuple[int, int, int]],
         unicode: bool = True) -> Text:
    """The figure as Rich text `width` x `height` cells (plain plotext underneath: no App needed)."""
    from textual_plotext import Plot

    plot = Plot()
    plot.plotsize(width, height)
    background, foreground = colours["surface"], colours["foreground"]
    plot.canvas_color(background)
    plot.axes_color(background)
    plot.ticks_color(foreground)
    marker = "braille" if unicode else "*"
    drawn = False
    for series in figure.series:
        if not series.xs:
            continue
        drawn = True
        kwargs = {"label": series.label, "color": colours.get(series.colour, foreground), "marker": marker}
        if series.scatter or len(series.xs) == 1:
            glyph = series.marker if series.marker and unicode else "dot" if unicode else "o"
            plot.scatter(list(series.xs), list(series.ys), **{**kwargs, "marker": glyph})
        else:
            plot.plot(list(series.xs), list(series.ys), **kwargs)
    for x, colour in figure.vlines:
        plot.vline(x, colours.get(colour, foreground))
    if figure.ylim:
        plot.ylim(*figure.ylim)
    if figure.xlim:
        plot.xlim(*figure.xlim)
    if figure.yticks:
        # Only as many ticks as the canvas has rows to spare: plotext drops colliding labels in an order that
        # changes from one process to the next.
        rows = height - 5  # title, frame, x ticks and label
        ticks = figure.yticks if rows >= 2 * len(figure.yticks) else figure.yticks[:: max(len(figure.yticks) // 2, 1)]
        plot.yticks(list(ticks), [f"{y:g}" for y in ticks])
    if figure.integer_x and drawn:
        low, high = figure.xlim or (min(min(s.xs) for s in figure.series if s.xs),
                                    max(max(s.xs) for s in figure.series if s.xs))
        ticks = whole_ticks(low, high, max(width // 10, 2))
        plot.xticks(ticks, [str(int(t)) for t in ticks])
    waiting = f"{figure.title}: {figure.empty}"
    # plotext leaves out a title wider than the plot: an empty plot would be a blank box.
    plot.title(figure.title if drawn else waiting if len(waiting) <= width else figure.empty)
    plot.xlabel(figure.xlabel)
    plot.ylabel(figure.ylabel)
    return Text.from_ansi(plot.build(), no_wrap=True, end="")


def whole_ticks(low: float, high: float, most: int) -> list[float]:
    """At most `most` whole-number ticks from `low` to `high`, a round step apart."""
    span = max(high - low, 1)
    step = next(s for s in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 250, 500, 1000, 10**9)
                if span / s <= most - 1)
    first = int(low // step * step) + (step if low % step else 0)
    ticks = [float(low)] if first != low else []
    ticks += [float(t) for t in range(first, int(high) + 1, step)]
    return ticks


class Chart(Widget):
    """One plot. `figure = Figure(...)` redraws it (on a thread) when it differs from the one shown."""

    DEFAULT_CSS = "Chart { height: 10; width: 1fr; }"

    def __init__(self, unicode: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.unicode = unicode
        self._figure: Figure | None = None
        self._drawn: tuple | None = None  # (figure, width, height, colours) of the drawing asked for last
        self._shown: tuple | None = None  # the same, of the drawing on screen
        self._lines: list[Strip] = []

    @property
    def figure(self) -> Figure | None:
        return self._figure

    @figure.setter
    def figure(self, figure: Figure) -> None:
        self._figure = figure
        self._redraw()

    @property
    def settled(self) -> bool:
        """The drawing shown is of the current figure at the current size (nothing left to draw)."""
        return self._figure is None or self.size.width < 10 or (
            self._shown is not None and self._shown == self._drawn and self._shown[:3] == (self._figure, *self.size))

    def on_mount(self) -> None:
        # The theme's variables are read when drawing: redraw once the new theme's are in place.
        self.app.theme_changed_signal.subscribe(self, lambda _: self.call_after_refresh(self._redraw))

    def on_resize(self) -> None:
        self._redraw()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        if self.is_mounted:
            self._redraw()  # the theme's colours changed

    def _colours(self) -> dict[str, tuple[int, int, int]]:
        variables = self.app.theme_variables
        names = (*SERIES_COLOURS, "surface", "foreground")
        return {name: Color.parse(variables[name]).rgb for name in names if name in variables}

    def _redraw(self) -> None:
        width, height = self.size
        if self._figure is None or width < 10 or height < 4:
            return
        colours = self._colours()
        key = (self._figure, width, height, tuple(sorted(colours.items())))
        if key == self._drawn:
            return
        self._drawn = key
        self._build(key)

    @work(thread=True, exclusive=True, group="chart")
    def _build(self, key: tuple) -> None:
        figure, width, height, colours = key
        with _BUILD:
            text = draw(figure, width, height, dict(colours), self.unicode)
        segments = text.render(self.app.console)
        lines = [Strip(line, width) for line in Segment.split_and_crop_lines(segments, width, pad=True,
                                                                                            include_new_lines=False)]
        self.app.call_from_thread(self._show, lines, key)

    def _show(self, lines: list[Strip], drawn: tuple) -> None:
        self._lines, self._shown = lines, drawn
        self.refresh()

    def render_line(self, y: int) -> Strip:
        if y < len(self._lines):
            return self._lines[y]
        return Strip.blank(self.size.width, self.rich_style)

    @property
    def text(self) -> str:
        """The drawing as plain text (tests, screen readers of the future)."""
        return "\n".join(line.text for line in self._lines)


class MissCurveChart(Chart, can_focus=True):
    """The miss curve: a cursor moves along the capacities; Enter asks for /capacity at the cursor."""

    BINDINGS = [
        Binding("left", "move(-1)", "fewer experts", show=False),
        Binding("right", "move(1)", "more experts", show=False),
        Binding("home", "move(-1000)", "first", show=False),
        Binding("end", "move(1000)", "last", show=False),
        Binding("enter,c", "pick", "set /capacity", id="miss_curve.set_capacity"),
        Binding("question_mark", "app.toggle_keys", "keys", show=False),
    ]
    HELP = """
## Miss curve

Hit rate against capacity (experts per layer) of every policy and Belady's MIN (the best any cache could
do), replayed on the routing so far. Solid line: the capacity; the other: the cursor, which Left/Right
move. Enter (or `c`) sets `/capacity` there.
"""

    class CursorMoved(Message):
        """The cursor moved: the panel re-plots with it."""

    class Picked(Message):
        """The user asked for the capacity under the cursor."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity

    def __init__(self, unicode: bool = True, **kwargs) -> None:
        super().__init__(unicode, **kwargs)
        self.capacities: tuple[int, ...] = ()
        self.cursor: int | None = None  # an index into capacities

    @property
    def cursor_capacity(self) -> int | None:
        return self.capacities[self.cursor] if self.capacities and self.cursor is not None else None

    def action_move(self, step: int) -> None:
        if not self.capacities:
            return
        index = self.cursor if self.cursor is not None else 0
        self.cursor = min(max(index + step, 0), len(self.capacities) - 1)
        self.post_message(self.CursorMoved())

    def action_pick(self) -> None:
        if self.cursor_capacity is not None:
            self.post_message(self.Picked(self.cursor_capacity))
