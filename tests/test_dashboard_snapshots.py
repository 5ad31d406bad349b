"""Screenshots of the cache dashboard at 80x24 (F2: the panel alone), 120x40 and 200x60, and in each theme,
with fixed data (FakeWorker: one snapshot, one miss curve)."""

from __future__ import annotations

import pytest
from moe_tui.app.main import MoeApp
from moe_tui.app.settings import Settings
from moe_tui.app.worker import EngineSpec

from tests.helpers import FakeWorker

pytest.importorskip("pytest_textual_snapshot")


def make_app(tmp_path, theme: str) -> MoeApp:
    settings = Settings(data_dir=str(tmp_path / "data"), glyphs="unicode", theme=theme)
    return MoeApp(EngineSpec(model="demo"), settings, worker_factory=FakeWorker)


@pytest.mark.parametrize("theme", ["moe-dark", "moe-light", "moe-colorblind"])
@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 60)])
def test_dashboard(snap_compare, tmp_path, monkeypatch, size, theme):
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))

    async def settle(pilot):
        from moe_tui.app.widgets.charts import Chart
        from moe_tui.app.widgets.chat import PromptInput
        from moe_tui.app.widgets.dashboard import Dashboard

        app = pilot.app
        app.query_one(PromptInput).cursor_blink = False  # its blink made screenshots differ
        for _ in range(50):
            if app.query_one(Dashboard).curve is not None:
                break
            await pilot.pause(0.05)
        # The plots are drawn on threads, again after each resize: wait until every one shows its latest drawing.
        for _ in range(100):
            await pilot.pause(0.05)
            if all(chart.settled for chart in app.query(Chart)):
                break
        await pilot.pause(0.1)

    assert snap_compare(make_app(tmp_path, theme), terminal_size=size, run_before=settle)
