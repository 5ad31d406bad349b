"""Screenshots of the main screen at 120x40 and 80x24 with deterministic data (no engine running)."""

from __future__ import annotations

import pytest
from moe_tui.app.main import MoeApp
from moe_tui.app.settings import Settings
from moe_tui.app.worker import EngineSpec

from tests.helpers import FakeWorker

pytest.importorskip("pytest_textual_snapshot")


def make_app(tmp_path) -> MoeApp:
    settings = Settings(data_dir=str(tmp_path / "data"), glyphs="unicode")
    app = MoeApp(EngineSpec(model="demo"), settings, worker_factory=FakeWorker)
    chat = app.store.create_chat(title="quicksort")
    app.store.add_message(chat.id, "user", "Write a quicksort in Python")
    app.store.add_message(chat.id, "assistant", "Here it is:\n\n```python\ndef quicksort(xs):\n"
                          "    if len(xs) <= 1:\n        return xs\n    pivot, *rest = xs\n"
                          "    return quicksort([x for x in rest if x < pivot]) + [pivot] + "
                          "quicksort([x for x in rest if x >= pivot])\n```")
    return app


@pytest.mark.parametrize("size", [(120, 40), (80, 24)])
def test_main_screen(snap_compare, tmp_path, monkeypatch, size):
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))

    async def settle(pilot):
        await pilot.pause(0.3)

    assert snap_compare(make_app(tmp_path), terminal_size=size, run_before=settle)
