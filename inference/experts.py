"""Where each expert's bytes live in the checkpoint, and reading them into MLX arrays.

Two layouts: stacked (`...switch_mlp.gate_proj.weight` of shape [E, out, in], one expert = one row)
and per-expert as in original HF checkpoints (`...experts.7.w1.weight`, `...experts.7.gate_proj.weight`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .errors import ModelLoadError
from .moe import MoEBlock
from .safetensors_io import DTYPES, AlignedScratch, RangeReader, TensorInfo

if TYPE_CHECKING:
    from .packed import PackedLayer

# Names the per-expert HF layout uses for each stacked projection.
ALIASES = {
    "gate_proj": ("gate_proj", "w1"),
    "up_proj": ("up_proj", "w3"),
    "down_proj": ("down_proj", "w2"),
}
# Floats checked on their raw bits: all exponent bits set means Inf or NaN (numpy has no bfloat16, and isfinite
# is several times slower). The exponent sits right under the sign bit, so a value is Inf or NaN exactly when
# its bits without the sign are >= the mask: see _check_finite.
NONFINITE_BITS = {"F16": ("uint16", 0x7C00), "BF16": ("uint16", 0x7F80), "F8_E5M2": ("uint8", 0x7C),
                  "F8_E4M3": ("uint8", 0x7F), "F32": ("uint32", 0x7F800000), "F64": ("uint64", 0x7FF0000000000000)}


@dataclass(frozen=True)
class ParamSource:
    """One per-expert parameter (e.g. gate_proj.weight) of one layer: stacked tensor or one per expert."""

    projection: str
    param: str
    expert_shape: tuple[int, ...]
    file_dtype: str
    stacked: TensorInfo | None
    per_expert: tuple[TensorInfo, ...] = ()

    def location(self, expert: int) -> tuple[Path, int]:
        """The file and byte offset of `expert`'s values of this parameter."""
        if self.stacked is not None:
            return self.stacked.path, self.stacked.offset + expert * self.stacked.row_bytes()
        return self.per_expert[expert].path, self.per_expert[expert].offset

    @property
    def expert_nbytes(self) -> int:
        info = self.stacked or self.per_expert[0]
        return info.row_bytes() if self.stacked else info.nbytes


def locate(block: MoEBlock, params: dict[str, list[str]], model_shapes: dict[str, tuple[int, ...]],
           tensors: dict[str, TensorInfo], num_experts: int) -> list[ParamSource]:
    """Map every expert parameter of one MoE layer to checkpoint bytes, checking shapes."""
    sources = []
    parent = block.path.rsplit(".", 1)[0]
    for proj, names in params.items():
        for name in names:
            key = f"{block.path}.{proj}.{name}"
            expected = model_shapes[key]
            info = tensors.get(key)
            if info is not None:
                if info.shape != expected:
                    raise ModelLoadError(
                        f"{info.path}: {key} has shape {list(info.shape)} but config.json implies "
                        f"{list(expected)}; the config and weights disagree (re-download or fix config.json)"
                    )
                sources.append(ParamSource(proj, name, expected[1:], info.dtype, info))
                continue
            per_expert = None
            for alias in ALIASES.get(proj, (proj,)):
                keys = [f"{parent}.experts.{e}.{alias}.{name}" for e in range(num_experts)]
                if keys[0] in tensors:
                    missing = [k for k in keys if k not in tensors]
                    if missing:
                        raise ModelLoadError(
                            f"{tensors[keys[0]].path.parent}: checkpoint lacks {missing[0]} "
                            f"({len(missing)} expert tensors missing); re-download the model"
                        )
                    per_expert = tuple(tensors[k] for k in keys)
                    break
            if per_expert is None:
                raise ModelLoadError(
                    f"no checkpoint tensor for {key} (nor per-expert '{parent}.experts.N.*'): this "
                    "expert layout is not supported; convert the model with mlx_lm.convert first"
                )
            for info in per_expert:
                if info.shape != expected[1:]:
                    raise ModelLoadError(
                        f"{info.path}: {info.name} has shape {list(info.shape)} but config.json implies "
                        f"{list(expected[1:])}; the config and weights disagree"
                    )
            sources.append(ParamSource(proj, name, expected[1:], per_expert[0].dtype, None, per_expert))
    return sources


READ_THREADS = 4  # positional reads in flight at once: they release the GIL, and disks serve several faster
INLINE_READ_BYTES = 1 << 20  # smaller loads from the page cache run on the calling thread: a hand-off costs more
RUN_BYTES = 8 << 20  # the most bytes of consecutive experts one read job takes: bigger runs split between threads
MAX_BUFFERS = 256  # buffers one read fills at most (POSIX guarantees 16; Linux and macOS allow 1024)


class ExpertReader:
    """Reads a batch of experts of one layer from disk into MLX arrays of the slot dtype."""

    def __init__(self, reader: RangeReader, threads: int = READ_THREADS) -> None:
        self.reader = reader
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._scratch = threading.local()  # per reader thread: file-dtype bytes awaiting conversion
        # (file, offset) of expert bytes found finite: the checkpoint does not change under a loaded model, so
        # an expert read again (evicted, then missed) is not checked again.
        self._finite: set[tuple[Path, int]] = set()

    def read(self, sources: list[ParamSource], experts: list[int],
             slot_dtypes: dict[tuple[str, str], mx.Dtype]) -> Iterator[tuple[tuple[str, str], Iterator[mx.array]]]:
        """Yields ((projection, param), per-expert arrays) one parameter at a time, in `sources` order.

        Every parameter's bytes are requested at once from a small pool of reader threads (adjacent experts
        in one call), so the disk works on several while the caller converts and stores the first; each is
        checked for NaN/Inf on its reader thread. Arrays are made one expert at a time.

        Raises:
            ModelLoadError: a read came up short, or an expert holds NaN/Inf.
        """
        if sum(src.expert_nbytes for src in sources) * len(experts) < INLINE_READ_BYTES:
            for src in sources:
                raw = self._read_checked(src, experts)
                target = slot_dtypes[(src.projection, src.param)]
                yield (src.projection, src.param), (_to_mx(row, src.file_dtype, target) for row in raw)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="moe-read")
        pending: list[Future] = [self._pool.submit(self._read_checked, src, experts) for src in sources]
        try:
            for src, future in zip(sources, pending, strict=True):
                raw = future.result()
                target = slot_dtypes[(src.projection, src.param)]
                yield (src.projection, src.param), (_to_mx(row, src.file_dtype, target) for row in raw)
        finally:
            for future in pending:  # the caller stopped early or a read failed: drop what is still queued
                future.cancel()
            for future in pending:
                if not future.cancelled():
                    future.exception()  # wait: no reader may still be writing into a buffer being dropped

    def write_slots(self, sources: list[ParamSource], placements: list[tuple[int, int, int]],
                    views: dict[tuple[str, str], np.ndarray], wait: bool = True,
                    packed: PackedLayer | None = None) -> SlotWrites:
        """Read each placed (expert, slot, _) straight into its slot through `views` (numpy views of the
        slot tensors' memory, see `slot_views`), converting on the reader threads: no MLX work, and the
        GIL is released while reading and converting. Consecutive experts of a stacked parameter are one
        read (up to RUN_BYTES); with `packed` (the layer's expert records, `moe pack`), consecutive experts'
        whole records are. With `wait=False` the writes run in the background; the caller must `wait()`
        before anything reads those slots.

        A small load (under INLINE_READ_BYTES) runs on the calling thread when its bytes are in the page
        cache (a memory copy: a hand-off would cost more); what must come from the disk goes to the reader
        threads, several reads in flight, since one at a time leaves the disk idle between them.

        Raises (here or from `wait`):
            ModelLoadError: a read came up short, or an expert holds NaN/Inf.
        """
        placements = sorted(placements)
        experts = [e for e, _, _ in placements]
        jobs: list[Callable[..., bool]] = []
        if packed is not None:
            outs = [[views[(src.projection, src.param)][slot] for src in sources] for _, slot, _ in placements]
            # One buffer per parameter and per gap between them in a direct read: well under the system's IOV_MAX.
            most = max(1, min(RUN_BYTES // packed.stride, MAX_BUFFERS // (2 * len(sources))))
            for run in _runs(experts, most):
                jobs.append(partial(self._write_records, packed, sources, experts[run.start : run.stop],
                                    outs[run.start : run.stop]))
        else:
            for src in sources:
                view = views[(src.projection, src.param)]
                most = max(1, RUN_BYTES // src.expert_nbytes) if src.stacked is not None else 1
                for run in _runs(experts, most):
                    jobs.append(partial(self._write_run, src, experts[run.start : run.stop],
                                        [view[placements[i][1]] for i in run]))
        nbytes = sum(src.expert_nbytes for src in sources) * len(placements)
        if wait and self.may_copy_inline(nbytes):
            jobs = [job for job in jobs if not job(nowait=True)]
            if not jobs:
                return SlotWrites([], nbytes)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="moe-read")
        # One task per reader thread, each taking the next run until none is left, not one task per run: a
        # hand-off costs the calling thread tens of microseconds, and a 4-bit expert is nine small reads.
        queue = deque(jobs)
        tasks = [self._pool.submit(self._write_runs, queue) for _ in range(min(self.threads, len(jobs)))]
        writes = SlotWrites(tasks, nbytes)
        if wait:
            writes.wait()
        return writes

    def _write_runs(self, queue: deque) -> None:
        """Each job taken from `queue` (shared by the reader threads) until it is empty."""
        while True:
            try:
                job = queue.popleft()  # atomic: each job is taken by one thread
            except IndexError:
                return
            job()

    def may_copy_inline(self, nbytes: int) -> bool:
        """Whether a load of `nbytes` may run on the calling thread (`write_slots`): small, and read through the
        page cache (where its bytes are there, it is a memory copy; uncached reads always wait for the disk)."""
        return nbytes < INLINE_READ_BYTES and not self.reader.uncached

    def _write_run(self, src: ParamSource, experts: list[int], outs: list[np.ndarray], nowait: bool = False) -> bool:
        """Consecutive `experts` of one parameter into their slot rows `outs`. With `nowait`: False, and
        nothing counted as written, when a byte would have to come from the disk."""
        path, offset = src.location(experts[0])
        raw_dtype = np.dtype(DTYPES[src.file_dtype][0])
        if not self.reader.uncached and outs[0].dtype == raw_dtype:  # no conversion: straight into the slots
            if not self.reader.read_into(path, offset, outs, nowait=nowait):
                return False
            for expert, out in zip(experts, outs, strict=True):
                self._check(src, [expert], out[None])
            return True
        raw = self._fetch(path, offset, len(experts) * outs[0].size * raw_dtype.itemsize, nowait)
        if raw is None:
            return False
        raw = raw.view(raw_dtype).reshape(len(experts), *outs[0].shape)
        self._check(src, experts, raw)
        for row, out in zip(raw, outs, strict=True):
            _store(src, row, out)
        return True

    def _write_records(self, packed: PackedLayer, sources: list[ParamSource], experts: list[int],
                       outs: list[list[np.ndarray]], nowait: bool = False) -> bool:
        """Consecutive `experts`' records (one read) into their slot rows: `outs[j][i]` is expert j's row of
        parameter i. With `nowait` as in `_write_run`."""
        offset = packed.location(experts[0])
        if not self.reader.uncached and all(out.dtype == DTYPES[src.file_dtype][0]
                                            for src, out in zip(sources, outs[0], strict=True)):
            # Straight into the slots (no conversion): one read fills every row, the padding into throwaway bytes.
            buffers, at_byte = [], 0
            for j, rows in enumerate(outs):
                for (at, nbytes), out in zip(packed.params, rows, strict=True):
                    start = j * packed.stride + at
                    if start > at_byte:
                        buffers.append(np.empty(start - at_byte, dtype=np.uint8))
                    buffers.append(out)
                    at_byte = start + nbytes
            if not self.reader.read_into(packed.path, offset, buffers, nowait=nowait):
                return False
            for expert, rows in zip(experts, outs, strict=True):
                for src, out in zip(sources, rows, strict=True):
                    self._check(src, [expert], out[None])
            return True
        raw = self._fetch(packed.path, offset, packed.run_nbytes(len(experts)), nowait)
        if raw is None:
            return False
        for j, expert in enumerate(experts):
            base = j * packed.stride
            for src, (at, nbytes), out in zip(sources, packed.params, outs[j], strict=True):
                values = raw[base + at : base + at + nbytes].view(DTYPES[src.file_dtype][0]).reshape(out.shape)
                self._check(src, [expert], values[None])
                _store(src, values, out)
        return True

    def _fetch(self, path: Path, offset: int, nbytes: int, nowait: bool) -> np.ndarray | None:
        """`nbytes` at `offset` as uint8 in this thread's scratch buffer (valid until its next call); None with
        `nowait` where they would have to come from the disk."""
        if not hasattr(self._scratch, "buf"):
            self._scratch.buf = AlignedScratch()
        if self.reader.uncached:
            if nowait:  # every uncached read waits for the disk
                return None
            return self.reader.read_uncached(path, offset, nbytes, self._scratch.buf)
        raw = self._scratch.buf.get(nbytes)
        return raw if self.reader.read_into(path, offset, raw, nowait=nowait) else None

    def _read_checked(self, src: ParamSource, experts: list[int]) -> np.ndarray:
        raw = self.read_raw(src, experts)
        self._check(src, experts, raw)
        return raw

    def _check(self, src: ParamSource, experts: list[int], raw: np.ndarray) -> None:
        """`_check_finite`, once per expert's bytes (see `_finite`)."""
        if src.file_dtype not in NONFINITE_BITS:
            return
        for j, expert in enumerate(experts):
            where = src.location(expert)
            if where not in self._finite:
                _check_finite(src, [expert], raw[j : j + 1])
                self._finite.add(where)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def read_raw(self, src: ParamSource, experts: list[int]) -> np.ndarray:
        """Rows for `experts` in the order given; runs of consecutive ids are read with one call each."""
        info = src.stacked or src.per_expert[0]
        out = np.empty((len(experts), *src.expert_shape), dtype=DTYPES[info.dtype][0])
        if src.stacked is None:
            for j, e in enumerate(experts):
                self.reader.read_into(*src.location(e), out[j])
            return out
        for run in _runs(experts):
            self.reader.read_into(*src.location(experts[run.start]), out[run.start : run.stop])
        return out


def _store(src: ParamSource, values: np.ndarray, out: np.ndarray) -> None:
    """One expert's values of `src` (file dtype) into its slot row, converted to the slot's dtype."""
    if src.file_dtype == "BF16" and out.dtype == np.float32:
        np.left_shift(values, 16, out=out.view(np.uint32), dtype=np.uint32)  # bf16 bits are f32's top half
    else:
        np.copyto(out, values)


def _runs(experts: list[int], most: int | None = None) -> Iterator[range]:
    """Index ranges of `experts` over which each id is the one before plus one, at most `most` long."""
    start = 0
    for i in range(1, len(experts) + 1):
        if i == len(experts) or experts[i] != experts[i - 1] + 1 or i - start == most:
            yield range(start, i)
            start = i


class SlotWrites:
    """Expert writes in flight (or done): `wait()` returns when every one has finished, raising the first
    failure after all have stopped (no reader is left writing into a slot the caller then reuses)."""

    def __init__(self, futures: list[Future], nbytes: int) -> None:
        self.futures = futures
        self.nbytes = nbytes  # bytes read from the checkpoint
        self.started = time.perf_counter()
        self.finished = self.started if not futures else None  # when the last write ended
        self._left = len(futures)
        self._lock = threading.Lock()
        for future in futures:
            future.add_done_callback(self._one_done)

    def _one_done(self, _future: Future) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.finished = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Wall time from the start of the first read to the end of the last (0 while in flight)."""
        return (self.finished - self.started) if self.finished is not None else 0.0

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def wait(self) -> None:
        error = None
        for future in self.futures:
            e = future.exception()
            error = error or e
        if error is not None:
            raise error


# (file dtype, slot dtype as numpy sees it) pairs the direct path converts; anything else goes through MLX.
DIRECT_CONVERSIONS = {("BF16", np.dtype("float32")), ("F16", np.dtype("float32"))}


def slot_views(arrays: dict[tuple[str, str], mx.array], sources: list[ParamSource],
               ) -> dict[tuple[str, str], np.ndarray] | None:
    """Writable numpy views of a layer's slot tensors (evaluated, contiguous), or None where the backend
    gives none that aliases MLX's memory, or a parameter needs a conversion numpy cannot do."""
    if not direct_writes_work():
        return None
    views = {}
    for src in sources:
        key = (src.projection, src.param)
        view = _writable_view(arrays[key])
        raw = np.dtype(DTYPES[src.file_dtype][0])
        if view is None or (view.dtype != raw and (src.file_dtype, view.dtype) not in DIRECT_CONVERSIONS):
            return None
        views[key] = view
    return views


def _writable_view(array: mx.array) -> np.ndarray | None:
    if array.dtype == mx.bfloat16:  # numpy has no bfloat16: its bits, through an aliasing view
        array = array.view(mx.uint16)
    mx.eval(array)
    try:
        view = np.array(array, copy=False)
    except (ValueError, TypeError, RuntimeError):
        return None
    if not (view.flags.c_contiguous and view.flags.writeable) or view.shape != tuple(array.shape):
        return None
    return view


def resized_rows(array: mx.array, count: int, last_into: int | None = None) -> mx.array:
    """A new tensor of `count` rows: `array`'s leading rows, zeros after them, and with `last_into` its last
    row written into that row (a layer's slot tensor one row longer, or one shorter whose last slot moved into
    the slot given up). Memory copies where numpy sees MLX's memory (MLX's gather runs several times slower
    on the CPU); MLX operations elsewhere."""
    n = min(count, array.shape[0])
    if direct_writes_work():
        out = mx.zeros((count, *array.shape[1:]), dtype=array.dtype)
        dst, src = _writable_view(out), _writable_view(array)
        if dst is not None and src is not None:
            dst[:n] = src[:n]
            if last_into is not None:
                dst[last_into] = src[-1]
            return out
    rows = np.arange(n)
    if last_into is not None:
        rows[last_into] = array.shape[0] - 1
    out = array[mx.array(rows)]
    if count > n:
        out = mx.concatenate([out, mx.zeros((count - n, *array.shape[1:]), dtype=array.dtype)])
    mx.eval(out)
    return out


_direct_ok: dict[str, bool] = {}


def direct_writes_work() -> bool:
    """Whether a write through a numpy view of an MLX array is what MLX then reads (unified memory: the
    CPU backend and Metal). Checked once per device by writing and reading back."""
    device = str(mx.default_device())
    if device not in _direct_ok:
        probe = mx.zeros((2, 8), dtype=mx.float32)
        mx.eval(probe)
        view = _writable_view(probe)
        ok = False
        if view is not None:
            view[1, 3] = 42.0
            ok = (probe * 1)[1, 3].item() == 42.0 and probe.sum().item() == 42.0
        _direct_ok[device] = ok
    return _direct_ok[device]


def _check_finite(src: ParamSource, experts: list[int], raw: np.ndarray) -> None:
    """Raise if a floating-point expert read holds Inf or NaN: it would turn every later output into NaN.

    Raises:
        ModelLoadError: naming the file, the tensor and the first expert with a non-finite value.
    """
    if src.file_dtype not in NONFINITE_BITS:
        return
    bits, mask = NONFINITE_BITS[src.file_dtype]
    unsigned = raw.view(bits)
    signed = unsigned.view(np.dtype(bits.replace("uint", "int")))
    # Positive Inf/NaN are the largest values read as signed integers, negative ones the largest read as unsigned:
    # two reductions with no temporary arrays (a mask and a compare made three passes and two arrays).
    sign = 1 << (8 * unsigned.itemsize - 1)
    if int(signed.max(initial=0)) < mask and int(unsigned.max(initial=0)) < (sign | mask):
        return
    bad = (unsigned & mask) == mask
    row = int(np.argmax(bad.reshape(len(experts), -1).any(axis=1)))
    expert = experts[row]
    info = src.stacked or src.per_expert[expert]
    raise ModelLoadError(f"{info.path}: tensor {info.name!r} holds NaN or Inf values for expert {expert}: the "
                         "checkpoint is corrupt; re-download it")


def _to_mx(raw: np.ndarray, file_dtype: str, target: mx.Dtype) -> mx.array:
    arr = mx.array(raw)
    if file_dtype == "BF16":
        arr = arr.view(mx.bfloat16)
    return arr if arr.dtype == target else arr.astype(target)
