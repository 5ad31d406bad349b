"""Untrusted text (model replies, remote servers, attached files) made safe to draw on the terminal."""

from __future__ import annotations

import re

from .coding import FENCE

# Shown in place of each complete escape sequence: the user sees that something was removed, and an
# OSC 52 clipboard payload or an SGR colour code does not fill the screen with its bytes.
REMOVED = "\u241b"  # ␛ SYMBOL FOR ESCAPE

# A complete escape sequence, 7-bit (ESC + introducer) or 8-bit (the C1 introducer itself):
#   CSI  ESC [ / U+009B, parameter bytes, intermediate bytes, one final byte (SGR, clear screen, cursor moves);
#   OSC/DCS/SOS/PM/APC  ESC ] P X ^ _ / U+009D U+0090 U+0098 U+009E U+009F, a payload, then BEL, ESC \ or U+009C;
#   the rest  ESC, intermediate bytes, one final byte (ESC 7, ESC c reset, ESC ( B charset).
# A string's payload may hold no control character: a stray introducer must not swallow the text up to some
# later BEL, and a sequence left unmatched is still harmless, since every control is then made visible.
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]"
    r"|(?:\x1b[\]PX^_]|[\x9d\x90\x98\x9e\x9f])[^\x00-\x1f\x7f-\x9f]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b(?![\[\]PX^_])[\x20-\x2f]*[\x30-\x7e]"
)

# Every character a terminal may act on: C0 but tab and newline, DEL, C1. Text without one (nearly every
# streamed chunk) is returned as it is after this one scan.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

# Controls left after the sequences are removed, made visible. C0 and DEL as Unicode control pictures
# (U+2400 + code, DEL U+2421): one cell each, and unlike a `\x1b` escape they cannot be mistaken for the
# same four characters typed in a code sample. C1 has no pictures; ECMA-48 defines each as ESC followed by
# code - 0x40, so it shows as that pair (the 8-bit CSI U+009B as ␛[, like the 7-bit one). None of these
# pictures is a control, which makes terminal_safe idempotent.
_VISIBLE = {code: chr(0x2400 + code) for code in range(0x20) if code not in (0x09, 0x0A)}
_VISIBLE[0x7F] = "\u2421"
_VISIBLE.update({code: REMOVED + chr(code - 0x40) for code in range(0x80, 0xA0)})
# Bidirectional embeddings, overrides and isolates: a terminal that reorders text would show `rm x‮txt.py` as
# something else than what runs ("Trojan Source"). Named, as they have no picture.
# In angle quotes, not brackets: the chat renders Markdown, and `[U+202E](https://...)` would become a link.
_VISIBLE.update({code: f"‹U+{code:04X}›" for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def terminal_safe(text: str) -> str:
    """`text` with nothing a terminal would act on: each complete escape sequence becomes one ␛, every other
    control character its visible picture; newline and tab stay, CRLF becomes a newline.

    A lone CR is shown (␍), not dropped or obeyed: obeyed it returns the cursor to overwrite the line, so a
    reply could hide what it printed first. Apply when drawing, not when storing: the stored text stays as
    received and is made safe on every redraw."""
    if _CONTROL.search(text) is None:
        return text
    return _SEQUENCE.sub(REMOVED, text.replace("\r\n", "\n")).translate(_VISIBLE)


def revealed(text: str) -> str:
    """`text` with nothing a terminal would act on and nothing hidden: every control character, inside an escape
    sequence or not, becomes its visible picture (`␛]0;...␇`); newline and tab stay, CRLF becomes a newline.
    For what the user is asked to approve (a diff to write, a command to run), where terminal_safe's one ␛ per
    sequence would hide what the sequence holds, and that is written or run as it is."""
    if _CONTROL.search(text) is None:
        return text
    return text.replace("\r\n", "\n").translate(_VISIBLE)


def markdown_safe(markdown: str) -> str:
    """A reply's Markdown for the chat: terminal_safe, but its code blocks revealed, since /save, /copy and
    /apply take them as they are (one ␛ for a whole sequence hid what they would write)."""
    if _CONTROL.search(markdown) is None:
        return markdown
    parts, at = [], 0
    for match in FENCE.finditer(markdown):
        parts += [terminal_safe(markdown[at:match.start()]), revealed(match.group(0))]
        at = match.end()
    return "".join(parts) + terminal_safe(markdown[at:])


def markup_safe(text: str) -> str:
    """`text` terminal-safe and escaped for a Textual markup string (Label, Static, App.notify), so a path
    like `[/]x.py` shows as written instead of raising MarkupError or styling what follows.

    Textual's parser treats every `[` after a backslash as text and drops that one backslash, so escaping each
    `[` round-trips any text exactly; rich.markup.escape doubles a backslash before a tag-like `[`, which
    Textual then shows doubled (`C:\\d\\[x]` gained a backslash)."""
    return terminal_safe(text).replace("[", "\\[")
