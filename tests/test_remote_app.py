"""The app as a client: `moe attach` on a live `moe serve`, and plain OpenAI-compatible servers."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from moe_tui.app.main import MoeApp
from moe_tui.app.remote import RemoteWorker
from moe_tui.app.settings import Settings
from moe_tui.app.textual_compat import notification_texts
from moe_tui.app.widgets.heatmap import HeatmapView
from moe_tui.app.worker import EngineSpec

from tests.helpers import finished, notified, replies, send, wait_until, watched
from tests.test_server import LiveServer, free_port


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


def curve_text(app) -> str:
    return "\n".join(line.plain for line in app.query_one("#curve-text").text_lines)


async def test_attach_shows_the_servers_miss_curve_and_belady(live, tmp_path, monkeypatch):
    from moe_tui.app.widgets.dashboard import Dashboard
    from moe_tui.inference.session import OPTIMUM_WINDOW

    app = remote_app(tmp_path, monkeypatch, live.url, telemetry=True)
    async with app.run_test(size=(200, 60)) as pilot:
        panel = app.query_one(Dashboard)
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]))
        snap = live.runner.snapshot
        # Asked for while idle, as the local panel does, and answered by the server's replay of its own trace.
        traced = live.runner.engine.traced_steps
        await wait_until(pilot, lambda: panel.curve is not None and panel.curve.steps == traced, timeout=60)
        curve = panel.curve
        assert curve.capacities == tuple(range(1, snap.num_experts + 1))
        engine = live.runner.engine  # idle: its trace stands still
        for i, capacity in enumerate(curve.capacities):
            expected = engine.hit_rates_vs_optimum(capacity, OPTIMUM_WINDOW)
            assert {name: rates[i] for name, rates in curve.rates.items()} == {
                name: r["hit_rate"] for name, r in expected.items()}, capacity
        assert "replay of the last" in curve_text(app) and "90% hits" in curve_text(app)
        # The hit-rate box's Belady figure: the curve at the server's capacity, as the local session sends it.
        # (The panel may ask again meanwhile: the figure follows the curve it holds.)
        await wait_until(pilot, lambda: app.last_optimum is not None
                         and app.last_optimum == panel.curve.at(snap.capacity))
        await wait_until(pilot, lambda: f"vs {snap.policy}" in "\n".join(
            line.plain for line in app.query_one("#hits").text_lines))


async def test_a_moe_serve_without_the_miss_curve_says_so(live, tmp_path, monkeypatch):
    from moe_tui.app.widgets.charts import MissCurveChart

    routes = live.server.config.app.router.routes
    kept = list(routes)
    routes[:] = [r for r in routes if getattr(r, "path", "") != "/v1/stats/miss-curve"]  # as an older moe serve
    try:
        app = remote_app(tmp_path, monkeypatch, live.url, telemetry=True)
        async with app.run_test(size=(200, 60)) as pilot:
            await wait_until(pilot, lambda: app.last_snapshot is not None)
            await send(pilot, app, "import os")
            await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]))
            await wait_until(pilot, lambda: "not available from this server" in curve_text(app), timeout=60)
            assert app.query_one(MissCurveChart).figure.empty == "not available from this server"
            assert not app.backend.capabilities.miss_curve
            assert not any("Error" in text for text in notification_texts(app))
    finally:
        routes[:] = kept


async def test_openai_compatible_server_without_telemetry(live, tmp_path, monkeypatch):
    app = remote_app(tmp_path, monkeypatch, live.url + "/v1", telemetry=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: "remote" in app.sub_title)
        assert app.query_one(HeatmapView).placeholder == "this server gives no expert telemetry"
        await wait_until(pilot, lambda: "not available from this server" in curve_text(app))
        await send(pilot, app, "import os")
        await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]))
        assert app.last_snapshot is None
        assert app.backend.remote.replies == 1 and app.backend.remote.ttft_s[0] > 0
        app.run_command("/capacity 2")  # settings belong to the server: a notice, nothing breaks
        await wait_until(pilot, lambda: notified(app, "set where the server runs"))


async def test_attach_fits_chats_to_the_servers_context_window(live, tmp_path, monkeypatch):
    """`moe attach` knew no context window: a message over it failed (fair), and so did every later one, the
    failed message being sent again each time. Now the window comes from /v1/models and counts from /tokenize:
    the app drops the oldest turns as it does locally, and refuses a message that cannot fit with the reason."""
    app = remote_app(tmp_path, monkeypatch, live.url, telemetry=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        assert app.context_length == 1024 and app.backend.capabilities.exact_token_counts
        await send(pilot, app, "def add(a, b):")
        await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]))
        await send(pilot, app, "word " * 1500)  # over the window alone
        await wait_until(pilot, lambda: len(replies(app)) == 2 and not app.generating)
        assert replies(app)[-1].status == "failed"
        await wait_until(pilot, lambda: notified(app, "even without older turns"))
        await send(pilot, app, "hello")
        await wait_until(pilot, lambda: len(replies(app)) == 3 and not app.generating)
        assert finished(replies(app)[-1]), replies(app)[-1].status
        await wait_until(pilot, lambda: notified(app, "oldest message(s) from the prompt"))


async def test_unreachable_server_is_reported(tmp_path, monkeypatch):
    app = remote_app(tmp_path, monkeypatch, "http://127.0.0.1:9", telemetry=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.sub_title == "model failed to load")


def start_server(model, port: int):
    """`moe serve` in its own process (so that it can die as a real server does), once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "moe_tui.app.cli", "serve", str(model), "--port", str(port),
                             "--capacity", "1.0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
        time.sleep(0.2)


@pytest.mark.parametrize("telemetry", [True, False])
async def test_a_server_that_goes_away_is_shown_and_found_again(tmp_path, monkeypatch, telemetry):
    from moe_tui.inference.synthetic import make_checkpoint

    model = make_checkpoint(tmp_path / "m", "qwen3_moe", router_scale=4.0)
    port = free_port()
    server = start_server(model, port)
    app = remote_app(tmp_path, monkeypatch, f"http://127.0.0.1:{port}", telemetry=telemetry)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_until(pilot, lambda: app.last_snapshot is not None if telemetry else "remote" in app.sub_title)
            app.backend.first_backoff, app.backend.max_backoff, app.backend.heartbeat = 0.2, 0.5, 0.3
            server.kill()  # as the OOM killer would
            server.wait()
            await wait_until(pilot, lambda: "disconnected" in app.sub_title)
            assert notified(app, "lost the server")
            server = start_server(model, port)
            await wait_until(pilot, lambda: "disconnected" not in app.sub_title, timeout=60)
            assert notified(app, "answers again")
            await send(pilot, app, "def add(a, b):")
            await wait_until(pilot, lambda: replies(app) and finished(replies(app)[-1]))
    finally:
        server.kill()
