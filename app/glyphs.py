"""ASCII mode (`glyphs = "ascii"`): every row drawn goes through a filter that keeps the terminal's output ASCII."""

from __future__ import annotations

import unicodedata
from functools import lru_cache

from rich.cells import cell_len
from rich.segment import Segment
from textual.color import Color
from textual.filter import LineFilter

# What Textual, Rich and the app draw, each as one ASCII character of the same width. Anything else that
# is not ASCII (a model's or a file's text included) becomes "?" per cell, so the layout stays in step.
_ASCII = {
    **dict.fromkeys("─━═╌╍┄┅┈┉╶╴╺╸▔⎺—–‒―", "-"),
    **dict.fromkeys("│┃║╎╏┆┇┊┋╷╵╻╹▏▎▍▌▋▊▉▐▕", "|"),
    **dict.fromkeys("┌┐└┘┏┓┗┛╭╮╰╯├┤┬┴┼┣┫┳┻╋╔╗╚╝╠╣╦╩╬┍┑┕┙┎┒┖┚┝┥┯┷┿╒╓╕╖╘╙╛╜╞╟╡╢╤╥╧╨╪╫", "+"),
    "▁": "_", "▂": "_", "▃": ".", "▄": "-", "▅": "=", "▆": "+", "▇": "#", "█": "#", "▀": "^", "▖": ".",
    "░": ".", "▒": ":", "▓": "#",
    "•": "*", "●": "*", "◆": "P", "◇": "o", "○": "o", "⭘": "o", "■": "#", "□": "o", "▪": "*", "▫": "o",
    "×": "x", "·": ".", "…": ".", "≈": "~", "≤": "<", "≥": ">", "≠": "!", "±": "+",
    "←": "<", "→": ">", "↑": "^", "↓": "v", "▲": "^", "▼": "v", "◀": "<", "▶": ">", "⏎": "<",
    "‘": "'", "’": "'", "“": '"', "”": '"', "«": '"', "»": '"', "\u00a0": " ", "\u2002": " ", "\u2003": " ",
    "✓": "v", "✔": "v", "✗": "x", "✘": "x",
}


@lru_cache(maxsize=4096)
def ascii_text(text: str) -> str:
    """`text` with each non-ASCII character replaced by ASCII of the same width (combining marks dropped)."""
    if text.isascii():
        return text
    out = []
    for char in text:
        if char.isascii():
            out.append(char)
        elif char in _ASCII:
            out.append(_ASCII[char])
        else:
            width = cell_len(char)
            if width:
                # A letter with an accent keeps its letter (é -> e); anything else is a question mark.
                base = unicodedata.normalize("NFKD", char)[0]
                out.append(base if width == 1 and base.isascii() and base.isprintable() else "?" * width)
    return "".join(out)


class AsciiFilter(LineFilter):
    """Rewrites every drawn row as ASCII: borders, scrollbars, the sparkline, Markdown's bullets, toasts."""

    def apply(self, segments: list[Segment], background: Color) -> list[Segment]:
        return [segment if segment.control or segment.text.isascii()
                else Segment(ascii_text(segment.text), segment.style, segment.control) for segment in segments]
