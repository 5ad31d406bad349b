"""Safetensors headers and byte-range reads: where every tensor lives on disk, without loading it."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one file's header and check every tensor's byte range against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
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
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: file not found; re-download the model") from exc
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: corrupt safetensors header ({exc}); re-download it") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: corrupt header entry for {name!r}; re-download it") from exc
        if dtype not in DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]
        if end - begin != expected or begin < 0:
            raise ModelLoadError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but {dtype}{list(shape)} needs "
                f"{expected}: the file is corrupt; re-download it"
            )
        if data_start + end > size:
            raise ModelLoadError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size}: "
                "the file is truncated; re-download it"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return tensors


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint files of a model folder, checked against the shard index where there is one."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"{index_path}: corrupt shard index ({exc}); re-download it") from exc
        missing = [n for n in names if not (model_dir / n).exists()]
        if missing:
            raise ModelLoadError(
                f"{model_dir}: shard(s) {', '.join(missing)} listed in model.safetensors.index.json "
                "are missing; finish the download"
            )
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no model*.safetensors files; is this an MLX/HF model folder?")
    return files


def index_model(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a (possibly sharded) checkpoint, by name."""
    tensors: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
        tensors.update(read_header(path))
    return tensors


class RangeReader:
    """Reads byte ranges of checkpoint files with positional reads into preallocated buffers."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_into(self, path: Path, offset: int, out: np.ndarray) -> None:
        """Fill `out` (C-contiguous) with the bytes at `offset`."""
        view = memoryview(out).cast("B")
        fd = self._fd(path)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done) if hasattr(os, "preadv") else _pread_into(
                fd, view[done:], offset + done
            )
            if n <= 0:
                raise ModelLoadError(f"{path}: unexpected end of file at byte {offset + done}; re-download it")
            done += n
        self.bytes_read += done

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
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)
