"""Memory gauges and routing/speed statistics, drawn from one CacheSnapshot at a time."""

from __future__ import annotations

from collections import deque

from moe_tui.inference import CacheSnapshot
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Sparkline

from .rows import StyledRows

BAR_WIDTH = 8
LABEL_WIDTH = 8


def human_bytes(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def bar(fraction: float, width: int = BAR_WIDTH, unicode: bool = True) -> Text:
    """A threshold-coloured bar: green below 70%, yellow below 90%, red above."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    color = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"
    full, empty = ("█", "░") if unicode else ("#", ".")
    return Text(full * filled, style=color) + Text(empty * (width - filled), style="dim")


def grid(rows: list[tuple[str | Text, ...]]) -> Text:
    """Rows of cells as one Text: a bold first column, every column padded to its widest cell. (A Rich
    Table looks the same but costs several times more to render, and these repaint on every stats tick.)"""
    cells = [[c if isinstance(c, Text) else Text(c) for c in row] for row in rows]
    widths = [max(row[j].cell_len for row in cells if j < len(row)) for j in range(max(map(len, cells)))]
    widths[0] = max(widths[0], LABEL_WIDTH)
    out = Text(no_wrap=True, overflow="ellipsis", end="")
    for i, row in enumerate(cells):
        if i:
            out.append("\n")
        for j, cell in enumerate(row):
            if j:
                out.append(" ")
            out.append_text(Text(cell.plain, style="bold") if j == 0 else cell)
            if j < len(row) - 1:
                out.append(" " * (widths[j] - cell.cell_len))
    return out


def memory_table(snap: CacheSnapshot, unicode: bool = True) -> Text:
    m = snap.memory
    total = m.system_used_bytes + m.system_available_bytes
    rows: list[tuple[str | Text, ...]] = [
        (label, bar(used / limit if limit else 0.0, unicode=unicode), f"{human_bytes(used)}/{human_bytes(limit)}")
        for label, used, limit in (
            ("experts", m.expert_cache_bytes, m.expert_cache_budget_bytes),
            ("RSS", m.rss_bytes, total),
            ("MLX", m.mlx_active_bytes, total),
            ("MLX peak", m.mlx_peak_bytes, total),
            ("RAM", m.system_used_bytes, total),
        )
    ]
    rows.append(("MLX cache", "", human_bytes(m.mlx_cache_bytes)))
    return grid(rows)


def stats_table(snap: CacheSnapshot, optimum: dict | None, speeds: deque) -> Text:
    avg = sum(speeds) / len(speeds) if speeds else 0.0
    top = max(speeds) if speeds else 0.0
    rows = [
        ("decode", f"{snap.decode_tps:.1f} tok/s  avg {avg:.1f}  max {top:.1f}"),
        ("prefill", f"{snap.prefill_tps:.0f} tok/s  TTFT {snap.ttft_s * 1000:.0f} ms"),
        ("tokens", f"{snap.tokens_generated}  steps {snap.steps}"),
        ("hit rate", f"{snap.hit_rate:.1%}"),
    ]
    if optimum:
        rows.append(("Belady", f"{optimum.get('belady', 0):.1%} (same capacity, cold start)"))
    if snap.mode == "fast":
        rows.append(("fallback", f"{snap.fallback_rate:.1%} of routings"))
    rows.append(("loaded", f"{int(snap.loads.sum())} experts  {human_bytes(snap.bytes_read)}"))
    rows.append(("load bw", f"{human_bytes(snap.load_bandwidth)}/s"))
    return grid(rows)


def wrapped(line: Text, width: int, indent: int = LABEL_WIDTH + 1) -> list[Text]:
    """`line` as rows of at most `width` cells: broken at a space past the label column, the rest indented
    under the values. A line with no such space is left whole (the caller cuts it with an ellipsis)."""
    rows = []
    while line.cell_len > width > indent + 1:
        cut = line.plain.rfind(" ", indent + 1, width + 1)
        if cut <= indent:
            break
        head, tail = line.divide([cut])
        head.rstrip()
        rows.append(head)
        rest = tail.plain.lstrip(" ")
        line = Text(" " * indent) + tail[len(tail.plain) - len(rest):]
    rows.append(line)
    return rows


class Readout(StyledRows, Widget):
    """Rows of text that change a few times a second. Each row is drawn once per change through the Line
    API; a change repaints only the rows that differ, and lays out only when the number of rows changes.
    A row too long for the width goes on in the next row (under its values), so nothing is cut at 80
    columns; one that cannot be broken is cut with an ellipsis."""

    DEFAULT_CSS = "Readout { height: auto; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.text_lines: list[Text] = []  # as shown with show()
        self.lines: list[Text] = []  # the rows drawn at self._width
        self._strips: dict[int, Strip] = {}  # row -> drawn at self._width
        self._width = 0

    def _rows(self, width: int) -> list[Text]:
        if width <= 0:
            return list(self.text_lines)
        return [row for line in self.text_lines for row in wrapped(line, width)]

    def show(self, text: Text | str) -> None:
        self.text_lines = list((Text(text) if isinstance(text, str) else text).split("\n"))
        self._update(self._rows(self._width or self.size.width))

    def _update(self, lines: list[Text]) -> None:
        if len(lines) != len(self.lines):
            self.lines, self._strips = lines, {}
            self.refresh(layout=True)
            return
        for y, (old, new) in enumerate(zip(self.lines, lines, strict=True)):
            if old.plain != new.plain or old.spans != new.spans or old.style != new.style:
                self.lines[y] = new
                self._strips.pop(y, None)
                self.refresh(Region(0, y, self.size.width, 1))

    def on_resize(self) -> None:
        if self.size.width != self._width:
            self._width = self.size.width
            self._strips = {}
            self._update(self._rows(self._width))
            self.refresh()

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(self._rows(width))

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips = {}  # drawn with the old theme's colours

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if width != self._width:
            self._width = width
            self.lines, self._strips = self._rows(width), {}
        strip = self._strips.get(y)
        if strip is None:
            if y >= len(self.lines):
                return self.row_over_style(None, width)
            line = self.lines[y].copy()
            line.truncate(width, overflow="ellipsis")
            strip = self._strips[y] = self.row_over_style(Strip(list(line.render(self.app.console)), line.cell_len),
                                                          width)
        return strip


class StatsPanel(Vertical):
    """Gauges, a decode tok/s sparkline and the routing numbers."""

    DEFAULT_CSS = """
    StatsPanel { height: auto; }
    StatsPanel Sparkline { height: 2; margin: 0 1; }

    """

    def __init__(self, unicode: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.unicode = unicode
        self.speeds: deque[float] = deque(maxlen=120)
        self._last_tokens = -1

    def compose(self) -> ComposeResult:
        yield Readout(id="memory")
        yield Sparkline([], id="speed")
        yield Readout(id="routing")

    def show_remote(self, remote) -> None:
        """Throughput and latency measured by this client (servers without expert telemetry)."""
        last = remote.decode_tps[-1] if remote.decode_tps else 0.0
        avg = sum(remote.decode_tps) / len(remote.decode_tps) if remote.decode_tps else 0.0
        ttft = remote.ttft_s[-1] * 1000 if remote.ttft_s else 0.0
        table = grid([
            ("decode", f"{last:.1f} tok/s  avg {avg:.1f}  max {max(remote.decode_tps, default=0):.1f}"),
            ("TTFT", f"{ttft:.0f} ms  (min {min(remote.ttft_s, default=0) * 1000:.0f} ms)"),
            ("replies", f"{remote.replies}  tokens {remote.tokens}"),
        ])
        self.speeds.extend(remote.decode_tps[-1:])
        self.query_one("#speed", Sparkline).data = list(self.speeds)
        self.query_one("#memory", Readout).show("memory: on the server (no telemetry)")
        self.query_one("#routing", Readout).show(table)

    def show(self, snap: CacheSnapshot, optimum: dict | None) -> None:
        if snap.tokens_generated != self._last_tokens and snap.decode_tps > 0:
            self.speeds.append(snap.decode_tps)
            self._last_tokens = snap.tokens_generated
            self.query_one("#speed", Sparkline).data = list(self.speeds)
        memory = memory_table(snap, self.unicode)
        routing = stats_table(snap, optimum, self.speeds)
        self.query_one("#memory", Readout).show(memory)
        self.query_one("#routing", Readout).show(routing)


class CachePanel(VerticalScroll):
    """The right-hand column: heatmap, gauges and numbers; it scrolls when the terminal is short."""

    HELP = """
## Cache panel

The expert-cache heatmap, memory gauges (expert cache vs its budget, RSS, MLX, RAM), decode tok/s over
time, prefill speed and time to first token, the hit rate beside Belady's optimum at the same capacity,
and how many experts were loaded. Up/Down and the mouse wheel scroll it when it does not fit.
F2 hides it (on a narrow terminal, F2 shows it in place of the chat).
"""
