"""StreamingReply: text appended in fragments must show exactly what wrapping the whole text at once shows."""

from __future__ import annotations

import random

from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll

from app.widgets.chat import StreamingReply

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
