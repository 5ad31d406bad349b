"""Immutable telemetry the engine hands to other threads: generation events and cache snapshots."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

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

    @property
    def system_total_bytes(self) -> int:
        """The machine's RAM (used + available: steady, unlike the available share alone)."""
        return self.system_used_bytes + self.system_available_bytes


def own_cgroups(proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[str | None, str | None] | None:
    """This process's memory cgroup paths from /proc/self/cgroup: (v1 memory controller's, v2 unified); None
    where the file cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            v1 = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    return v1, v2


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup"),
                        ) -> int | None:
    """The memory limit of this process's own cgroup (v1 or v2) in bytes, or None where there is none."""
    v1, v2 = own_cgroups(proc_cgroup) or (None, None)
    files = ([root / "memory" / v1.lstrip("/") / "memory.limit_in_bytes"] if v1 is not None else []) + (
        [root / v2.lstrip("/") / "memory.max"] if v2 is not None else [])
    for file in files:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes "no limit" as a huge number, v2 as "max"
            return int(text)
    return None


def available_memory() -> int:
    """Bytes this process may still take: the system's available memory, or less inside a memory cgroup."""
    available = psutil.virtual_memory().available
    limit = cgroup_memory_limit()
    if limit is not None:
        available = min(available, max(limit - psutil.Process(os.getpid()).memory_info().rss, 0))
    return available


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class IOStats:
    """Expert reads as the decoder sees them: how long it waits, how much it reads, and how well the
    next-layer prediction reads ahead. Decode figures count one-token steps only (no prompt)."""

    decode_steps: int = 0
    decode_stall_seconds: float = 0.0  # the forward pass waiting on expert reads while decoding
    decode_bytes: int = 0  # expert bytes read while decoding (on demand and ahead)
    read_seconds: float = 0.0  # wall time with expert reads in flight
    prefetches: int = 0  # experts read ahead of use on a prediction
    prefetch_hits: int = 0  # of those, used before being evicted
    prefetch_wasted: int = 0  # of those, evicted unused
    prefetch_bytes: int = 0
    demand_hits: int = 0  # hits on experts resident before any read ahead (a plain cache's hits)
    guesses: tuple[int, ...] = ()  # per MoE layer: experts predicted
    guess_hits: tuple[int, ...] = ()  # per MoE layer: predicted and needed
    guess_needed: tuple[int, ...] = ()  # per MoE layer: experts needed in the steps that had a prediction
    prefetch: bool = False  # reading ahead now
    prefetch_auto: bool = False  # on and off by timing (else as the user set it)
    step_seconds_with: float = 0.0  # the automatic setting's latest median decode step with reads ahead
    step_seconds_without: float = 0.0  # ... and without
    uncached_reads: bool = False

    @property
    def stall_per_token(self) -> float:
        return self.decode_stall_seconds / self.decode_steps if self.decode_steps else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.decode_bytes / self.decode_steps if self.decode_steps else 0.0

    def read_bandwidth(self, bytes_read: int) -> float:
        return bytes_read / self.read_seconds if self.read_seconds else 0.0

    def io_limit_tps(self, bytes_read: int) -> float:
        """Tokens per second the reads alone would allow at the measured bandwidth (0: unknown or no reads)."""
        per_token = self.bytes_per_token
        return self.read_bandwidth(bytes_read) / per_token if per_token else 0.0

    @property
    def prediction_precision(self) -> list[float]:
        return [h / g if g else 0.0 for h, g in zip(self.guess_hits, self.guesses, strict=True)]

    @property
    def prediction_recall(self) -> list[float]:
        return [h / n if n else 0.0 for h, n in zip(self.guess_hits, self.guess_needed, strict=True)]

    def to_dict(self, bytes_read: int) -> dict:
        d = dict(self.__dict__, guesses=list(self.guesses), guess_hits=list(self.guess_hits),
                 guess_needed=list(self.guess_needed))
        return d | {"stall_per_token": self.stall_per_token, "bytes_per_token": self.bytes_per_token,
                    "read_bandwidth": self.read_bandwidth(bytes_read), "io_limit_tps": self.io_limit_tps(bytes_read),
                    "prediction_precision": self.prediction_precision, "prediction_recall": self.prediction_recall}

    @classmethod
    def from_dict(cls, d: dict | None) -> IOStats:
        if not d:
            return cls()
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("guesses", "guess_hits", "guess_needed"):
            kw[k] = tuple(kw.get(k, ()))
        return cls(**kw)


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
    io: IOStats = field(default_factory=IOStats)
    trace_start_warm: bool = False  # the cache held experts as the oldest traced step began (replays start so)
    # Slots per MoE layer where one budget shared by the layers moved some (`capacity` is their mean); else ().
    capacities: tuple[int, ...] = ()

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
    def demand_hit_rate(self) -> float:
        """The hit rate without reads ahead: hits on experts that were resident before any prediction."""
        total = int(self.hits.sum() + self.misses.sum())
        return self.io.demand_hits / total if total else 0.0

    @property
    def expert_bytes(self) -> float:
        """Bytes of one expert of one layer (the cache's slots hold `capacity` of them per MoE layer)."""
        slots = self.capacity * self.num_moe_layers
        return self.memory.expert_cache_bytes / slots if slots else 0.0

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
            "trace_length": self.trace_length, "trace_start_warm": self.trace_start_warm,
            "demand_hit_rate": self.demand_hit_rate, "io": self.io.to_dict(self.bytes_read),
            "capacities": list(self.capacities),
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
            trace_length=d.get("trace_length", 0), io=IOStats.from_dict(d.get("io")),
            trace_start_warm=bool(d.get("trace_start_warm", False)),
            capacities=tuple(d.get("capacities", ())),
        )


def _build_snapshot(kw: dict) -> CacheSnapshot:
    return CacheSnapshot.build(**kw)
