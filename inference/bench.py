"""`moe bench`: stock mlx-lm vs the engine at several capacities and modes, measured in one run.

JSON goes to stdout, a readable table to stderr. Peak memory is MLX's peak active memory for each
configuration (reset between them; the previous model is freed first).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from .engine import Engine, resolve_model_path
from .plan import measure_read_bandwidth
from .safetensors_io import weight_files
from .traces import Trace, TraceRecorder, save_trace

# Configurations a run may compare: the engine's mode plus options (default: reads ahead while they pay, reads
# bypass the page cache only where it could not hold the experts).
MODES: dict[str, dict] = {
    "exact": {"mode": "exact"},  # the default: reads ahead while they make decoding faster
    "exact-prefetch": {"mode": "exact", "prefetch": True},
    "exact-noprefetch": {"mode": "exact", "prefetch": False},
    "exact-cached": {"mode": "exact", "uncached_reads": False},
    "exact-unpacked": {"mode": "exact", "pack": False},  # misses read from the checkpoint, not its expert records
}

BENCH_PROMPT = (
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n"
    "    result = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
)


def drop_page_cache(files: list[Path]) -> None:
    """Ask the OS to forget cached pages of `files` so the next read comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read_bandwidth(files: list[Path], chunk: int = 16 << 20) -> float:
    """Bytes/s reading the files whole in large chunks from the disk (page cache dropped first): the faster of
    ordinary reads (the kernel reads ahead) and reads that bypass the page cache (`plan.measure_read_bandwidth`:
    O_DIRECT / F_NOCACHE where the system has them, else ordinary reads again). On this project's 2-core VM
    ordinary reads alone reached 0.55-0.6x of direct ones, and the engine's own reads went past them: a bound
    that low says nothing (docs/performance.md)."""
    drop_page_cache(files)
    total, started = 0, time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            while data := os.read(fd, chunk):
                total += len(data)
        finally:
            os.close(fd)
    buffered = total / (time.perf_counter() - started)
    drop_page_cache(files)
    return max(buffered, measure_read_bandwidth(files, nbytes=total))


def _prompt_tokens(tokenizer, n: int) -> list[int]:
    ids = list(tokenizer.encode(BENCH_PROMPT))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _run_stock(path: Path, prompt: list[int], decode_tokens: int) -> tuple[dict, list[int]]:
    from mlx_lm import load
    from mlx_lm.generate import stream_generate

    model, tokenizer = load(str(path))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32, lambda d: mx.issubdtype(d, mx.floating) and d != mx.float32)
    mx.reset_peak_memory()
    tokens, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=decode_tokens):
        if last.finish_reason in (None, "length"):
            tokens.append(last.token)
    result = {"prefill_tps": last.prompt_tps, "decode_tps": last.generation_tps,
              "peak_memory_bytes": mx.get_peak_memory()}
    del model
    return result, tokens


def _generate(engine: Engine, prompt: list[int], decode_tokens: int):
    done = None
    for event in engine.stream(prompt, max_tokens=decode_tokens):
        done = event
    return done


def _run_engine(path: Path, prompt: list[int], decode_tokens: int, capacity, mode: str,
                record: bool = False) -> tuple[dict, Engine, Trace | None]:
    """A cold pass (empty cache, as after loading), then a measured warm pass (a follow-up request);
    `record`: the warm pass's routing trace (with the engine's next-layer guesses) comes back too."""
    engine = Engine.load(path, capacity=capacity, **MODES[mode])
    recorder = TraceRecorder(engine, source=f"moe bench {path}: {mode} at {engine.capacity} experts per layer, "
                             "warm pass") if record else None
    mx.reset_peak_memory()
    cold = _generate(engine, prompt, decode_tokens)
    cold_snap = engine.snapshot()
    engine.reset_prompt_cache()  # the warm pass prefills again, with whatever experts stayed cached
    if recorder is not None:
        recorder.begin()
    else:
        engine.reset_stats()
    done = _generate(engine, prompt, decode_tokens)
    snap = engine.snapshot()
    trace = None
    if recorder is not None:
        recorder.collect(len(prompt) + done.generated_tokens)
        trace = recorder.trace()
        recorder.close()
    result = {
        "mode": mode, "capacity": engine.capacity, "capacity_fraction": engine.capacity / engine.layout.num_experts,
        "prefill_tps": done.prefill_tps, "decode_tps": done.decode_tps, "peak_memory_bytes": mx.get_peak_memory(),
        "hit_rate": snap.hit_rate, "demand_hit_rate": snap.demand_hit_rate, "fallback_rate": snap.fallback_rate,
        "bytes_read": snap.bytes_read, "io": snap.io.to_dict(snap.bytes_read),
        "expert_load_bandwidth": snap.load_bandwidth, "generated_tokens": done.generated_tokens,
        "cold": {"prefill_tps": cold.prefill_tps, "decode_tps": cold.decode_tps, "ttft_s": cold.ttft_s,
                 "hit_rate": cold_snap.hit_rate, "bytes_read": cold_snap.bytes_read},
        "tokens": list(done.tokens),
        "expert_records": str(engine.experts.pack) if engine.experts.pack else None,  # `moe pack`
    }
    return result, engine, trace


def run_bench(model: str | Path, fractions=(1.0, 0.5, 0.25), prompt_len: int = 64, decode_tokens: int = 64,
              repeats: int = 2, trace_out: str | Path | None = None) -> dict:
    path = resolve_model_path(model)
    files = weight_files(path)
    probe = Engine.load(path, capacity=min(fractions))  # below full capacity: reads no expert up front
    layout = probe.layout
    prompt = _prompt_tokens(probe.tokenizer, prompt_len)
    probe.close()
    del probe
    gc.collect()
    mx.clear_cache()
    report: dict = {
        "model": str(model), "layout": {**layout.__dict__, "moe_layers": list(layout.moe_layers)},
        "expert_share_of_weights": layout.all_experts_bytes / max(layout.all_experts_bytes + layout.dense_bytes, 1),
        "prompt_tokens": prompt_len, "decode_tokens": decode_tokens, "device": str(mx.default_device()),
    }
    # Best of `repeats` for throughput, each configuration interleaved with stock to share the noise.
    stock_runs, stock_tokens = [], None
    # Reads ahead change nothing at 100% (nothing is read): without them only below it.
    configs = [(mode, f) for mode in ("exact", "exact-prefetch", "exact-noprefetch") for f in fractions
               if mode == "exact" or f < 1.0]
    results: dict[tuple[str, float], list[dict]] = {c: [] for c in configs}
    engines_trace = None
    for _ in range(repeats):
        r, stock_tokens = _run_stock(path, prompt, decode_tokens)
        stock_runs.append(r)
        gc.collect()
        mx.clear_cache()
        for mode, fraction in configs:
            drop_page_cache(files)
            traced = mode == "exact" and fraction == min(fractions)
            # The trace: from the run that reads ahead at every step, so every decode step has its guesses.
            record = trace_out is not None and fraction == min(fractions) and mode == (
                "exact-prefetch" if ("exact-prefetch", fraction) in results else "exact")
            r, engine, trace = _run_engine(path, prompt, decode_tokens, fraction, mode, record=record)
            r["matches_stock_tokens"] = r.pop("tokens") == stock_tokens
            results[(mode, fraction)].append(r)
            if traced:
                engines_trace = engine.hit_rates_vs_optimum()
            if trace is not None:
                save_trace(trace, trace_out)
                report["trace"] = str(trace_out)
            engine.close()
            del engine
            gc.collect()
            mx.clear_cache()
    stock = _best(stock_runs)
    report["stock"] = stock
    report["engine"] = []
    for runs in results.values():
        best = _best(runs)
        best["decode_vs_stock"] = _paired(runs, stock_runs, "decode_tps")
        best["prefill_vs_stock"] = _paired(runs, stock_runs, "prefill_tps")
        best["decode_vs_stock_of_bests"] = best["decode_tps"] / stock["decode_tps"]
        best["peak_memory_vs_stock"] = best["peak_memory_bytes"] / stock["peak_memory_bytes"]
        report["engine"].append(best)
    report["policy_vs_belady"] = {"capacity_fraction": min(fractions), **(engines_trace or {})}
    report["io"] = io_bandwidth(path, files, layout)
    return report


def _paired(runs: list[dict], stock_runs: list[dict], key: str) -> float:
    """Median over repeats of a configuration's figure over stock's in the same repeat. Each repeat runs stock
    and then every configuration, so a pair shares the machine's state of the moment; a ratio of best-of
    figures rests on one lucky run of either side."""
    return float(np.median([r[key] / s[key] for r, s in zip(runs, stock_runs, strict=True)]))


def _best(runs: list[dict]) -> dict:
    best = dict(max(runs, key=lambda r: r["decode_tps"]))
    best["prefill_tps"] = max(r["prefill_tps"] for r in runs)
    best["peak_memory_bytes"] = min(r["peak_memory_bytes"] for r in runs)
    best["runs"] = len(runs)
    return best


def io_bandwidth(path: Path, files: list[Path], layout) -> dict:
    """Cold sequential read of the checkpoint vs the engine loading every expert cold, one miss at a time."""
    sequential = sequential_read_bandwidth(files)
    result = {"sequential_read_bandwidth": sequential}
    for name, batch in (("one_expert_per_load", 1), ("whole_layer_per_load", None)):
        # One slot short of full: a full cache would load everything inside Engine.load.
        engine = Engine.load(path, capacity=max(layout.num_experts - 1, layout.top_k))
        engine.reset_stats()
        drop_page_cache(files)
        engine.warm(batch=batch)
        snap = engine.snapshot()
        engine.close()
        result[name] = {
            "bandwidth": snap.load_bandwidth,
            "vs_sequential": snap.load_bandwidth / sequential if sequential else 0.0,
            "bytes": snap.bytes_read,
            "seconds": snap.load_seconds,
        }
    return result


def make_synthetic(path: Path, quantized: bool = False) -> Path:
    """A qwen3_moe whose experts are ~95% of its weights (the benchmark's reference shape). `quantized`: 4-bit
    with bf16 scales and biases, as mlx-community's 4-bit checkpoints are."""
    from .synthetic import make_checkpoint

    extra = {"quant_bits": 4, "dtype": mx.bfloat16} if quantized else {}
    return make_checkpoint(path, "qwen3_moe", hidden_size=256, num_hidden_layers=4, num_experts=16,
                           moe_intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=64, router_scale=6.0, seed=7, **extra)


def format_table(report: dict) -> str:
    stock = report["stock"]
    lines = [
        f"model {report['model']}  experts {report['expert_share_of_weights']:.0%} of weights  "
        f"device {report['device']}",
        f"{'config':<22}{'prefill tok/s':>14}{'decode tok/s':>13}{'x stock':>8}{'peak MiB':>10}{'x stock':>8}"
        f"{'hit':>7}{'demand':>7}{'fallback':>9}{'MiB read':>9}{'tokens=':>8}",
        f"{'stock mlx-lm':<22}{stock['prefill_tps']:>14.1f}{stock['decode_tps']:>13.1f}{1:>8.2f}"
        f"{stock['peak_memory_bytes'] / 2**20:>10.1f}{1:>8.2f}",
    ]
    for r in report["engine"]:
        lines.append(
            f"{r['mode'] + '@' + format(r['capacity_fraction'], '.0%'):<22}{r['prefill_tps']:>14.1f}"
            f"{r['decode_tps']:>13.1f}{r['decode_vs_stock']:>8.2f}{r['peak_memory_bytes'] / 2**20:>10.1f}"
            f"{r['peak_memory_vs_stock']:>8.2f}{r['hit_rate']:>7.1%}{r.get('demand_hit_rate', r['hit_rate']):>7.1%}"
            f"{r['fallback_rate']:>9.1%}"
            f"{r['bytes_read'] / 2**20:>9.1f}{'yes' if r['matches_stock_tokens'] else 'no':>8}"
        )
    pvb = report["policy_vs_belady"]
    rates = "  ".join(f"{k} {v['hit_rate']:.1%}" for k, v in pvb.items() if isinstance(v, dict))
    lines.append(f"hit rates at {pvb['capacity_fraction']:.0%} capacity (exact-mode trace): {rates}")
    io = report["io"]
    for name in ("one_expert_per_load", "whole_layer_per_load"):
        lines.append(
            f"cold expert load ({name.replace('_', ' ')}) {io[name]['bandwidth'] / 2**20:.0f} MiB/s vs "
            f"sequential read {io['sequential_read_bandwidth'] / 2**20:.0f} MiB/s ({io[name]['vs_sequential']:.0%})"
        )
    lines.append("tok/s: best of the repeats; x stock (decode): median over repeats of the ratio to stock "
                 "in the same repeat")
    return "\n".join(lines)


@contextlib.contextmanager
def synthetic_checkpoint(quantized: bool = False, prefix: str = "moe-bench-") -> Iterator[Path]:
    """`make_synthetic`'s checkpoint in a temporary folder, removed afterwards (~100 MB). mlx-lm's "[INFO] ..."
    lines while it quantizes go to stderr: stdout stays the caller's report."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            path = make_synthetic(tmp / "synthetic-qwen3-moe", quantized=quantized)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(args) -> int:
    with contextlib.ExitStack() as stack:
        model = (stack.enter_context(synthetic_checkpoint(getattr(args, "quantized", False))) if args.synthetic
                 else args.model)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON report alone
            report = run_bench(model, prompt_len=args.prompt_tokens, decode_tokens=args.decode_tokens,
                               repeats=args.repeats, trace_out=getattr(args, "trace", None))
            print(format_table(report), file=sys.stderr)
    json.dump(report, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")
    return 0


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    return str(o)
