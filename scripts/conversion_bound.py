"""What converting expert reads costs decoding when every expert is resident: an upper bound for offloading.

    python scripts/conversion_bound.py --model /var/tmp/moe-offload-full --mib-per-token 95 [--rounds 4]

On MLX's CPU backend the expert slots are float32 (its `gather_mm` takes nothing else), so every expert read
from a bf16 checkpoint is widened on the reader threads while MLX decodes. Those conversions share the
machine's memory bandwidth with MLX's matrix-vector products. This script loads the model at 100% capacity
(files warm: no reads at all) and decodes passes in turn without and with a background load that converts
--mib-per-token MiB of bf16 to float32 per decoded token on four threads, from and into buffers larger than
the CPU's caches, as the reader threads do (a `moe bench --offload` row's MiB/tok at the capacity of
interest). The with/without ratio is the best a capacity reading that much per token can decode relative to
the compute limit, on this machine, with no wait on the disk and no bookkeeping at all. Prints decode tok/s
per pass, the MLX thread's CPU per token, and the geometric mean of the paired ratios.
"""

from __future__ import annotations

import argparse
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
from moe_tui.inference.offload_bench import ratios

PARAM_BYTES = 3 << 19  # 1.5 MiB of bf16 per conversion: one parameter of the offload checkpoint's experts
POOL_BYTES = 1 << 30  # bf16 source; the float32 destination is twice that, far beyond any cache


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process."""
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--mib-per-token", type=float, required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    from moe_tui.inference import Engine

    engine = Engine.load(args.model, capacity=1.0, prefetch=False)
    engine.tokenizer.eos_token_ids = set()
    count = POOL_BYTES // PARAM_BYTES
    src = np.random.default_rng(0).integers(0, 1 << 16, size=(count, PARAM_BYTES // 2), dtype=np.uint16)
    dst = np.empty((count, PARAM_BYTES // 2), dtype=np.float32)
    dst.fill(0.0)  # every page touched now: the slots' memory is never freshly mapped either
    per_token = max(1, round(args.mib_per_token * (1 << 20) / PARAM_BYTES))
    converters: set[int] = set()
    pool = ThreadPoolExecutor(4, thread_name_prefix="convert",
                              initializer=lambda: converters.add(threading.get_native_id()))
    rng = np.random.default_rng(1)

    def convert(i: int, j: int) -> None:
        np.left_shift(src[i], 16, out=dst[j].view(np.uint32), dtype=np.uint32)

    def decode(load: bool) -> tuple[float, float]:
        before, pending, done = thread_cpu(), [], None
        for event in engine.stream("class Stack:\n    def push(self, x):", max_tokens=args.tokens):
            done = event  # the last event: the generation's summary
            if load:
                for f in pending:
                    f.result()  # a token's conversions finish before the next token's start, as reads must
                pending = [pool.submit(convert, *rng.integers(0, count, 2)) for _ in range(per_token)]
        for f in pending:
            f.result()
        after = thread_cpu()
        others = {threading.get_native_id(), *converters}
        mlx = max((after[t] - before.get(t, 0.0) for t in after if t not in others), default=0.0)  # MLX's thread
        return done.decode_tps, mlx / done.generated_tokens * 1e3

    decode(False)  # warm-up: a whole pass, as a measured one
    rows = {False: [], True: []}
    for r in range(args.rounds):
        for load in ((False, True) if r % 2 == 0 else (True, False)):
            rows[load].append(decode(load))
    pool.shutdown()
    paired = ratios([t for t, _ in rows[True]], [t for t, _ in rows[False]])
    for load, name in ((False, "no conversions"), (True, f"{per_token * PARAM_BYTES / 2**20:.0f} MiB/token converted")):
        tps = [round(t, 2) for t, _ in rows[load]]
        cpu = statistics.median(c for _, c in rows[load])
        print(f"{name:<28} decode tok/s {tps}  MLX thread {cpu:.1f} ms CPU per token")
    print(f"with / without: {paired['geometric_mean']:.3f} (per round "
          + " / ".join(f"{x:.2f}" for x in paired["per_round"]) + ")")


if __name__ == "__main__":
    main()
