"""Pure heatmap renderer: a CacheSnapshot -> lines of Rich segments (rows = MoE layers, columns = experts).

No App needed: the widget (app/widgets/heatmap.py) only scrolls, moves a cursor and asks for lines.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from moe_tui.inference import CacheSnapshot
from rich.color import Color
from rich.segment import Segment
from rich.style import Style

UNICODE_MARKS = {"missed": "×", "pinned": "◆", "resident": "•", "none": " "}
ASCII_MARKS = {"missed": "x", "pinned": "P", "resident": "o", "none": " "}
ASCII_DENSITY = " .:-=+*#%@"
LABEL_WIDTH = 5  # "L12 "
RATE_WIDTH = 5  # " 87%"
MAX_CELL = 6  # cells widen to fill the width when there are few experts, up to this many columns each
FRAME = ("▕", "▏")  # the cursor: a frame around its cell (wide cells), not a colour
LEVELS = 63  # heat is drawn in 64 steps: cell styles are cached per step (and pair of steps), not built per cell


@dataclass(frozen=True)
class HeatmapStyle:
    gradient: tuple[str, ...] = ("#0b1a33", "#1f4e79", "#2e8b57", "#e0b000", "#ff4500")
    mark_color: str | None = None  # None: black or white, whichever stands out more on each cell
    label_color: str = "#a0a0a0"
    unicode: bool = True  # False: plain ASCII glyphs and no colours (dumb terminals)
    base: Style = Style()  # under every segment: the widget's own colours (theme background and text)


@dataclass(frozen=True)
class View:
    """Which part of the matrix to draw."""

    width: int  # terminal cells available
    first_expert: int = 0  # horizontal scroll (in experts)
    experts_per_column: int | None = None  # None: bin to fit the width
    half_blocks: bool = False  # two layers per row (no marks)
    cursor: tuple[int, int] | None = None  # (moe layer index, column)
    widen: bool = True  # False: one terminal cell (two in ASCII) per column, however wide the view


def gradient_color(stops: tuple[str, ...], t: float) -> Color:
    """The gradient's colour at `t` in [0, 1] (to the nearest of LEVELS steps)."""
    return _gradient_color(stops, level_of(t))


def level_of(t: float) -> int:
    return round(min(max(float(t), 0.0), 1.0) * LEVELS)


@lru_cache(maxsize=16)
def _stops_rgb(stops: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    return tuple(tuple(Color.parse(stop).get_truecolor()) for stop in stops)


@lru_cache(maxsize=4096)
def _gradient_color(stops: tuple[str, ...], level: int) -> Color:
    t = level / LEVELS * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    (r0, g0, b0), (r1, g1, b1) = _stops_rgb(stops)[i], _stops_rgb(stops)[i + 1]
    f = t - i
    return Color.from_rgb(r0 + (r1 - r0) * f, g0 + (g1 - g0) * f, b0 + (b1 - b0) * f)


@lru_cache(maxsize=16)
def _styles(style: HeatmapStyle) -> dict[tuple, Style]:
    """Cell styles already made for `style`, by (level, selected, missed) or (top level, bottom level):
    looked up by small int keys, since hashing the HeatmapStyle itself for every cell costs more."""
    return {}


def _cell_style(style: HeatmapStyle, styles: dict, level: int, selected: bool, missed: bool) -> Style:
    """A cell's colour; `selected` (a cursor too narrow for its frame) underlines it and keeps its colour."""
    key = (level, selected, missed)
    if (cell := styles.get(key)) is None:
        background = _gradient_color(style.gradient, level)
        cell = styles[key] = style.base + Style(color=style.mark_color or mark_color_on(background),
                                                bgcolor=background, underline=selected, bold=missed or selected)
    return cell


def _half_block_style(style: HeatmapStyle, styles: dict, top: int, bottom: int | None) -> Style:
    key = (top, bottom)
    if (cell := styles.get(key)) is None:
        bgcolor = None if bottom is None else _gradient_color(style.gradient, bottom)
        cell = styles[key] = style.base + Style(color=_gradient_color(style.gradient, top), bgcolor=bgcolor)
    return cell


def mark_color_on(background: Color) -> str:
    """Black or white, whichever contrasts more with `background` (WCAG relative luminance: black wins
    above 0.179)."""
    rgb = background.get_truecolor()

    def linear(v: int) -> float:
        c = v / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    luminance = 0.2126 * linear(rgb.red) + 0.7152 * linear(rgb.green) + 0.0722 * linear(rgb.blue)
    return "#000000" if luminance > 0.179 else "#ffffff"


def _room(view: View, style: HeatmapStyle) -> int:
    """Columns the view has for experts at their narrowest."""
    return max((view.width - LABEL_WIDTH - RATE_WIDTH) // (1 if style.unicode else 2), 1)


def columns_for(num_experts: int, view: View, style: HeatmapStyle) -> tuple[int, int]:
    """(experts per column, number of columns) for this view."""
    room = _room(view, style)
    per = view.experts_per_column or max(1, math.ceil((num_experts - view.first_expert) / room))
    cols = min(room, math.ceil((num_experts - view.first_expert) / per))
    return per, max(cols, 0)


def last_first_expert(num_experts: int, view: View, style: HeatmapStyle, per: int) -> int:
    """The largest first expert that still fills the view at `per` experts a column (0 when all fit)."""
    return max(num_experts - per * _room(view, style), 0)


def cell_width(num_experts: int, view: View, style: HeatmapStyle) -> int:
    """Terminal cells per column: more than one when few columns leave room (16 experts at 80 columns)."""
    narrow = 1 if style.unicode else 2
    _, cols = columns_for(num_experts, view, style)
    if not view.widen or not cols:
        return narrow
    room = view.width - LABEL_WIDTH - RATE_WIDTH
    return min(max(room // cols, narrow), MAX_CELL)


def row_width(num_experts: int, view: View, style: HeatmapStyle) -> int:
    """How many cells wide the rows of `render` are at most."""
    _, cols = columns_for(num_experts, view, style)
    return LABEL_WIDTH + cols * cell_width(num_experts, view, style) + RATE_WIDTH


def axis(snapshot: CacheSnapshot, view: View, style: HeatmapStyle = HeatmapStyle()) -> list[Segment]:
    """The expert-number axis above the rows: the first expert of a column, every few columns as room allows."""
    per, cols = columns_for(snapshot.num_experts, view, style)
    width = cell_width(snapshot.num_experts, view, style)
    label_style = style.base + Style(color=style.label_color) if style.unicode else style.base
    digits = len(str(max(snapshot.num_experts - 1, 0)))
    every = next(k for k in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 1 << 30) if k * width >= digits + 1)
    line = ["#" + " " * (LABEL_WIDTH - 1)]
    used = 0
    for c in range(0, cols, every):
        label = str(view.first_expert + c * per)
        at = c * width
        if at < used:
            continue
        line.append(" " * (at - used) + label)
        used = at + len(label)
    line.append(" " * max(cols * width - used, 0))
    return [Segment("".join(line), label_style)]


def binned(snapshot: CacheSnapshot, view: View, style: HeatmapStyle) -> dict[str, np.ndarray]:
    """Per (layer, column): routing heat in [0, 1] and which marks apply."""
    per, cols = columns_for(snapshot.num_experts, view, style)
    start = view.first_expert
    stop = min(snapshot.num_experts, start + per * cols)
    pad = start + per * cols - stop

    def fold(a: np.ndarray, how) -> np.ndarray:
        part = a[:, start:stop].astype(float)
        if pad:
            part = np.pad(part, ((0, 0), (0, pad)))
        return how(part.reshape(part.shape[0], cols, per), axis=2)

    recent = fold(snapshot.recent, np.sum)
    peak = float(recent.max()) if recent.size else 0.0
    return {
        "heat": recent / peak if peak > 0 else recent,
        "resident": fold(snapshot.resident, np.max) > 0,
        "pinned": fold(snapshot.pinned, np.max) > 0,
        "missed": fold(snapshot.just_missed, np.max) > 0,
        "per": np.array(per),
    }


def render(snapshot: CacheSnapshot, view: View, style: HeatmapStyle = HeatmapStyle()) -> list[list[Segment]]:
    """One list of segments per screen row, each at most `row_width(...)` cells wide."""
    if snapshot.num_moe_layers == 0:
        return [[Segment("no MoE layers: this model is dense", style.base)]]
    cells = binned(snapshot, view, style)
    width = cell_width(snapshot.num_experts, view, style)
    # Python loops over plain lists, and one cached Style per (heat step, mark): a 48-layer model has
    # thousands of cells, redrawn at every stats refresh.
    levels = np.rint(np.clip(cells["heat"], 0.0, 1.0) * LEVELS).astype(int).tolist()
    styles = _styles(style)
    label_style = style.base + Style(color=style.label_color) if style.unicode else style.base
    rates = snapshot.layer_hit_rates
    lines = []
    if view.half_blocks and style.unicode:
        for top in range(0, snapshot.num_moe_layers, 2):
            bottom = top + 1 if top + 1 < snapshot.num_moe_layers else None
            label = f"L{snapshot.layer_ids[top]:<3}"[:LABEL_WIDTH - 1] + " "
            row = [Segment(label, label_style)]
            for c, level in enumerate(levels[top]):
                row.append(Segment("▀" * width, _half_block_style(style, styles, level,
                                                                  None if bottom is None else levels[bottom][c])))
            rate = (rates[top] + (rates[bottom] if bottom is not None else rates[top])) / 2
            row.append(Segment(f" {rate:>3.0%}", label_style))
            lines.append(row)
        return lines
    marks = UNICODE_MARKS if style.unicode else ASCII_MARKS
    # 3 missed, 2 pinned, 1 resident, 0 none: the first that applies
    kinds = np.where(cells["missed"], 3, np.where(cells["pinned"], 2, np.where(cells["resident"], 1, 0))).tolist()
    names = ("none", "resident", "pinned", "missed")
    # Each column's text, centred in its cells: built once per kind, not per cell.
    glyphs = [_centred(marks[name], width) for name in names]
    framed = width >= (3 if style.unicode else 4)
    for i in range(snapshot.num_moe_layers):
        here = view.cursor is not None and view.cursor[0] == i
        label = (("▸" if style.unicode else ">") if here else "L") + f"{snapshot.layer_ids[i]:<3}"
        row = [Segment(label[:LABEL_WIDTH - 1] + " ", label_style)]
        for c, (level, kind) in enumerate(zip(levels[i], kinds[i], strict=True)):
            selected = here and view.cursor[1] == c
            if style.unicode:
                text = glyphs[kind]
                if selected and framed:
                    text = FRAME[0] + _centred(marks[names[kind]], width - 2) + FRAME[1]
                row.append(Segment(text, _cell_style(style, styles, level, selected and not framed, kind == 3)))
            else:
                density = ASCII_DENSITY[int(round(cells["heat"][i, c] * (len(ASCII_DENSITY) - 1)))]
                text = _centred(density + marks[names[kind]], width)
                if selected and framed:
                    text = "[" + _centred(density + marks[names[kind]], width - 2) + "]"
                row.append(Segment(text, style.base + Style(reverse=selected and not framed)))
        row.append(Segment(f" {rates[i]:>3.0%}", label_style))
        lines.append(row)
    return lines


def _centred(text: str, width: int) -> str:
    pad = width - len(text)
    return " " * (pad // 2) + text + " " * (pad - pad // 2) if pad > 0 else text[:width]


def legend(style: HeatmapStyle = HeatmapStyle(), width: int = 60) -> list[Segment]:
    """The legend on one row, cut at `width` (legend_lines wraps it instead)."""
    rows = legend_lines(style, 1 << 16)
    cut: list[Segment] = []
    room = width
    for segment in rows[0]:
        cut.append(Segment(segment.text[:room], segment.style))
        room -= len(cut[-1].text)
        if room <= 0:
            break
    return cut


def legend_lines(style: HeatmapStyle = HeatmapStyle(), width: int = 60) -> list[list[Segment]]:
    """The legend as rows of at most `width` cells: its entries wrap instead of being cut."""
    if style.unicode:
        scale = [Segment("low ", style.base)]
        scale += [Segment(" ", style.base + Style(bgcolor=gradient_color(style.gradient, j / 7))) for j in range(8)]
        scale.append(Segment(" high", style.base))
        entries = [scale] + [[Segment(text, style.base)] for text in
                             ("• cached", "◆ pinned", "× missed", "% = layer hit rate")]
    else:
        entries = [[Segment(text, style.base)] for text in
                   (f"heat '{ASCII_DENSITY.strip()}' low->high", "o cached", "P pinned", "x missed",
                    "% = layer hit rate")]
    rows: list[list[Segment]] = [[]]
    used = 0
    for entry in entries:
        size = sum(len(segment.text) for segment in entry)
        if rows[-1] and used + 2 + size > width:
            rows.append([])
            used = 0
        if rows[-1]:
            rows[-1].append(Segment("  ", style.base))
            used += 2
        rows[-1].extend(entry)
        used += size
    return rows


def wrap_words(text: str, width: int) -> list[str]:
    """`text` in rows of at most `width` characters, broken between words (a longer word is cut)."""
    return textwrap.wrap(text, max(width, 1), break_on_hyphens=False) or [""]


def describe(snapshot: CacheSnapshot, view: View, style: HeatmapStyle, layer: int, column: int,
             last_used: np.ndarray | None = None) -> str:
    """What the cell at (layer, column) covers, for the details under the heatmap: the same fields in the
    same order for every cell (`last_used`: per (layer, expert), the step it was last routed to, -1 never)."""
    per, _ = columns_for(snapshot.num_experts, view, style)
    first = view.first_expert + column * per
    experts = range(first, min(first + per, snapshot.num_experts))
    if not experts:
        return ""
    sl = slice(experts.start, experts.stop)
    who = f"expert {first}" if per == 1 else f"experts {first}-{experts.stop - 1}"

    def total(a: np.ndarray) -> int:
        return int(a[layer, sl].sum())

    def flag(mask: np.ndarray) -> str:
        count = total(mask)
        return ("yes" if count else "no") if len(experts) == 1 else f"{count}/{len(experts)}"

    if last_used is None or last_used.shape != snapshot.requests.shape:
        used = "unknown"
    else:
        step = int(last_used[layer, sl].max())
        used = "never" if step < 0 else f"step {step:,} of {snapshot.steps:,}"
    return (f"layer {snapshot.layer_ids[layer]} {who}: routings {total(snapshot.requests):,}, "
            f"hits {total(snapshot.hits):,}, misses {total(snapshot.misses):,}, loads {total(snapshot.loads):,}, "
            f"evictions {total(snapshot.evictions):,}, resident {flag(snapshot.resident)}, "
            f"pinned {flag(snapshot.pinned)}, last used {used}")
