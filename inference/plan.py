"""`moe plan`: will a model run in a given memory, with how many experts per layer, and how fast could the
disk feed it? Answered from config.json and the safetensors headers; no weight is loaded."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ModelLoadError
from .safetensors_io import AlignedScratch, RangeReader, read_header, weight_files

MEMORY_FRACTION = 0.6  # the share of memory (after the dense weights) the engine gives its expert cache
DEFAULT_CONTEXT = 8192  # tokens of KV cache reserved when the user names no context (capped at the model's)
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token", "experts_per_token",
              "n_activated_experts", "moe_k")
HALF = {"BF16", "F16"}
BANDWIDTH_SAMPLE = 256 << 20  # bytes read (bypassing the page cache) to measure the disk


@dataclass(frozen=True)
class Plan:
    model: str
    memory_bytes: int  # memory planned for (given, or what is available now)
    context_tokens: int
    dense_bytes: int  # in memory, as this backend holds them
    expert_bytes: int  # one expert of one layer in memory
    expert_disk_bytes: int  # the same on disk
    moe_layers: int
    num_experts: int
    top_k: int
    kv_bytes_per_token: int
    kv_bytes: int  # for context_tokens
    budget_bytes: int  # for the expert cache
    capacity: int  # experts per layer that fit (0: not even top_k)
    fits: bool
    all_experts_fit: bool
    hit_rate: float | None  # expected at `capacity`, from a profile's routing counts; None: no profile
    hit_rate_source: str
    read_bandwidth: float | None  # bytes/s (measured or given)
    bytes_per_token: float | None
    io_limit_tps: float | None  # tokens/s the reads alone allow
    reads_per_miss: int = 0  # one per expert parameter in the checkpoint (one with `moe pack`'s records)
    smallest_read_bytes: int = 0  # the smallest of them

    def to_dict(self) -> dict:
        return asdict(self)


def _config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: no config.json; not a model folder") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path / 'config.json'}: not valid JSON ({exc})") from exc


def _local_tensors(path: Path) -> tuple[list[Path], list[tuple[str, str, tuple[int, ...], int]]]:
    files = weight_files(path)
    if not files:
        raise ModelLoadError(f"{path}: no model*.safetensors files")
    return files, [(name, info.dtype, tuple(info.shape), info.nbytes) for file in files
                   for name, info in read_header(file).items()]


def _hub_model(repo: str) -> tuple[dict, list[tuple[str, str, tuple[int, ...], int]]]:
    """config.json and every tensor's header entry of a hub repo, without downloading the weights (the
    headers come by HTTP range requests)."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    from .loading import check_hub_reachable, hub_offline

    if not hub_offline():
        check_hub_reachable(repo)
    try:
        config = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
        meta = get_safetensors_metadata(repo)
    except Exception as exc:  # noqa: BLE001 - hub errors vary: offline, 404, auth
        raise ModelLoadError(f"{repo}: could not read its config and file headers from the Hugging Face hub "
                             f"({type(exc).__name__}: {exc})") from exc
    tensors = []
    for file in meta.files_metadata.values():
        for name, t in file.tensors.items():
            start, end = t.data_offsets
            tensors.append((name, t.dtype, tuple(t.shape), end - start))
    return config, tensors


def _whole_snapshot(repo: str) -> Path | None:
    """A repo's folder in the local hub cache when its config and every weight file are there (a plan through
    the hub caches config.json alone; a download may have stopped half-way)."""
    from .loading import cached_snapshot

    cached = cached_snapshot(repo)
    if cached is None or not (cached / "config.json").is_file():
        return None
    try:
        weight_files(cached)  # raises where none are there or shards are missing
    except ModelLoadError:
        return None
    return cached


def config_int(config: dict, keys) -> int:
    """The first positive integer among `keys` in a model's config, or in its text_config (0 when none)."""
    for source in (config, config.get("text_config") or {}):
        for k in keys:
            if isinstance(source.get(k), int) and source[k] > 0:
                return int(source[k])
    return 0


def kv_bytes_per_token(config: dict, float_bytes: int, kv_bits: int | None) -> int:
    """K and V of one token over every layer (an upper bound for hybrid models whose other layers keep none)."""
    cfg = config.get("text_config") or config
    layers = int(cfg.get("num_hidden_layers") or 0)
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads))
    if cfg.get("kv_lora_rank"):  # DeepSeek's latent attention caches full K/V heads in mlx-lm too
        head_dim = int(cfg.get("qk_nope_head_dim", 0)) + int(cfg.get("qk_rope_head_dim", 0))
        kv_heads = heads
    per_value = kv_bits / 8 + 2 * 4 / 64 if kv_bits else float_bytes  # quantized: + scale and bias per 64
    return int(2 * layers * kv_heads * head_dim * per_value)


def _is_expert(name: str, shape: tuple[int, ...], num_experts: int) -> bool:
    if re.search(r"\.experts\.\d+\.", name):
        return True
    return len(shape) >= 2 and shape[0] == num_experts and ("switch_mlp" in name or ".experts." in name)


def measure_read_bandwidth(files: list[Path], nbytes: int = BANDWIDTH_SAMPLE) -> float:
    """Bytes/s reading up to `nbytes` of the files in 16 MiB chunks, bypassing the page cache where the
    system allows (so the figure is the disk's, not memory's). Reads bytes; loads nothing."""
    reader = RangeReader(uncached=True)
    scratch = AlignedScratch()
    chunk = 16 << 20
    done, started = 0, time.perf_counter()
    try:
        for path in files:
            size = path.stat().st_size
            for offset in range(0, size - chunk + 1, chunk):
                reader.read_uncached(path, offset, chunk, scratch)
                done += chunk
                if done >= nbytes:
                    return done / (time.perf_counter() - started)
    finally:
        reader.close()
    return done / (time.perf_counter() - started) if done else 0.0


def expected_hit_rate(profile: dict, capacity: int) -> float:
    """The share of routings the `capacity` most-used experts of each layer take in the profile's counts: what
    a cache holding exactly those would hit (a plain LRU cache hits less, a predicting one can hit more)."""
    counts = np.asarray(profile["counts"], dtype=np.float64)
    top = -np.sort(-counts, axis=1)[:, :capacity].sum(axis=1)
    total = counts.sum(axis=1)
    return float(top.sum() / total.sum()) if total.sum() else 0.0


def make_plan(source: Path | str, memory: int | None = None, context: int | None = None, kv_bits: int | None = None,
              profile: dict | None = None, bandwidth: float | None = None, measure: bool = True,
              float32_compute: bool | None = None) -> Plan:
    """The plan for the model folder `source`, or a Hugging Face repo id not downloaded (its headers only).

    Args:
        memory: bytes to plan for (default: what is available now, cgroup-aware).
        context: tokens of KV cache to reserve (default DEFAULT_CONTEXT, at most the model's context).
        profile: an expert profile of this model (routing counts) for the expected hit rate.
        bandwidth: the disk's read bandwidth in bytes/s (default: measured on a local model's files when
            `measure`).
        float32_compute: half-precision weights held as float32 (MLX's CPU backend); default: this machine.
    """
    from .loading import context_length
    from .telemetry import available_memory

    files: list[Path] = []
    if isinstance(source, Path) or Path(source).exists():
        config = _config(Path(source))
        files, tensors = _local_tensors(Path(source))
    elif (cached := _whole_snapshot(str(source))) is not None:  # downloaded before
        config = _config(cached)
        files, tensors = _local_tensors(cached)
    else:
        config, tensors = _hub_model(source)
    num_experts = config_int(config, NUM_EXPERTS_KEYS)
    top_k = config_int(config, TOP_K_KEYS)
    if not num_experts or not top_k:
        raise ModelLoadError(f"{source}: config.json names no experts per layer / top-k: not a mixture-of-experts "
                             "model")
    if float32_compute is None:
        import mlx.core as mx

        float32_compute = mx.default_device() == mx.cpu
    dense = expert_mem = expert_disk = 0
    expert_layers: set[str] = set()
    reads: list[int] = []  # bytes of one expert's part of each expert tensor
    tensors_per_miss = 0.0  # expert tensors read for one expert (a per-expert tensor counts 1 / num_experts)
    for name, dtype, shape, nbytes in tensors:
        in_memory = nbytes * (2 if float32_compute and dtype in HALF else 1)
        if _is_expert(name, shape, num_experts):
            expert_mem += in_memory
            expert_disk += nbytes
            per_expert = bool(re.search(r"\.experts\.\d+\.", name))
            reads.append(nbytes if per_expert else nbytes // num_experts)
            tensors_per_miss += 1 / num_experts if per_expert else 1
            expert_layers.add(re.sub(r"\.experts\.\d+\..*|\.(switch_mlp|experts)\..*", "", name))
        else:
            dense += in_memory
    if not expert_layers:
        raise ModelLoadError(f"{source}: no expert tensors found (neither stacked switch_mlp/experts tensors nor "
                             "per-expert experts.N.*)")
    moe_layers = len(expert_layers)
    per_expert_mem = expert_mem // (moe_layers * num_experts)
    per_expert_disk = expert_disk // (moe_layers * num_experts)
    memory = available_memory() if memory is None else memory
    context = min(context or DEFAULT_CONTEXT, context_length(config))
    float_bytes = 4 if float32_compute else 2
    kv_token = kv_bytes_per_token(config, float_bytes, kv_bits)
    kv = kv_token * context
    budget = max(int(MEMORY_FRACTION * (memory - dense)) - kv, 0)
    per_slot = per_expert_mem * moe_layers
    capacity = min(num_experts, budget // max(per_slot, 1))
    fits = capacity >= top_k
    capacity = capacity if fits else 0
    hit_rate, hit_source = None, "no profile: record one with `moe profile` for an estimate"
    if profile is not None and fits:
        if profile.get("num_experts") == num_experts:
            hit_rate = expected_hit_rate(profile, capacity)
            hit_source = f"profile {profile.get('model', '?')} ({int(np.sum(profile.get('tokens', 0)))} tokens)"
        else:
            hit_source = "the profile is for a different model: ignored"
    if fits and capacity == num_experts:
        hit_rate, hit_source = 1.0, "every expert fits"
    if bandwidth is None and measure and files and fits and capacity < num_experts:
        bandwidth = measure_read_bandwidth(files)
    per_token = io_limit = None
    if hit_rate is not None:
        per_token = moe_layers * top_k * (1 - hit_rate) * per_expert_disk
        if bandwidth and per_token:
            io_limit = bandwidth / per_token
    return Plan(model=str(source), memory_bytes=memory, context_tokens=context, dense_bytes=dense,
                expert_bytes=per_expert_mem, expert_disk_bytes=per_expert_disk, moe_layers=moe_layers,
                num_experts=num_experts, top_k=top_k, kv_bytes_per_token=kv_token, kv_bytes=kv, budget_bytes=budget,
                capacity=capacity, fits=fits, all_experts_fit=capacity == num_experts, hit_rate=hit_rate,
                hit_rate_source=hit_source, read_bandwidth=bandwidth, bytes_per_token=per_token, io_limit_tps=io_limit,
                reads_per_miss=round(tensors_per_miss / moe_layers), smallest_read_bytes=min(reads))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(p: Plan) -> str:
    lines = [
        f"{p.model}: {p.moe_layers} MoE layers x {p.num_experts} experts, top-{p.top_k}",
        f"  memory planned for   {_gib(p.memory_bytes)}",
        f"  dense weights        {_gib(p.dense_bytes)}",
        f"  KV cache             {_gib(p.kv_bytes)} ({p.context_tokens} tokens x "
        f"{p.kv_bytes_per_token / 1024:.1f} KiB)",
        f"  expert cache budget  {_gib(p.budget_bytes)} ({MEMORY_FRACTION:.0%} of what the dense weights leave, "
        "less the KV cache)",
        f"  one expert           {p.expert_bytes / 2**20:.2f} MiB in memory, {p.expert_disk_bytes / 2**20:.2f} MiB on "
        f"disk; all of them {_gib(p.expert_bytes * p.num_experts * p.moe_layers)}",
    ]
    if not p.fits:
        need = p.dense_bytes + p.kv_bytes / MEMORY_FRACTION + p.top_k * p.expert_bytes * p.moe_layers / MEMORY_FRACTION
        smallest = _gib(p.top_k * p.expert_bytes * p.moe_layers)
        lines.append(f"does not fit: even {p.top_k} experts per layer ({smallest}) exceed the budget; about "
                     f"{_gib(need)} of memory would do (or a shorter --context, --kv-bits 4, or a quantized model)")
        return "\n".join(lines)
    lines.append(f"fits: {p.capacity} of {p.num_experts} experts per layer ({p.capacity / p.num_experts:.0%})"
                 + ("; every expert fits, nothing is read while generating" if p.all_experts_fit else ""))
    if p.hit_rate is not None and not p.all_experts_fit:
        lines.append(f"  expected hit rate    {p.hit_rate:.0%} ({p.hit_rate_source})")
    elif not p.all_experts_fit:
        lines.append(f"  expected hit rate    unknown ({p.hit_rate_source})")
    if p.read_bandwidth:
        lines.append(f"  disk read bandwidth  {p.read_bandwidth / 2**20:.0f} MiB/s")
    if p.io_limit_tps:
        lines.append(f"  reads per token      {p.bytes_per_token / 2**20:.1f} MiB at that hit rate: at most "
                     f"{p.io_limit_tps:.1f} tok/s from the disk (compute may be slower)")
    elif p.read_bandwidth and not p.all_experts_fit:
        worst = p.moe_layers * p.top_k * p.expert_disk_bytes
        lines.append(f"  reads per token      up to {worst / 2**20:.1f} MiB (no hits): at least "
                     f"{p.read_bandwidth / worst:.1f} tok/s from the disk")
    from .packed import SMALL_READ_BYTES  # here: `moe plan` needs no MLX until it must

    if not p.all_experts_fit and p.smallest_read_bytes < SMALL_READ_BYTES:
        lines.append(f"  reads per miss       {p.reads_per_miss}, the smallest {p.smallest_read_bytes / 2**10:.0f} "
                     "KiB: `moe pack` makes each miss one read (small reads cost the disk's latency each)")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """'16G', '512M', '1.5GiB', '2000000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 16G, 512M)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"a memory size must be above 0, not {text!r}")
    return size
