"""Headless Chromium driven over the DevTools protocol (aiohttp's WebSocket client), for the `moe web` test.

textual-serve draws the terminal with xterm.js on a WebGL or canvas layer: the page's DOM holds no text. The
text is read from xterm.js's own buffer, the cells it draws from. textual.js keeps its `Terminal` in a closure,
so a script run before the page's own (CAPTURE_TERMINAL) catches it as textual.js stores it.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# textual.js does `this.terminal = new Terminal(...)` on its own object: a setter on Object.prototype sees that
# first assignment, keeps the terminal for the test, gives the object its own property as the assignment would
# have, and removes itself.
CAPTURE_TERMINAL = """
Object.defineProperty(Object.prototype, "terminal", {
  configurable: true,
  get() { return undefined; },
  set(value) {
    Object.defineProperty(this, "terminal", {value, writable: true, configurable: true, enumerable: true});
    if (value && value.buffer && value.buffer.active) {
      window.__moeTerminal = value;
      delete Object.prototype.terminal;
    }
  },
});
"""

SCREEN_TEXT = """
(() => {
  const terminal = window.__moeTerminal;
  if (!terminal) return null;
  const buffer = terminal.buffer.active, rows = [];
  for (let y = 0; y < terminal.rows; y++) {
    const line = buffer.getLine(buffer.viewportY + y);
    rows.push(line ? line.translateToString(true) : "");
  }
  return rows.join("\\n");
})()
"""


def find_chromium() -> str | None:
    """$MOE_CHROMIUM, else the first Chromium or Chrome on PATH."""
    if os.environ.get("MOE_CHROMIUM"):
        return os.environ["MOE_CHROMIUM"]
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class DevToolsError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page, driven by DevTools protocol commands on a flattened session."""

    def __init__(self, binary: str, profile_dir: Path, width: int, height: int) -> None:
        self.binary, self.profile_dir, self.width, self.height = binary, profile_dir, width, height
        self.process: asyncio.subprocess.Process | None = None
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.http: aiohttp.ClientSession | None = None
        self.socket: aiohttp.ClientWebSocketResponse | None = None
        self.session_id: str | None = None
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> Chromium:
        flags = ["--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self.profile_dir}",
                 f"--window-size={self.width},{self.height}", "--no-first-run", "--no-default-browser-check",
                 "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--mute-audio", "--hide-scrollbars"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.process = await asyncio.create_subprocess_exec(
            self.binary, *flags, "about:blank", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        browser_url = await self._devtools_url()
        self.tasks.append(asyncio.create_task(self._drain_stderr()))
        self.http = aiohttp.ClientSession()
        self.socket = await self.http.ws_connect(browser_url, max_msg_size=0)
        self.tasks.append(asyncio.create_task(self._read()))
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self.session_id = attached["sessionId"]
        await self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc_info) -> None:
        try:
            if self.socket is not None:
                await self.socket.close()
            if self.http is not None:
                await self.http.close()
        finally:
            if self.process is not None and self.process.returncode is None:
                self.process.terminate()
                try:
                    await asyncio.wait_for(self.process.wait(), 10)
                except TimeoutError:
                    self.process.kill()
                    await self.process.wait()
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _devtools_url(self) -> str:
        """Chromium prints `DevTools listening on ws://...` on stderr once it takes commands."""
        assert self.process is not None and self.process.stderr is not None
        while line := (await asyncio.wait_for(self.process.stderr.readline(), 60)).decode(errors="replace"):
            self.stderr_tail.append(line)
            if line.startswith("DevTools listening on "):
                return line.removeprefix("DevTools listening on ").strip()
        raise DevToolsError("Chromium exited before it took commands:\n" + "".join(self.stderr_tail))

    async def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.stderr_tail.append(line.decode(errors="replace"))

    async def _read(self) -> None:
        assert self.socket is not None
        async for message in self.socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            reply = json.loads(message.data)
            future = self.pending.pop(reply.get("id"), None)  # events (no id) are not needed here
            if future is not None and not future.done():
                future.set_result(reply)
        for future in self.pending.values():
            future.set_exception(DevToolsError("the DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict:
        assert self.socket is not None
        command: dict[str, Any] = {"id": next(self.ids), "method": method, "params": params}
        if self.session_id is not None and not method.startswith("Target."):
            command["sessionId"] = self.session_id
        future = asyncio.get_running_loop().create_future()
        self.pending[command["id"]] = future
        await self.socket.send_str(json.dumps(command))
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise DevToolsError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression[:60]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def open_terminal_page(self, url: str) -> None:
        """Load a textual-serve page, keeping a handle on its xterm.js terminal."""
        await self.send("Page.addScriptToEvaluateOnNewDocument", source=CAPTURE_TERMINAL)
        await self.send("Page.navigate", url=url)

    async def screen_text(self) -> str | None:
        """The terminal's visible rows, as text; None before the page has made its terminal."""
        return await self.evaluate(SCREEN_TEXT)

    async def type_text(self, text: str) -> None:
        """Typed into the terminal as a user would: the text, then Enter, as key input to the focused page."""
        await self.evaluate("window.__moeTerminal.focus()")
        await self.send("Input.insertText", text=text)

    async def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                            windowsVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
