"""The coding commands /edits, /apply, /undo, /run, /diff and /drop, and the context gauge's upkeep: mixed into
MoeApp (they use its store, backend, notices and dialogs); the work itself is in edits.py and runner.py."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sqlite3
from pathlib import Path

from moe_tui.inference.events import Generate
from rich.text import Text
from textual.worker import Worker

from . import coding, edits, runner
from .context_gauge import ContextBudget, ContextGauge, count
from .messages import ReplyDone
from .sanitize import terminal_safe
from .store import AppliedFile
from .widgets.chat import MessageView, PromptInput
from .widgets.confirm import ConfirmScreen

SHOWN_OUTPUT_LINES = 30  # of a command's output, shown in the chat (all of it, capped, goes to the model)
_agent_tags = itertools.count(1)


class CodingCommands:
    """Handlers for MoeApp: each cmd_NAME is the slash command /NAME of commands.py."""

    running_command: Worker | None = None
    agent_on = False
    agent_worker: Worker | None = None
    agent_turns: dict[tuple[str, int], asyncio.Future]  # the local session's agent turns in flight, by tag

    # ---- edits
    def reply_edits(self, arg: str) -> tuple[list[edits.Change], list[str]] | None:
        """The last reply's edits (all, or code block `arg`) checked against the disk; None (and a notice)
        when there are none."""
        reply = self.last_reply()
        found, problems = edits.parse_edits(reply or "")
        if arg:
            try:
                number = int(arg)
            except ValueError:
                self.notice(f"/apply takes a code block number, not {arg!r}", "error")
                return None
            block = self.code_block(arg)  # None (and the notice) when the reply has no such block
            if block is None:
                return None
            if block[1]:  # the reply ended inside it
                self.notice(f"code block {number} was cut short (the reply ended inside it): nothing to apply; "
                            "/save it to keep what there is", "warning")
                return None
            found = [e for e in found if e.number == number]
            problems = [p for p in problems if p.startswith(f"[{number}]")]
            if not found and not problems:
                self.notice(f"code block {number} is not an edit: it names no file (/help apply shows the formats)",
                            "warning")
                return None
        if not found and not problems:
            self.notice("the last reply proposes no edits (/help apply shows the formats it can use)", "warning")
            return None
        users = [m.content for m in self.store.messages(self.chat_id) if m.role == "user"]
        changes, refused = edits.plan(found, self.cwd, edits.attached_files(users))
        return changes, problems + refused

    def cmd_edits(self, arg: str) -> None:
        planned = self.reply_edits(arg)
        if planned is None:
            return
        changes, problems = planned
        head = f"**{len(changes)} edit(s) in the last reply** (`/apply` writes them all, `/apply N` one)"
        self.add_view(MessageView("notice", head + "\n\n" + edits.listing(changes, problems)))

    def cmd_apply(self, arg: str) -> None:
        if self.generating:
            self.notice("a reply is still streaming: wait for its end (or Esc) before applying it", "warning")
            return
        planned = self.reply_edits(arg)
        if planned is None:
            return
        changes, problems = planned
        changes = [c for c in changes if c.new != c.old]
        if not changes:
            self.notice("nothing to apply: " + ("; ".join(problems) if problems else "the files already hold it"),
                        "error" if problems else "information")
            return
        outside = [c for c in changes if c.outside]
        stale = [c for c in changes if c.stale]
        files = ", ".join(str(c.path.relative_to(self.cwd)) if not c.outside else str(c.path) for c in changes)
        refused = f" Not applied: {'; '.join(problems)}." if problems else ""

        def write(ok: bool | None) -> None:
            if not ok:
                self.notice("no file changed")
                return
            written, failed = edits.write_changes(changes)
            if written:
                try:
                    self.store.record_apply(self.chat_id, [AppliedFile(str(w.path), w.before, w.after)
                                                           for w in written])
                except sqlite3.Error as exc:
                    self.store_failed(exc, "the undo record (/undo cannot restore this apply)")
                self.notice(f"applied to {len(written)} file(s): {', '.join(w.path.name for w in written)}; "
                            "/undo puts them back")
            for problem in failed:
                self.notice(problem, "error")
            self.refresh_context()

        def confirm(ok: bool | None = True) -> None:
            if not ok:
                self.notice("no file changed")
                return
            diff = "".join(c.diff for c in changes)
            self.push_screen(ConfirmScreen(f"Apply {len(changes)} edit(s) to {files}?{refused}", diff), write)

        if outside or stale:
            reasons = [f"{c.path} is outside {self.cwd}" for c in outside]
            reasons += [f"{c.path} changed on disk since it was attached to this chat (the edit was written "
                        "against the old text)" for c in stale]
            self.push_screen(ConfirmScreen("; ".join(reasons) + ". Go on to the diff?"), confirm)
        else:
            confirm()

    def cmd_undo(self, arg: str) -> None:
        last = self.store.last_apply()
        if last is None:
            self.notice("nothing to undo: no edits applied (or all undone)")
            return
        files = [edits.Written(Path(f.path), f.before, f.after) for f in last.files]
        changed = edits.changed_since(files)
        diff = "".join(edits.unified_diff(_current(f.path), f.before or "", f.path) for f in files)
        names = ", ".join(f.path.name + (" (removed: the apply created it)" if f.before is None else "")
                          for f in files)
        warning = (f" {', '.join(p.name for p in changed)} changed since the apply: undoing loses those changes."
                   if changed else "")

        def restore(ok: bool | None) -> None:
            if not ok:
                self.notice("nothing undone")
                return
            restored, problems = edits.restore(files)
            self.store.mark_undone(last.id)
            self.notice(f"restored {len(restored)} file(s) as they were before the apply"
                        + (f"; {'; '.join(problems)}" if problems else ""), "error" if problems else "information")

        self.push_screen(ConfirmScreen(f"Undo the last apply: restore {names}?{warning}", diff), restore)

    def mention_edits(self, reply: str) -> None:
        """After a reply: say when it proposes edits, and how to see and apply them."""
        found, _ = edits.parse_edits(reply)
        if found:
            numbers = ", ".join(f"[{e.number}] {e.path_text}" for e in found[:4]) + (" ..." if len(found) > 4 else "")
            self.notice(f"this reply proposes {len(found)} edit(s): {numbers}. /edits shows the diffs, /apply "
                        "writes them (it asks first)")

    # ---- commands and their output
    def cmd_run(self, arg: str) -> None:
        if not arg:
            self.usage("run")
            return
        if self.running_command is not None and not self.running_command.is_finished:
            self.notice("a command is still running: Esc stops it", "warning")
            return
        self.push_screen(ConfirmScreen(f"Run this command in {self.cwd}? Its output goes with your next message.\n\n"
                                       f"$ {arg}"), lambda ok: self.start_command(arg) if ok else
                         self.notice("not run"))

    def start_command(self, command: str) -> None:
        self.notice(f"running: {command} (Esc stops it; at most {runner.RUN_TIMEOUT:.0f} s)")
        # A worker on the app's loop: the command's output is read as it comes, the UI never waits on it.
        self.running_command = self.run_worker(self._run_command(command), group="command", exit_on_error=False)

    def working(self, what: str = "") -> None:
        """Say under the prompt, for as long as it lasts, what runs in the background (the toast saying it goes
        after a few seconds; a command waiting on an editor gave no sign at all); "" when it has ended."""
        # Text, not a str: a str is markup, and a command's `[/]` raised MarkupError in the worker (found in review).
        self.query_one(PromptInput).border_subtitle = Text(terminal_safe(f"{what} · Esc stops it")) if what else ""

    async def _run_command(self, command: str) -> None:
        self.working(f"running: {coding.shorten(command, 60)}")
        try:
            result = await runner.run_shell(command, str(self.cwd), timeout=runner.RUN_TIMEOUT)
        except asyncio.CancelledError:
            self.notice(f"stopped: {command} (nothing attached)", "warning")
            raise
        except OSError as exc:
            self.notice(f"could not run {command}: {exc}", "error")
            return
        finally:
            self.working()
        self.show_output(result)

    def cancel_command(self) -> bool:
        """Esc while a /run command or an agent reply runs stops it. True when there was one."""
        for worker in (self.running_command, self.agent_worker):
            if worker is not None and not worker.is_finished:
                worker.cancel()
                return True
        return False

    def show_output(self, result: runner.RunResult, what: str = "") -> None:
        """Attach a command's output to the next message and show its end in the chat."""
        self.attach_output(result, result.output or "(no output)")
        lines = result.output.rstrip("\n").splitlines()
        shown = "\n".join(lines[-SHOWN_OUTPUT_LINES:])
        hidden = len(lines) - SHOWN_OUTPUT_LINES
        notes = [f"{hidden} earlier lines of it not shown here"] if hidden > 0 else []
        if result.cut_bytes:  # the kept start and end do not hold these: say so, not only the kept lines' count
            notes.append(f"{result.cut_bytes:,} bytes cut from the output's middle, for the model too")
        more = f"({'; '.join(notes)})\n" if notes else ""
        fence = "````" if "```" in shown else "```"
        self.add_view(MessageView("notice", f"**$ {what or result.command}**: {result.status_text}, "
                                            f"{result.seconds:.1f} s; the output goes with your next message "
                                            f"(`/drop {result.command}` leaves it out)\n\n"
                                            f"{more}{fence}\n{shown}\n{fence}"))

    def attach_output(self, result: runner.RunResult, text: str) -> None:
        """The output goes with the next message (the same command's earlier output is replaced)."""
        self.attachments = [a for a in self.attachments if not _output_of(a, result.command)]
        attachment = coding.Attachment(self.cwd, text, 0, result.label)
        self.attachments.append(attachment)
        self.refresh_context()
        self.count_attachment(attachment)

    def cmd_diff(self, arg: str) -> None:
        async def diff() -> None:
            result, why = await runner.git_diff(str(self.cwd))
            if result is None:
                self.notice(why, "warning")
            elif result.exit_status != 0:
                self.notice(f"git diff failed ({result.status_text}): {result.output.strip()[:200]}", "error")
            elif not result.output.strip():
                self.notice("git diff: no changes (nothing attached)")
            else:
                self.show_output(result)

        self.run_worker(diff(), group="command", exit_on_error=False)

    def cmd_drop(self, arg: str) -> None:
        if not self.attachments:
            self.notice("nothing is attached to your next message")
            return
        if not arg:
            self.usage("drop", "attached: " + ", ".join(a.name for a in self.attachments))
            return
        kept = [a for a in self.attachments if a.name != arg and not _output_of(a, arg)]
        if len(kept) == len(self.attachments):
            try:
                path, _ = coding.resolve(arg, self.cwd)
            except coding.PathError as exc:
                self.notice(str(exc), "error")
                return
            kept = [a for a in self.attachments if a.label or a.path != path]
        if len(kept) == len(self.attachments):
            self.notice(f"{arg} is not attached; attached: {', '.join(a.name for a in self.attachments)}", "warning")
            return
        self.attachments = kept
        self.notice(f"dropped {arg}; {len(kept)} attachment(s) left")
        self.refresh_context()

    # ---- agent mode
    def cmd_agent(self, arg: str) -> None:
        settings = self.store.chat(self.chat_id).settings
        reads = settings.get("agent_reads", False)
        if arg not in ("on", "off", "reads"):
            state = "on" if self.agent_on else "off"
            self.usage("agent", f"agent mode is {state}; reads {'allowed' if reads else 'asked'} in this chat")
            return
        if arg == "on" and (problem := self.agent_unavailable()):
            self.notice(problem, "error")
            return
        if arg == "reads":
            self.store.update_chat(self.chat_id, settings={**settings, "agent_reads": not reads})
            self.notice("the agent's reads are allowed without asking in this chat" if not reads else
                        "the agent's reads ask first again in this chat")
            return
        self.agent_on = arg == "on"
        self.notice("agent mode on: the model may read, search, edit and run commands here; each write and run "
                    "asks first (reads too, until /agent reads)" if self.agent_on else "agent mode off")

    def agent_unavailable(self) -> str | None:
        """Why agent mode cannot run on this backend and model, or None."""
        caps = self.backend.capabilities
        if not caps.tool_calls:
            return ("agent mode needs a model or server that takes tools: the local model, `moe attach URL` on a "
                    "`moe serve`, or `moe chat --base-url URL`")
        if caps.remote:
            return None
        info = self.model_info
        if info is None:
            return "the model is still loading: /agent on again once it is ready"
        if not info.tool_parser:
            reason = info.no_tool_calling or "no tool-call format is known for it"
            return f"agent mode needs a model that can call tools, and {info.model} cannot: {reason}"
        return None

    def agent_turn_done(self, event: ReplyDone) -> bool:
        """A local agent turn's ReplyDone is handed to the agent loop awaiting it. True when it was one."""
        future = self.agent_turns.pop(event.tag, None)
        if future is None:
            return False
        if not future.done():
            future.set_result(event)
        return True

    async def agent_generate(self, request: Generate) -> ReplyDone:
        """One agent turn on the local session: submitted with a tag of its own, its ReplyDone awaited. Cancelled
        (Esc), it cancels the reply on the session."""
        tag = ("agent", next(_agent_tags))
        future = asyncio.get_running_loop().create_future()
        self.agent_turns[tag] = future
        self.backend.submit(dataclasses.replace(request, tag=tag))
        try:
            return await future
        except asyncio.CancelledError:
            self.backend.cancel()
            raise
        finally:
            self.agent_turns.pop(tag, None)

    def start_agent(self) -> bool:
        """Answer the last message with the agent loop, when agent mode is on. False: a plain reply is due."""
        if not self.agent_on:
            return False
        if self.agent_worker is not None and not self.agent_worker.is_finished:
            self.notice("the agent is still working: Esc stops it", "warning")
            return True
        self.agent_worker = self.run_worker(self._agent(self.chat_id), group="agent", exit_on_error=False)
        return True

    async def _agent(self, chat_id: int) -> None:
        from . import agent

        messages = self.history()
        if messages and messages[0]["role"] == "system" and messages[0]["content"] == edits.CODING_PROMPT:
            messages[0] = {"role": "system", "content": agent.AGENT_PROMPT}
        settings = self.store.chat(chat_id).settings
        backend = self.backend

        async def ask(question: str, diff: str) -> bool:
            return bool(await self.push_screen_wait(ConfirmScreen(question, diff)))

        def record(written: list[edits.Written]) -> None:
            self.store.record_apply(chat_id, [AppliedFile(str(w.path), w.before, w.after) for w in written])

        def shown(step) -> None:
            text = f"**tool** `{step.summary()}`\n\n```\n{coding.shorten(step.result, 2000)}\n```"
            message_id = self.store.add_message(chat_id, "tool", text)
            if chat_id == self.chat_id:
                self.add_view(MessageView("notice", text, message_id))

        tools = agent.Tools(self.cwd, ask, bool(settings.get("agent_reads")), record)
        max_tokens = int(settings.get("max_tokens", self.settings.max_tokens))
        temperature = float(settings.get("temperature", self.settings.temperature))
        self.notice("the agent is working (Esc stops it)")
        self.working("the agent is working")
        try:
            if not backend.capabilities.remote:
                model = agent.session_model(self.agent_generate, max_tokens, temperature)
                answer = await agent.run(model, messages, tools, shown)
            else:
                import httpx  # here: the app starts without the HTTP client unless it talks to a server

                async with httpx.AsyncClient(base_url=backend.base_url, headers=backend.headers,
                                             timeout=httpx.Timeout(10, read=300)) as client:
                    model = agent.server_model(client, backend.model, max_tokens, temperature)
                    answer = await agent.run(model, messages, tools, shown)
        except agent.AgentError as exc:
            self.notice(f"agent stopped: {exc}", "error")
            return
        except asyncio.CancelledError:
            self.notice("agent stopped", "warning")
            raise
        except Exception as exc:  # noqa: BLE001 - a bug or a server's nonsense: said, not a silent dead worker
            self.notice(f"agent failed: {type(exc).__name__}: {exc}", "error")
            return
        finally:
            self.working()
        message_id = self.store.add_message(chat_id, "assistant", answer)
        if chat_id == self.chat_id:
            self.add_view(MessageView("assistant", answer, message_id, markdown=coding.number_code_blocks(answer)))
        self.refresh_context()

    # ---- the context gauge
    def refresh_context(self) -> None:
        """Recount what the next prompt takes of the context window (on the inference thread, or estimated)."""
        if self.chat_id is None or not self.is_running:
            return
        try:
            gauge = self.query_one(ContextGauge)
        except Exception:  # noqa: BLE001 - not mounted yet, or the app is closing
            return
        messages = self.history()
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        settings = self.store.chat(self.chat_id).settings
        reply = int(settings.get("max_tokens", self.settings.max_tokens))
        files = sum(a.tokens for a in self.attachments)
        chat_id = self.chat_id
        self._context_counts = getattr(self, "_context_counts", 0) + 1
        ticket = self._context_counts

        def shown(budget: ContextBudget) -> None:
            if ticket == self._context_counts and chat_id == self.chat_id:  # not a late answer to an older count
                gauge.show(budget)

        count(self, self.backend, messages, system, files, reply, self.context_length, shown)


def _output_of(attachment: coding.Attachment, command: str) -> bool:
    return attachment.label.startswith(f"Output of `{command}` (")


def _current(path: Path) -> str:
    try:
        return edits.read_for_edit(path) or ""
    except coding.PathError:
        return ""
