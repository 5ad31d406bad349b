"""Recorded routing traces: which experts each MoE layer's router picked at each forward step, kept in a
small npz file and read back offline, so eviction policies and next-layer prediction are compared
without running the model (`moe bench --replay TRACE.npz`). Written by `moe profile --trace OUT.npz`
and `moe bench --trace OUT.npz`; the format is documented in docs/traces.md.

A step is one forward pass: one token while decoding, a prompt chunk while prefilling. Per (layer,
step) a trace keeps the distinct experts routed (ascending), the unit the engine counts hits in, and,
where the engine guessed them, the experts its next-layer prediction ranked highest for that layer and
step (best first), from which it chose what to read ahead.
Pure numpy: reading a trace needs no MLX.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "moe-tui routing trace"
VERSION = 1
REQUIRED = ("format", "version", "model", "num_experts", "top_k", "layer_ids", "tokens", "counts", "experts",
            "segments")
TEXT_FIELDS = ("model", "model_type", "mode", "source")


class TraceError(ValueError):
    """A trace file that cannot be read, or whose contents contradict each other (the message says which)."""


@dataclass
class Trace:
    """Per MoE layer, per step: the distinct experts routed (sorted int arrays).

    `guesses[layer][step]` are the experts the engine predicted for that layer and step, best first (empty
    where it made no guess: prefill steps, a full cache, the first layer for a token it had not routed
    before); None when none were recorded.
    `segments` holds the first step of each recorded run (a prompt, a text window), then the step count.
    """

    model: str
    num_experts: int
    top_k: int
    layer_ids: tuple[int, ...]
    steps: list[list[np.ndarray]]
    tokens: int = 0
    segments: tuple[int, ...] = ()
    guesses: list[list[np.ndarray]] | None = None
    model_type: str = ""
    mode: str = ""  # the engine's mode while recording (exact routing equals stock mlx-lm's)
    capacity: int = 0  # experts per layer cached while recording (what the guesses were sized for)
    source: str = ""  # how it was recorded, e.g. the command line

    def __post_init__(self) -> None:
        if not self.segments:
            self.segments = (0, self.num_steps)

    @property
    def num_layers(self) -> int:
        return len(self.steps)

    @property
    def num_steps(self) -> int:
        return len(self.steps[0]) if self.steps else 0

    @property
    def accesses(self) -> int:
        return sum(len(s) for layer in self.steps for s in layer)

    def validate(self, where: str = "trace") -> Trace:
        """Raise TraceError naming the first inconsistency; return self when there is none."""
        E = self.num_experts
        if E < 1 or not 1 <= self.top_k <= E:
            raise TraceError(f"{where}: num_experts {E} and top_k {self.top_k} must satisfy 1 <= top_k <= num_experts")
        if len(self.layer_ids) != len(self.steps):
            raise TraceError(f"{where}: {len(self.layer_ids)} layer ids for {len(self.steps)} layers of steps")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise TraceError(f"{where}: layer ids {list(self.layer_ids)} repeat")
        n = self.num_steps
        for i, layer in enumerate(self.steps):
            if len(layer) != n:
                raise TraceError(f"{where}: layer {self.layer_ids[i]} has {len(layer)} steps, layer "
                                 f"{self.layer_ids[0]} has {n}")
        seg = self.segments
        if seg[0] != 0 or seg[-1] != n or any(b < a for a, b in zip(seg, seg[1:], strict=False)):
            raise TraceError(f"{where}: segments must rise from 0 to the step count {n}, got {list(seg)[:8]}")
        groups = [("steps", self.steps)] + ([("guesses", self.guesses)] if self.guesses is not None else [])
        for name, table in groups:
            if len(table) != len(self.steps) or any(len(layer) != n for layer in table):
                raise TraceError(f"{where}: {name} must be {len(self.steps)} layers x {n} steps")
            for i, layer in enumerate(table):
                for t, ids in enumerate(layer):
                    if len(ids) and (ids.min() < 0 or ids.max() >= E):
                        raise TraceError(f"{where}: {name} of layer {self.layer_ids[i]}, step {t}: expert ids "
                                         f"{ids.tolist()} outside 0..{E - 1}")
                    if name == "steps" and len(ids) > 1 and not (np.diff(ids) > 0).all():
                        raise TraceError(f"{where}: steps of layer {self.layer_ids[i]}, step {t}: expert ids "
                                         f"{ids.tolist()} are not distinct and ascending")
                    if name == "guesses" and len(set(ids.tolist())) != len(ids):
                        raise TraceError(f"{where}: guesses of layer {self.layer_ids[i]}, step {t}: expert ids "
                                         f"{ids.tolist()} repeat")
        return self

    def window(self, start: int, stop: int) -> Trace:
        """Steps [start, stop) as a trace of their own (segments cut to fit)."""
        seg = sorted({0, *(min(max(s - start, 0), stop - start) for s in self.segments), stop - start})
        return Trace(self.model, self.num_experts, self.top_k, self.layer_ids,
                     [layer[start:stop] for layer in self.steps], self.tokens if (start, stop) == (0, self.num_steps)
                     else 0, tuple(seg), None if self.guesses is None else [g[start:stop] for g in self.guesses],
                     self.model_type, self.mode, self.capacity, self.source)


def _flatten(table: Sequence[Sequence[np.ndarray]], num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.array([[len(ids) for ids in layer] for layer in table], dtype=np.uint16).reshape(len(table), -1)
    dtype = np.int16 if num_experts < 2**15 else np.int32
    parts = [np.asarray(ids, dtype=dtype) for layer in table for ids in layer]
    return counts, (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))


def _unflatten(counts: np.ndarray, flat: np.ndarray) -> list[list[np.ndarray]]:
    ends = np.cumsum(counts.reshape(-1).astype(np.int64))
    pieces = np.split(flat.astype(np.int64), ends[:-1]) if len(ends) else []
    n = counts.shape[1]
    return [pieces[i * n : (i + 1) * n] for i in range(counts.shape[0])]


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write `trace` (validated first) as a compressed npz; returns the path written."""
    trace.validate()
    path = Path(path)
    counts, experts = _flatten(trace.steps, trace.num_experts)
    arrays: dict[str, Any] = {
        "format": np.array(FORMAT), "version": np.array(VERSION), "model": np.array(trace.model),
        "model_type": np.array(trace.model_type), "mode": np.array(trace.mode), "source": np.array(trace.source),
        "num_experts": np.array(trace.num_experts), "top_k": np.array(trace.top_k),
        "layer_ids": np.array(trace.layer_ids, dtype=np.int32), "tokens": np.array(trace.tokens),
        "capacity": np.array(trace.capacity), "segments": np.array(trace.segments, dtype=np.int64),
        "counts": counts, "experts": experts,
    }
    if trace.guesses is not None:
        arrays["guess_counts"], arrays["guesses"] = _flatten(trace.guesses, trace.num_experts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: savez would append .npz to a name without it
        np.savez_compressed(f, **arrays)
    return path


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace file.

    Raises:
        TraceError: missing, not a trace, a version this code does not know, or inconsistent contents.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError as exc:
        raise TraceError(f"{path}: trace not found") from exc
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise TraceError(f"{path}: not a routing trace (expected an npz file written by `moe profile --trace` "
                         f"or `moe bench --trace`: {exc})") from exc
    if not isinstance(arrays, dict) or str(arrays.get("format", "")) != FORMAT:
        raise TraceError(f"{path}: not a routing trace (no format={FORMAT!r} entry); record one with "
                         "`moe profile --trace` or `moe bench --trace`")
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise TraceError(f"{path}: trace lacks {', '.join(missing)}; record it again")
    version = int(arrays["version"])
    if version != VERSION:
        raise TraceError(f"{path}: trace format version {version}; this moe-tui reads version {VERSION}")
    counts, experts = arrays["counts"], arrays["experts"]
    layer_ids = tuple(int(x) for x in np.atleast_1d(arrays["layer_ids"]))
    if counts.ndim != 2 or counts.shape[0] != len(layer_ids):
        raise TraceError(f"{path}: counts has shape {counts.shape}, expected ({len(layer_ids)} layers, steps)")
    if int(counts.sum()) != len(experts):
        raise TraceError(f"{path}: counts add up to {int(counts.sum())} expert ids but the file holds {len(experts)}")
    guesses = None
    if "guesses" in arrays or "guess_counts" in arrays:
        if "guesses" not in arrays or "guess_counts" not in arrays:
            raise TraceError(f"{path}: guesses and guess_counts come together; the file has only one of them")
        gc, g = arrays["guess_counts"], arrays["guesses"]
        if gc.shape != counts.shape or int(gc.sum()) != len(g):
            raise TraceError(f"{path}: guess_counts {gc.shape} (summing to {int(gc.sum())}) does not match the "
                             f"steps {counts.shape} and the {len(g)} guessed ids")
        guesses = _unflatten(gc, g)
    text = {k: str(arrays[k]) if k in arrays else "" for k in TEXT_FIELDS}
    trace = Trace(model=text["model"], num_experts=int(arrays["num_experts"]), top_k=int(arrays["top_k"]),
                  layer_ids=layer_ids, steps=_unflatten(counts, experts), tokens=int(arrays["tokens"]),
                  segments=tuple(int(s) for s in np.atleast_1d(arrays["segments"])), guesses=guesses,
                  model_type=text["model_type"], mode=text["mode"],
                  capacity=int(arrays["capacity"]) if "capacity" in arrays else 0, source=text["source"])
    return trace.validate(str(path))


@dataclass
class TraceRecorder:
    """Collects an engine's routing trace over several runs (each run: `begin`, generate, `collect`),
    with the experts its next-layer prediction guessed for each layer and step.

    The engine keeps the routing itself (`engine.trace`, reset by `reset_stats`); the guesses are read as
    the engine hands them to its read-ahead (only in exact mode, decoding, below full capacity).
    """

    engine: Any
    source: str = ""
    steps: list[list[np.ndarray]] = field(init=False)
    guesses: list[list[np.ndarray]] = field(init=False)
    segments: list[int] = field(default_factory=lambda: [0])
    tokens: int = 0
    _pending: list[dict[int, np.ndarray]] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.engine.layout.moe_layers)
        self.steps = [[] for _ in range(n)]
        self.guesses = [[] for _ in range(n)]
        self._pending = [{} for _ in range(n)]
        experts = self.engine.experts
        if not experts.record_trace:
            raise ValueError("the engine was loaded with record_trace=False: it keeps no routing to record")
        # The engine hands each next-layer prediction (ids best first) to its `_prefetch_into`, during the
        # step of the layer before the one predicted: that layer's trace entry for the step comes next.
        prefetch = getattr(experts, "_prefetch_into", None)
        self._guessing = prefetch is not None
        if prefetch is not None:
            def record_and_prefetch(target, guess, _prefetch=prefetch):
                i = target.block.index
                ranked = list(dict.fromkeys(int(e) for e in np.asarray(guess).reshape(-1)))
                self._pending[i][len(experts.trace[i])] = np.array(ranked, dtype=np.int64)
                return _prefetch(target, guess)

            experts._prefetch_into = record_and_prefetch

    def begin(self) -> None:
        """Start a run: the engine's statistics and trace are reset (its cache contents stay)."""
        self.engine.reset_stats()
        self._pending = [{} for _ in self._pending]

    def collect(self, tokens: int | None = None) -> None:
        """Append the engine's trace since `begin` as one run. `tokens`: tokens routed in the run (default:
        from the engine's counters)."""
        snap = self.engine.snapshot()  # drains deferred routing records into the trace
        trace = self.engine.trace
        if self.engine.traced_steps > len(trace[0]):
            raise ValueError(f"the run routed {self.engine.traced_steps} steps but the engine keeps only the "
                             f"last {len(trace[0])}: record shorter runs")
        for i, layer in enumerate(trace):
            self.steps[i].extend(np.asarray(s, dtype=np.int64) for s in layer)
            pending = self._pending[i]
            self.guesses[i].extend(pending.get(t, np.zeros(0, dtype=np.int64)) for t in range(len(layer)))
            pending.clear()
        self.segments.append(len(self.steps[0]))
        top_k = max(self.engine.layout.top_k, 1)
        self.tokens += tokens if tokens is not None else int(snap.requests[0].sum()) // top_k

    def close(self) -> None:
        """Stop reading the engine's guesses (the engine is left as it was)."""
        if self._guessing:
            self.engine.experts.__dict__.pop("_prefetch_into", None)
            self._guessing = False

    def trace(self) -> Trace:
        layout = self.engine.layout
        recorded = any(len(g) for layer in self.guesses for g in layer)
        return Trace(model=self.engine.name, num_experts=layout.num_experts, top_k=layout.top_k,
                     layer_ids=tuple(layout.moe_layers), steps=[list(s) for s in self.steps], tokens=self.tokens,
                     segments=tuple(self.segments), guesses=[list(g) for g in self.guesses] if recorded else None,
                     model_type=layout.model_type, mode=self.engine.mode, capacity=self.engine.capacity,
                     source=self.source).validate()
