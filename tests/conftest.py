"""Shared fixtures: tiny random checkpoints built once per test session (no downloads)."""

from __future__ import annotations

import gc

import pytest
from moe_tui.inference.synthetic import make_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, quant_bits=None, layout="stacked", shards=1, **overrides) -> Path, cached."""
    built = {}

    def build(arch: str, quant_bits: int | None = None, layout: str = "stacked", shards: int = 1, **overrides):
        key = (arch, quant_bits, layout, shards, tuple(sorted(overrides.items())))
        if key not in built:
            name = f"{arch}-q{quant_bits}-{layout}-s{shards}-{len(built)}"
            built[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt") / name, arch, quant_bits=quant_bits,
                                         layout=layout, shards=shards, router_scale=4.0, **overrides)
        return built[key]

    return build


@pytest.fixture
def make_app(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))
    model = str(checkpoint("qwen3_moe"))

    def build(**settings):
        from moe_tui.app.main import MoeApp
        from moe_tui.app.settings import Settings
        from moe_tui.app.worker import EngineSpec

        from tests.helpers import watched

        spec = EngineSpec(model=model, capacity=4)
        return watched(MoeApp(spec, Settings(data_dir=str(tmp_path / "data"), refresh_hz=4, **settings)))

    yield build
    gc.unfreeze()  # the app froze the test process's objects at startup: let later tests' garbage go


@pytest.fixture
def fake_app(tmp_path, monkeypatch):
    """fake_app(**settings) -> a MoeApp on a FakeWorker (one fixed snapshot, no engine): quick to start."""
    monkeypatch.setenv("MOE_CONFIG", str(tmp_path / "config.toml"))

    def build(**settings):
        from moe_tui.app.main import MoeApp
        from moe_tui.app.settings import Settings
        from moe_tui.app.worker import EngineSpec

        from tests.helpers import FakeWorker, watched

        settings.setdefault("glyphs", "unicode")
        return watched(MoeApp(EngineSpec(model="demo"), Settings(data_dir=str(tmp_path / "data"), **settings),
                              worker_factory=FakeWorker))

    yield build
    gc.unfreeze()
