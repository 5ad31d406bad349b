"""Random direct (O_DIRECT) reads of a checkpoint into buffers of 4 KiB pages vs transparent huge pages: the
size of one expert parameter, at 1 and 4 threads, the page cache dropped before each measurement.

    python scripts/direct_reads.py /var/tmp/moe-offload-full/model.safetensors --nbytes 1572864 --reads 512

Linux only (O_DIRECT, posix_fadvise). The engine's reader uses `AlignedScratch` (huge pages); the 4 KiB
buffer is what it used before (an array sized to the read). docs/performance.md has the numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from moe_tui.inference.bench import drop_page_cache
from moe_tui.inference.safetensors_io import DIRECT_ALIGN, AlignedScratch


def small_pages(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + DIRECT_ALIGN, dtype=np.uint8)  # under numpy's 4 MiB threshold: no huge pages
    skip = -raw.ctypes.data % DIRECT_ALIGN
    return raw[skip : skip + nbytes]


def huge_pages(nbytes: int) -> np.ndarray:
    return AlignedScratch().get(nbytes)


def measure(path: Path, make, nbytes: int, threads: int, reads: int, seed: int) -> float:
    """Bytes/s of `reads` random aligned reads of `nbytes`, `threads` at a time, one buffer per thread."""
    drop_page_cache([path])
    size = path.stat().st_size
    rng = random.Random(seed)
    offsets = [rng.randrange(0, (size - nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN for _ in range(reads)]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    local = threading.local()

    def read(offset: int) -> None:
        if not hasattr(local, "buf"):
            local.buf = make(nbytes)
        os.preadv(fd, [memoryview(local.buf)], offset)

    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, offsets))
        return reads * nbytes / (time.perf_counter() - started)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file", type=Path)
    parser.add_argument("--nbytes", type=int, default=1_572_864, help="bytes per read (a multiple of 4096)")
    parser.add_argument("--reads", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for r in range(args.rounds):
        for name, make in (("4 KiB pages", small_pages), ("huge pages", huge_pages)):
            rates = [measure(args.file, make, args.nbytes, t, args.reads, seed=10 * r + t) for t in (1, 4)]
            print(f"round {r}  {name:<11}  1 thread {rates[0] / 1e9:.2f} GB/s  4 threads {rates[1] / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
