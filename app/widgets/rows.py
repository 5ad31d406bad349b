"""What the app's Line-API widgets share: rows painted over the widget's own style."""

from __future__ import annotations

from rich.style import Style
from textual.geometry import Region
from textual.strip import Strip


class StyledRows:
    """Mix into a Line-API widget (before Widget or ScrollView): `row_over_style(strip, width)` lays a row
    over the widget's background and text colour and pads it to `width`. The style is computed once per
    paint, not once per row: `rich_style` walks every ancestor's styles."""

    _row_style = Style()

    def render_lines(self, crop: Region) -> list[Strip]:
        self._row_style = self.rich_style
        return super().render_lines(crop)

    def row_over_style(self, strip: Strip | None, width: int) -> Strip:
        """`strip` over the widget's style, `width` cells wide; None: a blank row."""
        style = self._row_style
        if strip is None:
            return Strip.blank(width, style)
        return strip.apply_style(style).extend_cell_length(width, style)
