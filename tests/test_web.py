"""`moe web`: the options it passes on, its guards (page origin, one session at a time), and the real thing in
headless Chromium: the dashboard renders, a reply streams, the numbers change, and Ctrl+C ends it all."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import aiohttp.web
import pytest
from moe_tui.app import web
from moe_tui.app.cli import build_parser, main

from tests.chromium import Chromium, find_chromium

ROOT = Path(__file__).resolve().parent.parent
BOXES = ("Experts", "Hit rate", "Speed", "Memory")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def web_args(*argv: str):
    return build_parser().parse_args(["web", *argv])


def test_every_chat_option_reaches_the_app_unchanged():
    args = web_args("--capacity", "8", "--policy", "lru", "--profile", "/p/prof.json", "--no-pin", "--kv-bits", "8",
                    "--context", "4096", "--prefetch", "--data-dir", "/d/my chats", "--base-url", "http://h:1/v1",
                    "--model", "big", "--host", "127.0.0.2", "--port", "9000", "--public-url", "http://x:1",
                    "/models/my model")
    chat_args = web.chat_argv(build_parser().subcommands["web"], args)
    chat = build_parser().parse_args(["chat", *chat_args])
    for action in build_parser().subcommands["chat"]._actions:
        if action.dest != "help":
            assert getattr(chat, action.dest) == getattr(args, action.dest), action.dest
    assert not {"--host", "--port", "--public-url"} & set(chat_args)
    assert web.chat_argv(build_parser().subcommands["web"], web_args()) == []  # the demo, all defaults


def test_the_session_command_is_this_python_running_moe_chat():
    command = shlex.split(web.app_command(["--data-dir", "/d/my chats", "--", "/models/a b"]))
    assert command == [sys.executable, "-m", "moe_tui.app.cli", "chat", "--data-dir", "/d/my chats", "--",
                       "/models/a b"]


def test_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    args = web_args("--data-dir", "chats", "--profile", "p.json", "model")
    web.resolve_paths(args, "model")
    assert (args.model, args.profile, args.data_dir) == (str(tmp_path / "model"), tmp_path / "p.json",
                                                         tmp_path / "chats")


def test_other_hosts_than_loopback_are_warned_about():
    assert web.prepare(web_args()) is None
    assert web.prepare(web_args("--host", "localhost")) is None
    assert web.prepare(web_args("--host", "::1")) is None
    warning = web.prepare(web_args("--host", "192.168.1.20"))
    assert "anyone who can reach this address can use the app" in warning and "runs commands" in warning
    assert "anyone" in web.prepare(web_args("--host", "0.0.0.0", "--public-url", "http://box:8000"))


def test_the_page_connects_back_to_an_address_a_browser_can_parse():
    assert web.page_url("::1", 8000, None) == "http://[::1]:8000"
    assert web.page_url("127.0.0.1", 8000, None) is None  # textual-serve's http://127.0.0.1:8000
    assert web.page_url("::1", 8000, "http://localhost:9000") == "http://localhost:9000"


def test_a_wildcard_host_without_public_url_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    assert main(["web", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    assert "--public-url" in capsys.readouterr().err


def test_a_taken_port_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "moe_tui.app.cli", "web", "--port", str(port), "--data-dir",
                                 str(tmp_path)], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "MOE_CONFIG": str(tmp_path / "config.toml")})
    assert result.returncode == 2, result.stderr
    assert f"moe: cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


# A Textual app that starts in a moment, for the server's guards (the real app is the browser test's).
TINY_APP = """
from textual.app import App
from textual.widgets import Static

class Tiny(App):
    def compose(self):
        yield Static("tiny app here")

Tiny().run()
"""


async def read_until(socket: aiohttp.ClientWebSocketResponse, text: bytes, timeout: float = 30.0) -> bytes:
    received = b""
    async with asyncio.timeout(timeout):
        while text not in received:
            message = await socket.receive()
            assert message.type == aiohttp.WSMsgType.BINARY, message
            received += message.data
    return received


@pytest.fixture
async def tiny_server(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(TINY_APP)
    port = free_port()
    server = web.MoeWebServer(shlex.join([sys.executable, str(script)]), host="127.0.0.1", port=port,
                              public_url=None, title="tiny", session_wait=3.0)
    # Served as Server.serve() serves it (aiohttp's defaults; its TestServer cancels handlers on disconnect).
    runner = aiohttp.web.AppRunner(await server._make_app())
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
    # textual-serve never waits on a session's process: its transport is closed when collected, which must
    # happen while this loop still runs.
    gc.collect()
    await asyncio.sleep(0)


async def test_pages_from_other_sites_may_not_open_a_session(tiny_server):
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(tiny_server + "/ws", headers={"Origin": "http://evil.example"})
        assert refused.value.status == 403
        origin = tiny_server.replace("127.0.0.1", "localhost")
        async with http.ws_connect(tiny_server + "/ws?width=60&height=10", headers={"Origin": origin}) as ws:
            await read_until(ws, b"tiny app here")


async def test_one_session_at_a_time_and_the_next_one_after_it(tiny_server):
    async with aiohttp.ClientSession() as http:
        first = await http.ws_connect(tiny_server + "/ws?width=60&height=10")
        await read_until(first, b"tiny app here")
        async with http.ws_connect(tiny_server + "/ws") as second:
            notice = await read_until(second, b"one session at a time")
            assert b"Close that tab, then reload this one." in notice
        # A reload: the old tab's socket closes and the new one connects at once; it waits for the old app to
        # exit (it holds the chats) instead of being refused.
        await first.close()
        async with http.ws_connect(tiny_server + "/ws?width=60&height=10") as third:
            await read_until(third, b"tiny app here")


class WebServerProcess:
    """`moe web` on the demo model, as a user starts it, in its own process group."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        config = tmp_path / "config.toml"
        config.write_text("max_tokens = 96\nrefresh_hz = 4.0\ntemperature = 0.0\n")
        env = {**os.environ, "MOE_CONFIG": str(config)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moe_tui.app.cli", "web", "--port", str(self.port), "--data-dir",
             str(tmp_path / "data")], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.url_seen = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.url_seen.wait(60):
            self.stop()
            raise AssertionError("moe web did not start:\n" + self.output)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "serving the app on" in line:
                self.url = line.split("serving the app on ")[1].split()[0]
                self.url_seen.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        if self.group_alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def number(pattern: str, screen: str) -> float | None:
    """The number `pattern` captures on the screen; None when it is not there (e.g. a frame half drawn)."""
    match = re.search(pattern, screen)
    return float(match.group(1).replace(",", "")) if match else None


async def wait_for_screen(browser: Chromium, predicate, what: str, timeout: float = 90.0) -> str:
    """The terminal's text once `predicate` holds for it (re-read every 0.1 s: the page gives no event)."""
    screen = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = await browser.screen_text()
        if screen and predicate(screen):
            return screen
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not on the screen in {timeout:.0f} s; last seen:\n{screen}")


CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (chromium, chromium-browser, google-chrome or "
                                             "$MOE_CHROMIUM): `apt-get install chromium` runs this test")
async def test_the_app_in_headless_chromium(tmp_path):
    server = WebServerProcess(tmp_path)
    try:
        async with Chromium(CHROMIUM, tmp_path / "chromium-profile", 1600, 960) as browser:
            await browser.open_terminal_page(server.url)
            screen = await wait_for_screen(
                browser, lambda s: all(box in s for box in BOXES) and re.search(r"\d+/\d+ experts per layer", s),
                "the dashboard's boxes and the loaded demo model")
            assert "tokens   0 generated" in screen and re.search(r"ready\s+0\.0%\s+0/0", screen), screen

            await browser.type_text("def fib(n):")
            await browser.press_enter()
            counts: list[float] = []

            def streaming(s: str) -> bool:  # every token count seen, until the reply is in the chat's count
                counts.append(number(r"tokens\s+([\d,]+) generated", s) or 0)
                return (number(r"· chat ([\d,]+) ·", s) or 0) > 0

            screen = await wait_for_screen(browser, streaming, "the reply, counted into the chat")
            seen = sorted({c for c in counts if c > 0})
            assert len(seen) >= 2, f"the token count went straight to {seen}: no update while the reply streamed"
            assert "def fib(n):" in screen
            assert (number(r"ready\s+[\d.]+%\s+[\d,]+/([\d,]+)", screen) or 0) > 0, screen  # routings counted
            assert (number(r"decode\s+([\d.]+) tok/s", screen) or 0) > 0, screen
            screen = await wait_for_screen(browser, lambda s: re.search(r"Belady\s+[\d.]+%", s) is not None,
                                           "Belady's replay, run while idle")

            shot = await browser.screenshot(tmp_path / "moe-web.png")
            assert png_size(shot) == (1600, 960)
            print(f"\nmoe web screenshot: {shot}")

        # Ctrl+C on the server alone (the path a service manager's signal takes too): its session is told
        # to quit, as when a tab closes; the app and its inference process exit, nothing is left behind.
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(30) == 0, server.output
        deadline = time.monotonic() + 30
        while server.group_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not server.group_alive(), "a session process outlived moe web"
        assert "ended" in server.output and "Traceback" not in server.output, server.output
    finally:
        server.stop()
