"""Chat widgets. StreamingReply: text appended in fragments must show exactly what wrapping the whole text at
once shows. MessageView: shows what Rich renders for the Markdown, at the widget's width, and text in it can
be selected with the mouse. Readout (the stats panel's rows): redraws what changed, cuts what does not fit."""

from __future__ import annotations

import random

from moe_tui.app.textual_compat import layout_passes
from moe_tui.app.widgets.chat import PAGE_OVERLAP, ChatScroll, MessageView, StreamingReply
from moe_tui.app.widgets.gauges import Readout, grid
from rich.markdown import Markdown
from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll

REPLY = (
    "Here is a function:\n\n```python\ndef merge(a, b):\n    out = []\n\twhile a and b:\n"
    "        out.append((a if a[0] < b[0] else b).pop(0))\n    return out + a + b\n```\n\n"
    + "A long paragraph that has to wrap over several rows of the terminal, word by word, " * 4
    + "\nünïcödé and wide 漢字 characters too.\n"
)


class Host(App):
    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield StreamingReply()


def shown(reply: StreamingReply) -> list[str]:
    rows = [reply.render_line(y).text.rstrip() for y in range(reply.content_size.height)]
    while rows and not rows[-1]:
        rows.pop()
    return rows


def expected(app: App, text: str, width: int) -> list[str]:
    rows = []
    for paragraph in text.split("\n"):
        lines = Text(paragraph).wrap(app.console, width) if paragraph else []
        rows += [line.plain.rstrip() for line in lines] or [""]
    while rows and not rows[-1]:
        rows.pop()
    return rows


async def test_fragments_render_like_the_whole_text_and_rewrap_on_resize():
    app = Host()
    async with app.run_test(size=(60, 50)) as pilot:
        reply = app.query_one(StreamingReply)
        await pilot.pause()
        rng = random.Random(7)
        i = 0
        while i < len(REPLY):
            n = rng.randint(1, 12)
            reply.append(REPLY[i : i + n])
            i += n
            if rng.random() < 0.3:
                await pilot.pause()
        await pilot.pause()
        assert reply.text == REPLY
        width = reply.content_size.width
        assert shown(reply) == expected(app, REPLY, width)
        assert reply.size.height >= len(expected(app, REPLY, width)) + 1  # grew to hold every row

        await pilot.resize_terminal(40, 50)
        await pilot.pause()
        assert reply.content_size.width < width
        assert shown(reply) == expected(app, REPLY, reply.content_size.width)


class AnchoredChat(App):
    """The app's chat: anchored at its newest rows, a prompt above the streaming reply."""

    def compose(self) -> ComposeResult:
        with ChatScroll() as box:
            yield MessageView("user", "Write `merge(a, b)`")
            yield StreamingReply()
        box.anchor()


async def test_a_streaming_reply_grows_a_page_at_a_time_without_hiding_what_was_not_read():
    app = AnchoredChat()
    async with app.run_test(size=(60, 20)) as pilot:
        box, reply = app.query_one(VerticalScroll), app.query_one(StreamingReply)
        await pilot.pause()
        viewport = box.scrollable_content_region.height
        prompt = app.query_one(MessageView)
        question = prompt.outer_size.height + 1  # its bottom margin
        heights = set()
        for row in range(3 * viewport):
            reply.append(f"{'' if row == 0 else chr(10)}row {row}")
            await pilot.pause()
            top = box.scroll_y - reply.virtual_region.y  # the reply's first row in view
            in_view = range(max(top, 0), top + viewport)
            assert shown(reply)[row] == f"row {row}"
            assert row in in_view  # the newest row is on screen
            assert max(row - PAGE_OVERLAP + 1, 0) in in_view  # and the rows read just before it
            if row < viewport - 2 - question:
                # The reply's start and the question it answers stay in view until its first page is full.
                assert 0 in in_view and box.scroll_y <= prompt.virtual_region.y
            heights.add(reply.size.height)
        # A height per page, not per row: each growth is a layout pass over the whole screen.
        assert len(heights) <= 2 + 3 * viewport // (viewport - PAGE_OVERLAP)


async def test_a_growing_reply_costs_one_layout_pass():
    """Textual asks for a second full layout pass whenever one changes a widget's virtual size; the chat's
    widgets skip it (OnePassResize). Typing waits behind every pass while a reply streams."""
    app = AnchoredChat()
    async with app.run_test(size=(60, 20)) as pilot:
        reply = app.query_one(StreamingReply)
        await pilot.pause()
        height = reply.size.height
        with layout_passes(app.screen) as passes:
            reply.append("\n".join(f"row {row}" for row in range(height + 2)))
            for _ in range(5):
                await pilot.pause()
        assert reply.size.height > height and len(passes) == 1


class Messages(App):
    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield MessageView("user", "Write `merge(a, b)`")
            yield MessageView("assistant", REPLY)


def rich_rows(app: App, text: str, width: int) -> list[str]:
    """The golden reference: Rich's own rendering of the Markdown at that width."""
    lines = app.console.render_lines(Markdown(text, hyperlinks=False), app.console.options.update_width(width))
    rows = ["".join(segment.text for segment in line).rstrip() for line in lines]
    while rows and not rows[0]:
        rows.pop(0)
    return rows


async def test_a_message_shows_its_markdown_as_rich_renders_it_and_rewraps_on_resize():
    app = Messages()
    async with app.run_test(size=(60, 50)) as pilot:
        await pilot.pause()
        view = app.query(MessageView)[1]
        widths = []
        for terminal_width in (60, 40):
            await pilot.resize_terminal(terminal_width, 50)
            await pilot.pause()
            widths.append(view.content_size.width)
            rows = [view.render_line(y).text.rstrip() for y in range(view.content_size.height)]
            assert rows == rich_rows(app, REPLY, widths[-1])  # height: auto holds every row, no more
            assert any(row.strip() == "def merge(a, b):" for row in rows)  # the fence's code, not its ```
            assert not any("```" in row or "**" in row for row in rows)
        assert widths[1] < widths[0]


async def test_text_in_a_message_can_be_selected_with_the_mouse():
    app = Messages()
    async with app.run_test(size=(60, 50)) as pilot:
        await pilot.pause()
        view = app.query(MessageView)[1]
        rows = [view.render_line(y).text.rstrip() for y in range(view.content_size.height)]
        y = next(i for i, row in enumerate(rows) if "def merge" in row)
        x = rows[y].index("def merge")
        left = view.region.x + view.styles.gutter.left  # drag from 'def' on that row to the next row's end
        await pilot.mouse_down(offset=(left + x, view.region.y + y))
        await pilot.hover(offset=(left + len(rows[y + 1]), view.region.y + y + 1))
        await pilot.mouse_up(offset=(left + len(rows[y + 1]), view.region.y + y + 1))
        await pilot.pause()
        selected = app.screen.get_selected_text()
        assert selected is not None and selected.startswith("def merge(a, b):\n") and "out = []" in selected
        highlighted = view.render_line(y)  # the selection is drawn
        assert any(segment.style and segment.style.bgcolor for segment in highlighted if "def" in segment.text)


class Gauges(App):
    def compose(self) -> ComposeResult:
        yield Readout()


async def test_a_readout_shows_its_rows_redraws_a_changed_row_and_cuts_long_ones_with_an_ellipsis():
    app = Gauges()
    async with app.run_test(size=(30, 10)) as pilot:
        readout = app.query_one(Readout)
        readout.show(grid([("decode", "150.0 tok/s"), ("tokens", "12"), ("load bw", "x" * 40)]))
        await pilot.pause()

        def rows():
            return [readout.render_line(y).text.rstrip() for y in range(readout.size.height)]

        assert readout.size.height == 3
        assert rows()[:2] == ["decode   150.0 tok/s", "tokens   12"]
        assert rows()[2].endswith("…") and len(rows()[2]) == 30
        readout.show(grid([("decode", "151.5 tok/s"), ("tokens", "13"), ("load bw", "x" * 40)]))
        await pilot.pause()
        assert rows()[:2] == ["decode   151.5 tok/s", "tokens   13"]
        readout.show("one row")
        await pilot.pause()
        assert readout.size.height == 1 and rows() == ["one row"]


async def test_a_reply_that_is_one_huge_line_costs_linear_time():
    """Each fragment re-wraps a bounded tail, not the whole line so far (a 3.5 MB line held the UI for
    over a minute)."""
    app = AnchoredChat()
    async with app.run_test(size=(60, 20)) as pilot:
        reply = app.query_one(StreamingReply)
        await pilot.pause()
        wrapped = []
        wrap = reply._wrap
        reply._wrap = lambda paragraph: (wrapped.append(len(paragraph)), wrap(paragraph))[1]
        fragment = ("word " * 200)[:1000]
        for _ in range(300):
            reply.append(fragment)
        assert sum(wrapped) <= 10 * len(reply.text)
        assert "".join(strip.text for strip in reply._strips).replace(" ", "") == reply.text.replace(" ", "")


async def test_a_reply_shows_its_prompt_progress_until_text_arrives():
    app = AnchoredChat()
    async with app.run_test(size=(60, 20)) as pilot:
        reply = app.query_one(StreamingReply)
        reply.status = "reading the prompt: 512 of 9,800 tokens · Esc cancels"
        await pilot.pause()
        assert "512 of 9,800" in reply.render_line(0).text
        reply.append("def f():")
        await pilot.pause()
        assert reply.render_line(0).text.strip().startswith("def f():")


def test_reply_marks_stay_outside_an_open_code_block():
    from moe_tui.app.main import _shown

    shown = _shown("Here:\n```python\ndef f():\n    return", "cancelled")
    assert shown.endswith("```\n\n*(cancelled)*")
    assert "max_tokens" in _shown("all of it", "truncated") and _shown("all", "complete") == "all"
