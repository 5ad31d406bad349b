"""Screenshots of the main screen at 120x40 and 80x24 with deterministic data (no engine running)."""

from __future__ import annotations

import numpy as np
import pytest
from moe_tui.app.backend import estimated_tokens
from moe_tui.app.main import MoeApp
from moe_tui.app.messages import EngineInfo, EngineReady, SnapshotReady
from moe_tui.app.settings import Settings
from moe_tui.app.worker import LOCAL, EngineSpec
from moe_tui.inference.telemetry import CacheSnapshot, MemorySample

pytest.importorskip("pytest_textual_snapshot")

LAYERS, EXPERTS = 6, 48


def fixed_snapshot() -> CacheSnapshot:
    rng = np.random.default_rng(7)
    recent = rng.gamma(0.6, 4.0, size=(LAYERS, EXPERTS))
    resident = np.zeros((LAYERS, EXPERTS), bool)
    for i in range(LAYERS):
        resident[i, np.argsort(-recent[i])[:16]] = True
    pinned = np.zeros_like(resident)
    pinned[:, 3] = True
    resident[:, 3] = True
    missed = np.zeros_like(resident)
    missed[[0, 2, 5], [7, 11, 40]] = True
    hits = (recent * 3).astype(int) * resident
    misses = (recent * 1).astype(int) * ~resident
    return CacheSnapshot.build(
        model="demo", mode="exact", policy="lru", capacity=16, num_experts=EXPERTS, top_k=2,
        layer_ids=tuple(range(LAYERS)), resident=resident, pinned=pinned, just_missed=missed,
        requests=hits + misses, hits=hits, misses=misses, fallbacks=np.zeros_like(hits), loads=misses,
        evictions=misses, recent=recent, bytes_read=48 << 20, load_seconds=0.25,
        memory=MemorySample(rss_bytes=900 << 20, mlx_active_bytes=300 << 20, mlx_peak_bytes=420 << 20,
                            mlx_cache_bytes=12 << 20, expert_cache_bytes=200 << 20,
                            expert_cache_budget_bytes=800 << 20, system_used_bytes=6 << 30,
                            system_available_bytes=10 << 30),
        decode_tps=42.5, prefill_tps=310.0, ttft_s=0.12, tokens_generated=256, steps=300, trace_length=300)


class FakeWorker:
    """A Backend that posts one fixed engine state and ignores requests."""

    capabilities = LOCAL

    def __init__(self, app) -> None:
        self.app = app

    def start(self) -> None:
        self.app.post_message(EngineReady(EngineInfo("demo", "qwen3_moe", 6, tuple(range(LAYERS)), EXPERTS, 2,
                                                     1 << 20, 10 << 20, 2048)))
        self.app.post_message(SnapshotReady(fixed_snapshot(), {"lru": 0.61, "lfu": 0.63, "decay": 0.64,
                                                               "belady": 0.78}))

    def submit(self, request) -> None:
        pass

    def configure(self, request) -> None:
        pass

    def count_tokens(self, text: str):
        return estimated_tokens(text)

    def cancel(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def join(self, timeout=None) -> None:
        pass


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
