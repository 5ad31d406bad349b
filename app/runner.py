"""Shell commands for /run and /diff: run in a folder as an asyncio subprocess, time-limited, output capped."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import time
from dataclasses import dataclass

RUN_TIMEOUT = 120.0  # seconds before a /run command is stopped
HEAD_BYTES = 8 * 1024  # output kept from the start (the first error)...
TAIL_BYTES = 24 * 1024  # ...and from the end (the summary); what lies between is cut
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
DRAIN = 0.5  # seconds the output is still read after the shell exits, while what it started in the background runs
POLL = 0.05  # seconds between looks at the shell's exit
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


@dataclass(frozen=True)
class RunResult:
    command: str
    output: str
    """stdout and stderr as they came, terminal escapes removed, the middle cut when long."""
    exit_status: int | None
    """None when it was stopped (timeout or cancel)."""
    seconds: float
    timed_out: bool = False
    cut_bytes: int = 0
    """Bytes of output left out of the middle."""
    background: str = ""
    """The shell exited leaving processes it started in the background on its output: "stopped", or "running"
    (they left its process group, e.g. setsid, so stopping the group did not reach them)."""

    @property
    def status_text(self) -> str:
        if self.timed_out:
            return f"stopped after {self.seconds:.0f} s (time limit)"
        if self.exit_status is None:
            return "stopped"
        status = (f"killed by signal {-self.exit_status}" if self.exit_status < 0
                  else f"exit status {self.exit_status}")
        left = {"stopped": "; what it left running in the background was stopped",
                "running": "; what it left in the background is still running (outside its process group)"}
        return status + left.get(self.background, "")

    @property
    def label(self) -> str:
        """How the output is introduced to the model."""
        return f"Output of `{self.command}` ({self.status_text})"


class CappedOutput:
    """The first HEAD_BYTES and the last TAIL_BYTES of a stream, whatever its length."""

    def __init__(self, head: int = HEAD_BYTES, tail: int = TAIL_BYTES) -> None:
        self.head_limit, self.tail_limit = head, tail
        self.head = bytearray()
        self.tail = bytearray()
        self.cut = 0

    def add(self, data: bytes) -> None:
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        if len(self.tail) > self.tail_limit:
            extra = len(self.tail) - self.tail_limit
            del self.tail[:extra]
            self.cut += extra

    def text(self) -> str:
        middle = f"\n[... {self.cut} bytes of output cut ...]\n".encode() if self.cut else b""
        decoded = (bytes(self.head) + middle + bytes(self.tail)).decode("utf-8", errors="replace")
        return _ESCAPES.sub("", decoded.replace("\r\n", "\n"))


async def run_shell(command: str, cwd: str, timeout: float = RUN_TIMEOUT) -> RunResult:
    """Run `command` with the user's shell in `cwd`, stdin closed. It ends when the shell does: what the
    command started in the background (`server &`) and still holds the output is stopped DRAIN seconds later,
    its output so far kept (what detached from the output, `nohup x > log &`, runs on). Cancelling the task
    stops the command (its whole process group: a shell's children too) and re-raises."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_shell(
        command, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    output = CappedOutput()

    async def read() -> None:
        while data := await process.stdout.read(65536):
            output.add(data)

    # The shell's exit is seen on returncode, not process.wait(), which on newer Pythons also waits for the
    # output to close (a background process keeps it open).
    reading = asyncio.ensure_future(read())
    timed_out = background = False
    exited_at = None
    left = ""
    try:
        while not (process.returncode is not None and reading.done()):
            now = time.monotonic()
            if process.returncode is not None and exited_at is None:
                exited_at = now
            if exited_at is not None and now - exited_at >= DRAIN:
                background = True
                break
            if now - started >= timeout:
                timed_out = True
                break
            await _pause(reading)
        seconds = time.monotonic() - started
        if timed_out or background:
            await _stop(process, reading)
        if background:
            left = "stopped" if reading.done() else "running"
        if not reading.done():  # what holds the output escaped the group: let go of our end (asyncio has no
            process._transport.close()  # public call for it; left open, the pipe outlived the event loop)
    except asyncio.CancelledError:
        await asyncio.shield(_stop(process, reading))
        raise
    finally:
        reading.cancel()
    return RunResult(command, output.text(), None if timed_out else process.returncode, seconds, timed_out,
                     output.cut, left)


async def _pause(reading: asyncio.Future) -> None:
    """POLL seconds, or less if the output ends meanwhile (a done `reading` would return at once: a spin)."""
    if reading.done():
        await asyncio.sleep(POLL)
    else:
        await asyncio.wait({reading}, timeout=POLL)


async def _stop(process: asyncio.subprocess.Process, reading: asyncio.Future) -> None:
    """SIGTERM to the command's process group (the shell and what it started), SIGKILL if after KILL_GRACE
    the shell has not exited or something still holds the output (`reading` not done)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return  # the group is gone
        deadline = time.monotonic() + KILL_GRACE
        while time.monotonic() < deadline:
            if process.returncode is not None and reading.done():
                return
            await _pause(reading)


async def git_diff(cwd: str) -> tuple[RunResult | None, str]:
    """(`git diff HEAD` in `cwd`: staged and unstaged changes, "") or (None, why not)."""
    try:
        inside = await run_shell("git rev-parse --is-inside-work-tree", cwd, timeout=10)
    except OSError as exc:
        return None, f"cannot run git: {exc}"
    if inside.exit_status == 127:
        return None, "git is not installed (or not on PATH)"
    if inside.exit_status != 0 or inside.output.strip() != "true":
        return None, f"{cwd} is not in a git repository: nothing for /diff to show"
    has_head = (await run_shell("git rev-parse --verify -q HEAD", cwd, timeout=10)).exit_status == 0
    result = await run_shell("git --no-pager diff --no-color" + (" HEAD" if has_head else " --cached"), cwd, timeout=30)
    return dataclasses.replace(result, command="git diff"), ""  # as the user knows it (and /drop takes it)
