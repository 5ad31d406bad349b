"""Decode speed of the engine's exact mode vs boyle 0.2.1's offload runtime, side by side in one process.

    python scripts/peer_bench.py [--model DIR] [--rounds 8] [--decode-tokens 128] [--json out.json]

boyle (https://pypi.org/project/boyle/, Apache-2.0) is a peer that also keeps a bounded number of each
MoE layer's experts resident in slots (LRU) and reads the others from the checkpoint on a miss; its decode is
bit-identical to stock mlx-lm, like our exact mode. It is not a dependency of this project: install it only to
run this script, `pip install boyle==0.2.1 --no-deps` (its own dependencies are ours).

Without --model the script converts the demo model (inference/demo, bf16 on disk) to 4-bit in a temporary
folder with mlx-lm's `convert` (group size 64, affine, dtype bfloat16), which is mlx-community's format:
uint32 weights with bf16 scales and biases (mlx-lm's default predicate keeps the router at 8 bits). boyle
only offloads quantized experts, so a quantized checkpoint is what the comparison can run on.

Configurations, all loaded once and kept for the whole run (each keeps its expert cache from one request
to the next, as a server would):
- stock: mlx-lm's model with every expert in memory, half-precision parameters upcast to float32 on the CPU
  backend as stock needs there (`model.set_dtype(mx.float32, lambda d: d in (mx.bfloat16, mx.float16))`):
  the 1.0x reference;
- per capacity (25% and 50% of the experts per layer by default): ours (`Engine.load(model, capacity=c,
  mode="exact")`, the product's default: reads ahead while they pay, timed by the engine), ours without reads
  ahead (`prefetch=False`), and boyle.

Each round runs every configuration once (greedy, same prompt ids, EOS ignored so each decodes exactly
--decode-tokens tokens), in an order that alternates between rounds (forward, then reversed), so that
paired runs are a few seconds apart and share the machine's noise. One unmeasured round first (caches
fill, kernels compile). Decode speed counts the tokens after the first one: from the first token's arrival
to the last's, by wall time (`time.perf_counter`) and by process CPU time (`time.process_time`, every thread
of the process, I/O pools included); the CPU figure is the fair one on a shared machine. Reported per
capacity: each configuration's speed relative to stock of the same round, and the ratio ours/boyle: the
geometric mean over rounds, the min and max per-round ratio, and a bootstrap 90% interval of the geometric
mean (rounds resampled). Every run's tokens are compared with stock's.

The engine measured is whatever `moe_tui.inference` imports (printed as "engine code"); to measure a commit
while the checkout has uncommitted engine edits, export it and put it first on the path:
`mkdir -p /tmp/x/moe_tui && git archive HEAD inference | tar -x -C /tmp/x/moe_tui && touch
/tmp/x/moe_tui/__init__.py && PYTHONPATH=/tmp/x python scripts/peer_bench.py`.

How the timing reaches inside each generation loop: stock and boyle run mlx-lm's `stream_generate`, stamped
as each token is yielded; ours runs `Engine.stream`, stamped by a wrapper around this engine instance's
`experts.after_step` (called once per token right after mlx-lm yields it), so the engine's own per-token
work (its generation loop, stop strings, reads issued between tokens) is inside the measured time.

boyle on Linux / MLX's CPU backend: what this script changes (here only, never in the product), each
needed because boyle 0.2.1 targets macOS/Metal:
1. Reads. Its default store (`CheckpointExpertStore(direct=True)`) opens shards with
   `fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)` (boyle/_runtime.py:186, and ColoStore's at :260), a macOS-only flag:
   on Linux it raises AttributeError inside the I/O pool on the first miss. Its fallback (`direct=False`)
   copies each slab out of an `np.memmap` with the GIL held (the path its docstring measures 4x slower).
   With `--boyle-reads pread` (the default; configuration "boyle") its models read through a subclass of
   `CheckpointExpertStore` whose `read_raw` is boyle's own direct branch minus the F_NOCACHE call: pread
   through the page cache, which is also what our engine does here (its `uncached_reads=None` keeps the page
   cache when the experts fit in memory, as the demo's do). `--boyle-reads memmap` (configuration
   "boyle-memmap") runs boyle's unmodified `direct=False` path; `--boyle-reads pread memmap` runs both.
2. Device query. `boyle.loader.load` ends with
   `mx.set_wired_limit(min(budget, mx.device_info()["max_recommended_working_set_size"]))`
   (boyle/loader.py:218), a Metal-only key: KeyError on the CPU backend. The script does not call
   `load`; it repeats its steps (`mlx_lm.utils.load_model(lazy=True)`, wrap the switch layers, `mx.eval` the
   parameters, `load_tokenizer`) and skips the wired limit (Metal's residency setting).
3. Slot floor. `apply_expert_offload` and the budget planner never give a layer fewer than 8 slots
   (`max(8, ...)` at boyle/_runtime.py:896/898; boyle/budget.py:20 MIN_CAPACITY): the demo has 16
   experts per layer, so 25% (4 slots) would silently run at 50%. The script wraps each stock `SwitchGLU`
   itself with boyle's `OffloadSwitchGLU(glu, capacity, view)` (view from its `_resolve_store_view`), the
   same constructor `apply_expert_offload` calls, at exactly the requested capacity.
4. Upcast. As with stock, half-precision parameters are upcast to float32 (on the lazy model, before
   wrapping, so boyle's slots are made float32 and each bf16 slab read is cast exactly into them): MLX's
   CPU backend runs bf16 scales and biases 10-30x slower, and our engine upcasts them the same way.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "inference" / "demo"

# A fixed prompt (the demo model was trained on Python source); its first --prompt-tokens tokens are used.
PROMPT_TEXT = '''import heapq
from collections import defaultdict


class Graph:
    """A weighted directed graph stored as adjacency lists."""

    def __init__(self):
        self.edges = defaultdict(list)

    def add_edge(self, source, target, weight=1.0):
        self.edges[source].append((target, weight))

    def shortest_paths(self, start):
        """Dijkstra's algorithm: the distance from start to every reachable node."""
        distances = {start: 0.0}
        queue = [(0.0, start)]
        while queue:
            distance, node = heapq.heappop(queue)
            if distance > distances.get(node, float("inf")):
                continue
            for target, weight in self.edges[node]:
'''


# ---------------------------------------------------------------- the checkpoint


def convert_demo_4bit(out: Path) -> Path:
    """The demo model in mlx-community's 4-bit format (uint32 weights, bf16 scales and biases)."""
    from mlx_lm.convert import convert

    convert(str(DEMO), str(out), quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16")
    return out


def checkpoint_dtypes(path: Path) -> dict[str, int]:
    """Count of (tensor kind, dtype) in the checkpoint's safetensors headers."""
    import struct

    counts: dict[str, int] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with open(shard, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, spec in header.items():
            if name != "__metadata__":
                key = f"{name.rsplit('.', 1)[-1]}:{spec['dtype']}"
                counts[key] = counts.get(key, 0) + 1
    return counts


def upcast(model) -> None:
    """As stock mlx-lm needs on the CPU backend."""
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32, lambda d: d in (mx.bfloat16, mx.float16))


# ---------------------------------------------------------------- boyle, adapted to Linux / CPU


def pread_store(path: Path):
    """boyle's store with its pread read path minus the macOS-only F_NOCACHE call (bypass 1 in the docstring):
    a subclass used by this script's boyle models only; boyle's own class is left as it is."""
    from boyle import _runtime as br

    class PreadStore(br.CheckpointExpertStore):
        def read_raw(self, name, start_elem, n_elems, out_shape):  # boyle/_runtime.py read_raw, direct branch
            shard, dtype, _, offset = self._specs[name]
            np_dtype, _ = br._DTYPES[dtype]
            itemsize = np.dtype(np_dtype).itemsize
            fd = self._fd[shard]
            raw = np.frombuffer(os.pread(fd, n_elems * itemsize, offset + start_elem * itemsize), dtype=np.uint8)
            return raw.view(np_dtype).reshape(out_shape), dtype

    store = PreadStore(path, direct=True)
    for shard in sorted(path.glob("*.safetensors")):  # opened up front: the I/O pool's threads never open one
        store._fd[shard] = os.open(shard, os.O_RDONLY)
    return store


def load_boyle(path: Path, capacity: int, reads: str, io_workers: int = 8):
    """boyle.loader.load's steps at exactly `capacity` slots per layer (bypasses 2-4 in the docstring)."""
    from boyle import _runtime as br
    from mlx_lm.utils import load_model, load_tokenizer

    model, _ = load_model(path, lazy=True)
    upcast(model)
    store = pread_store(path) if reads == "pread" else br.CheckpointExpertStore(path, direct=False)
    wrapped = []
    for parent, key, glu, tree_path in list(br._iter_switch_glus(model)):
        view, reason = br._resolve_store_view(glu, store, tree_path)
        if view is None:
            raise RuntimeError(f"boyle cannot offload {tree_path}: {reason}")
        new = br.OffloadSwitchGLU(glu, capacity, view, io_workers=io_workers)
        if isinstance(parent, nn.Module):
            setattr(parent, key, new)  # registers the child, as apply_expert_offload does
        else:
            parent[key] = new
        wrapped.append(new)
        br._sync_and_clear_cache()
    if not wrapped:
        raise RuntimeError("boyle wrapped no layer")
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(path)
    tokenizer.eos_token_ids = set()
    return model, tokenizer, wrapped


# ---------------------------------------------------------------- one generation per configuration


class Runner:
    """One configuration, loaded once; `run` decodes `decode_tokens` greedy tokens after `prompt`."""

    def __init__(self, name: str, kind: str, capacity: int | None) -> None:
        self.name, self.kind, self.capacity = name, kind, capacity

    def run(self, prompt: list[int], decode_tokens: int) -> dict:
        raise NotImplementedError


def _rates(stamps: list[tuple[float, float]], tokens: list[int]) -> dict:
    (w0, c0), (w1, c1) = stamps[0], stamps[-1]
    n = len(stamps) - 1  # tokens after the first one
    return {"tokens": tokens, "decode_wall_tps": n / (w1 - w0), "decode_cpu_tps": n / max(c1 - c0, 1e-9),
            "decode_wall_s": w1 - w0, "decode_cpu_s": c1 - c0}


class MlxLmRunner(Runner):
    """Stock mlx-lm, or boyle (an mlx-lm model with its switch layers replaced): both run `stream_generate`."""

    def __init__(self, name, kind, capacity, model, tokenizer, boyle_layers=()) -> None:
        super().__init__(name, kind, capacity)
        self.model, self.tokenizer, self.boyle_layers = model, tokenizer, list(boyle_layers)

    def _counters(self) -> tuple[int, int]:
        return (sum(g.cache.hits for g in self.boyle_layers), sum(g.cache.misses for g in self.boyle_layers))

    def run(self, prompt, decode_tokens):
        from mlx_lm.generate import stream_generate

        before = self._counters()
        stamps, tokens = [], []
        for response in stream_generate(self.model, self.tokenizer, prompt, max_tokens=decode_tokens):
            stamps.append((time.perf_counter(), time.process_time()))
            tokens.append(response.token)
        result = _rates(stamps, tokens)
        if self.boyle_layers:
            hits, misses = (a - b for a, b in zip(self._counters(), before, strict=True))
            result["hit_rate"] = hits / max(hits + misses, 1)  # prompt and decode; distinct experts per call
        return result


class EngineRunner(Runner):
    def __init__(self, name, kind, capacity, engine) -> None:
        super().__init__(name, kind, capacity)
        self.engine = engine
        self.stamps: list[tuple[float, float]] = []
        after_step = engine.experts.after_step

        def stamped() -> None:  # this instance only: the engine's own per-token work, then the stamp
            after_step()
            self.stamps.append((time.perf_counter(), time.process_time()))

        engine.experts.after_step = stamped

    def run(self, prompt, decode_tokens):
        self.engine.reset_prompt_cache()  # prefill the whole prompt again, as the others do
        self.engine.reset_stats()
        self.stamps = []
        events = list(self.engine.stream(prompt, max_tokens=decode_tokens))
        done = events[-1]
        result = _rates(self.stamps, list(done.tokens))
        snap = self.engine.snapshot()
        # distinct experts per forward step, prompt and decode, as boyle counts them; "demand": without the
        # experts read ahead (a plain LRU cache's hits), "hit_rate": with them (ready when the layer ran)
        result["hit_rate"], result["demand_hit_rate"] = snap.hit_rate, snap.demand_hit_rate
        return result


# ---------------------------------------------------------------- statistics


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def summarize(ratios: list[float], rng: random.Random, reps: int = 4000) -> dict:
    """Geometric mean of per-round ratios, their min/max, and a bootstrap 90% interval of the geometric mean."""
    logs = [math.log(r) for r in ratios]
    boots = sorted(math.exp(sum(rng.choices(logs, k=len(logs))) / len(logs)) for _ in range(reps))
    return {"geomean": geomean(ratios), "min": min(ratios), "max": max(ratios),
            "ci90": (boots[int(0.05 * reps)], boots[int(0.95 * reps) - 1]), "rounds": ratios}


# ---------------------------------------------------------------- the run


BOYLE_KINDS = {"pread": "boyle", "memmap": "boyle-memmap"}  # --boyle-reads -> configuration name


def engine_code() -> str:
    """Where the engine measured was imported from (the checkout, or e.g. a `git archive` export on PYTHONPATH)."""
    import moe_tui.inference

    return str(Path(moe_tui.inference.__file__).resolve().parent)


def git_commit() -> str:
    """HEAD, with "+dirty" when inference/ has uncommitted changes (the code measured is the working tree's)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "inference"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def build_runners(path: Path, fractions: list[float], boyle_reads: list[str], io_workers: int) -> list[Runner]:
    from mlx_lm.utils import load_model, load_tokenizer
    from moe_tui.inference import Engine

    model, _ = load_model(path, lazy=True)
    upcast(model)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(path)
    tokenizer.eos_token_ids = set()
    runners: list[Runner] = [MlxLmRunner("stock", "stock", None, model, tokenizer)]
    num_experts = json.loads((path / "config.json").read_text())["num_experts"]
    for fraction in fractions:
        capacity = max(1, round(num_experts * fraction))
        pct = f"{fraction:.0%}"
        for prefetch in (None, False):
            engine = Engine.load(path, capacity=capacity, mode="exact", prefetch=prefetch)
            engine.tokenizer.eos_token_ids = set()  # every run decodes exactly --decode-tokens
            kind = "ours" if prefetch is None else "ours-noprefetch"
            runners.append(EngineRunner(f"{kind}@{pct}", kind, capacity, engine))
        for reads in boyle_reads:
            b_model, b_tok, layers = load_boyle(path, capacity, reads, io_workers)
            kind = BOYLE_KINDS[reads]
            runners.append(MlxLmRunner(f"{kind}@{pct}", kind, capacity, b_model, b_tok, layers))
    return runners


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a quantized mlx-lm MoE checkpoint (default: the demo, "
                        "converted to 4-bit with bf16 scales in a temporary folder)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--capacities", type=float, nargs="+", default=[0.25, 0.5],
                        help="fractions of each layer's experts kept in memory")
    parser.add_argument("--boyle-reads", choices=tuple(BOYLE_KINDS), nargs="+", default=["pread"],
                        help="pread: boyle's pread path without F_NOCACHE (configuration 'boyle'); memmap: its "
                        "unmodified direct=False path ('boyle-memmap'); give both to run both")
    parser.add_argument("--boyle-io-workers", type=int, default=8, help="boyle's I/O pool size (its default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="for the bootstrap")
    parser.add_argument("--json", type=Path, help="write the full report (every run) here")
    args = parser.parse_args()

    import boyle

    if boyle.__version__ != "0.2.1":
        print(f"note: boyle {boyle.__version__} installed; this script was written against 0.2.1", file=sys.stderr)

    started, commit = time.perf_counter(), git_commit()  # at the start: the code that gets loaded
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
        path = args.model or convert_demo_4bit(Path(tmp) / "demo-4bit")
        dtypes = checkpoint_dtypes(path)
        runners = build_runners(path, args.capacities, args.boyle_reads, args.boyle_io_workers)
        from mlx_lm.utils import load_tokenizer

        prompt = list(load_tokenizer(path).encode(PROMPT_TEXT))[: args.prompt_tokens]
        loadavg = [os.getloadavg()]
        print(f"{len(runners)} configurations, prompt {len(prompt)} tokens, decode {args.decode_tokens}, "
              f"{args.rounds} rounds + 1 warm-up", file=sys.stderr)

        runs: dict[str, list[dict]] = {r.name: [] for r in runners}
        for rnd in range(args.rounds + 1):
            order = runners if rnd % 2 == 0 else runners[::-1]
            for runner in order:
                gc.collect()
                result = runner.run(prompt, args.decode_tokens)
                if rnd > 0:
                    runs[runner.name].append(result)
            if rnd > 0:
                line = "  ".join(f"{n} {runs[n][-1]['decode_cpu_tps']:.0f}" for n in runs)
                print(f"round {rnd}: cpu tok/s {line}", file=sys.stderr)
        loadavg.append(os.getloadavg())
        for runner in runners:  # release the engines' I/O threads
            if isinstance(runner, EngineRunner):
                runner.engine.close()

    rng = random.Random(args.seed)
    stock = runs["stock"]
    reference = stock[0]["tokens"]
    report_rows = {}
    for name, rs in runs.items():
        mismatches = [i for i, r in enumerate(rs) if r["tokens"] != reference]
        first_diff = None
        if mismatches:
            bad = rs[mismatches[0]]["tokens"]
            first_diff = next((i for i, (a, b) in enumerate(zip(bad, reference, strict=False)) if a != b),
                              min(len(bad), len(reference)))
        row = {"tokens_equal_stock": not mismatches, "runs_differing": len(mismatches), "first_diff": first_diff}
        for metric in ("decode_wall_tps", "decode_cpu_tps"):
            row[metric] = float(np.median([r[metric] for r in rs]))
            row[f"{metric}_vs_stock"] = summarize([r[metric] / s[metric] for r, s in zip(rs, stock, strict=True)],
                                                  rng)
        for key in ("hit_rate", "demand_hit_rate"):
            if key in rs[0]:
                row[key] = float(np.mean([r[key] for r in rs]))
        report_rows[name] = row
    versus = {}
    for fraction in args.capacities:
        pct = f"{fraction:.0%}"
        for peer in (BOYLE_KINDS[reads] for reads in args.boyle_reads):
            for ours in ("ours", "ours-noprefetch"):
                a, b = runs[f"{ours}@{pct}"], runs[f"{peer}@{pct}"]
                versus[f"{ours}/{peer}@{pct}"] = {
                    metric: summarize([x[metric] / y[metric] for x, y in zip(a, b, strict=True)], rng)
                    for metric in ("decode_wall_tps", "decode_cpu_tps")}

    import mlx_lm

    report = {
        "date": datetime.date.today().isoformat(), "commit": commit, "engine_code": engine_code(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_start_end": loadavg,
        "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "boyle": boyle.__version__,
        "device": str(mx.default_device()),
        "model": str(args.model or "inference/demo converted to 4-bit (group 64, bf16 scales/biases)"),
        "checkpoint_dtypes": dtypes, "prompt_tokens": len(prompt), "decode_tokens": args.decode_tokens,
        "rounds": args.rounds, "capacities": {r.name: r.capacity for r in runners},
        "elapsed_s": time.perf_counter() - started, "configs": report_rows, "versus": versus,
        "runs": {n: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for n, rs in runs.items()},
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(format_report(report))
    return 0


def _interval(s: dict) -> str:
    return f"{s['geomean']:.2f}x [{s['ci90'][0]:.2f}-{s['ci90'][1]:.2f}] ({s['min']:.2f}-{s['max']:.2f})"


def format_report(report: dict) -> str:
    out = [f"{report['date']}  commit {report['commit']}  {report['machine']} x{report['cpus']}  "
           f"mlx {report['mlx']}  mlx-lm {report['mlx_lm']}  boyle {report['boyle']}",
           f"engine code {report['engine_code']}",
           f"{report['model']}; prompt {report['prompt_tokens']} tokens, decode {report['decode_tokens']} greedy, "
           f"{report['rounds']} rounds; {report['elapsed_s']:.0f} s; load average "
           f"{report['loadavg_start_end'][0][0]:.2f} -> {report['loadavg_start_end'][1][0]:.2f}", "",
           "| config | slots | hit rate | decode tok/s (wall) | vs stock (wall) | decode tok/s (CPU) | vs stock (CPU) "
           "| tokens = stock |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in report["configs"].items():
        hit = f"{row['hit_rate']:.1%}" if "hit_rate" in row else "-"
        if "demand_hit_rate" in row and row["demand_hit_rate"] != row["hit_rate"]:
            hit += f" ({row['demand_hit_rate']:.1%})"
        same = ("yes" if row["tokens_equal_stock"]
                else f"NO ({row['runs_differing']} runs, from token {row['first_diff']})")
        out.append(f"| {name} | {report['capacities'][name] or 'all'} | {hit} | {row['decode_wall_tps']:.1f} | "
                   f"{_interval(row['decode_wall_tps_vs_stock'])} | {row['decode_cpu_tps']:.1f} | "
                   f"{_interval(row['decode_cpu_tps_vs_stock'])} | {same} |")
    out += ["", "| ratio | wall time | process CPU time |", "|---|---:|---:|"]
    for name, v in report["versus"].items():
        out.append(f"| {name} | {_interval(v['decode_wall_tps'])} | {_interval(v['decode_cpu_tps'])} |")
    out += ["", "tok/s: median over rounds; ratios: geometric mean of per-round ratios [bootstrap 90% interval] "
            "(min-max per round); hit rate: distinct experts per forward step, prompt and decode, mean over rounds "
            "(ours with reads ahead: experts ready when the layer ran (hits of the plain LRU cache alone))"]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
