"""The app when its engine is gone, when it is told to stop, and when an export would overwrite a file."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from moe_tui.app.main import MoeApp
from moe_tui.app.settings import Settings
from moe_tui.app.widgets.chat import PromptInput
from moe_tui.app.worker import EngineSpec

from ..helpers import dialog_open, notified, send, wait_until, watched


async def test_no_message_is_taken_once_the_model_failed_to_load(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    app = watched(MoeApp(EngineSpec(model=str(tmp_path / "missing")),
                         Settings(data_dir=str(tmp_path / "data"), inference_process=False)))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.sub_title == "model failed to load")
        await send(pilot, app, "hello")
        await wait_until(pilot, lambda: notified(app, "no reply can be generated"))
        assert not app.generating and app.query_one(PromptInput).text == "hello"
        assert not [m for m in app.store.messages(app.chat_id) if m.role == "user"]


async def test_export_over_an_existing_file_asks_first(make_app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.md").write_text("mine")
    app = make_app(inference_process=False)
    async with app.run_test(size=(120, 40)) as pilot:
        app.run_command("/export md notes.md")
        await wait_until(pilot, lambda: dialog_open(app))
        await pilot.press("enter")  # the default answer is No
        await wait_until(pilot, lambda: notified(app, "not exported"))
        assert (tmp_path / "notes.md").read_text() == "mine"
        app.run_command("/export md fresh.md")
        await wait_until(pilot, lambda: (tmp_path / "fresh.md").exists())


HEADLESS = """
import sys
from moe_tui.app.main import MoeApp
from moe_tui.app.settings import Settings
from moe_tui.app.worker import EngineSpec
app = MoeApp(EngineSpec(model=sys.argv[1]), Settings(data_dir=sys.argv[2], inference_process=False))
app.run(headless=True)
print("exited cleanly", flush=True)
"""


def test_sigterm_and_sighup_end_the_app_cleanly(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGHUP):
        data = tmp_path / sig.name
        proc = subprocess.Popen([sys.executable, "-c", HEADLESS, str(tmp_path / "missing"), str(data)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (data / "chats.sqlite3").exists():  # the app is up once its store is open
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "exited cleanly" in out, (sig, proc.returncode, err[-2000:])
