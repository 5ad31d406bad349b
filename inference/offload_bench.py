"""`moe bench --offload`: the engine on a checkpoint the page cache cannot hold, per capacity and mode.

Each configuration runs in its own child process. Where the machine allows it (root on Linux, a memory
cgroup v1 or v2), the child runs in a memory cgroup of its own, limited to what the engine needs to hold
(dense weights + the expert cache + headroom), so expert reads cannot be served from a page cache that
holds the whole checkpoint; the file's pages are also dropped (posix_fadvise DONTNEED) before each run,
since pages cached by another cgroup would still be hits. Elsewhere only the drop is done, and the output
says so.

The default checkpoint is a synthetic qwen3_moe of about 2.3 GiB (bf16 on disk; `--quantized`: the same model
converted to 4 bits as mlx-community ships models, about 0.65 GiB). Its routing is calibrated
to the locality of the trained demo model: LRU's hit rate at 25% and 50% capacity on a per-token replay of
a fixed text (`EMBED_STD`, found with `--offload-calibrate`; see `calibrate`).

Reported per configuration: prefill and decode tok/s, bytes read per decode token, the time decoding waits
on expert reads (the engine's load seconds per decode token) and two limits from the same run: the
compute limit (decode tok/s with every expert in memory, files warm) and the I/O limit (the cold
sequential read bandwidth of the same files divided by the bytes read per decode token). And prefill at each
capacity below 100% against 100% with the files in the page cache, the two taking turns in one process. JSON
goes to stdout, a table to stderr.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# No MLX at module level: the parent only spawns children, and a child joins its cgroup before MLX loads.

# The demo model's LRU hit rates, per-token trace over held-out text (docs/demo-model.md, "Routing").
DEMO_LRU = {"0.25": 0.403, "0.5": 0.673}

# Standard deviation of the synthetic checkpoint's token embeddings, the knob that sets its routing
# locality. A random model's residual stream is dominated by its attention and expert outputs, which
# change slowly from token to token, so with the usual embedding scale (1/sqrt(hidden)) its routers
# keep choosing the same few experts (LRU hits ~94% at 25% capacity). Larger embeddings make routing
# follow the tokens: LRU 33%/64% at 25%/50% with std 1.0, 49%/80% with 0.4, 38%/70% with 0.58 (small).
# The router's own scale (make_checkpoint's router_scale) cannot do this: scaling logits keeps every
# top-k choice the same.
# Found with `moe bench --offload --offload-calibrate` (the "small" size; the knob does not depend on
# the hidden size, since the layer outputs and a unit-variance embedding both scale as sqrt(hidden)).
EMBED_STD = 0.58
ROUTER_SCALE = 6.0
SEED = 7

_COMMON = {"num_experts": 64, "num_experts_per_tok": 4, "norm_topk_prob": True}
SIZES: dict[str, dict] = {
    # ~2.3 GiB bf16 on disk: 8 layers x 64 experts x 4.7 MB.
    "full": {**_COMMON, "hidden_size": 1024, "moe_intermediate_size": 768, "num_hidden_layers": 8,
             "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128},
    "medium": {**_COMMON, "hidden_size": 512, "moe_intermediate_size": 384, "num_hidden_layers": 8,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64},  # ~0.6 GB
    "small": {**_COMMON, "hidden_size": 256, "moe_intermediate_size": 256, "num_hidden_layers": 8,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64},  # ~0.2 GB
    "tiny": {**_COMMON, "hidden_size": 64, "moe_intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},  # ~3 MB, for tests
}
MARKER = "offload_bench.json"  # written beside a checkpoint this module made: how it was made
QUANTIZATION = {"bits": 4, "group_size": 64}  # `--quantized`: mlx-community's usual 4-bit format
CALIBRATION_TOKENS = 384
HEADROOM_MB = 512

# A fixed text: the calibration trace and the benchmark prompt. Ordinary Python, as the demo's held-out text.
CALIBRATION_TEXT = '''\
import os
import json
from collections import OrderedDict


class LRUCache:
    """A mapping that keeps at most `capacity` items and forgets the least recently used one."""

    def __init__(self, capacity=128):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.items = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key, default=None):
        """Return the value for `key` and mark it as recently used."""
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        return default

    def put(self, key, value):
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def hit_rate(self):
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def load_settings(path, defaults=None):
    """Read a JSON settings file; missing keys take their default values."""
    settings = dict(defaults or {})
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            settings.update(json.load(f))
    return settings


def word_counts(lines):
    counts = {}
    for line in lines:
        for word in line.lower().split():
            word = word.strip(".,;:!?\\"'()")
            if word:
                counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


if __name__ == "__main__":
    cache = LRUCache(capacity=2)
    for name in ["a", "b", "a", "c", "b", "a"]:
        if cache.get(name) is None:
            cache.put(name, name.upper())
    print(cache.hit_rate())
'''


def text_tokens(tokenizer, n: int) -> list[int]:
    ids = list(tokenizer.encode(CALIBRATION_TEXT))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


# ---------------------------------------------------------------------------------------------- cgroups


class MemoryCgroup:
    """A memory cgroup for one child at a time; `detect()` returns None where none can be made.

    v1: a child of this process's own memory cgroup (so limits above it still apply), memory.limit_in_bytes.
    v2: a child of this process's cgroup if that delegates the memory controller, else of the root.
    """

    def __init__(self, version: int, parent: Path, name: str) -> None:
        self.version = version
        self.parent = parent
        self.path = parent / name
        self.path.mkdir()

    @classmethod
    def detect(cls, root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup"),
               name: str | None = None) -> MemoryCgroup | None:
        from .telemetry import own_cgroups

        name = name or f"moe-bench-{os.getpid()}"
        own = own_cgroups(proc_cgroup)
        if own is None:
            return None
        own_v1, own_v2 = own
        candidates: list[tuple[int, Path]] = []
        v1 = root / "memory"
        if own_v1 is not None and (v1 / "memory.limit_in_bytes").exists():
            candidates.append((1, v1 / own_v1.lstrip("/")))
        if (root / "cgroup.controllers").exists():
            for parent in ([root / own_v2.lstrip("/")] if own_v2 not in (None, "/") else []) + [root]:
                try:
                    if "memory" in (parent / "cgroup.subtree_control").read_text().split():
                        candidates.append((2, parent))
                        break
                except OSError:
                    continue
        for version, parent in candidates:
            try:
                return cls(version, parent, name)
            except OSError:
                continue
        return None

    @property
    def kind(self) -> str:
        return f"cgroup-v{self.version}"

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def set_limit(self, nbytes: int) -> None:
        self._reset_peak()
        (self.path / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")).write_text(str(int(nbytes)))

    def _reset_peak(self) -> None:
        with contextlib.suppress(OSError):
            if self.version == 1:
                (self.path / "memory.max_usage_in_bytes").write_text("0")
                (self.path / "memory.failcnt").write_text("0")
            else:
                (self.path / "memory.peak").write_text("0")  # kernels >= 6.12; elsewhere left as is

    def stats(self) -> dict:
        def read_int(name: str) -> int | None:
            try:
                return int((self.path / name).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return None

        if self.version == 1:
            return {"peak_bytes": read_int("memory.max_usage_in_bytes"), "limit_hits": read_int("memory.failcnt")}
        events = {}
        with contextlib.suppress(OSError):
            events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        return {"peak_bytes": read_int("memory.peak"), "limit_hits": int(events.get("max", 0)),
                "oom_kills": int(events.get("oom_kill", 0))}

    def empty(self) -> None:
        """Reclaim the page cache charged here (v1), so the next configuration starts cold."""
        if self.version == 1:
            with contextlib.suppress(OSError):
                (self.path / "memory.force_empty").write_text("0")

    def remove(self) -> None:
        self.empty()
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # the exited child is still being removed from it
        print(f"moe bench: could not remove {self.path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- children

_BOOT = ("import os, sys\n"
         "if sys.argv[1]:\n"
         "    with open(sys.argv[1], 'w') as f: f.write(str(os.getpid()))\n"
         "from moe_tui.inference.offload_bench import worker_main\n"
         "sys.exit(worker_main(sys.argv[2], sys.argv[3]))\n")


def run_child(task: dict, workdir: Path, cgroup: MemoryCgroup | None = None,
              limit: int | None = None) -> dict:
    """Run `task` in a child process (in `cgroup`, limited to `limit` bytes) and return its result."""
    n = len(list(workdir.glob("task-*.json")))
    spec, out = workdir / f"task-{n}.json", workdir / f"result-{n}.json"
    spec.write_text(json.dumps(task))
    procs = ""
    if cgroup is not None and limit is not None:
        cgroup.set_limit(limit)
        procs = str(cgroup.procs)
    # The child's stdout goes to our stderr (fd 2): our stdout carries only the report.
    child = subprocess.Popen([sys.executable, "-c", _BOOT, procs, str(spec), str(out)], stdout=2)
    try:
        rc = child.wait()
    except BaseException:
        child.kill()
        child.wait()
        raise
    result = json.loads(out.read_text()) if out.exists() else {}
    if rc != 0:
        why = ("killed by SIGKILL (over the memory limit? raise --offload-headroom)" if rc == -9
               else f"exit status {rc}")
        result.setdefault("error", f"child {why}")
    if cgroup is not None and limit is not None:
        result["cgroup"] = {"limit_bytes": limit, **cgroup.stats()}
        cgroup.empty()
    return result


def worker_main(spec_path: str, out_path: str) -> int:
    task = json.loads(Path(spec_path).read_text())
    try:
        result = TASKS[task["task"]](**task["args"])
        code = 0
    except Exception as exc:  # reported in the result, the parent goes on with the next configuration
        import traceback

        traceback.print_exc()
        result, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out_path).write_text(json.dumps(result, default=_json_default))
    return code


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    return str(o)


# ---------------------------------------------------------------------------------------------- tasks


def make_offload_checkpoint(path: str, size: str, embed_std: float = EMBED_STD, quantized: bool = False,
                            scratch: str | None = None) -> dict:
    """Write the synthetic checkpoint of `size` to `path` (bf16 on disk) with calibrated routing. `quantized`:
    then converted as mlx-community's 4-bit models are (`mlx_lm.convert`, QUANTIZATION: bf16 scales and biases,
    the routers at 8 bits): the same weights in the format most people download (quantizing moves the routing
    a little; the benchmark measures it on the checkpoint it runs). The bf16 original and the conversion are
    written under `scratch` (default: beside `path`), which the benchmark's parent removes even when this
    child is killed."""
    import mlx.core as mx

    from .synthetic import make_checkpoint

    started = time.perf_counter()
    path = Path(path)
    work = Path(scratch) if scratch else path.parent
    raw = work / f"{path.name}.bf16-tmp" if quantized else path
    try:
        make_checkpoint(raw, "qwen3_moe", dtype=mx.bfloat16, seed=SEED, router_scale=ROUTER_SCALE, **SIZES[size])
        set_embedding_std(raw, embed_std)  # before quantizing: the embeddings are quantized too
        if quantized:
            _convert_4bit(raw, path, work / f"{path.name}.4bit-tmp")
    finally:
        if raw != path:
            shutil.rmtree(raw, ignore_errors=True)
    info = {"size": size, "embed_std": embed_std, "router_scale": ROUTER_SCALE, "seed": SEED,
            "config": SIZES[size], "quantization": QUANTIZATION if quantized else None}
    (path / MARKER).write_text(json.dumps(info, indent=2))
    return {**info, "seconds": time.perf_counter() - started, **probe(str(path), 0.25)}


def _convert_4bit(source: Path, path: Path, out: Path) -> None:
    """`mlx_lm.convert` of `source` into `out`, then its files moved into `path` (new or empty: convert itself
    refuses any existing folder)."""
    from mlx_lm.convert import convert

    shutil.rmtree(out, ignore_errors=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its "[INFO] ..." lines: stdout is the report's
            convert(str(source), mlx_path=str(out), quantize=True, q_bits=QUANTIZATION["bits"],
                    q_group_size=QUANTIZATION["group_size"], dtype="bfloat16")
        path.mkdir(parents=True, exist_ok=True)
        for f in out.iterdir():
            shutil.move(f, path / f.name)  # the scratch folder may be on another file system
    finally:
        shutil.rmtree(out, ignore_errors=True)


def set_embedding_std(path: Path, std: float, name: str = "model.embed_tokens.weight") -> None:
    """Rescale the token embeddings in place (same dtype and bytes) to standard deviation `std`."""
    import numpy as np

    from .safetensors_io import read_header, weight_files

    for file in weight_files(path):
        info = read_header(file).get(name)
        if info is None:
            continue
        with open(file, "r+b") as f:
            f.seek(info.offset)
            raw = np.frombuffer(f.read(info.nbytes), dtype=np.uint16 if info.itemsize == 2 else np.float32)
            if info.dtype == "BF16":
                values = (raw.astype(np.uint32) << 16).view(np.float32)
            elif info.dtype == "F16":
                values = raw.view(np.float16).astype(np.float32)
            elif info.dtype == "F32":
                values = raw.copy()
            else:
                raise ValueError(f"{file}: {name} is {info.dtype}; expected BF16, F16 or F32")
            values = values * (std / float(np.sqrt(np.mean(values.astype(np.float64) ** 2))))
            if info.dtype == "BF16":
                bits = values.astype(np.float32).view(np.uint32)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
                out = (bits >> 16).astype(np.uint16)
            elif info.dtype == "F16":
                out = values.astype(np.float16)
            else:
                out = values.astype(np.float32)
            f.seek(info.offset)
            f.write(out.tobytes())
        return
    raise ValueError(f"{path}: no tensor {name}")


def probe(path: str, capacity: float) -> dict:
    from .engine import Engine

    try:
        engine = Engine.load(path, capacity=capacity)  # below 100%: nothing is read up front
    except ValueError:  # below top_k
        engine = Engine.load(path, capacity=1.0)
    layout = engine.layout
    engine.close()
    return {"layout": {**layout.__dict__, "moe_layers": list(layout.moe_layers)}}


def _trace_hit_rates(engine, tokens: list[int], fractions=(0.25, 0.5)) -> dict:
    """Feed `tokens` one at a time (decode-style) and replay the per-layer trace at each capacity."""
    engine.reset_stats()
    engine.route_tokens(tokens)
    E = engine.layout.num_experts
    out = {}
    for f in fractions:
        # From an empty cache: a calibration trace at other capacities than the run's, compared with cold replays.
        rates = engine.experts.hit_rates_vs_optimum(capacity=max(engine.layout.top_k, round(f * E)), warm=False)
        out[str(f)] = {name: r["hit_rate"] for name, r in rates.items()}
    return out


class _DecodeWindow:
    """Counters at the first token and at the end of one `engine.stream` pass: decode-only deltas.

    Wraps the engine's per-token callback (read by `Engine.stream` when it starts) for one pass.
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self.first = None
        self.first_at = None
        experts = engine.experts
        self._original = experts.after_step
        experts.after_step = self._after_step

    def _read(self):
        c = self.engine.counters
        reader = self.engine.experts.reader
        return {"bytes": int(c.bytes_read.sum()), "seconds": float(c.load_seconds.sum()),
                "read_seconds": c.read_seconds, "disk_bytes": reader.bytes_read, "disk_seconds": reader.busy_seconds,
                "hits": int(c.hits.sum()), "misses": int(c.misses.sum()),
                "prefetches": int(c.prefetches.sum()), "prefetch_hits": int(c.prefetch_hits.sum()),
                "prefetch_wasted": int(c.prefetch_wasted.sum())}

    def _after_step(self) -> None:
        if self.first is None:
            self.first, self.first_at = self._read(), time.perf_counter()
        self._original()

    def close(self) -> dict:
        self.engine.experts.__dict__.pop("after_step", None)
        ended = time.perf_counter()
        self.engine.snapshot()  # folds deferred routing records into the counters
        end = self._read()
        start = self.first or end
        return {k: end[k] - start[k] for k in end} | {"seconds_wall": ended - (self.first_at or ended)}


def _pass(engine, prompt: list[int], decode_tokens: int) -> dict:
    engine.reset_prompt_cache()
    engine.reset_stats()
    window = _DecodeWindow(engine)
    done = None
    try:
        for event in engine.stream(prompt, max_tokens=decode_tokens):
            done = event
    finally:
        delta = window.close()
    snap = engine.snapshot()
    n = max(done.generated_tokens - 1, 1)  # tokens after the first (which comes out of the prefill)
    lookups = delta["hits"] + delta["misses"]
    return {
        "prefill_tps": done.prefill_tps, "decode_tps": done.decode_tps, "ttft_s": done.ttft_s,
        "generated_tokens": done.generated_tokens, "hit_rate": snap.hit_rate, "fallback_rate": snap.fallback_rate,
        "bytes_read": snap.bytes_read, "load_seconds": snap.load_seconds,
        "decode": {"tokens": n, "bytes_read": delta["bytes"], "load_seconds": delta["seconds"],
                   "read_seconds": delta["read_seconds"], "wall_seconds": delta["seconds_wall"],
                   # The reads alone (a preadv in flight), apart from widening and writing into the slots.
                   "disk_bytes": delta["disk_bytes"], "disk_seconds": delta["disk_seconds"],
                   "hit_rate": delta["hits"] / lookups if lookups else 0.0,
                   "demand_hit_rate": (delta["hits"] - delta["prefetch_hits"]) / lookups if lookups else 0.0,
                   "prefetches": delta["prefetches"], "prefetch_hits": delta["prefetch_hits"],
                   "prefetch_wasted": delta["prefetch_wasted"],
                   "bytes_per_token": delta["bytes"] / n, "stall_s_per_token": delta["seconds"] / n},
        "tokens": list(done.tokens),
    }


def measure(path: str, capacity: float, mode: str, prompt_tokens: int, decode_tokens: int,
            calibration: bool = False, passes: int = 1, pack: str | bool = False) -> dict:
    """One configuration: load, a first pass (cache cold, as after loading), then the measured pass (the
    fastest decode of `passes`). `pack`: the expert records to read misses from (`Engine.load`), unless the
    mode says otherwise."""
    from .engine import Engine

    started = time.perf_counter()
    from .bench import MODES

    engine = Engine.load(path, capacity=capacity, **{"pack": pack, **MODES[mode]})
    load = {"seconds": time.perf_counter() - started, "bytes_read": int(engine.counters.bytes_read.sum()),
            "load_seconds": float(engine.counters.load_seconds.sum())}
    engine.tokenizer.eos_token_ids = set()  # every pass decodes exactly decode_tokens
    prompt = text_tokens(engine.tokenizer, prompt_tokens)
    first = _pass(engine, prompt, decode_tokens)
    result = max((_pass(engine, prompt, decode_tokens) for _ in range(passes)), key=lambda r: r["decode_tps"])
    result["measured_passes"] = passes
    result.update(mode=mode, capacity=engine.capacity, capacity_fraction=engine.capacity / engine.layout.num_experts,
                  load=load, first_pass={k: first[k] for k in ("prefill_tps", "decode_tps", "hit_rate", "bytes_read")})
    result["same_tokens_both_passes"] = result.pop("tokens") == first["tokens"]
    if calibration:
        decode_steps = result["decode"]["tokens"]
        E, K = engine.layout.num_experts, engine.layout.top_k
        # The measured pass's decode traffic, replayed (its trace is the last steps of the pass).
        result["decode_trace_lru"] = {
            str(f): engine.experts.hit_rates_vs_optimum(max(K, round(f * E)), last_steps=decode_steps,
                                                        warm=False)["lru"]["hit_rate"]
            for f in (0.25, 0.5)}
        result["calibration_trace"] = _trace_hit_rates(engine, text_tokens(engine.tokenizer, CALIBRATION_TOKENS))
    engine.close()
    return result


# Rounds of prefills taken in turns with the files warm (plus a first one, not counted). Even, so that each
# order of the two engines counts as often and whatever the order adds cancels in the geometric mean: in one
# 5-round run the rounds split by order (0.77-0.84 against 0.90-0.93), in the next 6-round runs they did not.
WARM_PREFILL_ROUNDS = 6


def prefill_rounds(configs: list[tuple[str, Any, Callable[[], None] | None]], prompt: list[int],
                   rounds: int) -> dict[str, list[float]]:
    """Prefill tok/s of each (name, engine, before) configuration, one process taking turns: one prefill of
    `prompt` each per round, the order reversed every other round, and a first round not counted (it fills
    the caches, as `moe bench`'s warm pass does). An even `rounds` counts each order equally often. `before`,
    where given, runs before each of its prefills."""
    speeds: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for r in range(rounds + 1):
        for name, engine, before in configs if r % 2 else configs[::-1]:
            if before is not None:
                before()
            engine.reset_prompt_cache()
            *_, done = engine.stream(prompt, max_tokens=1)
            if r:
                speeds[name].append(done.prefill_tps)
    return speeds


def ratios(values: list[float], base: list[float]) -> dict:
    """Each round's value over the base's in the same round: median and geometric mean (over rounds taken in
    both orders equally often, the geometric mean cancels what the order adds to one and takes from the other)."""
    each = [a / b for a, b in zip(values, base, strict=True)]
    return {"median": statistics.median(each), "geometric_mean": math.exp(statistics.fmean(map(math.log, each))),
            "per_round": each}


def warm_prefill(path: str, fractions: list[float], prompt_tokens: int, rounds: int = WARM_PREFILL_ROUNDS,
                 pack: str | bool = False) -> dict:
    """Prefill at each capacity in `fractions` against every expert resident, files in the page cache (no
    memory limit; loading at 100% reads them all, and reads go through the page cache even where the engine
    would bypass it), the two taking turns in one process. One smaller engine at a time beside the 100% one."""
    import gc

    from .bench import MODES
    from .engine import Engine

    full = Engine.load(path, capacity=1.0, pack=pack, **MODES["exact-cached"])
    prompt = text_tokens(full.tokenizer, prompt_tokens)
    configs = []
    try:
        for fraction in fractions:
            part = Engine.load(path, capacity=fraction, pack=pack, **MODES["exact-cached"])
            try:
                speeds = prefill_rounds([("full", full, None), ("part", part, None)], prompt, rounds)
                configs.append({"capacity_fraction": part.capacity / part.layout.num_experts,
                                "capacity": part.capacity,
                                "prefill_tps": statistics.median(speeds["part"]),
                                "full_prefill_tps": statistics.median(speeds["full"]),
                                "vs_full": ratios(speeds["part"], speeds["full"])})
            finally:
                part.close()
                del part  # its slots go before the next capacity's are made
                gc.collect()
    finally:
        full.close()
    return {"rounds": rounds, "prompt_tokens": len(prompt), "configs": configs}


def calibration_point(path: str, embed_std: float, tokens: int) -> dict:
    from .engine import Engine

    set_embedding_std(Path(path), embed_std)
    engine = Engine.load(path, capacity=1.0)
    rates = _trace_hit_rates(engine, text_tokens(engine.tokenizer, tokens))
    engine.close()
    return {"embed_std": embed_std, "lru": {f: r["lru"] for f, r in rates.items()}}


def pack_records(path: str, out: str) -> dict:
    """The checkpoint's expert records (`moe pack`) in `out`, where they make misses faster to read."""
    from .errors import ModelLoadError
    from .packed import pack_model

    started = time.perf_counter()
    try:
        folder, nbytes, _ = pack_model(path, Path(out))
    except ModelLoadError as e:
        return {"path": None, "skipped": str(e)}
    return {"path": str(folder), "bytes": nbytes, "seconds": time.perf_counter() - started}


TASKS = {"make": make_offload_checkpoint, "probe": probe, "measure": measure, "calibrate": calibration_point,
         "warm_prefill": warm_prefill, "pack": pack_records}


# ---------------------------------------------------------------------------------------------- the run


def parse_percents(text: str) -> list[float]:
    values = [float(v.strip().rstrip("%")) / 100 for v in text.split(",") if v.strip()]
    if not values or any(not 0 < v <= 1 for v in values):
        raise ValueError(f"capacities {text!r}: give percents in (0, 100], e.g. 12.5,25,50,100")
    return values


def prepare_checkpoint(model: str | None, size: str, workdir: Path, quantized: bool = False,
                       ) -> tuple[Path, dict | None, bool]:
    """(path, how it was made or None for a checkpoint not made here, whether this run made it)."""
    if model is not None and (Path(model) / "config.json").exists():
        marker = Path(model) / MARKER
        made = json.loads(marker.read_text()) if marker.exists() else None
        if quantized and not (made or {}).get("quantization"):
            raise ValueError(f"--quantized makes the synthetic checkpoint in 4 bits, but {model} already holds "
                             f"{'a bf16 one' if made else 'a checkpoint not made by moe bench'}: give a new "
                             f"--offload-model path, or leave out --quantized to run this one")
        return Path(model), made, False
    if model is not None and Path(model).exists() and (not Path(model).is_dir() or any(Path(model).iterdir())):
        raise ValueError(f"--offload-model {model} exists and is not a checkpoint: give a new or empty folder "
                         f"to make the synthetic one in")
    suffix = "-4bit" if quantized else ""
    path = Path(model) if model is not None else workdir / f"synthetic-qwen3-moe-{size}{suffix}"
    kind = f"{size}, 4-bit" if quantized else size
    print(f"moe bench: writing a synthetic checkpoint ({kind}) to {path}", file=sys.stderr)
    made = run_child({"task": "make", "args": {"path": str(path), "size": size, "quantized": quantized,
                                               "scratch": str(workdir)}}, workdir)
    if "error" in made:
        raise RuntimeError(f"making the checkpoint failed: {made['error']}")
    return path, made, True


def run_offload_bench(model: str | None = None, size: str = "full", fractions=(0.125, 0.25, 0.5, 1.0),
                      modes=("exact", "exact-prefetch", "exact-noprefetch"), prompt_tokens: int = 64,
                      decode_tokens: int = 64, headroom: int = HEADROOM_MB << 20,
                      use_cgroup: bool = True, quantized: bool = False) -> dict:
    from .bench import MODES

    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    workdir = Path(tempfile.mkdtemp(prefix="moe-offload-"))
    with _terminate_as_exit():
        return _run(model, size, fractions, modes, prompt_tokens, decode_tokens, headroom, use_cgroup, workdir,
                    quantized)


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM ends the run like Ctrl+C: the running child is killed and the cgroup removed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def slots_at(layout: dict, fraction: float) -> int:
    """Experts per layer at `fraction` of them, as the children's engines hold them."""
    return max(layout["top_k"], round(fraction * layout["num_experts"]))


def memory_limit(layout: dict, fraction: float, headroom: int) -> int:
    """The memory cgroup limit of a run at `fraction`: dense weights + the expert cache there + `headroom` bytes."""
    cache = slots_at(layout, fraction) * layout["expert_bytes"] * len(layout["moe_layers"])
    return layout["dense_bytes"] + cache + headroom


def probe_limit(path: str, fraction: float, headroom: int) -> int:
    """`memory_limit` for the checkpoint at `path` (its layout read by a child, which loads no expert)."""
    layout = run_child({"task": "probe", "args": {"path": str(path), "capacity": fraction}},
                       Path(tempfile.mkdtemp(prefix="moe-probe-")))["layout"]
    return memory_limit(layout, fraction, headroom)


def add_limited_args(parser) -> None:
    """The arguments of a script that re-runs itself through `run_limited`: the model, the capacity its memory
    limit is sized for, the headroom, and the child's own (--child, and --procs: where it writes its pid)."""
    import argparse

    parser.add_argument("--model", required=True)
    parser.add_argument("--capacity", type=float, default=0.25, help="fraction of each layer's experts")
    parser.add_argument("--headroom", type=int, default=512, help="MiB above dense + cache in the cgroup")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--procs", default="", help=argparse.SUPPRESS)


def run_limited(command: list[str], cgroup: MemoryCgroup | None, path: str, fraction: float,
                headroom: int) -> dict | None:
    """Run `command` (a script re-running itself as a child, which writes its pid into the file named after
    `--procs` before MLX allocates anything) in `cgroup`, limited as a run at `fraction` (`probe_limit`), and
    remove the cgroup afterwards: {"limit_bytes", "peak_bytes"}. Without a cgroup it runs unlimited: None.

    Raises:
        subprocess.CalledProcessError: the child failed.
    """
    if cgroup is None:
        subprocess.run(command, check=True)
        return None
    try:
        limit = probe_limit(path, fraction, headroom)
        cgroup.set_limit(limit)
        subprocess.run([*command, "--procs", str(cgroup.procs)], check=True)
        return {"limit_bytes": limit, "peak_bytes": cgroup.stats().get("peak_bytes") or 0}
    finally:
        cgroup.remove()


def _run(model, size, fractions, modes, prompt_tokens, decode_tokens, headroom, use_cgroup, workdir,
         quantized=False) -> dict:
    from . import packed
    from .bench import drop_page_cache, sequential_read_bandwidth
    from .safetensors_io import weight_files

    cgroup = None
    try:
        path, made, created = prepare_checkpoint(model, size, workdir, quantized)
        files = weight_files(path)
        file_bytes = sum(f.stat().st_size for f in files)
        if made and "layout" in made:
            layout = made.pop("layout")
        else:
            probed = run_child({"task": "probe", "args": {"path": str(path), "capacity": min(fractions)}}, workdir)
            if "error" in probed:
                raise RuntimeError(f"opening {path} failed: {probed['error']}")
            layout = probed["layout"]
        cgroup = MemoryCgroup.detect() if use_cgroup else None
        environment = {
            "isolation": cgroup.kind if cgroup else "fadvise",
            "cgroup": str(cgroup.path) if cgroup else None,
            "headroom_bytes": headroom if cgroup else None,
            "page_cache_dropped_before_each_run": True,
            "note": ("each configuration runs in a memory cgroup limited to dense weights + expert cache + "
                     "headroom, its files' pages dropped first" if cgroup else
                     "no memory cgroup" + (" (--offload-no-cgroup)" if not use_cgroup else " available (needs root "
                     "and a memory controller)") + ": the files' pages are dropped (posix_fadvise DONTNEED) "
                     "before each run, but pages read during a run may stay cached"),
            "file_bytes": file_bytes, "files": [str(f) for f in files], "cpu_count": os.cpu_count(),
        }
        if not cgroup:
            print(f"moe bench: {environment['note']}", file=sys.stderr)
        report: dict = {
            "model": str(path), "synthetic": made, "made_here": created, "layout": layout, "environment": environment,
            "quantization": _quantization(path),
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
        }
        # The expert records misses are read from (`moe pack`), where they make reads faster; the modes ending
        # in -unpacked read the checkpoint itself.
        print("moe bench: expert records (moe pack)", file=sys.stderr)
        report["records"] = run_child({"task": "pack", "args": {"path": str(path), "out": str(workdir / "records")}},
                                      workdir)
        pack = report["records"].get("path") or False
        dropped = files + ([Path(pack) / packed.RECORDS] if pack else [])
        sequential = sequential_read_bandwidth(files)
        # The compute limit: every expert in memory, files warm (just read), no memory limit; best of 3.
        print("moe bench: compute limit (100% capacity, files warm)", file=sys.stderr)
        compute = run_child({"task": "measure", "args": {
            "path": str(path), "capacity": 1.0, "mode": "exact", "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens, "calibration": True, "passes": 3, "pack": pack}}, workdir)
        if "error" in compute:
            raise RuntimeError(f"the compute-limit run failed: {compute['error']}")
        # Prefill below 100% against 100%, files still warm, no memory limit: the two take turns in one child.
        below = [f for f in fractions if slots_at(layout, f) < layout["num_experts"]]  # capacities that can miss
        if below:
            print("moe bench: prefill with the files warm, " + ", ".join(f"{f:.1%}" for f in below) + " against 100%, "
                  "taking turns", file=sys.stderr)
            report["warm_prefill"] = run_child({"task": "warm_prefill", "args": {
                "path": str(path), "fractions": below, "prompt_tokens": prompt_tokens, "pack": pack}}, workdir)
        configs = []
        for mode in modes:
            for fraction in fractions:
                limit = memory_limit(layout, fraction, headroom)
                print(f"moe bench: {mode} @ {fraction:.1%}" + (f", memory limit {limit / 2**20:.0f} MiB" if cgroup
                                                            else ""), file=sys.stderr)
                drop_page_cache(dropped)
                r = run_child({"task": "measure", "args": {
                    "path": str(path), "capacity": fraction, "mode": mode, "prompt_tokens": prompt_tokens,
                    "decode_tokens": decode_tokens, "pack": pack}}, workdir, cgroup, limit)
                r.setdefault("mode", mode)
                r.setdefault("capacity_fraction", fraction)
                configs.append(_derive(r, sequential, compute["decode_tps"]))
        report["routing"] = {
            "demo_lru": DEMO_LRU,
            "synthetic_lru": {f: v["lru"] for f, v in compute["calibration_trace"].items()},
            "synthetic_belady": {f: v["belady"] for f, v in compute["calibration_trace"].items()},
            "calibration_tokens": CALIBRATION_TOKENS,
            "benchmark_decode_lru": compute["decode_trace_lru"],
        }
        report["limits"] = {"compute_decode_tps": compute["decode_tps"], "compute_prefill_tps": compute["prefill_tps"],
                            "compute_peak_rss_bytes": compute.get("peak_rss_bytes")}
        ok = [c for c in configs if "error" not in c and c["decode"]["load_seconds"] > 0]
        read = sum(c["decode"]["bytes_read"] for c in ok)
        secs = sum(c["decode"]["read_seconds"] for c in ok)
        engine_bw = read / secs if secs else 0.0
        disk_bytes = sum(c["decode"]["disk_bytes"] for c in ok)
        disk_secs = sum(c["decode"]["disk_seconds"] for c in ok)
        disk_bw = disk_bytes / disk_secs if disk_secs else 0.0
        warm = compute["load"]
        warm_bw = warm["bytes_read"] / warm["load_seconds"] if warm["load_seconds"] else 0.0
        report["io"] = {"sequential_read_bandwidth": sequential, "engine_cold_load_bandwidth": engine_bw,
                        "engine_vs_sequential": engine_bw / sequential if sequential else 0.0,
                        "engine_bytes": read, "engine_load_seconds": secs,
                        # The same reads timed alone: wall time with a read in flight, not the widening after.
                        "engine_cold_read_bandwidth": disk_bw,
                        "engine_read_vs_sequential": disk_bw / sequential if sequential else 0.0,
                        # Every expert loaded a whole layer at a time from the page cache (the compute-limit
                        # run's load): the engine's load path (read, upcast, copy into slots) with no disk.
                        "engine_warm_load_bandwidth": warm_bw}
        report["configs"] = configs
        report["model_kept"] = model is not None  # else it was made in a temporary folder, removed now
        return report
    finally:
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(workdir, ignore_errors=True)


def _quantization(path: Path) -> dict | None:
    """The checkpoint's quantization as its config.json states it (bits, group size), or None."""
    q = json.loads((path / "config.json").read_text()).get("quantization")
    return {"bits": q.get("bits"), "group_size": q.get("group_size")} if isinstance(q, dict) else None


def _derive(r: dict, sequential: float, compute_tps: float) -> dict:
    if "error" in r:
        return r
    d = r["decode"]
    per_token = d["bytes_per_token"]
    r["load_bandwidth"] = d["bytes_read"] / d["read_seconds"] if d["read_seconds"] else None
    r["load_vs_sequential"] = r["load_bandwidth"] / sequential if r["load_bandwidth"] and sequential else None
    r["read_bandwidth"] = d["disk_bytes"] / d["disk_seconds"] if d["disk_seconds"] else None  # reads alone
    r["stall_share"] = d["stall_s_per_token"] * r["decode_tps"]  # of each decode token's time
    r["io_limit_tps"] = sequential / per_token if per_token else None  # None: nothing read, no I/O limit
    r["compute_limit_tps"] = compute_tps
    bound = min(compute_tps, r["io_limit_tps"] or float("inf"))
    r["vs_bound"] = r["decode_tps"] / bound if bound else None
    return r


def calibrate(size: str = "small", tokens: int = CALIBRATION_TOKENS, stds=None) -> dict:
    """Search the embedding std whose LRU hit rates (25%, 50%) come closest to the demo model's."""
    workdir = Path(tempfile.mkdtemp(prefix="moe-calibrate-"))
    try:
        path, _, _ = prepare_checkpoint(None, size, workdir)
        points = []

        def point(std: float) -> dict:
            r = run_child({"task": "calibrate", "args": {"path": str(path), "embed_std": std, "tokens": tokens}},
                          workdir)
            if "error" in r:
                raise RuntimeError(r["error"])
            r["error_max"] = max(abs(r["lru"][f] - DEMO_LRU[f]) for f in DEMO_LRU)
            print(f"embed std {std:.3f}: LRU {r['lru']} (demo {DEMO_LRU}), max error {r['error_max']:.3f}",
                  file=sys.stderr)
            points.append(r)
            return r

        for std in stds or (0.45, 0.5, 0.55, 0.58, 0.6, 0.65, 0.7, 0.8):
            point(std)
        best = min(points, key=lambda p: p["error_max"])
        return {"size": size, "tokens": tokens, "demo_lru": DEMO_LRU, "points": points, "best": best}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- output


def format_table(report: dict) -> str:
    env, lay = report["environment"], report["layout"]
    lim = report["limits"]
    io = report["io"]
    iso = env["isolation"] + (f" (headroom {env['headroom_bytes'] / 2**20:.0f} MiB)" if env["headroom_bytes"] else "")
    q = report.get("quantization")
    lines = [
        f"model {report['model']}  {env['file_bytes'] / 2**30:.2f} GiB on disk"
        + (f" ({q['bits']}-bit, group {q['group_size']})" if q else "") + f"  {lay['num_experts']} experts top-"
        f"{lay['top_k']} x {len(lay['moe_layers'])} layers  expert {lay['expert_bytes'] / 2**20:.2f} MiB in memory",
        f"isolation {iso}; page cache dropped before each run",
        f"cold sequential read {io['sequential_read_bandwidth'] / 2**20:.0f} MiB/s; engine's cold expert reads "
        f"{io['engine_cold_read_bandwidth'] / 2**20:.0f} MiB/s while a read is in flight "
        f"({io['engine_read_vs_sequential']:.0%} of it), {io['engine_cold_load_bandwidth'] / 2**20:.0f} MiB/s "
        f"with widening into the slots ({io['engine_vs_sequential']:.0%}); "
        f"engine loading every expert from warm files {io['engine_warm_load_bandwidth'] / 2**20:.0f} MiB/s",
        f"compute limit (100%, files warm): decode {lim['compute_decode_tps']:.1f} tok/s, "
        f"prefill {lim['compute_prefill_tps']:.1f} tok/s",
    ]
    rec = report.get("records") or {}
    if rec.get("path"):
        lines.append(f"expert records (moe pack): {rec['bytes'] / 2**30:.2f} GiB written in {rec['seconds']:.0f} s; "
                     "misses read from them (modes ending in -unpacked: from the checkpoint)")
    elif rec:
        lines.append(f"expert records (moe pack): none: {rec.get('skipped') or rec.get('error')}")
    warm = report.get("warm_prefill")
    if warm and "error" in warm:
        lines.append(f"prefill with files warm: error: {warm['error']}")
    elif warm:
        lines.append(f"prefill with files warm, taking turns with 100% ({warm['rounds']} rounds; median tok/s, "
                     "geometric mean of the rounds' ratios): "
                     + ", ".join(f"{c['capacity_fraction']:.1%}".replace(".0%", "%") + f" {c['prefill_tps']:.1f} "
                                 f"vs {c['full_prefill_tps']:.1f} tok/s ({c['vs_full']['geometric_mean']:.2f}x)"
                                 for c in warm["configs"]))
    rt = report["routing"]
    lines.append("LRU hit rate, per-token trace: " + "  ".join(
        f"{float(f):.0%} demo {rt['demo_lru'][f]:.1%} / synthetic {rt['synthetic_lru'][f]:.1%} "
        f"(benchmark decode {rt['benchmark_decode_lru'][f]:.1%})" for f in rt["demo_lru"] if f in rt["synthetic_lru"]))
    lines.append(f"{'config':<23}{'prefill':>8}{'decode':>7}{'ready':>7}{'demand':>7}{'MiB/tok':>8}{'stall ms':>9}"
                 f"{'stall':>6}{'io lim':>8}{'cpu lim':>8}{'of lim':>7}{'load MiB/s':>11}{'limit MiB':>10}"
                 f"{'peak MiB':>9}")
    for r in report["configs"]:
        name = f"{r['mode']}@{r['capacity_fraction']:.1%}".replace(".0%", "%")
        if "error" in r:
            lines.append(f"{name:<23} error: {r['error']}")
            continue
        d = r["decode"]
        cg = r.get("cgroup") or {}
        lines.append(
            f"{name:<23}{r['prefill_tps']:>8.1f}{r['decode_tps']:>7.1f}{d['hit_rate']:>7.1%}"
            f"{d.get('demand_hit_rate', d['hit_rate']):>7.1%}"
            f"{d['bytes_per_token'] / 2**20:>8.2f}{d['stall_s_per_token'] * 1e3:>9.1f}{r['stall_share']:>6.0%}"
            f"{_num(r['io_limit_tps']):>8}{r['compute_limit_tps']:>8.1f}{_num(r['vs_bound'], '.0%'):>7}"
            f"{_num(r['load_bandwidth'] and r['load_bandwidth'] / 2**20, '.0f'):>11}"
            f"{_num(cg.get('limit_bytes') and cg['limit_bytes'] / 2**20, '.0f'):>10}"
            f"{_num(cg.get('peak_bytes') and cg['peak_bytes'] / 2**20, '.0f'):>9}")
    lines.append("decode tok/s and hit rates over decode tokens (ready: needed experts resident when their layer ran, "
                 "read ahead included; demand: without the reads ahead); stall: seconds per decode token the forward "
                 "pass waited on reads and its share of the token's time; io lim: sequential read / bytes per token; "
                 "of lim: decode / min(limits); load MiB/s: bytes / the loads' wall time (reads, widening, "
                 "writes into the slots)")
    return "\n".join(lines)


def _num(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def main(args) -> int:
    if getattr(args, "offload_calibrate", False):
        result = calibrate(size=args.offload_size if args.offload_size != "full" else "small")
        json.dump(result, sys.stdout, indent=2, default=_json_default)
        sys.stdout.write("\n")
        return 0
    try:
        report = run_offload_bench(
            model=args.offload_model, size=args.offload_size, fractions=parse_percents(args.offload_capacities),
            modes=tuple(m.strip() for m in args.offload_modes.split(",") if m.strip()),
            prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
            headroom=int(args.offload_headroom) << 20, use_cgroup=not args.offload_no_cgroup,
            quantized=getattr(args, "quantized", False))
    except KeyboardInterrupt:
        print("moe bench: interrupted (the running child was ended and its cgroup removed)", file=sys.stderr)
        return 130
    print(format_table(report), file=sys.stderr)
    json.dump(report, sys.stdout, indent=2, default=_json_default)
    sys.stdout.write("\n")
    return 0
