"""Safetensors headers, shard index and byte-range reads: where every tensor lives on disk, checked, not loaded."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import re
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import ModelLoadError

# safetensors dtype -> (numpy dtype used to hold the raw bytes, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("uint16", 2),  # numpy has no bfloat16: raw bits, reinterpreted in MLX
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("uint8", 1),
    "F8_E5M2": ("uint8", 1),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_BYTES = 100 * 1024 * 1024  # config.json, the shard index: megabytes at most in real models
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a safetensors file: absolute byte range, dtype and shape."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    def row_bytes(self) -> int:
        """Bytes of one slice along the first axis (one expert of a stacked tensor)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def regular_file(path: Path) -> os.stat_result:
    """stat `path` (following symlinks) and insist it is a regular file.

    Checked before any open: opening a FIFO blocks until a writer appears, and a directory or a symlink loop
    would only fail later with a bare OSError.

    Raises:
        ModelLoadError: missing, a broken symlink or symlink loop, unreadable, or not a regular file.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelLoadError(f"{path}: symlink loop (too many levels of symbolic links); replace the link "
                                 "with the real file") from exc
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise ModelLoadError(f"{path}: broken symlink (its target {os.readlink(path)!r} does not exist); "
                                 "re-download the model") from exc
        if exc.errno == errno.ENOENT:
            raise ModelLoadError(f"{path}: file not found; re-download the model") from exc
        raise ModelLoadError(f"{path}: cannot read it ({exc.strerror})") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "a special file")
        raise ModelLoadError(f"{path}: not a regular file (it is {kind}); put the real file there")
    return st


def open_regular(path: Path) -> BinaryIO:
    """Open a checked regular file for reading (see `regular_file`)."""
    regular_file(path)
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the check, open() returns instead of blocking.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot open it ({exc.strerror})") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelLoadError(f"{path}: not a regular file; put the real file there")
    return os.fdopen(fd, "rb")


def read_json(path: Path, what: str = "file") -> Any:
    """The parsed JSON of a small model file (config, index); any problem is one ModelLoadError naming it."""
    with open_regular(path) as f:
        try:
            data = f.read(MAX_JSON_BYTES + 1)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read it ({exc.strerror})") from exc
    if len(data) > MAX_JSON_BYTES:
        raise ModelLoadError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB; not a model {what}")
    return _parse_json(path, data, "not valid JSON", "re-download it")


def _parse_json(path: Path, data: bytes, problem: str, fix: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError as exc:
        raise ModelLoadError(f"{path}: {problem} (JSON nested too deeply); {fix}") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, or an int over 4300 digits
        raise ModelLoadError(f"{path}: {problem} ({exc}); {fix}") from exc


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON true would pass isinstance(int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one file's header and check every tensor's dtype, shape and byte range against the file.

    Raises:
        ModelLoadError: the file is not a regular file, is truncated, or its header is malformed, names
            an unknown dtype, a bad shape, offsets that are not integers, out of the file, or overlapping.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ModelLoadError(f"{path}: file is truncated (no safetensors header); re-download it")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ModelLoadError(
                    f"{path}: header length {header_len} exceeds the file ({size} bytes): "
                    "the file is truncated or not safetensors; re-download it"
                )
            header_bytes = f.read(header_len)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read it ({exc.strerror})") from exc
    header = _parse_json(path, header_bytes, "corrupt safetensors header", "re-download it")
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    _check_no_overlap(path, tensors.values())
    return tensors


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    """One header entry, checked: dtype known, shape of non-negative ints, offsets in the file and sized right."""
    def corrupt(problem: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: tensor {name!r} {problem}: the file is corrupt; re-download it")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise corrupt("has a malformed header entry (needs dtype, shape and data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}; re-download or convert it")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise corrupt(f"has an invalid shape {shape!r} (dims must be non-negative integers)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_int, offsets))
            or not 0 <= offsets[0] <= offsets[1]):
        raise corrupt(f"has invalid data_offsets {offsets!r} (two integers, 0 <= begin <= end)")
    begin, end = offsets
    if data_start + end > size:
        raise ModelLoadError(
            f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size}: "
            "the file is truncated; re-download it"
        )
    expected = math.prod(shape) * DTYPES[dtype][1]  # Python ints: a huge shape cannot wrap around
    if end - begin != expected:
        raise corrupt(f"spans {end - begin} bytes but its dtype and shape, {dtype}{shape}, need {expected}")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, end - begin)


def _check_no_overlap(path: Path, infos: Any) -> None:
    previous: TensorInfo | None = None
    for info in sorted(infos, key=lambda i: (i.offset, i.nbytes)):
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            raise ModelLoadError(
                f"{path}: tensors {previous.name!r} and {info.name!r} overlap (their byte ranges share bytes "
                f"from {info.offset}): the file is corrupt; re-download it"
            )
        previous = info


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint files of a model folder, checked against the shard index where there is one.

    Every `model*.safetensors` must be a regular file even where an index lists the shards: mlx-lm's
    loader opens all of them.
    """
    globbed = sorted(model_dir.glob("model*.safetensors"))
    for path in globbed:
        regular_file(path)
    index_path = model_dir / "model.safetensors.index.json"
    if os.path.lexists(index_path):
        names = _index_shards(index_path)
        missing = [n for n in names if not os.path.lexists(model_dir / n)]
        if missing:
            raise ModelLoadError(
                f"{model_dir}: shard(s) {', '.join(missing)} listed in model.safetensors.index.json "
                "are missing; finish the download"
            )
        return [model_dir / n for n in names]
    if not globbed:
        raise ModelLoadError(f"{model_dir}: no model*.safetensors files; is this an MLX/HF model folder?")
    # No index (yet): shards named model-00001-of-00003.safetensors still say how many there must be.
    counts = {int(m.group(1)) for p in globbed if (m := _SHARD_NAME.fullmatch(p.name))}
    for count in counts:
        expected = {f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
        missing = sorted(expected - {p.name for p in globbed})
        if missing:
            raise ModelLoadError(f"{model_dir}: shard(s) {', '.join(missing)} are missing; finish the download")
    return globbed


_SHARD_NAME = re.compile(r"model-\d{5}-of-(\d{5})\.safetensors")


def _index_shards(index_path: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json maps tensors to, each a plain name in its folder."""
    index = read_json(index_path, "shard index")
    if not isinstance(index, dict) or "weight_map" not in index:
        raise ModelLoadError(f'{index_path}: corrupt shard index (expected a JSON object with a "weight_map" '
                             f"object, got {type(index).__name__}); re-download it")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f'{index_path}: corrupt shard index ("weight_map" must be a JSON object of tensor '
                             f"name -> shard file, got {type(weight_map).__name__}); re-download it")
    for tensor, shard in weight_map.items():
        # A plain name only: "../x" or "/etc/x" would read outside the model folder.
        if not isinstance(shard, str) or shard in ("", ".", "..") or os.path.basename(shard) != shard:
            raise ModelLoadError(f"{index_path}: corrupt shard index (weight_map[{tensor!r}] is {shard!r}, "
                                 "not a shard file name in this folder); re-download it")
    return sorted(set(weight_map.values()))


def index_model(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a (possibly sharded) checkpoint, by name; a tensor in two files is an error."""
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
        for name, info in read_header(path).items():
            if name in tensors:
                raise ModelLoadError(f"{model_dir}: tensor {name!r} is in both {tensors[name].path.name} and "
                                     f"{path.name}; re-download the model")
            tensors[name] = info
    return tensors


# preadv2 flag: fail with EAGAIN instead of waiting for the disk (Linux 4.14+); 0 where there is none.
NOWAIT = getattr(os, "RWF_NOWAIT", 0)
DIRECT_ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the logical block size
HUGE_PAGE = 2 << 20  # a transparent huge page (x86-64, arm64 with 4 KiB base pages)


class RangeReader:
    """Reads byte ranges of checkpoint files with positional reads into preallocated buffers (thread-safe:
    positional reads share no file offset, and the descriptors and the byte count are guarded).

    With `uncached`, reads bypass the page cache where the OS allows (O_DIRECT on Linux, F_NOCACHE on
    macOS), so bytes already held in the expert cache are not held a second time as cached file pages;
    elsewhere, or on a file system that refuses it, reads are ordinary.
    """

    def __init__(self, uncached: bool = False) -> None:
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int | None] = {}  # None: this file cannot be read with O_DIRECT
        self._lock = threading.Lock()
        self.bytes_read = 0
        # Wall time with at least one read in flight (overlapping reads count once): bytes_read / busy_seconds
        # is the bandwidth the reads themselves got, apart from what the callers do with the bytes.
        self._busy_total = 0.0  # busy periods that have ended
        self._in_flight = 0
        self._busy_since = 0.0
        self.uncached = uncached
        self._nowait = bool(NOWAIT)  # cleared where the kernel or file system refuses RWF_NOWAIT

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                    if self.uncached and sys.platform == "darwin":
                        import fcntl

                        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
        return fd

    def _direct_fd(self, path: Path) -> int | None:
        if not self.uncached or not hasattr(os, "O_DIRECT"):
            return None
        if path not in self._direct_fds:
            with self._lock:
                if path not in self._direct_fds:
                    try:
                        self._direct_fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    except OSError:  # e.g. tmpfs: no direct I/O there
                        self._direct_fds[path] = None
        return self._direct_fds[path]

    def hold(self, path: Path) -> int:
        """Open `path` now (for direct reads too, where they are on), so that later reads read this file even if
        it is deleted or replaced meanwhile; its size in bytes."""
        fd = self._fd(path)
        self._direct_fd(path)
        return os.fstat(fd).st_size

    def read_into(self, path: Path, offset: int, out: np.ndarray | list[np.ndarray], nowait: bool = False) -> bool:
        """Fill `out` (C-contiguous; or several, filled in turn from consecutive bytes, one call each time)
        with the bytes at `offset`.

        With `nowait` (Linux), only what the page cache already holds is read: False as soon as a read would
        have to wait for the disk (what was read so far is left in `out`), so a caller can hand cold reads to
        a thread and keep warm ones, a memory copy, on its own.
        """
        views = [memoryview(o).cast("B") for o in (out if isinstance(out, list) else [out])]
        fd = self._fd(path)
        flags = NOWAIT if nowait and self._nowait else 0
        total, done = sum(len(v) for v in views), 0
        first, skip = 0, 0  # the next byte goes to views[first][skip]
        with self._reading():
            while done < total:
                buffers = [views[first][skip:], *views[first + 1 :]]
                try:
                    if flags:
                        n = os.preadv(fd, buffers, offset + done, flags)
                    elif hasattr(os, "preadv"):
                        n = os.preadv(fd, buffers, offset + done)
                    else:
                        n = _pread_into(fd, buffers[0], offset + done)
                except BlockingIOError:
                    return False
                except OSError as e:
                    if not flags or e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    # A kernel or file system without RWF_NOWAIT: ordinary reads from now on.
                    self._nowait = flags = 0
                    continue
                if n <= 0:
                    raise ModelLoadError(f"{path}: unexpected end of file at byte {offset + done}; re-download it")
                done += n
                skip += n
                while first < len(views) and skip >= len(views[first]):
                    skip -= len(views[first])
                    first += 1
        with self._lock:
            self.bytes_read += total
        return True

    @property
    def busy_seconds(self) -> float:
        """Wall time so far with at least one read in flight, the current busy period included (a snapshot taken
        mid-period and one taken later then cover the same span as the bytes counted between them)."""
        with self._lock:
            return self._busy_total + (time.perf_counter() - self._busy_since if self._in_flight else 0.0)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Around each read (they may overlap, on several threads): a busy period runs from the first read in
        flight to the end of the last, however the reads end."""
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._busy_total += time.perf_counter() - self._busy_since

    def read_uncached(self, path: Path, offset: int, nbytes: int, scratch: AlignedScratch) -> np.ndarray:
        """`nbytes` at `offset` as uint8, bypassing the page cache where possible, in `scratch` (reused by
        the next call on the same scratch)."""
        fd = self._direct_fd(path)
        if fd is None:
            out = scratch.get(nbytes)
            self.read_into(path, offset, out)
            return out
        start = offset - offset % DIRECT_ALIGN
        length = -(-(offset + nbytes - start) // DIRECT_ALIGN) * DIRECT_ALIGN
        buf = scratch.get(length)
        view = memoryview(buf).cast("B")
        done = 0
        with self._reading():
            try:
                while done < nbytes + offset - start:
                    n = os.preadv(fd, [view[done:]], start + done)
                    if n <= 0:
                        raise ModelLoadError(f"{path}: unexpected end of file at byte {start + done}; re-download it")
                    done += n
                    if n % DIRECT_ALIGN:  # a short read (end of file): the rest cannot be read aligned
                        break
            except OSError:  # the file system refused direct I/O after all: ordinary reads from now on
                with self._lock:
                    self._direct_fds[path] = None
                return self.read_uncached(path, offset, nbytes, scratch)
        if done < nbytes + offset - start:
            raise ModelLoadError(f"{path}: unexpected end of file at byte {start + done}; re-download it")
        with self._lock:
            self.bytes_read += nbytes
        return buf[offset - start : offset - start + nbytes]

    def read_rows(self, info: TensorInfo, first: int, count: int = 1) -> np.ndarray:
        """Rows [first, first+count) along axis 0 of a tensor, as raw-typed numpy."""
        np_dtype = DTYPES[info.dtype][0]
        out = np.empty((count, *info.shape[1:]), dtype=np_dtype)
        self.read_into(info.path, info.offset + first * info.row_bytes(), out)
        return out

    def read_tensor(self, info: TensorInfo) -> np.ndarray:
        out = np.empty(info.shape, dtype=DTYPES[info.dtype][0])
        self.read_into(info.path, info.offset, out)
        return out

    def drop_page_cache(self) -> None:
        """Ask the OS to forget cached pages of the files read so far (cold-read benchmarks)."""
        for fd in self._fds.values():
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()


class AlignedScratch:
    """A growable byte buffer for direct I/O (one per thread that reads): it starts on a huge-page boundary, spans
    whole huge pages, and asks Linux for transparent huge pages. A direct read into 4 KiB pages reaches the
    disk as many small requests: on this project's VM, 1.5 MiB expert reads ran at half the speed of the same
    reads into huge pages (docs/performance.md)."""

    def __init__(self) -> None:
        self._raw: Any = None  # what holds the memory (an mmap, or a numpy array where there is no mmap flag)
        self._buf = np.empty(0, dtype=np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if self._buf.nbytes < nbytes:
            size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
            self._raw, self._buf = None, np.empty(0, dtype=np.uint8)  # the old one is freed before the new is made
            self._raw, self._buf = _huge_page_buffer(size)
        return self._buf[:nbytes]


def _huge_page_buffer(size: int) -> tuple[Any, np.ndarray]:
    """`size` bytes starting on a huge-page boundary, and what keeps them alive."""
    if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
        # Private: Python's anonymous mmap is shared memory by default, which Linux backs with small pages.
        raw: Any = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                raw.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel without transparent huge pages (EINVAL): small pages, as before
                pass
        whole = np.frombuffer(raw, dtype=np.uint8)
    else:
        raw = whole = np.empty(size + HUGE_PAGE, dtype=np.uint8)
    skip = -whole.ctypes.data % HUGE_PAGE
    return raw, whole[skip : skip + size]


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)
