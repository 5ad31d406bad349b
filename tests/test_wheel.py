"""The built wheel, installed outside the checkout, starts: `moe --help` and the app on the demo model."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Run by the wheel's Python, from a folder outside the checkout: the app opens headless on the demo model,
# with its own themes and the demo's profile (both package data), and answers one message.
HEADLESS_RUN = """
import asyncio, sys, moe_tui.app.main as main
from moe_tui.app.cli import _profile, build_parser
from moe_tui.app.settings import Settings
from moe_tui.app.worker import EngineSpec
from moe_tui.inference.demo_paths import DEMO_MODEL, DEMO_PROFILE

assert "site-packages" in main.__file__, main.__file__
profile, _ = _profile(build_parser().parse_args(["chat"]), demo=True)
assert profile == DEMO_PROFILE and DEMO_PROFILE.is_file(), DEMO_PROFILE

async def run():
    spec = EngineSpec(model=str(DEMO_MODEL), capacity=0.5, profile=str(profile), pin=False)
    app = main.MoeApp(spec, Settings(data_dir=sys.argv[1], max_tokens=4, inference_process=False))
    async with app.run_test(size=(100, 30)) as pilot:
        while app.last_done is None:
            if app.last_snapshot is not None and not app.generating and not app.store.messages(app.chat_id):
                app.send("def f():")
            await pilot.pause(0.1)
        assert app.theme == "moe-dark", app.theme
        assert app.last_snapshot.resident.sum() > 0
    print("headless ok", app.last_done.generated_tokens)

asyncio.run(asyncio.wait_for(run(), 120))
"""


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no network: dependencies come from this test env's packages)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], check=True, capture_output=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("moe_tui-*.whl")
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    site = Path(subprocess.run([env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The test env's site-packages as a plain path entry: its packages are seen, but its .pth files (the
    # checkout's editable install among them) are not run, so moe_tui can only come from the wheel.
    (site / "test-env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, capture_output=True)
    return env


def test_installed_wheel_runs_moe_help(wheel_env, tmp_path):
    result = subprocess.run([wheel_env / "bin" / "moe", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: moe" in result.stdout


def test_installed_wheel_opens_the_app_on_the_demo(wheel_env, tmp_path):
    result = subprocess.run([wheel_env / "bin" / "python", "-c", HEADLESS_RUN, str(tmp_path / "data")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "headless ok" in result.stdout


def test_installed_wheel_serves_the_app_to_a_browser(wheel_env, tmp_path):
    """`moe web` from the wheel runs each session with the wheel's own Python, from any folder: a WebSocket
    client (the browser's part, without a browser) gets the app's dashboard."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([wheel_env / "bin" / "moe", "web", "--port", str(port), "--data-dir",
                               str(tmp_path / "d")], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "MOE_CONFIG": str(tmp_path / "config.toml")})
    try:
        banner = [server.stdout.readline() for _ in range(2)]
        assert f"each browser session runs: {wheel_env / 'bin' / 'python'} -m moe_tui.app.cli chat" in banner[1], banner

        async def dashboard() -> bytes:
            received = b""
            async with aiohttp.ClientSession() as http, http.ws_connect(
                    f"http://127.0.0.1:{port}/ws?width=160&height=50") as ws, asyncio.timeout(120):
                while not all(title in received for title in (b"Experts", b"Hit rate", b"experts per layer")):
                    received += (await ws.receive_bytes())
            return received

        asyncio.run(dashboard())
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
        assert server.returncode == 0 and "ended" in output and "Traceback" not in output, output
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
