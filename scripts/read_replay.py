"""The engine's own expert reads, replayed with nothing else running: how much of the gap between its reads and
the disk's sequential read is the reads' pattern, and how much the engine around them.

    python scripts/read_replay.py --model /var/tmp/moe-offload-q4b [--capacity 0.25] [--tokens 64] [--replays 2]
        [--busy 2 [--busy-kind spin|copy]]

A child loads the model at --capacity (as root on Linux, in a memory cgroup limited as `moe bench --offload`
limits it, so reads come from the disk), runs one pass to fill the cache, then logs every direct read of a
second pass (prompt and --tokens decoded): start, duration, file, offset, size, thread. The parent then
replays those reads from the same number of threads, each read at its logged start time (later if the
thread's previous read has not ended), the page cache dropped first, and prints per-read times and the
bandwidth while at least one read is in flight, for the engine and for each replay, beside the files' cold
sequential read (`moe bench`'s figure). With --busy N, the replays again with N processes keeping CPUs busy
meanwhile, as the engine's own decoding and widening do. Linux only (O_DIRECT, posix_fadvise). Uses the model's expert
records (`moe pack`) where they are in their default place, as the engine would.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    if args.procs:
        Path(args.procs).write_text(str(os.getpid()))  # before MLX allocates anything
    from moe_tui.inference import offload_bench as ob
    from moe_tui.inference import safetensors_io as sio
    from moe_tui.inference.engine import Engine

    log, lock = [], threading.Lock()
    read_uncached = sio.RangeReader.read_uncached

    def logged(self, path, offset, nbytes, scratch):
        started = time.perf_counter()
        out = read_uncached(self, path, offset, nbytes, scratch)
        with lock:
            log.append((started, time.perf_counter() - started, str(path), offset, nbytes,
                        threading.current_thread().name))
        return out

    engine = Engine.load(args.model, capacity=args.capacity, uncached_reads=True)
    engine.tokenizer.eos_token_ids = set()  # every pass decodes exactly --tokens
    prompt = ob.text_tokens(engine.tokenizer, 64)
    ob._pass(engine, prompt, args.tokens)
    sio.RangeReader.read_uncached = logged
    done = ob._pass(engine, prompt, args.tokens)
    sio.RangeReader.read_uncached = read_uncached
    engine.close()
    Path(args.log).write_text(json.dumps({"decode_tps": done["decode_tps"], "reads": log}))


def busy(spans: list[tuple[float, float, int]]) -> tuple[float, float]:
    """(seconds with at least one read in flight, bytes / those seconds)."""
    spans = sorted(spans)
    total, (start, end, _) = 0.0, spans[0]
    for a, b, _ in spans[1:]:
        if a > end:
            total, start = total + end - start, a
        end = max(end, b)
    total += end - start
    return total, sum(n for *_, n in spans) / total


def replay(reads: list) -> list[tuple[float, float, int]]:
    """Each logged read again, from one thread per logged thread, at its logged start time: (start, end, bytes)."""
    from moe_tui.inference.bench import drop_page_cache
    from moe_tui.inference.safetensors_io import DIRECT_ALIGN, AlignedScratch

    fds = {p: os.open(p, os.O_RDONLY | os.O_DIRECT) for p in {r[2] for r in reads}}
    drop_page_cache([Path(p) for p in fds])
    first = min(r[0] for r in reads)
    per_thread = collections.defaultdict(list)
    for started, _, path, offset, nbytes, name in reads:
        per_thread[name].append((started - first, path, offset, nbytes))
    spans, lock = [], threading.Lock()

    def run(items, t0):
        scratch = AlignedScratch()
        for rel, path, offset, nbytes in items:
            time.sleep(max(0.0, t0 + rel - time.perf_counter()))
            start = offset - offset % DIRECT_ALIGN
            length = -(-(offset + nbytes - start) // DIRECT_ALIGN) * DIRECT_ALIGN
            buf = memoryview(scratch.get(length))
            a = time.perf_counter()
            os.preadv(fds[path], [buf], start)
            with lock:
                spans.append((a, time.perf_counter(), nbytes))

    t0 = time.perf_counter() + 0.1
    threads = [threading.Thread(target=run, args=(items, t0)) for items in per_thread.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds.values():
        os.close(fd)
    return spans


def main() -> None:
    from moe_tui.inference import offload_bench as ob  # no MLX: the child writes its pid before MLX loads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ob.add_limited_args(parser)
    parser.add_argument("--tokens", type=int, default=64, help="decoded in the logged pass")
    parser.add_argument("--replays", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0,
                        help="also replay with this many processes keeping CPUs busy (as MLX and the widening do)")
    parser.add_argument("--busy-kind", choices=("spin", "copy"), default="spin",
                        help="spin: a Python loop; copy: numpy copying 64 MiB buffers (memory bandwidth too)")
    parser.add_argument("--log", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not hasattr(os, "O_DIRECT"):
        sys.exit("read_replay: needs O_DIRECT (Linux)")
    from moe_tui.inference.bench import sequential_read_bandwidth
    from moe_tui.inference.safetensors_io import weight_files

    workdir = Path(tempfile.mkdtemp(prefix="read-replay-"))
    log = workdir / "reads.json"
    cgroup = ob.MemoryCgroup.detect()
    if cgroup is None:
        print("read_replay: no memory cgroup (root on Linux): the engine's reads bypass the page cache anyway",
              file=sys.stderr)
    ob.run_limited([sys.executable, __file__, "--child", "--log", str(log), *sys.argv[1:]], cgroup, args.model,
                   args.capacity, args.headroom << 20)
    logged = json.loads(log.read_text())
    reads = logged["reads"]
    if not reads:
        sys.exit("read_replay: the pass read nothing from the disk (every expert resident?)")
    sequential = sequential_read_bandwidth(weight_files(Path(args.model)))
    print(f"cold sequential read {sequential / 2**20:.0f} MiB/s; engine decode {logged['decode_tps']:.1f} tok/s, "
          f"{len(reads)} reads of {statistics.median(r[4] for r in reads) / 2**10:.0f} KiB (median)")
    rows = [("engine", [(r[0], r[0] + r[1], r[4]) for r in reads])]
    rows += [(f"replay {i + 1}", replay(reads)) for i in range(args.replays)]
    if args.busy:
        import subprocess

        work = ("while True: pass" if args.busy_kind == "spin" else
                "import numpy as np\na = np.ones(1 << 24, np.float32)\nb = np.empty_like(a)\n"
                "while True: np.copyto(b, a)")
        hogs = [subprocess.Popen([sys.executable, "-c", work]) for _ in range(args.busy)]
        try:
            time.sleep(0.5)  # running
            rows += [(f"busy {i + 1}", replay(reads)) for i in range(args.replays)]
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    for name, spans in rows:
        seconds, bandwidth = busy(spans)
        times = [b - a for a, b, _ in spans]
        print(f"{name:9s} per read median {statistics.median(times) * 1e3:.3f} ms, "
              f"mean {statistics.mean(times) * 1e3:.3f} ms; "
              f"{bandwidth / 2**20:.0f} MiB/s while a read is in flight ({bandwidth / sequential:.0%} of sequential), "
              f"{seconds:.2f} s")


if __name__ == "__main__":
    main()
