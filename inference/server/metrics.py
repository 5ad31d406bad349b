"""Prometheus text exposition of the engine's counters, memory and speed."""

from __future__ import annotations

from ..telemetry import CacheSnapshot


def prometheus_text(snap: CacheSnapshot | None, runner) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP moe_{name} {help_text}")
        lines.append(f"# TYPE moe_{name} {kind}")
        lines.extend(f"moe_{name}{labels} {value}" for labels, value in samples)

    metric("queue_waiting", "gauge", "Requests waiting for the inference thread.", [("", runner.waiting())])
    metric("requests_total", "counter", "Generations finished, by outcome.",
           [(f'{{outcome="{outcome}"}}', count) for outcome, count in runner.outcomes.items()])
    if snap is None:
        return "\n".join(lines) + "\n"
    for name, values, help_text in (
        ("expert_requests_total", snap.requests, "(token, expert) routings."),
        ("expert_hits_total", snap.hits, "Distinct experts per step found in the cache."),
        ("expert_misses_total", snap.misses, "Distinct experts per step not in the cache."),
        ("expert_loads_total", snap.loads, "Experts read from disk into the cache."),
        ("expert_evictions_total", snap.evictions, "Experts evicted from the cache."),
    ):
        metric(name, "counter", help_text,
               [(f'{{layer="{layer}"}}', int(values[i].sum())) for i, layer in enumerate(snap.layer_ids)])
    metric("hit_rate", "gauge", "Cache hit rate since the last reset.", [("", snap.hit_rate)])
    metric("demand_hit_rate", "gauge", "Hit rate without the reads ahead.", [("", snap.demand_hit_rate)])
    metric("prefetches_total", "counter", "Experts read ahead of use on a prediction.", [("", snap.io.prefetches)])
    metric("prefetch_hits_total", "counter", "Experts read ahead and used.", [("", snap.io.prefetch_hits)])
    metric("decode_stall_seconds_total", "counter", "Decode time spent waiting on expert reads.",
           [("", snap.io.decode_stall_seconds)])
    metric("bytes_read_total", "counter", "Expert bytes read from disk.", [("", snap.bytes_read)])
    metric("decode_tokens_per_second", "gauge", "Decode speed of the latest generation.", [("", snap.decode_tps)])
    metric("prefill_tokens_per_second", "gauge", "Prefill speed of the latest generation.", [("", snap.prefill_tps)])
    metric("time_to_first_token_seconds", "gauge", "TTFT of the latest generation.", [("", snap.ttft_s)])
    metric("tokens_generated_total", "counter", "Tokens generated.", [("", snap.tokens_generated)])
    m = snap.memory
    metric("memory_bytes", "gauge", "Memory by kind.", [
        ('{kind="rss"}', m.rss_bytes), ('{kind="mlx_active"}', m.mlx_active_bytes),
        ('{kind="mlx_peak"}', m.mlx_peak_bytes), ('{kind="mlx_cache"}', m.mlx_cache_bytes),
        ('{kind="expert_cache"}', m.expert_cache_bytes), ('{kind="expert_cache_budget"}', m.expert_cache_budget_bytes),
        ('{kind="system_available"}', m.system_available_bytes)])
    metric("cache_capacity", "gauge", "Experts cached per MoE layer.", [("", snap.capacity)])
    return "\n".join(lines) + "\n"
