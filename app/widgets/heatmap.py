"""Expert-cache heatmap widget: Line API over the pure renderer in app/heatmap.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from moe_tui.inference import CacheSnapshot
from rich.segment import Segment
from textual.binding import Binding
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from .. import heatmap as renderer
from . import sizing
from .rows import StyledRows


class HeatmapView(StyledRows, ScrollView, can_focus=True):
    """Rows = MoE layers, columns = experts (binned to fit). Arrows select a cell; +/- zoom; [ ] scroll."""

    BINDINGS = [
        Binding("left", "move(0, -1)", "cell left", show=False),
        Binding("right", "move(0, 1)", "cell right", show=False),
        Binding("up", "move(-1, 0)", "cell up", show=False),
        Binding("down", "move(1, 0)", "cell down", show=False),
        Binding("plus,equals_sign", "zoom(1)", "zoom in", id="heatmap.zoom_in"),
        Binding("minus", "zoom(-1)", "zoom out", id="heatmap.zoom_out"),
        Binding("left_square_bracket", "pan(-1)", "pan left", show=False, id="heatmap.pan_left"),
        Binding("right_square_bracket", "pan(1)", "pan right", show=False, id="heatmap.pan_right"),
        Binding("h", "toggle_half", "2 layers/row", id="heatmap.half_blocks"),
        Binding("question_mark", "app.toggle_keys", "keys", show=False),
    ]
    HELP = """
## Expert-cache heatmap

Rows: MoE layers; columns: experts. Colour: how often the router picked them lately. `•` cached, `◆`
pinned, `×` just missed; the row ends with the layer's hit rate. Arrows select a cell (`▕•▏`); its numbers
show below the map. Tab: the miss curve, then the chat.
"""
    DEFAULT_CSS = """
    HeatmapView {
        height: auto; max-height: 80vh; min-height: 4; scrollbar-size-vertical: 1; scrollbar-size-horizontal: 0;
    }
    """

    snapshot: reactive[CacheSnapshot | None] = reactive(None)  # height is set only when it changes

    def __init__(self, style: renderer.HeatmapStyle | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heat_style = style or renderer.HeatmapStyle()
        self.cursor = (0, 0)
        self.first_expert = 0
        self.experts_per_column: int | None = None
        self.half_blocks: bool | None = None  # None: automatic when rows are short
        self._lines: list[Strip] = []
        self._placeholder = "loading the model..."
        self._detail_rows = (0, 0)  # (width, most rows the cell details took at that width)
        self._requests: np.ndarray | None = None  # routing counts at the previous snapshot
        self.last_used: np.ndarray | None = None  # per (layer, expert): the step of the refresh it was last routed at

    def reset_history(self) -> None:
        """Forget when experts were last used (the statistics were reset)."""
        self._requests, self.last_used = None, None

    @property
    def placeholder(self) -> str:
        return self._placeholder

    @placeholder.setter
    def placeholder(self, text: str) -> None:
        self._placeholder = text
        self._rebuild()

    def set_style(self, style: renderer.HeatmapStyle) -> None:
        self.heat_style = style
        self._rebuild()

    def watch_snapshot(self, snapshot: CacheSnapshot | None) -> None:
        if snapshot is not None:
            requests = snapshot.requests
            previous = self._requests
            if previous is not None and requests.shape == previous.shape and (requests < previous).any():
                self.last_used = None  # counters went back: the statistics were reset
            self.last_used = last_used(self._requests, requests, snapshot.steps, self.last_used)
            self._requests = requests
        self._rebuild()

    def on_resize(self) -> None:
        self._rebuild()

    def _view(self) -> renderer.View:
        snap = self.snapshot
        layers = snap.num_moe_layers if snap else 0
        half = self.half_blocks
        if half is None:
            room = self.screen.size.height * 6 // 10 if self.is_attached else self.size.height
            half = layers + 2 > max(room, 4)
        return renderer.View(width=max(self.size.width, 20), first_expert=self.first_expert,
                             experts_per_column=self.experts_per_column, half_blocks=half,
                             cursor=None if half else self.cursor)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._rebuild()  # the rows are drawn in the theme's colours

    def _rebuild(self) -> None:
        # The theme's background and text colour go under the cells' own colours (labels, legend, gaps),
        # drawn into the renderer's cached styles rather than laid over every segment at each paint.
        if self.heat_style.base != (base := self.rich_style):
            self.heat_style = replace(self.heat_style, base=base)
        style = self.heat_style
        snap = self.snapshot
        if snap is None:
            self._lines = [Strip([Segment(self._placeholder, style.base)])]
            width = self._lines[0].cell_length
        else:
            view = self._view()
            rows = [renderer.axis(snap, view, style)] + renderer.render(snap, view, style)
            width = renderer.row_width(snap.num_experts, view, style)
            extra = renderer.legend_lines(style, view.width)
            if not view.half_blocks and snap.num_moe_layers:
                details = renderer.wrap_words(renderer.describe(snap, view, style, *self.cursor, self.last_used),
                                              view.width)
                # Its row count never shrinks at one width: a count that grows a digit must not re-lay out
                # the screen at every stats tick (a key typed meanwhile would wait for it).
                width_seen, most = self._detail_rows
                if width_seen != view.width:  # from the start, the rows the widest counts would take
                    most = len(renderer.wrap_words(renderer.describe(
                        sizing.widest(snap)[0], view, style, *self.cursor, sizing.last_used(snap)), view.width))
                most = max(len(details), most)
                self._detail_rows = (view.width, most)
                extra += [[Segment(row, style.base)] for row in details + [""] * (most - len(details))]
            self._lines = [Strip(row) for row in rows + extra]
            # The legend and details are wrapped to the view's width: reckoning them at that width keeps the
            # virtual size (a layout pass over the whole screen when it changes) still as the details change.
            below = max((line.cell_length for line in self._lines[len(rows):]), default=0)
            width = max(width, view.width if below <= view.width else below)
        self.virtual_size = Size(width, len(self._lines))
        if self.styles.height is None or self.styles.height.value != len(self._lines):
            self.styles.height = len(self._lines)  # only on change: setting it forces a layout pass
        self.refresh()

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index, width, style = y + scroll_y, self.size.width, self._row_style
        if index >= len(self._lines):
            return Strip.blank(width, style)
        return self._lines[index].crop(scroll_x, scroll_x + width).extend_cell_length(width, style)

    # ---- actions
    def action_move(self, d_layer: int, d_col: int) -> None:
        if not self.snapshot:
            return
        _, cols = renderer.columns_for(self.snapshot.num_experts, self._view(), self.heat_style)
        layer = min(max(self.cursor[0] + d_layer, 0), self.snapshot.num_moe_layers - 1)
        col = min(max(self.cursor[1] + d_col, 0), max(cols - 1, 0))
        self.cursor = (layer, col)
        self._rebuild()

    def action_zoom(self, direction: int) -> None:
        if not self.snapshot:
            return
        per, _ = renderer.columns_for(self.snapshot.num_experts, self._view(), self.heat_style)
        per = max(1, per // 2) if direction > 0 else per * 2
        self.experts_per_column = per
        # Zoomed out, the view stays full: it starts earlier where the experts after it no longer fill it.
        self.first_expert = min(self.first_expert, renderer.last_first_expert(
            self.snapshot.num_experts, self._view(), self.heat_style, per))
        self._rebuild()

    def action_pan(self, direction: int) -> None:
        if not self.snapshot:
            return
        per, cols = renderer.columns_for(self.snapshot.num_experts, self._view(), self.heat_style)
        step = max(per * max(cols // 2, 1), 1)
        last = renderer.last_first_expert(self.snapshot.num_experts, self._view(), self.heat_style, per)
        self.first_expert = min(max(self.first_expert + direction * step, 0), last)  # never past a full view
        self._rebuild()

    def action_toggle_half(self) -> None:
        self.half_blocks = not self._view().half_blocks
        self._rebuild()


def last_used(previous: np.ndarray | None, requests: np.ndarray, steps: int, seen: np.ndarray | None) -> np.ndarray:
    """Per (layer, expert): the engine step of the latest snapshot at which its routing count grew (-1: never
    routed). Experts routed before the first snapshot count as used at that snapshot's step."""
    if seen is None or seen.shape != requests.shape:
        return np.where(requests > 0, steps, -1)
    if previous is None or previous.shape != requests.shape:
        return seen
    return np.where(requests > previous, steps, seen)
