"""Immutable telemetry the engine hands to other threads: generation events and cache snapshots."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import numpy as np
import psutil


@dataclass(frozen=True)
class TokenDelta:
    """New text from one generated token."""

    text: str
    token: int


@dataclass(frozen=True)
class GenerationDone:
    """The end of one `Engine.stream` call."""

    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int  # tokens in the whole prompt
    prefilled_tokens: int  # tokens actually run through the model (the rest came from the prompt cache)
    generated_tokens: int
    prefill_tps: float
    decode_tps: float
    ttft_s: float
    tokens: tuple[int, ...] = ()  # every generated token id, including ones that added no text yet
    stop_sequence: str | None = None  # the stop string that ended generation, if one did


@dataclass(frozen=True)
class MemorySample:
    rss_bytes: int
    mlx_active_bytes: int
    mlx_peak_bytes: int
    mlx_cache_bytes: int
    expert_cache_bytes: int
    expert_cache_budget_bytes: int
    system_used_bytes: int
    system_available_bytes: int

    @staticmethod
    def take(expert_cache_bytes: int, budget: int) -> MemorySample:
        import mlx.core as mx  # here, not at the top: the telemetry types import without MLX

        vm = psutil.virtual_memory()
        return MemorySample(
            rss_bytes=psutil.Process(os.getpid()).memory_info().rss,
            mlx_active_bytes=mx.get_active_memory(),
            mlx_peak_bytes=mx.get_peak_memory(),
            mlx_cache_bytes=mx.get_cache_memory(),
            expert_cache_bytes=expert_cache_bytes,
            expert_cache_budget_bytes=budget,
            system_used_bytes=vm.total - vm.available,
            system_available_bytes=vm.available,
        )


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class LayerView:
    """One MoE layer of a snapshot."""

    layer: int
    resident: tuple[int, ...]
    pinned: tuple[int, ...]
    requests: np.ndarray
    hits: np.ndarray
    misses: np.ndarray
    fallbacks: np.ndarray
    recent: np.ndarray

    @property
    def hit_rate(self) -> float:
        total = int(self.hits.sum() + self.misses.sum())
        return float(self.hits.sum()) / total if total else 0.0


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class CacheSnapshot:
    """The expert cache and engine state at one moment; every array is a read-only copy.

    Arrays are [moe_layers, num_experts]. Hits and misses count distinct experts per forward step;
    requests and fallbacks count (token, expert) routings.
    """

    model: str
    mode: str
    policy: str
    capacity: int
    num_experts: int
    top_k: int
    layer_ids: tuple[int, ...]
    resident: np.ndarray  # bool
    pinned: np.ndarray  # bool
    just_missed: np.ndarray  # bool: missed in the latest step
    requests: np.ndarray
    hits: np.ndarray
    misses: np.ndarray
    fallbacks: np.ndarray
    loads: np.ndarray
    evictions: np.ndarray
    recent: np.ndarray  # routing counts with exponential decay
    bytes_read: int
    load_seconds: float
    memory: MemorySample
    decode_tps: float
    prefill_tps: float
    ttft_s: float
    tokens_generated: int
    steps: int
    trace_length: int
    extras: dict = field(default_factory=dict)

    @classmethod
    def build(cls, **kw) -> CacheSnapshot:
        for name in ("resident", "pinned", "just_missed", "requests", "hits", "misses", "fallbacks",
                     "loads", "evictions", "recent"):
            kw[name] = _frozen(kw[name])
        return cls(**kw)

    def __reduce__(self):
        # Pickled across processes (the app's inference process): rebuilt read-only on the other side.
        return _build_snapshot, ({f.name: getattr(self, f.name) for f in fields(self)},)

    @property
    def num_moe_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def hit_rate(self) -> float:
        total = int(self.hits.sum() + self.misses.sum())
        return float(self.hits.sum()) / total if total else 0.0

    @property
    def layer_hit_rates(self) -> list[float]:
        """Each MoE layer's hit rate (what `layer(i).hit_rate` gives, for all layers at once)."""
        hits = self.hits.sum(axis=1)
        total = hits + self.misses.sum(axis=1)
        return [float(h) / int(t) if t else 0.0 for h, t in zip(hits.tolist(), total.tolist(), strict=True)]

    @property
    def fallback_rate(self) -> float:
        total = int(self.requests.sum())
        return float(self.fallbacks.sum()) / total if total else 0.0

    @property
    def load_bandwidth(self) -> float:
        """Bytes per second while loading experts."""
        return self.bytes_read / self.load_seconds if self.load_seconds else 0.0

    def layer(self, i: int) -> LayerView:
        return LayerView(
            layer=self.layer_ids[i],
            resident=tuple(int(e) for e in np.flatnonzero(self.resident[i])),
            pinned=tuple(int(e) for e in np.flatnonzero(self.pinned[i])),
            requests=self.requests[i], hits=self.hits[i], misses=self.misses[i],
            fallbacks=self.fallbacks[i], recent=self.recent[i],
        )

    @property
    def layers(self) -> tuple[LayerView, ...]:
        return tuple(self.layer(i) for i in range(self.num_moe_layers))

    def to_dict(self) -> dict:
        """JSON-ready form (for benchmarks and the server)."""
        def ints(a):
            return a.astype(int).tolist()

        return {
            "model": self.model, "mode": self.mode, "policy": self.policy, "capacity": self.capacity,
            "num_experts": self.num_experts, "top_k": self.top_k, "layer_ids": list(self.layer_ids),
            "resident": [np.flatnonzero(r).tolist() for r in self.resident],
            "pinned": [np.flatnonzero(r).tolist() for r in self.pinned],
            "requests": ints(self.requests), "hits": ints(self.hits), "misses": ints(self.misses),
            "fallbacks": ints(self.fallbacks), "loads": ints(self.loads), "evictions": ints(self.evictions),
            "recent": np.round(self.recent, 3).tolist(),
            "hit_rate": self.hit_rate, "fallback_rate": self.fallback_rate,
            "bytes_read": self.bytes_read, "load_seconds": self.load_seconds,
            "memory": self.memory.__dict__, "decode_tps": self.decode_tps, "prefill_tps": self.prefill_tps,
            "ttft_s": self.ttft_s, "tokens_generated": self.tokens_generated, "steps": self.steps,
            "just_missed": [np.flatnonzero(r).tolist() for r in self.just_missed],
            "trace_length": self.trace_length,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CacheSnapshot:
        """Inverse of `to_dict` (a snapshot received from `moe serve`)."""
        n, E = len(d["layer_ids"]), d["num_experts"]

        def mask(lists) -> np.ndarray:
            out = np.zeros((n, E), dtype=bool)
            for i, ids in enumerate(lists):
                out[i, ids] = True
            return out

        def grid(rows, dtype) -> np.ndarray:
            return np.array(rows, dtype=dtype).reshape(n, E)

        return cls.build(
            model=d["model"], mode=d["mode"], policy=d["policy"], capacity=d["capacity"], num_experts=E,
            top_k=d["top_k"], layer_ids=tuple(d["layer_ids"]), resident=mask(d["resident"]),
            pinned=mask(d["pinned"]), just_missed=mask(d.get("just_missed", [[]] * n)),
            requests=grid(d["requests"], np.int64), hits=grid(d["hits"], np.int64),
            misses=grid(d["misses"], np.int64), fallbacks=grid(d["fallbacks"], np.int64),
            loads=grid(d["loads"], np.int64), evictions=grid(d["evictions"], np.int64),
            recent=grid(d["recent"], np.float64), bytes_read=d["bytes_read"], load_seconds=d["load_seconds"],
            memory=MemorySample(**d["memory"]), decode_tps=d["decode_tps"], prefill_tps=d["prefill_tps"],
            ttft_s=d["ttft_s"], tokens_generated=d["tokens_generated"], steps=d["steps"],
            trace_length=d.get("trace_length", 0),
        )


def _build_snapshot(kw: dict) -> CacheSnapshot:
    return CacheSnapshot.build(**kw)
