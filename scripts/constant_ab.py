"""Two values of one engine constant, side by side in one engine: passes alternate between them, so a
before/after ratio holds on a noisy machine (separate processes differ by more than many changes gain).

    python scripts/constant_ab.py --model /var/tmp/moe-offload-full --capacity 0.25 \
        --constant moe_tui.inference.expert_cache.PREFETCH_MIN_PRECISION 0.4 0.2

Below 100% capacity (as root on Linux) the engine runs in a memory cgroup limited as `moe bench --offload`
limits it (dense + expert cache + headroom) with the checkpoint's pages dropped first, so experts come from
the disk. The constant must be read where it is used at call time (a module global), not copied at import.
Prints each value's decode tok/s per pass and the geometric mean of the paired per-round ratios.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    if args.procs:
        Path(args.procs).write_text(str(os.getpid()))  # before MLX allocates anything
    import numpy as np
    from moe_tui.inference import offload_bench as ob
    from moe_tui.inference.bench import MODES, drop_page_cache
    from moe_tui.inference.engine import Engine
    from moe_tui.inference.safetensors_io import weight_files

    module, name = args.constant[0].rsplit(".", 1)
    module = importlib.import_module(module)
    values = [json.loads(v) for v in args.constant[1:]]
    if args.procs:
        drop_page_cache(weight_files(Path(args.model)))
    setattr(module, name, values[0])
    engine = Engine.load(args.model, capacity=args.capacity, **MODES[args.mode])
    engine.tokenizer.eos_token_ids = set()  # every pass decodes exactly --tokens
    prompt = ob.text_tokens(engine.tokenizer, 64)
    # The cache fills. As long as a measured pass: each pass starts from the cache the one before left, and a
    # shorter first pass favoured the value measured second: swapped, the same pair read 1.053x and 1.034x.
    ob._pass(engine, prompt, args.tokens)
    runs: dict[int, list[dict]] = {0: [], 1: []}
    for r in range(args.rounds):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            setattr(module, name, values[k])
            runs[k].append(ob._pass(engine, prompt, args.tokens))
    engine.close()
    for k in (0, 1):
        decode = [p["decode_tps"] for p in runs[k]]
        print(f"{name}={values[k]!r}: decode tok/s {' / '.join(f'{d:.2f}' for d in decode)}, prefill "
              f"{np.median([p['prefill_tps'] for p in runs[k]]):.1f}, ready "
              f"{np.mean([p['decode']['hit_rate'] for p in runs[k]]):.1%}, MiB/token "
              f"{np.mean([p['decode']['bytes_per_token'] for p in runs[k]]) / 2**20:.1f}")
    ratios = [b["decode_tps"] / a["decode_tps"] for a, b in zip(runs[0], runs[1], strict=True)]
    print(f"decode {values[1]!r} / {values[0]!r}: {float(np.exp(np.mean(np.log(ratios)))):.3f}x "
          f"(per round {' '.join(f'{x:.2f}' for x in ratios)})")


def main() -> None:
    from moe_tui.inference import offload_bench as ob  # no MLX: the child writes its pid before MLX loads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ob.add_limited_args(parser)
    parser.add_argument("--mode", default="exact-prefetch", help="a `moe bench` mode (default: reads ahead on)")
    parser.add_argument("--constant", nargs=3, required=True, metavar=("MODULE.NAME", "A", "B"),
                        help="the constant and its two values (JSON)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="decoded per pass")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    cgroup = ob.MemoryCgroup.detect() if args.capacity < 1.0 else None
    if args.capacity < 1.0 and cgroup is None:
        print("constant_ab: no memory cgroup (root on Linux): the page cache may hold the experts", file=sys.stderr)
    used = ob.run_limited([sys.executable, __file__, "--child", *sys.argv[1:]], cgroup, args.model, args.capacity,
                          args.headroom << 20)
    if used is not None:
        print(f"memory cgroup: limit {used['limit_bytes'] / 2**20:.0f} MiB, peak {used['peak_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
