"""The moe-tui Textual app: chat on the left, the expert cache on the right. A thin shell over the worker."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import math
import os
import signal
import sqlite3
import time
from functools import partial, wraps
from pathlib import Path

from moe_tui.inference.cache import POLICIES
from moe_tui.inference.events import Configure, Generate
from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import Footer, Header

from . import coding, edits
from .coding_commands import CodingCommands
from .commands import BY_NAME, command_help, help_text, parse_capacity
from .context_gauge import ContextGauge, deliver
from .dashboard import CACHE_HELP, MissCurve
from .glyphs import AsciiFilter
from .heatmap import HeatmapStyle
from .messages import (
    ConnectionChanged,
    EngineFailed,
    EngineInfo,
    EngineNotice,
    EngineReady,
    MissCurveReady,
    PrefillProgress,
    ReplyChunk,
    ReplyDone,
    SnapshotReady,
)
from .palette import MoeCommands
from .reply import Reply
from .sanitize import markup_safe, terminal_safe
from .settings import MAX_TEMPERATURE, Settings, remember
from .store import ChatStore, DataDirLock
from .textual_compat import add_line_filter
from .themes import VARIABLE_DEFAULTS, load_themes
from .widgets.chat import ChatScroll, EarlierMessages, MessageView, PromptInput, StreamingReply
from .widgets.completion import CompletionList
from .widgets.confirm import ConfirmScreen
from .widgets.dashboard import Dashboard
from .widgets.heatmap import HeatmapView
from .widgets.pickers import ChatPicker, Pick, snippet
from .worker import EngineSpec, InferenceProcess, InferenceWorker


def while_mounted(handler):
    """Worker messages can still arrive while the app shuts down and its widgets are gone: drop them then."""

    @wraps(handler)
    async def wrapper(self, event):
        try:
            result = handler(self, event)
            if hasattr(result, "__await__"):
                await result
        except NoMatches:
            if self.is_running and not self._exit:
                raise

    return wrapper


def store_writes(method):
    """A handler that writes to the chat store: a failed write (a full disk) is a notice, not a traceback."""

    @wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            self.store_failed(exc, "the change")

    return wrapper


class FailSoftStore:
    """The store as a streaming reply writes to it: a failed write is a notice, and the reply goes on streaming
    on screen; its row keeps what was saved last (or there is none)."""

    def __init__(self, app: MoeApp) -> None:
        self.app = app

    def add_message(self, *args, **kwargs) -> int | None:
        try:
            return self.app.store.add_message(*args, **kwargs)
        except sqlite3.Error as exc:
            self.app.store_failed(exc, "the reply (it is shown, not stored)")
            return None

    def update_message(self, message_id: int | None, content: str, status: str) -> None:
        if message_id is None:
            return
        try:
            self.app.store.update_message(message_id, content, status)
        except sqlite3.Error as exc:
            self.app.store_failed(exc, "the reply (it stays on screen)")


STORE_NOTICE_INTERVAL = 10.0  # seconds: a reply saved every second must not stack a notice a second

# Messages of a chat kept on screen (older ones load on request): a layout pass, on each mount and each
# time a streaming reply grows, walks every mounted widget, so its cost grows with this window.
# Figures: docs/performance.md, "Chat layout pass and the message window".
MESSAGE_WINDOW = 40
FULL_COLLECTION_HELD = 1 << 30  # gen2 threshold while a reply streams: no full cycle-collector pass
IDLE_COLLECTION_DELAY = 1.0  # seconds after a reply ends before the held full pass runs
NARROW_WIDTH = 76  # columns: below it the chat (40) and the cache panel (36) do not both fit
WIDE_WIDTH = 160  # columns: from here the cache dashboard takes half the width (its boxes in two columns)


class MoeApp(CodingCommands, App):
    TITLE = "moe-tui"
    COMMANDS = App.COMMANDS | {MoeCommands}
    CSS = """
    #main { height: 1fr; }
    #chat { width: 3fr; min-width: 40; }
    #messages { height: 1fr; }
    #side { width: 2fr; min-width: 36; border-left: solid $divider; padding: 0 1; scrollbar-size-vertical: 1; }
    #side.hidden { display: none; }
    #main.wide > #chat, #main.wide > #side { width: 1fr; }
    /* Narrow: the chat alone; F2 shows the cache panel in its place (never both, so nothing is clipped). */
    #main.narrow > #side { display: none; }
    #main.narrow.panel-only > #side { display: block; width: 1fr; min-width: 0; border-left: none; }
    #main.narrow.panel-only > #chat { display: none; }
    /* F1: Textual gives a pane's help text half the panel and clips the rest; the key list below scrolls. The
       text gets three quarters, less padding (it fits at 80x24), and scrolls if a longer one ever does not. */
    HelpPanel #widget-help { max-height: 75%; padding: 0; overflow-y: auto; }
    HelpPanel #widget-help MarkdownBlock { padding-left: 1; padding-right: 1; }
    HelpPanel KeyPanel#keys-help { min-height: 6; }
    /* The compact footer's right margin after every key left the docked palette key a cell short of the edge:
       the keys scrolled beneath showed through in the last column ("^p palettec"). */
    Footer.-compact FooterKey.-command-palette { margin-right: 0; padding-right: 1; }
    """
    BINDINGS = [
        Binding("escape", "cancel", "cancel", id="app.cancel"),
        Binding("f1", "toggle_keys", "keys", id="app.keys"),
        Binding("f2", "toggle_side", "cache panel", id="app.toggle_side"),
        Binding("ctrl+r", "regenerate", "regenerate", id="app.regenerate"),
        # priority: the prompt's own ctrl+e (end of line) would win while it has focus, which it nearly always has
        Binding("ctrl+e", "edit_last", "edit last", id="app.edit_last", priority=True, show=False),
        Binding("ctrl+n", "new_chat", "new chat", id="app.new_chat"),
        # priority: the prompt (a text area) would take them for its own cursor, which a one-line prompt rarely needs
        Binding("pageup", "page_chat(-1)", "page up", id="app.page_up", priority=True, show=False),
        Binding("pagedown", "page_chat(1)", "page down", id="app.page_down", priority=True, show=False),
        Binding("ctrl+q", "quit", "quit", id="app.quit"),
    ]

    def __init__(self, spec: EngineSpec, settings: Settings, store_path: Path | None = None,
                 worker_factory=None) -> None:
        super().__init__()
        self.spec = spec
        self.settings = settings
        store_path = store_path or settings.resolved_data_dir() / "chats.sqlite3"
        self.draft_path = store_path.parent / "draft.json"  # what was typed and attached, not sent, at quit
        self.lock = DataDirLock(store_path)
        self.lock.acquire()  # StoreInUse when another app has these chats open: the CLI prints it
        try:
            self.store = ChatStore(store_path)
        except BaseException:
            self.lock.release()
            raise
        interval = 1.0 / max(settings.refresh_hz, 0.1)
        if worker_factory is None and settings.inference_process:
            log = settings.resolved_data_dir() / "inference.log"
            worker_factory = partial(InferenceProcess, spec=spec, stats_interval=interval, log_path=str(log))
        elif worker_factory is None:
            worker_factory = partial(InferenceWorker, spec=spec, stats_interval=interval)
        self.backend = worker_factory(self)
        self.theme_gradients: dict[str, tuple[str, ...]] = {}
        self.chat_id: int | None = None
        self.reply: Reply | None = None  # the reply streaming now, if any
        self.engine_down: str | None = None  # why no reply can be generated (load failed, engine stopped)
        self.editing: int | None = None  # id of the user message Ctrl+E took back into the prompt, if any
        # What the prompt held and what was attached before Ctrl+E took the last message back: Esc (and quitting)
        # give them back.
        self._before_edit: tuple[str, list[coding.Attachment]] = ("", [])
        self.disconnected: str | None = None  # why the remote server does not answer, while it does not
        self.context_length = 0
        self.model_info: EngineInfo | None = None  # the loaded model's (or the server's), once ready
        self.agent_turns = {}
        self.last_snapshot = None
        self.last_optimum: dict | None = None  # hit rates of every policy and Belady on the recent trace
        self.last_done = None  # GenerationDone of the latest reply (speeds, token counts)
        self.attachments: list[coding.Attachment] = []
        self.cwd = Path.cwd()
        self._store_notice: tuple[str, float] = ("", 0.0)  # the last could-not-save notice and when

    @property
    def generating(self) -> bool:
        return self.reply is not None

    @property
    def reply_text(self) -> str:
        return self.reply.text if self.reply is not None else ""

    # ---- layout
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                with ChatScroll(id="messages"):
                    yield EarlierMessages()
                yield CompletionList(id="completions")
                # Whole in the chat's 40 columns at 80x24 (longer, "F1 keys" was cut off there).
                yield PromptInput(id="prompt", placeholder="Message · / commands · @path · F1 keys")
                yield ContextGauge(unicode=self.settings.unicode(), id="context")
            yield Dashboard(HeatmapStyle(unicode=self.settings.unicode()), unicode=self.settings.unicode(), id="side")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        for name, (theme, gradient) in load_themes().items():
            self.register_theme(theme)
            self.theme_gradients[name] = gradient
        if self.settings.theme not in self.theme_gradients:
            self.notice(f"theme {self.settings.theme!r} (config.toml) is not one of "
                        f"{', '.join(sorted(self.theme_gradients))}: moe-dark instead", "warning")
        self.apply_theme(self.settings.theme if self.settings.theme in self.theme_gradients else "moe-dark")
        if self.settings.keymap:
            self.set_keymap(self.settings.keymap)
            self.call_after_refresh(self.check_keymap)
        if not self.settings.unicode():
            add_line_filter(self, AsciiFilter())
        self.title = terminal_safe(Path(self.spec.model).name or self.spec.model)
        self.sub_title = "loading model..."
        chats = self.store.chats()
        self.open_chat(chats[0].id if chats else self.store.create_chat(model=self.spec.model).id)
        self.restore_draft()
        # Anchored: while the reader is at the newest rows, the chat stays there as a reply grows, inside
        # the same layout pass (a scroll_end after each growth was a second pass). Scrolling up releases
        # the anchor; scrolling back to the bottom restores it.
        self.query_one("#messages", VerticalScroll).anchor()
        self.query_one(PromptInput).completions = self.query_one(CompletionList)
        self.query_one(PromptInput).focus()
        self.fit_width(self.size.width)
        self.exit_on_signals()
        self.backend.start()

    def exit_on_signals(self) -> None:
        """SIGTERM and SIGHUP (a closed terminal, `kill`) end the app like Ctrl+Q, so the terminal is given
        back as it was (main screen, no mouse reporting) and the chat is closed cleanly."""
        loop = asyncio.get_running_loop()
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                loop.add_signal_handler(sig, self.exit)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no such support
                pass

    def exit(self, *args, **kwargs) -> None:
        self.save_draft()
        super().exit(*args, **kwargs)

    def save_draft(self) -> None:
        """The chat the app is in, and what is typed in the prompt and attached, not sent, kept for the next
        start: quitting lost it without a word (a long test run's output too). An edit of a sent message is not
        kept: quitting drops it, as Esc does, and keeps what was typed and attached before it."""
        try:
            text = self.query_one(PromptInput).text
        except NoMatches:
            return
        kept = self.attachments
        if self.editing is not None:  # the edit is dropped, as Esc drops it: what was there before it is kept
            text, kept = self._before_edit
        # A file outside the project is kept as it was attached (the question before reading it was answered for
        # that text), not read again at the next start.
        frozen = [a.frozen or (not a.label and not self._inside_project(a.path)) for a in kept]
        attachments = [{"path": str(a.path), "label": a.label, "text": a.text if a.label or ice else None,
                        "frozen": ice} for a, ice in zip(kept, frozen, strict=True)]
        if not text.strip() and not attachments:
            text = ""  # nothing to bring back but the chat it was in
        try:
            partial = self.draft_path.with_suffix(".json.part")
            partial.write_text(json.dumps({"chat_id": self.chat_id, "text": text, "attachments": attachments}))
            os.replace(partial, self.draft_path)
        except OSError:  # a full disk or a read-only data folder: the draft is lost, as it was before
            pass

    def restore_draft(self) -> None:
        """The chat the app was in at the last quit, and the draft kept then, back in the prompt and the
        attachments (files as they are now). The most recently updated chat opened instead, not the one the
        user had been in."""
        try:
            draft = json.loads(self.draft_path.read_text())
            self.draft_path.unlink()
        except (OSError, ValueError):
            return
        if not isinstance(draft, dict) or not isinstance(draft.get("text"), str):
            return
        chat_id = draft.get("chat_id")
        if isinstance(chat_id, int) and chat_id != self.chat_id and any(c.id == chat_id for c in self.store.chats()):
            self.open_chat(chat_id)
        if not draft["text"] and not draft.get("attachments"):
            return
        restored = 0
        for item in draft.get("attachments") or []:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                continue
            if (item.get("label") or item.get("frozen")) and isinstance(item.get("text"), str):  # as it was
                label = str(item.get("label") or "")
                self.attachments.append(coding.Attachment(self.cwd if label else Path(item["path"]), item["text"], 0,
                                                          label, frozen=bool(item.get("frozen"))))
                self.count_attachment(self.attachments[-1])
                restored += 1
            elif self.attach(item["path"]):  # a file: read again (one gone is said)
                restored += 1
        self.put_back(draft["text"])
        with_files = f" (and {restored} attachment(s))" if restored else ""
        self.notice(f"your unsent message from the last session{with_files} is back")

    def on_unmount(self) -> None:
        hold_full_collections(False)
        self.backend.stop()
        self.backend.join(timeout=5)
        self.store.close()
        self.lock.release()

    # ---- chats
    def open_chat(self, chat_id: int, show: int | None = None) -> None:
        """Show chat `chat_id` at its end, or at message `show` (a search hit)."""
        self.leave_reply()
        if chat_id != self.chat_id and self.editing is not None:  # the edit belongs to the chat being left
            self.drop_edit()
        self.chat_id = chat_id
        box = self.query_one("#messages", VerticalScroll)
        box.remove_children("MessageView, StreamingReply")
        stored = self.store.messages(chat_id)
        hidden = max(0, len(stored) - MESSAGE_WINDOW)
        ids = [m.id for m in stored]
        if show in ids:
            hidden = min(hidden, ids.index(show))
        self.query_one(EarlierMessages).set_hidden(hidden)
        views = [_view(m) for m in stored[hidden:]]
        box.mount_all(views)
        target = next((v for v in views if show is not None and v.message_id == show), None)
        if target is None:
            box.scroll_end(animate=False)
        else:
            target.add_class("found")
            self.call_after_refresh(box.scroll_to_widget, target, animate=False, top=True)
        # Up in the prompt brings back this chat's messages (the typed part: attached files are not repeated).
        self.query_one(PromptInput).sent.reset([coding.typed_part(m.content) for m in stored if m.role == "user"])
        self.refresh_context()

    @on(EarlierMessages.Pressed)
    async def show_earlier(self) -> None:
        earlier = self.query_one(EarlierMessages)
        start = max(0, earlier.hidden - MESSAGE_WINDOW // 2)
        views = [_view(m) for m in self.store.messages(self.chat_id)[start:earlier.hidden]]
        if not views:
            return
        earlier.set_hidden(start)
        box = self.query_one("#messages", VerticalScroll)
        await box.mount_all(views, after=earlier)
        # The reader goes on upwards from where they were.
        self.call_after_refresh(box.scroll_to_widget, views[-1], animate=False, top=True)
        if not earlier.display:
            self.query_one(PromptInput).focus()

    def trim_chat(self) -> None:
        """Unmount the oldest messages of a long chat (the reader is at the bottom): they stay stored and
        come back with the "earlier messages" button."""
        views = [v for v in self.query("#messages > MessageView") if not v.has_class("trimmed")]  # removal is async
        if len(views) <= MESSAGE_WINDOW + MESSAGE_WINDOW // 4:
            return
        earlier = self.query_one(EarlierMessages)
        old = views[: len(views) - MESSAGE_WINDOW]
        earlier.set_hidden(earlier.hidden + sum(v.message_id is not None for v in old))
        for view in old:
            view.add_class("trimmed")
            view.remove()

    def system_prompt(self) -> str:
        """The system prompt the chat is sent with: its own, else the built-in coding prompt (settings)."""
        chat = self.store.chat(self.chat_id)
        return chat.system_prompt or (edits.CODING_PROMPT if self.settings.coding_prompt else "")

    def history(self) -> list[dict]:
        system = self.system_prompt()
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": m.role, "content": m.content} for m in self.store.messages(self.chat_id)
                     if m.role in ("user", "assistant") and m.content and m.status != "replaced"]
        return messages

    def add_view(self, view: MessageView) -> MessageView:
        box = self.query_one("#messages", VerticalScroll)
        if _at_bottom(box):
            self.trim_chat()
        box.mount(view)
        box.scroll_end(animate=False)
        return view

    def notice(self, text: str, severity: str = "information") -> None:
        """A toast; its text may come from a model, a server or a file, so it is made inert first."""
        self.notify(markup_safe(text), severity=severity, timeout=4)

    def store_failed(self, exc: sqlite3.Error, what: str) -> None:
        """A write to the chat store failed (most often a full disk): say so once in a while, in one line."""
        reason = "disk full" if "full" in str(exc).lower() else str(exc)
        text = f"could not save {what}: {reason} ({self.store.path.parent})"
        last, at = self._store_notice
        if text != last or time.monotonic() - at > STORE_NOTICE_INTERVAL:
            self._store_notice = (text, time.monotonic())
            self.notice(text, "error")

    # ---- sending
    @on(PromptInput.Submitted)
    def on_submit(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if text.startswith("/"):
            self.run_command(text)
            return
        if self.generating:
            self.notice("a reply is still streaming: Esc cancels it", "warning")
            self.put_back(event.text)
            return
        if self.engine_down is not None:
            self.notice(f"no reply can be generated: {self.engine_down}; restart moe (your text is kept)", "error")
            self.put_back(event.text)
            return
        try:
            resolved = {p: coding.resolve(p, self.cwd) for p in coding.mentions(text)}
        except coding.PathError as exc:  # not sent: the user fixes the @path and sends again
            self.notice(str(exc), "error")
            self.put_back(event.text)
            return
        mentioned = [p for p, (path, _) in resolved.items() if path.is_file()]  # a missing one is a @decorator
        missing = [p for p, (path, _) in resolved.items() if not path.exists() and edits.looks_like_path(p)]
        if missing:  # @utlis.py, a typo: said, and the message goes as typed
            self.notice(f"no such file: {', '.join(missing)} (sent as text, not attached)", "warning")
        outside = [p for p in mentioned if resolved[p][1]]

        def proceed(allow_outside: bool | None = True) -> None:
            before = list(self.attachments)
            attached = [self.attach(p) for p in mentioned if allow_outside or p not in outside]
            if all(attached):
                self.send(text)
            else:  # a file named in the message could not go with it (notice given): the user decides
                self.attachments = before  # its other @files go with it or not at all
                self.refresh_context()
                self.put_back(event.text)

        if outside:
            self.push_screen(ConfirmScreen(f"Attach files outside {self.cwd}? {', '.join(outside)}"), proceed)
        else:
            proceed()

    def send(self, typed: str) -> None:
        edited = self.editing is not None
        if edited and not self.replace_edited():
            self.put_back(typed)
            return
        self.attachments = [self.as_it_is_now(a) for a in self.attachments]
        text = "\n\n".join([a.as_prompt() for a in self.attachments] + [typed])
        try:
            message_id = self.store.add_message(self.chat_id, "user", text)
        except sqlite3.Error as exc:  # not sent: the text goes back to the prompt, the attachments stay
            self.store_failed(exc, "your message (it is back in the prompt)")
            self.put_back(typed)
            return
        self.attachments = []
        if edited:  # what was typed and attached before Ctrl+E, back for the next message
            self.restore_before_edit()
        try:
            if self.store.chat(self.chat_id).title == "New chat":
                self.store.update_chat(self.chat_id, title=typed.splitlines()[0][:60])
        except sqlite3.Error as exc:
            self.store_failed(exc, "the chat's title")
        self.add_view(MessageView("user", text, message_id))
        self.start_reply()

    def start_reply(self) -> None:
        if self.start_agent():  # agent mode: the agent loop answers
            return
        settings = self.store.chat(self.chat_id).settings
        hold_full_collections(True)
        self.reply = Reply(FailSoftStore(self), self.chat_id, self.add_view(StreamingReply()))
        self.query_one(PromptInput).cursor_blink = False  # a blink is a repaint: none while tokens stream
        self.backend.submit(Generate(self.history(), fit_context=True, tag=self.reply.tag,
                                     max_tokens=int(settings.get("max_tokens", self.settings.max_tokens)),
                                     temperature=float(settings.get("temperature", self.settings.temperature))))

    def leave_reply(self, discard: bool = False) -> None:
        """The chat on screen changes while a reply streams: cancel it; it stops being drawn and, with
        `discard` (its messages are being deleted), stored."""
        if self.reply is None:
            return
        self.backend.cancel()
        self.reply.discard() if discard else self.reply.detach()

    @on(ReplyChunk)
    @while_mounted
    async def on_reply_chunk(self, event: ReplyChunk) -> None:
        if event.stats is not None:
            self.show_snapshot(event.stats)
        if self.reply is not None and event.tag == self.reply.tag:
            self.reply.add(event.text)

    @on(PrefillProgress)
    @while_mounted
    def on_prefill_progress(self, event: PrefillProgress) -> None:
        reply = self.reply
        if reply is None or event.tag != reply.tag or reply.view is None or not reply.view.is_attached:
            return
        if event.done >= event.total:
            reply.view.status = ""
            return
        rate = f", {event.done / event.seconds:.0f} tok/s" if event.done and event.seconds > 0 else ""
        reply.view.status = f"reading the prompt: {event.done:,} of {event.total:,} tokens{rate} · Esc cancels"

    @on(ReplyDone)
    @while_mounted
    async def on_reply_done(self, event: ReplyDone) -> None:
        if self.agent_turn_done(event):
            return
        reply = self.reply
        if reply is None or event.tag != reply.tag:
            return
        self.reply = None
        hold_full_collections(False)
        self.set_timer(IDLE_COLLECTION_DELAY, self.collect_when_idle)
        self.query_one(PromptInput).cursor_blink = True
        self.last_done = event.done
        status = reply_status(event)
        reply.finish(event.text, status)
        if reply.view is not None and reply.view.is_attached:
            # One full Markdown render at the end, in place of the plain streaming text.
            view = MessageView(_view_role("assistant", status), event.text, reply.message_id,
                               markdown=coding.number_code_blocks(_shown(event.text, status)))
            self.render_in_place_of(reply.view, view, reply.view.content_size.width, self.current_theme.dark)
        if event.error:
            self.notice(f"generation failed: {event.error}", "error")
            # Kept in the chat too: the toast goes after a few seconds, and the reply only says "(failed)".
            self.add_view(MessageView("notice", f"The reply failed: {event.error}"))
        elif status in ("complete", "truncated"):
            self.mention_edits(event.text)
        self.refresh_context()
        caps = self.backend.capabilities
        if caps.remote and not caps.telemetry and hasattr(self.backend, "remote"):
            self.query_one(Dashboard).show_remote(self.backend.remote)

    @work(thread=True, group="render")
    def render_in_place_of(self, live: StreamingReply, view: MessageView, width: int, dark: bool) -> None:
        """Render `view`'s Markdown on a thread (for `width` and the theme, read on the UI thread), then
        show it where `live` was: the UI thread keeps handling keys meanwhile (a long reply's render would
        hold them; see docs/performance.md, "Rendering a finished reply")."""
        view.prerender(self.console, width, dark)
        self.call_from_thread(self._swap, live, view)

    async def _swap(self, live: StreamingReply, view: MessageView) -> None:
        if not live.is_attached:  # the chat was switched, cleared or reopened meanwhile
            return
        with self.batch_update():  # one screen update for the swap, not one per step
            await live.parent.mount(view, after=live)
            await live.remove()

    def collect_when_idle(self) -> None:
        if not self.generating:
            gc.collect()

    def action_cancel(self) -> None:
        if self.generating:
            self.backend.cancel()
        elif self.cancel_command():
            pass
        elif self.editing is not None:
            self.drop_edit()
            self.notice("edit dropped: your message and its reply are unchanged, the prompt as it was")
        elif self.screen.query("HelpPanel"):
            self.action_hide_help_panel()

    @store_writes
    def action_regenerate(self) -> None:
        if self.generating:
            return
        stored = [m for m in self.store.messages(self.chat_id) if m.status != "replaced"]
        if not stored or stored[-1].role != "assistant":
            self.notice("nothing to regenerate", "warning")
            return
        # The previous reply stays, set aside: /restore brings it back.
        self.store.update_message(stored[-1].id, stored[-1].content, "replaced")
        self.open_chat(self.chat_id)
        self.start_reply()

    @store_writes
    def cmd_restore(self, arg: str) -> None:
        if self.generating:
            self.notice("a reply is still streaming: Esc cancels it first", "warning")
            return
        stored = self.store.messages(self.chat_id)
        users = [m.id for m in stored if m.role == "user"]
        after = users[-1] if users else -1
        replaced = [m for m in stored if m.status == "replaced" and m.id > after]
        if not replaced:
            self.notice("no earlier version of the last reply to restore (regenerating keeps one each time)")
            return
        current = [m for m in stored if m.role == "assistant" and m.status != "replaced" and m.id > after]
        for m in current:
            self.store.update_message(m.id, m.content, "replaced")
        self.store.update_message(replaced[-1].id, replaced[-1].content, "complete")
        self.open_chat(self.chat_id)
        self.notice("the earlier reply is back; the newer one is set aside (/restore again swaps them)")

    @store_writes
    def action_edit_last(self) -> None:
        """Put the last message back into the prompt; it and what followed are replaced only when the edited
        text is sent (Esc, a new chat or quitting leaves the chat as it was)."""
        if self.generating:
            self.notice("a reply is still streaming: Esc cancels it first", "warning")
            return
        if len(self.screen_stack) > 1:  # a question is open: its answer may send what the prompt held
            return
        users = [m for m in self.store.messages(self.chat_id) if m.role == "user"]
        if not users:
            self.notice("no message to edit yet", "warning")
            return
        if self.editing is not None:  # what was typed into the edit stays
            self.notice("already editing your last message: Enter sends it, Esc drops the edit")
            return
        # What it was sent with goes back to the attachments, not into the prompt's text (sent again with them,
        # the files went twice); files are read again at send time, as any attachment.
        attached, typed = coding.split_message(users[-1].content, self.cwd)
        self._before_edit = (self.query_one(PromptInput).text, list(self.attachments))
        self.editing = users[-1].id
        self.attachments = []  # the edit goes with its own files; the draft's come back after it (or on Esc)
        for attachment in attached:
            if not attachment.label and not self._inside_project(attachment.path):
                # Not read again at send time: the text as it was sent (it may be text the user pasted, and a
                # file outside the project is read only after a question).
                attachment = dataclasses.replace(attachment, frozen=True)
            self.attachments.append(attachment)
            self.count_attachment(attachment)
        self.put_back(typed)
        self.query_one(PromptInput).focus()
        again = f" ({len(attached)} attachment(s) with it again: /files)" if attached else ""
        self.notice(f"editing your last message{again}: Enter replaces it and its reply; Esc drops the edit")

    def _inside_project(self, path: Path) -> bool:
        try:
            return not coding.resolve(str(path), self.cwd)[1]
        except coding.PathError:
            return False

    def drop_edit(self) -> None:
        """Leave the edit Ctrl+E began: the prompt and the attachments as they were before it."""
        self.editing = None
        self.restore_before_edit()

    def restore_before_edit(self) -> None:
        """What was typed and attached before Ctrl+E, back in the prompt and the attachments (their token
        counts taken again where they had none yet: a count that came during the edit found them gone)."""
        text, before = self._before_edit
        self.put_back(text)
        self.attachments = list(before)
        for attachment in before:
            if not attachment.tokens:
                self.count_attachment(attachment)
        self.refresh_context()

    def replace_edited(self) -> bool:
        """Delete the message being edited and everything after it (the edited text is being sent)."""
        edited, self.editing = self.editing, None
        try:
            for m in self.store.messages(self.chat_id):
                if m.id >= edited:
                    self.store.delete_message(m.id)
        except sqlite3.Error as exc:
            self.store_failed(exc, "the edit (your text is back in the prompt)")
            return False
        self.open_chat(self.chat_id)
        return True

    @store_writes
    def action_new_chat(self) -> None:
        self.open_chat(self.store.create_chat(model=self.spec.model).id)  # a streaming reply is cancelled

    def action_page_chat(self, direction: int) -> None:
        """Scroll the chat a page (from the prompt too); under a question, the question's text and diff."""
        if isinstance(self.screen, ConfirmScreen):
            self.screen.action_scroll_box("page_up" if direction < 0 else "page_down")
            return
        box = self.query_one("#messages", VerticalScroll)
        box.scroll_page_up(animate=False) if direction < 0 else box.scroll_page_down(animate=False)

    def check_keymap(self) -> None:
        """Say which [keymap] entries name no binding of the app (they would be ignored without a word)."""
        from .widgets.confirm import ConfirmScreen

        classes = {type(self), ConfirmScreen} | {type(node) for node in self.screen.walk_children()}
        known = {binding.id for cls in classes for klass in cls.__mro__ for binding in getattr(klass, "BINDINGS", ())
                 if isinstance(binding, Binding) and binding.id}
        unknown = sorted(set(self.settings.keymap) - known)
        if unknown:
            self.notice(f"[keymap] in config.toml: no binding {', '.join(unknown)}; the app's: "
                        f"{', '.join(sorted(known))}", "warning")

    def action_toggle_keys(self) -> None:
        """The keys of the focused pane and what it is for (Textual's help panel), or hide them."""
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def action_show_help_panel(self) -> None:
        super().action_show_help_panel()
        self.call_after_refresh(self.refit)  # the panel takes columns from the chat and the cache panel

    def action_hide_help_panel(self) -> None:
        super().action_hide_help_panel()
        self.call_after_refresh(self.refit)

    def refit(self, tries: int = 10) -> None:
        """Fit the chat and the cache panel to the columns the keys panel (F1) leaves them."""
        panels = self.screen.query("HelpPanel")
        taken = panels.first().outer_size.width if panels else 0
        if panels and not taken and tries:  # mounted, not laid out yet
            self.call_after_refresh(self.refit, tries - 1)
            return
        self.fit_width(self.size.width - taken, keys=bool(panels))

    def action_toggle_side(self) -> None:
        main = self.query_one("#main")
        if not main.has_class("narrow"):
            self.query_one("#side").toggle_class("hidden")
            return
        main.toggle_class("panel-only")
        self.query_one(HeatmapView if main.has_class("panel-only") else PromptInput).focus()

    def on_resize(self, event: events.Resize) -> None:
        if self.screen.query("HelpPanel"):
            self.call_after_refresh(self.refit)  # the keys panel's width follows the terminal's: fit after it
        else:
            self.fit_width(event.size.width)

    def fit_width(self, width: int, keys: bool = False) -> None:
        """Below NARROW_WIDTH columns the chat and the cache panel do not both fit: the panel hides itself
        (F2 shows it in place of the chat), and says so once each time the terminal becomes narrow (`keys`:
        the keys panel takes the other columns)."""
        main = self.query_one("#main")
        main.set_class(width >= WIDE_WIDTH, "wide")
        narrow = width < NARROW_WIDTH
        if narrow == main.has_class("narrow"):
            return
        main.set_class(narrow, "narrow")
        if narrow:
            where = "beside the keys (F1 hides them)" if keys else f"narrow terminal ({width} columns)"
            self.notice(f"{where}: cache panel hidden; F2 shows it (in place of the chat)")
        elif main.has_class("panel-only"):
            main.remove_class("panel-only")
            self.query_one(PromptInput).focus()

    # ---- worker events
    @on(EngineReady)
    @while_mounted
    def on_engine_ready(self, event: EngineReady) -> None:
        # Everything built so far (imports, themes, the screen) lives until exit. Freezing it keeps the
        # cycle collector's full passes short, so they do not stall the UI thread mid-reply (figures:
        # docs/performance.md, "Garbage collection"). The price: cyclic garbage among these objects
        # (views of a chat closed later) stays.
        self.call_after_refresh(gc.freeze)
        self.model_info = event.info
        self.context_length = event.info.context_length
        self.refresh_context()
        caps = self.backend.capabilities
        if caps.remote:
            self.title = terminal_safe(event.info.model)  # the server names its model: untrusted text
            self.sub_title = "remote server"
            self.query_one(HeatmapView).placeholder = ("waiting for expert telemetry from the server..."
                                                       if caps.telemetry else "this server gives no expert telemetry")
        self.update_subtitle()

    @on(ConnectionChanged)
    @while_mounted
    def on_connection_changed(self, event: ConnectionChanged) -> None:
        self.disconnected = None if event.connected else event.reason
        if event.connected:
            self.notice("the server answers again")
        else:
            self.notice(f"lost the server ({event.reason}); retrying in the background", "warning")
        self.update_subtitle()

    @on(EngineNotice)
    @while_mounted
    def on_engine_notice(self, event: EngineNotice) -> None:
        self.notice(event.text, event.severity)

    @on(EngineFailed)
    @while_mounted
    def on_engine_failed(self, event: EngineFailed) -> None:
        for tag in list(self.agent_turns):  # an agent turn in flight ends with the engine
            self.agent_turn_done(ReplyDone(tag, "", None, event.error))
        self.engine_down = "the model did not load" if self.last_snapshot is None else "the inference engine stopped"
        if self.last_snapshot is None:
            self.sub_title = "model failed to load"
            self.query_one(HeatmapView).placeholder = "the model did not load (see the chat)"
            self.add_view(MessageView("notice", f"**Could not load the model.** {event.error}"))
            return
        self.sub_title = "inference stopped"
        self.add_view(MessageView("notice", f"**The inference engine stopped.** {event.error}. "
                                            "Your chats are saved; restart `moe` to continue."))
        if self.reply is not None:  # keep the partial reply, marked cancelled
            self.post_message(ReplyDone(self.reply.tag, self.reply.text, None, event.error))

    @on(SnapshotReady)
    @while_mounted
    def on_snapshot(self, event: SnapshotReady) -> None:
        self.show_snapshot(event)

    @on(MissCurveReady)
    @while_mounted
    def on_miss_curve(self, event: MissCurveReady) -> None:
        self.query_one(Dashboard).show_miss_curve(MissCurve(event.capacities, event.rates, event.steps))

    def show_snapshot(self, event: SnapshotReady) -> None:
        self.last_snapshot, self.last_optimum = event.snapshot, event.optimum
        self.query_one(HeatmapView).snapshot = event.snapshot
        self.query_one(Dashboard).show(event.snapshot, event.optimum)
        self.update_subtitle()

    def update_subtitle(self) -> None:
        if self.disconnected is not None:
            self.sub_title = "disconnected from the server · retrying"
            return
        s = self.last_snapshot
        if s is not None:
            # A server attached to sends these strings: shown through terminal_safe like any untrusted text.
            self.sub_title = terminal_safe(f"{s.mode} · {s.policy} · {s.capacity}/{s.num_experts} experts per layer")
        elif self.backend.capabilities.remote:
            self.sub_title = "remote server"

    def get_system_commands(self, screen):
        # Textual's own theme picker offers its 20 built-in themes (half-applied to this app, never saved):
        # the palette's "Theme: NAME" entries offer the app's themes and remember the choice.
        for command in super().get_system_commands(screen):
            if command.callback != self.action_change_theme:
                yield command

    # ---- themes
    def get_theme_variable_defaults(self) -> dict[str, str]:
        return {**super().get_theme_variable_defaults(), **VARIABLE_DEFAULTS}

    def apply_theme(self, name: str) -> None:
        self.theme = name
        self.query_one(HeatmapView).set_style(
            HeatmapStyle(gradient=self.theme_gradients[name], unicode=self.settings.unicode()))

    # ---- completion
    @on(PromptInput.Changed)
    def update_completion(self) -> None:
        self.query_one(CompletionList).update_for(self.query_one(PromptInput), self.cwd)

    # ---- slash commands
    def prefill(self, text: str) -> None:
        """Put a command that needs an argument into the prompt for the user to finish."""
        self.put_back(text)
        self.query_one(PromptInput).focus()

    def put_back(self, text: str) -> None:
        """`text` into the prompt, the cursor at its end: what is typed next goes after it, not in front."""
        prompt = self.query_one(PromptInput)
        prompt.text = text
        prompt.move_cursor(prompt.document.end)

    @store_writes
    def run_command(self, line: str) -> None:
        name, _, arg = line.strip().lstrip("/").partition(" ")
        arg = arg.strip()
        if name not in BY_NAME:
            self.notice(f"unknown command /{name}; /help lists them", "warning")
            return
        getattr(self, f"cmd_{name}")(arg)

    def cmd_help(self, arg: str) -> None:
        text = CACHE_HELP if arg == "cache" else command_help(arg) if arg else help_text()
        if text is None:
            self.notice(f"no command /{arg.lstrip('/')}; /help lists them", "warning")
            return
        view = self.add_view(MessageView("notice", text))
        box = self.query_one("#messages", VerticalScroll)
        # Read from its start: a page longer than the chat would otherwise show its last lines, not the keys.
        self.call_after_refresh(lambda: box.scroll_to_widget(view, top=True, animate=False))

    def usage(self, name: str, current: str = "") -> None:
        """A command given no argument (or a wrong one): the current value, if any, and how to use it."""
        command = BY_NAME[name]
        now = f"{current}. " if current else ""
        self.notice(f"{now}usage: {command.usage_line} ({command.help}); /help {name} for more")

    def cmd_capacity(self, arg: str) -> None:
        snap = self.last_snapshot
        if not arg:
            spread = (f" on average, {min(snap.capacities)}-{max(snap.capacities)} by layer now (one budget, "
                      "slots move to the layers they help most)" if snap is not None and snap.capacities else "")
            self.usage("capacity", f"capacity: {snap.capacity} of {snap.num_experts} experts per layer{spread}"
                       if snap is not None else "")
            return
        try:
            self.configure(Configure(capacity=parse_capacity(arg)))
        except ValueError as exc:
            self.notice(str(exc), "error")

    def cmd_policy(self, arg: str) -> None:
        self.set_choice("policy", arg, POLICIES)

    def set_choice(self, name: str, arg: str, choices: tuple[str, ...]) -> None:
        current = getattr(self.last_snapshot, name, None)
        if arg not in choices:
            if arg:
                self.notice(f"/{name} takes {' or '.join(choices)}, not {arg!r}", "error")
            else:
                self.usage(name, f"{name}: {current}" if current else "")
            return
        self.configure(Configure(**{name: arg}))

    def cmd_reset(self, arg: str) -> None:
        self.configure(Configure(reset_stats=True))

    def configure(self, request: Configure) -> None:
        if not self.backend.capabilities.configurable:
            self.notice("capacity and policy are set where the server runs "
                        "(moe serve --capacity/--policy)", "warning")
            return
        self.backend.configure(request)

    def cmd_theme(self, arg: str) -> None:
        if not arg:
            self.usage("theme", f"theme: {self.settings.theme}; themes: {', '.join(self.theme_gradients)}")
            return
        if arg not in self.theme_gradients:
            self.notice(f"unknown theme {arg!r}; themes: {', '.join(self.theme_gradients)}", "error")
            return
        self.apply_theme(arg)
        self.settings.theme = arg
        remember("theme", arg)

    def cmd_new(self, arg: str) -> None:
        self.action_new_chat()

    def cmd_earlier(self, arg: str) -> None:
        if self.query_one(EarlierMessages).hidden == 0:
            self.notice("all of this chat's messages are shown")
            return
        self.call_next(self.show_earlier)

    def cmd_clear(self, arg: str) -> None:
        count = len(self.store.messages(self.chat_id))
        if not count:
            self.notice("this chat has no messages")
            return
        self.push_screen(ConfirmScreen(f"Delete all {count} messages of this chat? The chat stays, empty."),
                         lambda ok: self.clear_chat() if ok else self.notice("nothing deleted"))

    @store_writes
    def clear_chat(self) -> None:
        self.leave_reply(discard=True)
        for m in self.store.messages(self.chat_id):
            self.store.delete_message(m.id)
        self.open_chat(self.chat_id)

    def cmd_chats(self, arg: str) -> None:
        chats = self.store.chats()
        entries = [(Pick(c.id), Text(f"{c.id:>4}  ") + Text(terminal_safe(c.title), style="bold")
                    + Text("  (open now)" if c.id == self.chat_id else "", style="dim")) for c in chats]
        current = next((i for i, c in enumerate(chats) if c.id == self.chat_id), 0)
        self.push_screen(ChatPicker(f"{len(chats)} chats", entries, current), self.open_pick)

    def cmd_search(self, arg: str) -> None:
        if not arg:
            self.usage("search")
            return
        titles = {c.id: c.title for c in self.store.chats()}
        hits = self.store.search_messages(arg)
        found = {chat_id for chat_id, _, _ in hits}
        entries = [(Pick(c.id), Text(f"{c.id:>4}  ") + Text(terminal_safe(c.title), style="bold")
                    + Text("  (title)", style="dim")) for c in self.store.chats(arg) if c.id not in found]
        width = ChatPicker.row_width(self.size.width)  # each snippet centred on its match in what the row shows

        def hit(chat_id: int, content: str) -> Text:
            head = Text(f"{chat_id:>4}  ") + Text(terminal_safe(titles[chat_id])[:30], style="bold") + Text("  ")
            return head + snippet(content, arg, max(4, (width - len(head) - len(arg) - 2) // 2))

        entries += [(Pick(chat_id, message_id), hit(chat_id, content)) for chat_id, message_id, content in hits]
        if not entries:
            self.notice(f"no chat or message contains {arg!r}")
            return
        count = f"{len(entries)} match" + ("" if len(entries) == 1 else "es")
        self.push_screen(ChatPicker(f"{count} for {arg!r}", entries), self.open_pick)

    def open_pick(self, pick: Pick | None) -> None:
        """Open the chat picked in a list; a search hit also brings its message into view."""
        if pick is None:
            return
        self.open_chat(pick.chat_id, show=pick.message_id)

    def cmd_switch(self, arg: str) -> None:
        if not arg:
            chat = self.store.chat(self.chat_id)
            self.usage("switch", f"this is chat {chat.id} ({chat.title!r})")
            return
        try:
            self.open_chat(self.store.chat(int(arg)).id)
        except (ValueError, KeyError, OverflowError):  # OverflowError: past SQLite's 64-bit integers
            self.notice(f"no chat {arg!r}; /chats lists them", "error")

    def cmd_rename(self, arg: str) -> None:
        if not arg:
            self.usage("rename", f"this chat is {self.store.chat(self.chat_id).title!r}")
            return
        self.store.update_chat(self.chat_id, title=arg)
        self.notice(f"renamed to {arg}")

    def cmd_delete(self, arg: str) -> None:
        chat = self.store.chat(self.chat_id)
        count = len(self.store.messages(self.chat_id))
        self.push_screen(ConfirmScreen(f"Delete the chat {chat.title!r} and its {count} messages?"),
                         lambda ok: self.delete_chat() if ok else self.notice("nothing deleted"))

    @store_writes
    def delete_chat(self) -> None:
        self.leave_reply(discard=True)
        self.store.delete_chat(self.chat_id)
        chats = self.store.chats()
        self.open_chat(chats[0].id if chats else self.store.create_chat(model=self.spec.model).id)

    def cmd_system(self, arg: str) -> None:
        current = self.store.chat(self.chat_id).system_prompt
        if not arg:
            shown = f"{current!r}" if current else "none (the built-in coding prompt)" if self.settings.coding_prompt \
                else "none"
            self.usage("system", f"system prompt: {shown}")
            return
        if arg == "--clear":
            if not current:
                self.notice("this chat has no system prompt")
                return
            self.push_screen(ConfirmScreen(f"Remove this chat's system prompt? {current!r}"),
                             lambda ok: self.set_system_prompt("") if ok else self.notice("system prompt kept"))
            return
        self.set_system_prompt(arg)

    @store_writes
    def set_system_prompt(self, text: str) -> None:
        self.store.update_chat(self.chat_id, system_prompt=text)
        self.notice("system prompt set" if text else "system prompt removed")
        self.refresh_context()

    def cmd_temp(self, arg: str) -> None:
        current = self.store.chat(self.chat_id).settings.get("temperature", self.settings.temperature)
        if not arg:
            self.usage("temp", f"temperature {current} for this chat")
            return
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        # float() takes nan and inf: the sampler would turn them (or a negative) into garbage or an error.
        if not 0 <= value <= MAX_TEMPERATURE:
            self.notice(f"/temp needs a number from 0 to {MAX_TEMPERATURE}, e.g. /temp 0.2 (now {current})", "error")
            return
        settings = {**self.store.chat(self.chat_id).settings, "temperature": value}
        self.store.update_chat(self.chat_id, settings=settings)
        self.notice(f"temperature {value} for this chat")

    # ---- coding
    def attach(self, path_text: str) -> bool:
        """Attach a file to the next message; False (and an error notice) when it cannot be."""
        try:
            path, _ = coding.resolve(path_text, self.cwd)
            text = coding.read_text_file(path)
        except coding.PathError as exc:
            self.notice(str(exc), "error")
            return False
        self.attachments = [a for a in self.attachments if a.path != path] + [coding.Attachment(path, text, 0)]
        exact = self.backend.capabilities.exact_token_counts
        # The count comes from the model's tokenizer on the inference thread (or is estimated for a server).
        deliver(self, self.backend.count_tokens(text), lambda counted: self._attached(path, counted, exact))
        return True

    def as_it_is_now(self, attachment: coding.Attachment) -> coding.Attachment:
        """An attached file as it is when the message is sent: read again if it changed since it was attached
        (said); one that is gone or cannot be read any more keeps the text attached (said too)."""
        if attachment.label or attachment.frozen:  # a command's output, or a file taken back by Ctrl+E: as it was
            return attachment
        try:
            text = coding.read_text_file(attachment.path)
        except coding.PathError as exc:
            self.notice(f"{exc}: the text attached earlier is sent", "warning")
            return attachment
        if text == attachment.text:
            return attachment
        self.notice(f"{attachment.path} changed since it was attached: its text now is sent")
        return dataclasses.replace(attachment, text=text)

    def count_attachment(self, attachment: coding.Attachment) -> None:
        """Count an attachment's tokens (on the inference thread, or estimated for a server); the count reaches
        it if it is still attached then, without a notice."""
        deliver(self, self.backend.count_tokens(attachment.text), lambda counted: self._counted(attachment, counted))

    def _counted(self, attachment: coding.Attachment, counted) -> None:
        if counted.exception() is None:
            self.attachments = [dataclasses.replace(a, tokens=counted.result()) if a is attachment else a
                                for a in self.attachments]
            self.refresh_context()

    def _attached(self, path: Path, counted, exact: bool) -> None:
        if not any(a.path == path for a in self.attachments):
            return  # sent already (an @path in the message) or dropped meanwhile: nothing goes with the next one
        if counted.exception() is not None:
            self.notice(f"attached {path}; its token count is unknown ({counted.exception()})", "warning")
            return
        tokens = counted.result()
        self.attachments = [dataclasses.replace(a, tokens=tokens) if a.path == path else a for a in self.attachments]
        self.notice(f"attached {path} ({'' if exact else '≈'}{tokens} tokens); it goes with your next message")
        self.refresh_context()

    def cmd_add(self, arg: str) -> None:
        if not arg:
            self.notice("usage: /add PATH", "error")
            return
        try:
            path, outside = coding.resolve(arg, self.cwd)
        except coding.PathError as exc:
            self.notice(str(exc), "error")
            return
        if not path.exists():  # said before any question about where it is
            self.notice(f"{coding.shorten(str(path))}: no such file", "error")
            return
        if outside:
            self.push_screen(ConfirmScreen(f"{path} is outside {self.cwd}. Attach it?"),
                             lambda ok: ok and self.attach(arg))
        else:
            self.attach(arg)

    def cmd_files(self, arg: str) -> None:
        if not self.attachments:
            self.notice("no files attached; /add PATH or @path attaches one")
            return
        lines = ["**attached to your next message**", ""]
        lines += [f"- `{a.name}` ({a.tokens} tokens)" for a in self.attachments]
        self.add_view(MessageView("notice", "\n".join(lines)))

    def last_reply(self) -> str | None:
        """The last reply in the conversation (not one set aside by regenerating or /restore)."""
        replies = [m for m in self.store.messages(self.chat_id)
                   if m.role == "assistant" and m.content and m.status != "replaced"]
        return replies[-1].content if replies else None

    def code_block(self, number: str) -> tuple[str, bool] | None:
        """Code block `number` of the last reply, and whether the reply ended inside it (cut short); None (and
        a notice) when there is no such block."""
        blocks, cut = coding.reply_code_blocks(self.last_reply() or "")
        try:
            index = int(number) - 1
        except ValueError:
            index = -1
        if not 0 <= index < len(blocks):
            self.notice(f"the last reply has {len(blocks)} code block(s); give a number from 1", "error")
            return None
        return blocks[index][1], cut and index == len(blocks) - 1

    def cmd_save(self, arg: str) -> None:
        number, _, target = arg.partition(" ")
        if not target.strip():
            self.notice("usage: /save N PATH", "error")
            return
        block = self.code_block(number)
        if block is None:
            return
        code, cut = block
        try:
            path, outside = coding.resolve(target.strip(), self.cwd)
        except coding.PathError as exc:
            self.notice(str(exc), "error")
            return

        def write(ok: bool | None = True) -> None:
            if not ok:
                self.notice("not saved")
            elif self.write_file(path, code + "\n"):
                self.notice(f"saved code block {number} to {path}")

        def check_existing(ok: bool | None = True) -> None:
            if not ok:
                self.notice("not saved")
                return
            try:  # read without blocking: what stood there at /save may have changed while the user was asked
                existing = coding.existing_text(path)
            except coding.PathError as exc:
                self.notice(str(exc), "error")
                return
            except OSError as exc:
                self.notice(f"could not read {path}: {exc}", "error")
                return
            if existing is None:
                write()
            elif existing[1] is None:  # too large to diff here: the UI would freeze for as long as it takes
                self.push_screen(ConfirmScreen(f"Overwrite {path}? It holds {existing[0] / 1e6:.1f} MB, too much "
                                               "to show what changes."), write)
            else:
                self.push_screen(ConfirmScreen(f"Overwrite {path}?", coding.diff(existing[1], code + "\n", path)),
                                 write)

        def check_outside(ok: bool | None = True) -> None:
            if not ok:
                self.notice("not saved")
            elif outside:
                self.push_screen(ConfirmScreen(f"{path} is outside {self.cwd}. Write there?"), check_existing)
            else:
                check_existing()

        if cut:
            self.push_screen(ConfirmScreen(f"Code block {number} was cut short: the reply ended inside it. Save what "
                                           "there is?"), check_outside)
        else:
            check_outside()

    def write_file(self, path: Path, text: str) -> bool:
        """Write `path` (never blocking on a FIFO); a failure is an error notice. True when written."""
        try:
            coding.write_text_file(path, text)
        except coding.PathError as exc:
            self.notice(str(exc), "error")
            return False
        except OSError as exc:
            self.notice(f"could not write {path}: {exc}", "error")
            return False
        return True

    def cmd_copy(self, arg: str) -> None:
        block = self.code_block(arg) if arg else (self.last_reply(), False)
        text, cut = block or (None, False)
        if text is None:
            if not arg:
                self.notice("nothing to copy yet", "warning")
            return
        self.copy_to_clipboard(text)  # OSC 52: works in most terminals, over SSH too
        copied = f"copied ({len(text)} chars{'; cut short: the reply ended inside this block' if cut else ''})"
        fallback = self.settings.resolved_data_dir() / "clipboard.txt"
        try:
            fallback.parent.mkdir(parents=True, exist_ok=True)
            fallback.write_text(text)
            self.notice(f"{copied}; also written to {fallback}", "warning" if cut else "information")
        except OSError:
            self.notice(copied, "warning" if cut else "information")

    def cmd_export(self, arg: str) -> None:
        kind, _, target = arg.partition(" ")
        if kind not in ("md", "json") or not target.strip():
            self.notice("usage: /export md|json PATH", "error")
            return
        export = self.store.export_markdown if kind == "md" else self.store.export_json
        text = export(self.chat_id, system=self.system_prompt())
        try:
            path, outside = coding.resolve(target.strip(), self.cwd)  # anywhere the user says, but a regular file
        except coding.PathError as exc:
            self.notice(str(exc), "error")
            return

        def write(ok: bool | None = True) -> None:
            if not ok:
                self.notice("not exported")
            elif self.write_file(path, text):
                self.notice(f"exported to {path}")

        if path.exists() or outside:  # never overwrite, nor write outside the project, without asking
            where = "exists" if path.exists() else f"is outside {self.cwd}"
            self.push_screen(ConfirmScreen(f"{path} {where}. Write the export there?"), write)
        else:
            write()


def hold_full_collections(hold: bool) -> None:
    """While a reply streams, the cycle collector makes no full passes (the young generations are still
    collected); the reply's end schedules one for when the UI is idle. A full pass holds the UI thread,
    and keys typed meanwhile wait for it (figures: docs/performance.md, "Garbage collection")."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_HELD if hold else _FULL_COLLECTION_THRESHOLD)


_FULL_COLLECTION_THRESHOLD = gc.get_threshold()[2]


def _at_bottom(box: VerticalScroll) -> bool:
    """Whether the reader is at the newest rows of the chat (within a row), or all of it fits."""
    return box.max_scroll_y == 0 or box.scroll_y >= box.max_scroll_y - 1


def _view(message) -> MessageView:
    shown = _shown(message.content, message.status)
    return MessageView(_view_role(message.role, message.status), message.content, message.id,
                       markdown=coding.number_code_blocks(shown) if message.role == "assistant" else shown)


def reply_status(event: ReplyDone) -> str:
    """How a reply ended, as stored: complete, truncated (max_tokens), cancelled or failed."""
    if event.error:
        return "failed"
    if event.done is not None and event.done.finish_reason == "cancelled":
        return "cancelled"
    if event.done is not None and event.done.finish_reason == "length":
        return "truncated"
    return "complete"


def _view_role(role: str, status: str) -> str:
    return role if status in ("complete", "truncated") else "cancelled"


MARKS = {"cancelled": "cancelled", "partial": "interrupted", "failed": "failed",
         "replaced": "set aside when regenerated: not part of the conversation; /restore brings it back",
         "truncated": "cut short: the reply reached its length limit (max_tokens)"}


def _shown(content: str, status: str) -> str:
    """A reply's Markdown with its ending's mark, outside any code block it left open."""
    content = coding.close_open_fence(content)  # numbered like /save and /copy see it
    mark = MARKS.get(status)
    return content if mark is None else content + f"\n\n*({mark})*"
