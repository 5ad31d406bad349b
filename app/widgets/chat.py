"""Chat widgets: one Markdown view per message, and the prompt box (Enter sends, Shift+Enter/Ctrl+J newline)."""

from __future__ import annotations

import re

from rich.console import Console
from rich.markdown import Markdown as RichMarkdown
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.geometry import Region, Size
from textual.message import Message
from textual.selection import Selection
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Button, TextArea

from ..history import PromptHistory
from ..sanitize import markdown_safe, terminal_safe
from ..textual_compat import OnePassResize
from .completion import CompletionList
from .rows import StyledRows

# A CRLF ends a line like a LF: split on the LF alone, the CR would show (as ␍) at the end of each row.
_LINE_END = re.compile(r"\r?\n")
# A streaming line longer than this is broken (at a space where there is one), so that each fragment
# re-wraps a bounded tail: a reply that is one huge line would otherwise cost quadratic time.
LONG_LINE = 4096


def _paragraphs(text: str) -> list[str]:
    """`text` split into lines, long lines into pieces of at most LONG_LINE characters; the last is open."""
    pieces = []
    for line in _LINE_END.split(text):
        while len(line) > LONG_LINE:
            cut = line.rfind(" ", LONG_LINE // 2, LONG_LINE) + 1 or LONG_LINE
            pieces.append(line[:cut])
            line = line[cut:]
        pieces.append(line)
    return pieces


class ChatScroll(OnePassResize, VerticalScroll):
    """The chat's scrolling list of messages. Its scrollbar is always shown: one that appears when a reply
    first overflows the screen re-lays out the screen once more."""

    DEFAULT_CSS = """
    ChatScroll { overflow-y: scroll; }
    ChatScroll:focus { background: $accent 7%; scrollbar-color: $accent; }
    """
    BINDINGS = [Binding("question_mark", "app.toggle_keys", "keys", show=False)]
    HELP = """
## Chat

Arrows, PageUp/PageDown and the mouse wheel scroll. Drag over text and Ctrl+C copies it. Code blocks carry
a number: `/save N PATH` and `/copy N` take it.
"""


NOTICE_LABEL = "moe-tui says"  # the first row of the app's own messages (/help, /chats, errors)


class MessageView(OnePassResize, StyledRows, Widget):
    """A chat message as Markdown, code blocks syntax-highlighted.

    One widget per message: Rich renders the Markdown into rows once per width (and light/dark theme),
    and the Line API paints those rows. Textual's Markdown widget mounts a widget per block (each
    paragraph, list item, fence), so every message meant several mounts and layout passes, and every
    later layout pass walked all of them (`python scripts/ui_cost.py --message` measures a message's cost).
    Text can still be selected with the mouse; what is copied is the text as shown.
    `text` is kept as received (it is stored so); only what is drawn goes through terminal_safe."""

    DEFAULT_CSS = """
    MessageView { height: auto; margin: 0 1 1 1; padding: 0 1; }
    MessageView.user { border-left: thick $accent; }
    MessageView.assistant { border-left: thick $primary; }
    MessageView.notice { color: $text-muted; border-left: outer $secondary; background: $secondary 8%; }
    MessageView.cancelled { border-left: thick $error; }
    MessageView.found { background: $accent 15%; }
    """

    def __init__(self, role: str, text: str = "", message_id: int | None = None, markdown: str | None = None,
                 **kwargs) -> None:
        """`text` is the message; `markdown` what to show, when that differs (a cancelled reply's mark)."""
        super().__init__(classes=role, **kwargs)
        self.role = role
        self.text = text
        self.markdown = text if markdown is None else markdown
        self.message_id = message_id
        self._key: tuple[int, bool] | None = None  # what the rows were rendered for: width, dark theme
        self._rows: list[Strip] = []

    def _rendered(self, width: int) -> list[Strip]:
        dark = self.app.current_theme.dark
        if self._key != (width, dark):
            self.prerender(self.app.console, width, dark)
        return self._rows

    def prerender(self, console: Console, width: int, dark: bool) -> None:
        """Render the rows for this width and theme now; safe off the UI thread before the view is mounted
        (a long reply's Markdown is slow to render: done on the UI thread, keys would wait)."""
        # Rich keeps ESC in its segments: a reply's OSC 52 would write the clipboard on every redraw.
        markdown = RichMarkdown(markdown_safe(self.markdown), code_theme="monokai" if dark else "default",
                                hyperlinks=False)
        lines = console.render_lines(markdown, console.options.update_width(max(width, 1)), pad=False)
        while lines and not lines[0]:  # Rich starts a list with an empty row; the margin spaces messages
            lines.pop(0)
        if self.role == "notice":  # the app speaking, not the user or the model: labelled so
            lines.insert(0, list(Text(NOTICE_LABEL, style="bold italic").render(console)))
        self._rows = [Strip(line).simplify() for line in lines]
        self._key = (width, dark)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(self._rendered(width))

    def render_line(self, y: int) -> Strip:
        width = self.content_size.width
        rows = self._rendered(width)
        if y >= len(rows):
            return self.row_over_style(None, width)
        row = rows[y]
        selection = self.text_selection
        span = selection.get_span(y) if selection is not None else None
        if span is not None:
            start, end = span
            end = row.cell_length if end == -1 else min(end, row.cell_length)
            if start < end:
                highlight = self.screen.get_component_rich_style("screen--selection")
                before, chosen, after = row.divide([start, end, row.cell_length])
                row = Strip.join([before, chosen.apply_style(highlight), after])
        return self.row_over_style(row, width).apply_offsets(0, y)

    def get_selection(self, selection: Selection) -> tuple[str, str] | None:
        rows = self._rendered(self.content_size.width)
        return selection.extract("\n".join(row.text.rstrip() for row in rows)), "\n"


class EarlierMessages(Button):
    """Top of the chat when older messages are not on screen: pressing it shows more of them.

    A chat keeps only its newest messages mounted: every layout pass (each mount, each time a streaming
    reply grows) walks every widget in the chat, so the cost would otherwise grow with its length."""

    DEFAULT_CSS = """
    EarlierMessages { width: 100%; margin: 0 1 1 1; }
    """

    def __init__(self) -> None:
        super().__init__("", compact=True)
        self.set_hidden(0)

    def set_hidden(self, count: int) -> None:
        self.hidden = count
        self.label = f"↑ {count} earlier message{'s' if count != 1 else ''} (Enter or click to show)"
        self.display = count > 0


HEIGHT_STEP = 8  # a short streaming reply is this many rows tall
PAGE_OVERLAP = 3  # rows of the previous page still in view after a longer reply grows by a page


class StreamingReply(OnePassResize, StyledRows, Widget):
    """A reply while it streams: plain text through the Line API, replaced by a MessageView (rendered as
    Markdown once) when it ends. Appending re-wraps only the last paragraph and repaints only the rows
    that changed. The height grows a page at a time (see _fit_height), because each change is a layout pass
    over the whole screen. (Not a fixed-height box that scrolls its text: every new row would repaint the
    whole box; see docs/performance.md.)"""

    DEFAULT_CSS = """
    StreamingReply { margin: 0 1 1 1; padding: 0 1; border-left: thick $primary; height: 8; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.text = ""
        self._done: list[Strip] = []  # wrapped rows of the finished paragraphs
        self._strips: list[Strip] = []  # _done + the rows of the paragraph still being written
        self._tail = ""  # text after the last newline
        self._width = 0
        self._status = ""

    @property
    def status(self) -> str:
        """A line shown (dimmed) while the reply has no text yet, e.g. how far a long prompt has been read."""
        return self._status

    @status.setter
    def status(self, line: str) -> None:
        if line != self._status:
            self._status = line
            self.refresh(Region(0, 0, self._width or self.content_size.width, 1))

    def _wrap(self, paragraph: str) -> list[Strip]:
        console = self.app.console
        lines = Text(terminal_safe(paragraph)).wrap(console, self._width) if paragraph else []
        return [Strip(line.render(console), line.cell_len) for line in lines] or [Strip.blank(0)]

    def _rewrap(self) -> None:
        *paragraphs, self._tail = _paragraphs(self.text)
        self._done = [strip for paragraph in paragraphs for strip in self._wrap(paragraph)]
        self._strips = self._done + self._wrap(self._tail)

    def on_resize(self) -> None:
        if self.content_size.width != self._width:
            self._width = max(self.content_size.width, 1)
            self._rewrap()
            self._fit_height()
            self.refresh()

    def render_line(self, y: int) -> Strip:
        if y == 0 and not self.text and self._status:
            status = Text(terminal_safe(self._status), style="dim", no_wrap=True, overflow="ellipsis")
            status.truncate(max(self.content_size.width, 1), overflow="ellipsis")
            return self.row_over_style(Strip(status.render(self.app.console), status.cell_len), self.content_size.width)
        return self.row_over_style(self._strips[y] if y < len(self._strips) else None, self.content_size.width)

    def append(self, fragment: str) -> None:
        """Add text: repaint the rows it changed, or lay out again when the widget has to grow."""
        self.text += fragment
        if not self._width:  # not laid out yet: on_resize wraps everything
            return
        first = len(self._done)
        # The tail is wrapped whole again: a sequence split over fragments is removed once it is complete.
        *finished, self._tail = _paragraphs(self._tail + fragment)
        for paragraph in finished:
            self._done.extend(self._wrap(paragraph))
        self._strips = self._done + self._wrap(self._tail)
        if not self._fit_height():  # growing repaints everything anyway
            self.refresh(Region(0, first, self._width, len(self._strips) - first))

    def _question_height(self, viewport: int) -> int:
        """Rows taken by the message just above (margins included), or 0 if it is not a short one."""
        siblings = self.parent.children
        index = siblings.index(self)
        above = siblings[index - 1] if index > 0 else None
        if not isinstance(above, MessageView):
            return 0
        rows = above.outer_size.height + above.styles.margin.top + above.styles.margin.bottom
        return rows if rows <= viewport // 3 else 0

    def _fit_height(self) -> bool:
        """Grow (never shrink) to hold every row plus one; True when the height changed.

        A short reply is HEIGHT_STEP rows. Past that it grows a page at a time, like a pager: first to
        what is left of the chat's height under the message it answers (when that takes at most a third
        of it), so the question and the reply's first row stay in view; then by a page less PAGE_OVERLAP
        rows, so the anchored chat moves a page at a time and the last rows read stay on screen above
        the new ones. The rows not yet written are blank; the reply's start is never hidden below them."""
        viewport = self.parent.scrollable_content_region.height
        page = viewport - self.styles.margin.bottom
        first_page = max(HEIGHT_STEP, page - self._question_height(viewport))
        step = max(HEIGHT_STEP, page - PAGE_OVERLAP)
        needed = len(self._strips) + 1
        if needed <= HEIGHT_STEP:
            height = HEIGHT_STEP
        elif needed <= first_page:
            height = first_page
        else:
            height = first_page + -(-(needed - first_page) // step) * step
        current = self.styles.height.value if self.styles.height is not None else 0
        if height > current:
            self.styles.height = height
            return True
        return False


class PromptInput(TextArea):
    """Multi-line prompt. Enter submits; Shift+Enter and Ctrl+J insert a newline."""

    HELP = """
## Prompt

**Enter** sends; **Shift+Enter** or **Ctrl+J**: a new line. **Up**/**Down** at the first/last line: earlier
messages. `/` starts a command (Tab completes it), `@path` attaches a file, `/help` lists all. **Esc**
cancels a reply, **Ctrl+R** regenerates, **Ctrl+E** edits your last message.
"""

    DEFAULT_CSS = """
    PromptInput { height: auto; min-height: 3; max-height: 10; }
    """

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent = PromptHistory()  # not `history`: TextArea keeps its undo history there
        self.completions: CompletionList | None = None  # the list above the prompt, when the app has one

    def accept_completion(self) -> bool:
        """Put the highlighted completion in place of the word being typed; False when none is shown."""
        menu = self.completions
        candidate = menu.chosen() if menu is not None else None
        if candidate is None or menu.completion is None:
            return False
        row, column = self.cursor_location
        start = menu.completion.start
        menu.hide()
        self.replace(candidate.insert, (row, start), (row, column))
        return True

    def _completion_key(self, key: str) -> bool:
        """While completions are listed: Tab takes one, Up/Down move, Esc closes the list. True if handled."""
        menu = self.completions
        if menu is not None and key == "tab":
            return menu.catch_up(self) and self.accept_completion()
        if menu is None or not menu.shown:
            return False
        if key in ("up", "down"):
            menu.move(-1 if key == "up" else 1)
            return True
        if key == "escape":
            menu.hide()
            return True
        return False

    def show_entry(self, text: str | None) -> bool:
        """Put a history entry in the prompt, the cursor at its end; False when there is none."""
        if text is None:
            return False
        self.text = text
        self.move_cursor(self.document.end)
        return True

    async def _on_key(self, event: events.Key) -> None:
        if self._completion_key(event.key):
            event.stop()
            event.prevent_default()
            return
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.sent.add(text)
                self.post_message(self.Submitted(text))
                self.clear()
            return
        # Up on the first line and Down on the last walk the history; elsewhere they move the cursor.
        row = self.cursor_location[0]
        if (event.key == "up" and row == 0 and self.show_entry(self.sent.older(self.text))) or (
                event.key == "down" and row == self.document.line_count - 1 and self.show_entry(self.sent.newer())):
            event.stop()
            event.prevent_default()
            return
        if event.key in ("shift+enter", "ctrl+j", "newline"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)
