"""What work on the other CPU costs MLX's compute thread: decoding with every expert resident, the process
held to one CPU, passes taking turns with the other CPU idle and busy (Linux: CPU affinity).

    python scripts/sibling_cost.py --model DIR [--tokens 64] [--rounds 4] [--load spin|copy]  (Linux)

MLX's CPU backend computes on one thread. The engine's reader threads and its host bookkeeping run beside it,
and on a machine whose CPUs share a physical core (or a power budget) they slow that thread down even when
they touch no memory it needs. This measures that cost alone: nothing is read and no expert is loaded, and
the load on the other CPU is a separate process (`spin`: a Python busy loop, arithmetic only; `copy`: numpy
copying 64 MiB buffers, memory traffic mostly). Reported: the MLX thread's CPU milliseconds per decoded token
and decode tok/s with the other CPU idle and busy, medians over the rounds, and busy over idle.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

# Each load holds itself to the CPU given as argv[1] before anything else (numpy starts no thread on another
# CPU first) and is killed with its parent (PR_SET_PDEATHSIG, set in `start_load`).
_PIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\n"
LOADS = {
    "spin": _PIN + "while True: pass",
    "copy": _PIN + "import numpy as np\na = np.ones(64 << 20, np.uint8)\nb = np.empty_like(a)\n"
                   "while True: np.copyto(b, a)",
}


def start_load(kind: str, cpu: int) -> subprocess.Popen:
    """The load process on `cpu`; it dies with this process, however this one ends."""
    def die_with_parent() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    load = subprocess.Popen([sys.executable, "-c", LOADS[kind], str(cpu)], preexec_fn=die_with_parent)
    time.sleep(0.5)
    if load.poll() is not None:
        sys.exit(f"sibling_cost: the {kind} load ended at once (exit status {load.returncode})")
    return load


def siblings(cpu: int) -> str:
    """The CPUs sharing `cpu`'s core, as the kernel lists them ("?" where it does not say)."""
    try:
        return Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
    except OSError:
        return "?"


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process."""
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--load", choices=sorted(LOADS), default="spin")
    args = parser.parse_args()
    if args.rounds < 2 or args.rounds % 2:
        sys.exit("sibling_cost: --rounds must be even (each order of idle and busy counted equally often)")
    if not hasattr(os, "sched_setaffinity"):
        sys.exit("sibling_cost: Linux only (CPU affinity per process)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("sibling_cost: needs two CPUs (one for the engine, one for the load)")
    mine = cpus[0]
    # The other CPU: a hyperthread of the engine's core where the kernel says there is one, else the next.
    listed = siblings(mine).replace("-", ",").split(",")
    other = next((c for c in cpus[1:] if str(c) in listed), cpus[1])
    print(f"engine on CPU {mine} (core shared with: {siblings(mine)}), load on CPU {other}")
    os.sched_setaffinity(0, {mine})  # before MLX starts its threads: they inherit it

    from moe_tui.inference import Engine

    engine = Engine.load(args.model, capacity=1.0)
    engine.tokenizer.eos_token_ids = set()  # every pass decodes exactly --tokens
    prompt = "def fibonacci(n):\n    return"
    list(engine.stream(prompt, max_tokens=8))  # warm-up
    main_tid = os.getpid()
    results: dict[str, list[tuple[float, float]]] = {"idle": [], "busy": []}
    for r in range(args.rounds):
        for which in ("idle", "busy") if r % 2 == 0 else ("busy", "idle"):
            load = None
            try:
                if which == "busy":
                    load = start_load(args.load, other)
                before, started = thread_cpu(), time.perf_counter()
                *_, done = engine.stream(prompt, max_tokens=args.tokens + 1)
                after, wall = thread_cpu(), time.perf_counter() - started
                if load is not None and load.poll() is not None:
                    sys.exit(f"sibling_cost: the {args.load} load ended during the pass")
            finally:
                if load is not None:
                    load.kill()
                    load.wait()
            used = {t: after[t] - before.get(t, 0.0) for t in after if t != main_tid}
            mlx_tid = max(used, key=used.get, default=None)  # the busiest thread besides the main one: MLX's
            if mlx_tid is None or used[mlx_tid] < 0.5 * wall:
                sys.exit("sibling_cost: no thread besides the main one computed most of the pass; this MLX "
                         "does not compute on a thread of its own, which this script measures")
            mlx_ms = used[mlx_tid] / args.tokens * 1e3
            results[which].append((mlx_ms, done.decode_tps))
            print(f"round {r} {which:<4} MLX thread {mlx_ms:6.1f} ms CPU per token  "
                  f"decode {done.decode_tps:5.2f} tok/s", flush=True)
    med = {k: (statistics.median(m for m, _ in v), statistics.median(t for _, t in v)) for k, v in results.items()}
    print(f"model {args.model}  CPUs {mine} (engine) and {other} ({args.load})  "
          f"{args.rounds} rounds of {args.tokens} tokens")
    for k, (m, t) in med.items():
        print(f"other CPU {k:<4}  MLX thread {m:6.1f} ms CPU per token  decode {t:5.2f} tok/s")
    (busy_ms, busy_tps), (idle_ms, idle_tps) = med["busy"], med["idle"]
    print(f"busy / idle: MLX thread CPU {busy_ms / idle_ms:.3f}x, decode {busy_tps / idle_tps:.3f}x")
    engine.close()


if __name__ == "__main__":
    main()
