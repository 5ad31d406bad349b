"""What work on the other CPU costs MLX's compute thread: decoding with every expert resident, the process
held to one CPU, passes taking turns with the other CPU idle and busy (Linux: CPU affinity, /proc per thread).

    python scripts/sibling_cost.py --model DIR [--tokens 64] [--rounds 4] [--load spin|copy]

MLX's CPU backend computes on one thread. The engine's reader threads and its host bookkeeping run beside it,
and on a machine whose CPUs share a physical core (or a power budget) they slow that thread down even when
they touch no memory it needs. This measures that cost alone: nothing is read and no expert is loaded, and
the load on the other CPU is a separate process (`spin`: a Python busy loop, arithmetic only; `copy`: numpy
copying 64 MiB buffers, memory traffic mostly). Reported: the MLX thread's CPU milliseconds per decoded token
and decode tok/s with the other CPU idle and busy, medians over the rounds, and busy over idle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOADS = {
    "spin": "while True: pass",
    "copy": "import numpy as np\na = np.ones(64 << 20, np.uint8); b = np.empty_like(a)\nwhile True: np.copyto(b, a)",
}


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--load", choices=sorted(LOADS), default="spin")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("sibling_cost: needs two CPUs (one for the engine, one for the load)")
    mine, other = cpus[0], cpus[1]
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
            if which == "busy":
                load = subprocess.Popen([sys.executable, "-c", LOADS[args.load]])
                os.sched_setaffinity(load.pid, {other})
                time.sleep(0.5)
            try:
                before = thread_cpu()
                *_, done = engine.stream(prompt, max_tokens=args.tokens + 1)
                after = thread_cpu()
            finally:
                if load is not None:
                    load.kill()
                    load.wait()
            used = {t: after[t] - before.get(t, 0.0) for t in after if t != main_tid}
            mlx_ms = max(used.values()) / args.tokens * 1e3  # the busiest thread besides the main one: MLX's
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
