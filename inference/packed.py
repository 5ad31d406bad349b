"""Expert records: a copy of a checkpoint's expert weights with each (layer, expert) in one contiguous record.

A checkpoint stores each expert parameter in its own tensor (stacked `[experts, ...]` or one per expert), so
one expert of a 4-bit layer is nine reads: three weights and six small scales and biases. Small reads are slow
on a disk (each costs the disk's latency), so a miss spends most of its time on the few bytes of its scales.
`moe pack MODEL` writes every expert's parameters side by side, each record starting on a 4 KiB boundary (what
direct I/O needs), and the engine then reads a miss with one request. The records hold the checkpoint's bytes
unchanged (no conversion), in the order of the layer's `ParamSource`s.

A pack is a folder: `experts.bin` (the records) and `manifest.json` (where each layer's records start, their
stride, each parameter's place in a record, and a fingerprint of the checkpoint it was made from). The
manifest is written last, so a pack cut short is never used, and a pack whose checkpoint changed since
(another size, modification time or tensor layout) is refused with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelLoadError
from .experts import ExpertReader, ParamSource
from .safetensors_io import DIRECT_ALIGN, RangeReader, read_json

FORMAT = "moe-tui expert records"
VERSION = 1
RECORDS = "experts.bin"
MANIFEST = "manifest.json"
CHUNK_BYTES = 64 << 20  # records assembled in memory before each write while packing
# A read under this many bytes spends much of its time on the disk's latency: records pay where an expert has
# such parameters (a 4-bit expert's scales and biases). Where every parameter is larger (bf16 experts) one read
# per parameter runs as fast and spreads the conversion over the reader threads (measured: docs/performance.md,
# "Expert records").
SMALL_READ_BYTES = 1 << 20
SAMPLE_BYTES = 4096  # of each layer's checkpoint bytes, hashed into the fingerprint
PARAM_ALIGN = 64  # where each parameter starts in a record (any dtype's alignment, a cache line)


@dataclass(frozen=True)
class PackedLayer:
    """One MoE layer's records: expert e's record starts at `offset + e * stride`; parameter i of the layer's
    sources lies at `params[i] = (offset in the record, bytes)`."""

    path: Path
    offset: int
    stride: int
    params: tuple[tuple[int, int], ...]

    @property
    def record_nbytes(self) -> int:
        """Bytes of one record without its padding."""
        return self.params[-1][0] + self.params[-1][1]

    def location(self, expert: int) -> int:
        return self.offset + expert * self.stride

    def run_nbytes(self, count: int) -> int:
        """Bytes of `count` consecutive records, the last without its padding."""
        return (count - 1) * self.stride + self.record_nbytes


def default_pack_dir(model_dir: Path) -> Path:
    """Where `moe pack` puts a model's records unless told otherwise: the user's cache folder, one folder per
    model folder (its resolved path hashed), so a read-only model folder (the Hugging Face cache) needs no
    write access."""
    import platformdirs

    model_dir = Path(model_dir).resolve()
    key = hashlib.sha256(str(model_dir).encode()).hexdigest()[:16]
    return Path(platformdirs.user_cache_dir("moe-tui")) / "packs" / f"{model_dir.name}-{key}"


def model_dir_of(layers: list[list[ParamSource]]) -> Path:
    """The folder of the checkpoint files the sources read."""
    first = layers[0][0]
    return (first.stacked or first.per_expert[0]).path.parent


def fingerprint(layers: list[list[ParamSource]], num_experts: int) -> dict:
    """What a pack must match to be used: every file's size and modification time, a hash of where each expert
    parameter lies in them, and a hash of a few of their bytes (SAMPLE_BYTES of each layer's last expert's first
    parameter: a copy that kept modification times, or another revision of the same shapes, differs there)."""
    files = sorted({info.path for sources in layers for s in sources for info in _infos(s)})
    layout, sample = hashlib.sha256(), hashlib.sha256()
    reader = RangeReader()
    try:
        for i, sources in enumerate(layers):
            for s in sources:
                where = [(s.location(e)[0].name, s.location(e)[1]) for e in range(num_experts)]
                layout.update(json.dumps([i, s.projection, s.param, s.file_dtype, list(s.expert_shape),
                                          s.expert_nbytes, where]).encode())
            raw = np.empty(min(SAMPLE_BYTES, sources[0].expert_nbytes), dtype=np.uint8)
            reader.read_into(*sources[0].location(num_experts - 1), raw)
            sample.update(raw.tobytes())
    finally:
        reader.close()
    return {"files": [{"name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files],
            "layout": layout.hexdigest(), "sample": sample.hexdigest()}


def _infos(src: ParamSource):
    return [src.stacked] if src.stacked is not None else list(src.per_expert)


def _plan(layers: list[list[ParamSource]], num_experts: int) -> list[dict]:
    """Each layer's first record, stride and parameter places, records laid out layer after layer."""
    plan, offset = [], 0
    for sources in layers:
        params, at = [], 0
        for s in sources:
            at = -(-at // PARAM_ALIGN) * PARAM_ALIGN  # each parameter aligned for its dtype's numpy view
            params.append([at, s.expert_nbytes])
            at += s.expert_nbytes
        stride = -(-at // DIRECT_ALIGN) * DIRECT_ALIGN
        plan.append({"offset": offset, "stride": stride, "params": params})
        offset += stride * num_experts
    return plan


def write_pack(layers: list[list[ParamSource]], num_experts: int, out: Path,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the records of every expert of `layers` (each layer's `ParamSource`s, in the order the engine
    keeps them) into the folder `out`, replacing a pack there. `progress(done, total)` after each layer. An
    engine that opened the old records keeps reading them (its files stay open) until it closes.

    Raises:
        ModelLoadError: the folder cannot be written, too little disk space (nothing written), or a
            checkpoint read came up short.
    """
    out = Path(out)
    plan = _plan(layers, num_experts)
    total = plan[-1]["offset"] + plan[-1]["stride"] * num_experts if plan else 0
    partial = out / (RECORDS + ".partial")
    reader = RangeReader()
    experts = ExpertReader(reader)  # reads the checkpoint's rows of each parameter, as the engine does
    try:
        out.mkdir(parents=True, exist_ok=True)
        # The old pack stops being valid before anything is written, and what a killed pack left goes too.
        for stale in (out / MANIFEST, out / RECORDS, partial, out / (MANIFEST + ".partial")):
            stale.unlink(missing_ok=True)
        free = shutil.disk_usage(out).free
        if free < total + (256 << 20):
            raise ModelLoadError(f"{out}: packing needs {total / 2**30:.2f} GiB and the disk has "
                                 f"{free / 2**30:.2f} GiB free; free some space (or point XDG_CACHE_HOME elsewhere)")
        with open(partial, "wb") as f:
            for i, (sources, layer) in enumerate(zip(layers, plan, strict=True)):
                _write_layer(f, experts, sources, layer, num_experts)
                # A pack of a model bigger than memory should not evict everything else from the page cache.
                f.flush()
                getattr(os, "fdatasync", os.fsync)(f.fileno())  # written out: clean pages can be dropped
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                reader.drop_page_cache()
                if progress is not None:
                    progress(i + 1, len(layers))
            os.fsync(f.fileno())
        os.replace(partial, out / RECORDS)
        manifest = {"format": FORMAT, "version": VERSION, "model": str(model_dir_of(layers)) if layers else "",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "num_experts": num_experts,
                    "records_bytes": total, "source": fingerprint(layers, num_experts) if layers else {},
                    "layers": plan}
        tmp = out / (MANIFEST + ".partial")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out / MANIFEST)
    except OSError as e:  # a read-only or full disk, a folder that cannot be made
        raise ModelLoadError(f"{out}: cannot write expert records: {e.strerror or e}") from e
    finally:
        reader.close()
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return out


def _write_layer(f, reader: ExpertReader, sources: list[ParamSource], layer: dict, num_experts: int) -> None:
    """One layer's records, assembled CHUNK_BYTES at a time, appended to `f`."""
    stride = layer["stride"]
    per_chunk = max(1, CHUNK_BYTES // stride)
    for first in range(0, num_experts, per_chunk):
        experts = list(range(first, min(first + per_chunk, num_experts)))
        buf = np.zeros((len(experts), stride), dtype=np.uint8)
        for s, (at, nbytes) in zip(sources, layer["params"], strict=True):
            buf[:, at : at + nbytes] = reader.read_raw(s, experts).reshape(len(experts), -1).view(np.uint8)
        f.write(memoryview(buf).cast("B"))


def open_pack(directory: Path, layers: list[list[ParamSource]], num_experts: int,
              reader: RangeReader | None = None) -> tuple[list[PackedLayer] | None, str]:
    """The layers' records in `directory`, or None and why not (no pack there, or one made from another
    checkpoint or an older version of this one, or cut short). With `reader`, the records are opened in it
    (`RangeReader.hold`): deleted or packed again later, they stay readable for it."""
    directory = Path(directory)
    manifest_path, records = directory / MANIFEST, directory / RECORDS
    if not manifest_path.is_file():
        return None, f"no expert records in {directory} (make them with `moe pack`)"
    try:
        manifest = json.loads(manifest_path.read_text())
        ok = manifest.get("format") == FORMAT and manifest.get("version") == VERSION
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        return None, f"{manifest_path}: not a manifest this version reads; run `moe pack` again"
    plan = _plan(layers, num_experts)
    if manifest.get("num_experts") != num_experts or manifest.get("layers") != plan:
        return None, f"{directory}: records of another model; run `moe pack` again"
    if manifest.get("source") != fingerprint(layers, num_experts):
        return None, f"{directory}: the checkpoint changed since it was packed; run `moe pack` again"
    try:
        size = reader.hold(records) if reader is not None else records.stat().st_size
    except OSError:
        size = -1
    if size != manifest.get("records_bytes"):
        return None, (f"{records}: {size} bytes where the manifest says {manifest.get('records_bytes')}; "
                      "run `moe pack` again")
    return [PackedLayer(records, p["offset"], p["stride"], tuple(tuple(x) for x in p["params"])) for p in plan], ""


def smallest_read(layers: list[list[ParamSource]]) -> int:
    """Bytes of the smallest read of a miss from the checkpoint (one expert's part of one parameter)."""
    return min(s.expert_nbytes for sources in layers for s in sources)


def records_help(layers: list[list[ParamSource]]) -> bool:
    """Whether some expert parameter is a small read (see SMALL_READ_BYTES)."""
    return smallest_read(layers) < SMALL_READ_BYTES


def pack_model(model: str | Path, out: Path | None = None, progress: Callable[[int, int], None] | None = None,
               force: bool = False) -> tuple[Path, int, bool]:
    """Write `model`'s expert records (`out`, default `default_pack_dir`): (the folder, its bytes, whether they
    were written: up-to-date records are kept unless `force`). The model is opened without its experts and with
    the fewest slots; nothing is computed.

    Raises:
        ModelLoadError: the model cannot be opened, has no MoE layers, records would not make its misses
            faster to read (unless `force`), or there is no room on the disk.
    """
    from .engine import Engine
    from .loading import _top_k, check_model_folder

    folder = check_model_folder(model)
    _, top_k = _top_k(read_json(folder / "config.json", "config"))
    engine = Engine.load(folder, capacity=top_k if isinstance(top_k, int) else None, prefetch=False,
                         record_trace=False, pack=False)
    try:
        sources = [layer.sources for layer in engine.experts._layers]
        if not sources:
            raise ModelLoadError(f"{engine.path}: no MoE layers, so no expert records to write")
        if not force and not records_help(sources):
            raise ModelLoadError(
                f"{engine.path}: every expert parameter is already a large read (the smallest is "
                f"{smallest_read(sources) / 2**20:.1f} MiB), which the disk serves as fast as one record; records "
                f"would take {engine.experts.expert_disk_bytes() / 2**30:.2f} GiB of disk for nothing (--force "
                "writes them)")
        out = Path(out) if out is not None else default_pack_dir(model_dir_of(sources))
        fresh, _ = open_pack(out, sources, engine.layout.num_experts)
        if fresh is None or force:
            write_pack(sources, engine.layout.num_experts, out, progress)
        return out, (out / RECORDS).stat().st_size, fresh is None or force
    finally:
        engine.close()
