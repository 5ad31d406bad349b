"""Rows of numbers that repaint cheaply (Readout), and grid() to align them in columns."""

from __future__ import annotations

from rich.text import Text
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.widget import Widget

from .rows import StyledRows

LABEL_WIDTH = 8


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


def _lines(text: Text | str) -> list[Text]:
    return list((Text(text) if isinstance(text, str) else text).split("\n"))


class Readout(StyledRows, Widget):
    """Rows of text that change a few times a second. Each row is drawn once per change through the Line
    API; a change repaints only the rows that differ, and lays out only when the number of rows changes.
    A row too long for the width goes on in the next row (under its values), so nothing is cut at 80
    columns; one that cannot be broken is cut with an ellipsis."""

    DEFAULT_CSS = "Readout { height: auto; }"

    def __init__(self, steady: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steady = steady
        self.text_lines: list[Text] = []  # as shown with show()
        self.reserved: list[tuple[Text, ...]] = []  # steady: per line, its widest forms; their rows are held
        self.lines: list[Text] = []  # the rows drawn at self._width
        self._strips: dict[int, Strip] = {}  # row -> drawn at self._width
        self._width = 0
        self._most_rows = (0, 0)  # (width, most rows shown at that width)

    def _rows(self, width: int) -> list[Text]:
        if width <= 0:
            return list(self.text_lines)
        rows = [row for line in self.text_lines for row in wrapped(line, width)]
        # steady: never fewer rows than before at this width: a number that grows a digit and wraps one row more, then
        # less, must not re-lay out the screen at every stats tick (a key typed meanwhile would wait for it).
        if not self.steady:
            return rows
        seen, most = self._most_rows
        if seen != width:
            most = sum(max((len(wrapped(line, width)) for line in lines), default=0) for lines in self.reserved)
        most = max(len(rows), most)
        self._most_rows = (width, most)
        return rows + [Text("")] * (most - len(rows))

    def show(self, text: Text | str) -> None:
        self.text_lines = _lines(text)
        self._update(self._rows(self._width or self.size.width))

    def reserve(self, *texts: Text | str) -> None:
        """Hold, at every width, at least the rows the widest of `texts` takes line by line (steady readouts):
        given the widest the numbers get, the readout's height is fixed from its first show instead of growing
        when a number first gets longer, which lays out the whole screen again (a key typed meanwhile waits)."""
        self.reserved = list(zip(*map(_lines, texts), strict=False))
        self._most_rows = (0, 0)

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
