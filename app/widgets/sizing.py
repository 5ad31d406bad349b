"""The widest a snapshot's numbers get in a long session, for the panel to hold room for from the start.

A box whose text first grows a digit or a unit ("0 B" -> "29.6 MiB", "no decode yet" -> "12% of token
time") and wraps one row more changes its height, and a height change lays out the whole screen (18-50 ms
at 120x40: a key typed meanwhile waits for it). Rows drawn from `widest(snap)` are as long as the real
ones get, so the boxes reserve them once per width and keep their height while a reply streams.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from moe_tui.inference.telemetry import CacheSnapshot, IOStats, MemorySample

COUNT = 999_999  # counters: a million is hours of decoding; past it a box may grow a row, once
BYTES = int(99.9 * 1024**3)  # the widest human_bytes: "99.9 GiB"
PER_TOKEN = int(99.9 * 1024**2)  # expert bytes read per token: "99.9 MiB"


def widest(snap: CacheSnapshot) -> list[CacheSnapshot]:
    """`snap` with every counter, size and rate at its widest (the same layers, experts and settings). Two
    versions, a fast decoder and a slow one, as some numbers are wide only at one end (9999.9 ms of stall
    per token is a slow decoder): a row reserves the most rows either takes."""
    cells = max(snap.hits.size, 1)
    count = np.full(snap.hits.shape, COUNT // cells, dtype=np.int64)
    few = np.full(snap.hits.shape, COUNT // cells // 250, dtype=np.int64)  # a 99.60% hit rate
    layers = snap.num_moe_layers
    memory = MemorySample(rss_bytes=BYTES, mlx_active_bytes=BYTES, mlx_peak_bytes=BYTES, mlx_cache_bytes=BYTES,
                          expert_cache_bytes=BYTES, expert_cache_budget_bytes=BYTES, system_used_bytes=BYTES,
                          system_available_bytes=BYTES)
    io = IOStats(decode_steps=1, decode_bytes=PER_TOKEN, read_seconds=1.0, prefetches=COUNT,
                 prefetch_hits=COUNT // 3, prefetch_wasted=COUNT // 3, prefetch_bytes=BYTES, demand_hits=COUNT,
                 guesses=(COUNT,) * layers, guess_hits=(COUNT // 3,) * layers, guess_needed=(COUNT,) * layers,
                 prefetch=False, uncached_reads=True)
    # The shared slot budget's spread at its widest: both ends as many digits as the experts' count.
    capacities = (snap.num_experts,) * layers if layers > 1 else ()
    base = replace(snap, capacities=capacities, requests=count, hits=count, misses=few, loads=count,
                   evictions=count, bytes_read=BYTES, load_seconds=9_999.99, memory=memory, tokens_generated=COUNT,
                   steps=COUNT, trace_length=COUNT)
    fast = replace(base, decode_tps=9_999.9, prefill_tps=99_999.9, ttft_s=9.99,
                   io=replace(io, decode_stall_seconds=0.0000999))
    slow = replace(base, decode_tps=0.1, prefill_tps=0.1, ttft_s=9_999.99, io=replace(io, decode_stall_seconds=9.9999))
    return [fast, slow]


def last_used(snap: CacheSnapshot) -> np.ndarray:
    """A `last_used` table for `widest(snap)`: every cell used at the latest step."""
    return np.full(snap.hits.shape, COUNT, dtype=np.int64)
