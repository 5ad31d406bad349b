"""Old code vs new code on the offload benchmark, interleaved: the same checkpoint, cgroup and limits, one child
per configuration, configurations in turn, round after round (a noisy machine affects all of them alike).

    python scripts/offload_ab.py --model /var/tmp/moe-offload-full --old /tmp/old --capacities 25 --rounds 3

`--old` is a checkout of the earlier commit (`git worktree add /tmp/old REV`); the script puts a `moe_tui`
shim for it on PYTHONPATH for the old children. Needs root and a memory cgroup (see `moe bench --offload`).
Prints one JSON line per child and a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from moe_tui.inference import offload_bench as ob
from moe_tui.inference.bench import drop_page_cache, sequential_read_bandwidth
from moe_tui.inference.safetensors_io import weight_files


def shim(old: Path) -> str:
    root = Path(tempfile.mkdtemp()) / "moe_tui"
    root.mkdir()
    for name in ("app", "inference", "themes", "profiles"):
        (root / name).symlink_to(old / name)
    return f"{root.parent}:{old}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the old commit")
    parser.add_argument("--capacities", default="25", help="percents")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--headroom", type=int, default=512, help="MiB")
    parser.add_argument("--modes", default="exact,exact-prefetch,exact-noprefetch",
                        help="the new code's modes (`moe bench --offload-modes`)")
    parser.add_argument("--old-modes", default="exact", help="the old code's modes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    layout = ob.run_child({"task": "probe", "args": {"path": args.model, "capacity": 1.0}}, work)["layout"]
    old_modes, new_modes = args.old_modes.split(","), args.modes.split(",")
    old_path = shim(args.old.resolve())
    variants = [*((f"old-{mode}", old_path, mode) for mode in old_modes),
                *((f"new-{mode}", None, mode) for mode in new_modes)]
    files = weight_files(Path(args.model))
    cgroup = ob.MemoryCgroup.detect()
    if cgroup is None:
        raise SystemExit("offload_ab: needs a memory cgroup (root on Linux)")
    rows = []
    try:
        print(json.dumps({"sequential_read_bandwidth": sequential_read_bandwidth(files)}), flush=True)
        for r in range(args.rounds):
            for fraction in ob.parse_percents(args.capacities):
                limit = ob.memory_limit(layout, fraction, args.headroom << 20)
                for name, pythonpath, mode in variants:
                    os.environ.pop("PYTHONPATH", None)
                    if pythonpath:
                        os.environ["PYTHONPATH"] = pythonpath
                    drop_page_cache(files)
                    res = ob.run_child({"task": "measure", "args": {
                        "path": args.model, "capacity": fraction, "mode": mode, "prompt_tokens": 64,
                        "decode_tokens": 64}}, work, cgroup, limit)
                    os.environ.pop("PYTHONPATH", None)
                    if "error" in res:
                        print(json.dumps({"round": r, "variant": name, "fraction": fraction, "error": res["error"]}))
                        continue
                    d = res["decode"]
                    row = {"round": r, "variant": name, "fraction": fraction, "decode_tps": res["decode_tps"],
                           "prefill_tps": res["prefill_tps"], "ready": d["hit_rate"],
                           "demand": d.get("demand_hit_rate", d["hit_rate"]),
                           "mib_per_token": d["bytes_per_token"] / 2**20, "stall_ms": d["stall_s_per_token"] * 1e3,
                           "stall_share": d["stall_s_per_token"] * res["decode_tps"],
                           "load_mib_s": d["bytes_read"] / d["read_seconds"] / 2**20 if d["read_seconds"] else None,
                           "peak_mib": (res.get("cgroup") or {}).get("peak_bytes", 0) / 2**20,
                           "same_tokens_both_passes": res.get("same_tokens_both_passes")}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        cgroup.remove()
    by = defaultdict(list)
    for row in rows:
        by[(row["fraction"], row["variant"])].append(row)
    for (fraction, name), rs in sorted(by.items()):
        old = by.get((fraction, f"old-{old_modes[0]}"), [])  # the reference: the old code's first mode
        ratios = [a["decode_tps"] / b["decode_tps"] for a, b in zip(rs, old, strict=False)]
        geo = float(np.exp(np.mean(np.log(ratios)))) if ratios else float("nan")
        runs = " / ".join(format(r["decode_tps"], ".2f") for r in rs)
        print(f"{fraction:.1%} {name:<15} decode {runs}  "
              f"vs old {geo:.2f}x  ready {np.median([r['ready'] for r in rs]):.1%}  "
              f"stall {np.median([r['stall_share'] for r in rs]):.0%}  "
              f"reads {np.median([r['load_mib_s'] or 0 for r in rs]):.0f} MiB/s  "
              f"peak {np.median([r['peak_mib'] for r in rs]):.0f} MiB")


if __name__ == "__main__":
    main()
