"""The app as a client: `moe attach` on a live `moe serve`, and plain OpenAI-compatible servers."""

from __future__ import annotations

import pytest
from moe_tui.app.main import MoeApp
from moe_tui.app.remote import RemoteWorker
from moe_tui.app.settings import Settings
from moe_tui.app.widgets.heatmap import HeatmapView
from moe_tui.app.worker import EngineSpec

from tests.helpers import finished, notified, replies, send, wait_until, watched
from tests.test_server import LiveServer


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from moe_tui.inference.synthetic import make_checkpoint

    server = LiveServer(make_checkpoint(tmp_path_factory.mktemp("remote") / "m", "qwen3_moe", router_scale=4.0,
                                        max_position_embeddings=1024))
    yield server
    server.close()


def remote_app(tmp_path, monkeypatch, url, telemetry):
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    settings = Settings(data_dir=str(tmp_path / "data"), max_tokens=12, refresh_hz=4)
    return watched(MoeApp(EngineSpec(model=url), settings,
                          worker_factory=lambda app: RemoteWorker(app, url, telemetry=telemetry, stats_hz=4)))


async def test_attach_streams_a_reply_and_fills_the_heatmap(live, tmp_path, monkeypatch):
    app = remote_app(tmp_path, monkeypatch, live.url, telemetry=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]))
        assert replies(app)[-1].content
        await wait_until(pilot, lambda: app.last_snapshot.requests.sum() > 0)
        assert app.query_one(HeatmapView).snapshot.num_moe_layers == 2
        assert app.last_done.generated_tokens > 0


async def test_openai_compatible_server_without_telemetry(live, tmp_path, monkeypatch):
    app = remote_app(tmp_path, monkeypatch, live.url + "/v1", telemetry=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: "remote" in app.sub_title)
        assert app.query_one(HeatmapView).placeholder == "this server gives no expert telemetry"
        await send(pilot, app, "import os")
        await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]))
        assert app.last_snapshot is None
        assert app.backend.remote.replies == 1 and app.backend.remote.ttft_s[0] > 0
        app.run_command("/capacity 2")  # settings belong to the server: a notice, nothing breaks
        await wait_until(pilot, lambda: notified(app, "set where the server runs"))


async def test_unreachable_server_is_reported(tmp_path, monkeypatch):
    app = remote_app(tmp_path, monkeypatch, "http://127.0.0.1:9", telemetry=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.sub_title == "model failed to load")
