"""The expert side of a loaded model: per-layer slots filled from disk on demand, the policies that
evict, the forward hooks the swapped expert projections call, and the counters and trace behind every
snapshot. Nothing here knows about prompts or tokens."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import packed as packs
from .budget import SlotBudget
from .cache import POLICIES, LayerCache, LayerCounters
from .errors import ModelLoadError
from .experts import ExpertReader, ParamSource, SlotWrites, locate, resized_rows, slot_views
from .moe import (
    ExpertLayerRuntime,
    MoEBlock,
    expert_param_names,
    find_moe_blocks,
    install,
    is_quantized,
    probe_block,
)
from .plan import MEMORY_FRACTION, TOP_K_KEYS
from .safetensors_io import RangeReader, TensorInfo
from .telemetry import CacheSnapshot, IOStats, MemorySample, available_memory

MODES = ("exact",)
FAST_REMOVED = ("fast mode was removed: with reads ahead, exact mode (outputs equal to stock mlx-lm) was faster "
                "at every capacity measured (docs/performance.md)")
PREFETCH_MIN_PRECISION = 0.4  # read a guess rank ahead only while this share of its guesses is needed
PREFETCH_MEMORY = 0.95  # per guess scored: the weight of earlier guesses in a rank's recent precision
PREFETCH_WARMUP = 4.0  # guesses of a rank scored before its precision decides (until then: read)
DRAIN_EVERY = 16  # steps between host-side stats updates when no step needs them sooner
LOAD_CHUNK_BYTES = 4 << 20  # read buffer per parameter while loading experts
TRACE_STEPS = 1 << 14  # routing steps kept per layer for replays; older ones drop off (memory stays bounded)
PREFILL_OVERLAP = True  # expert-major prefill reads the next group while MLX computes this one (_forward_exact)
SPLIT_READY = True  # a decoding token's resident experts are computed while its others are read (_start_ready)


@dataclass(frozen=True)
class ModelLayout:
    """Shape facts about a loaded model, known before any expert is read."""

    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_bytes: int  # one expert of one layer, all projections, as held in the cache
    dense_bytes: int  # everything but the experts
    quantized: bool
    normalizes_topk: bool  # the model renormalizes its top-k routing weights

    @property
    def all_experts_bytes(self) -> int:
        return self.expert_bytes * self.num_experts * len(self.moe_layers)


@dataclass
class _Layer:
    """Cache state of one MoE layer (inference thread only)."""

    block: MoEBlock
    runtime: ExpertLayerRuntime
    cache: LayerCache
    sources: list[ParamSource]
    slot_dtypes: dict[tuple[str, str], mx.Dtype]
    identity: bool = False  # every expert resident in the slot of its own id: no lookup needed
    pending: list[tuple[int, mx.array]] = field(default_factory=list)  # (step, expert ids) not yet counted
    views: dict[tuple[str, str], np.ndarray] | None = None  # numpy views of the slots: direct writes
    packed: packs.PackedLayer | None = None  # this layer's expert records (`moe pack`): a miss is one read
    last_out: mx.array | None = None  # the latest output computed from the slots (maybe still lazy)
    inflight: tuple[SlotWrites, list[tuple[int, int, int]]] | None = None  # prefetch writes, placements
    guess: np.ndarray | None = None  # experts predicted for this layer's next call
    guess_missing: list[tuple[int, int]] | None = None  # (rank, expert) of the guesses not resident then
    ranked: list[int] | None = None  # every expert guessed for this layer's next call, best first
    # Per guess rank (0 = the router's top choice): recent (needed, guessed while not resident), decayed.
    rank_record: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


class ExpertCache:
    """Swaps a stock model's expert projections for bounded slots and keeps them filled.

    Inference thread only (MLX streams are per thread). `Engine` composes it with the generation side.
    """

    def __init__(self, model: Any, config: dict, tensors: dict[str, TensorInfo], name: str,
                 capacity: int | float | None, mode: str, policy: str, record_trace: bool,
                 prefetch: bool | None = None, direct_writes: bool = True, uncached_reads: bool | None = None,
                 reserve_bytes: int = 0, slot_budget: bool = False, pack: str | Path | bool | None = None) -> None:
        _check_mode(mode)
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.model = model
        self.config = config
        self.name = name  # the model as the user named it (snapshots, messages)
        self.reader = RangeReader()
        self.expert_reader = ExpertReader(self.reader)
        self._mode = mode
        self.record_trace = record_trace
        # Exact decode: read the next layer's predicted experts while this one computes. None: only while that
        # makes decoding faster here (timed, see ReadAheadSwitch; made again below, once the reads' kind is known).
        self.prefetch = prefetch
        self.read_ahead: ReadAheadSwitch | None = None
        self.slot_budget = slot_budget  # slots move between layers while reading ahead (SlotBudget); off by default
        self.direct_writes = direct_writes  # read into the slots' memory where the backend allows it
        self.reserve_bytes = reserve_bytes  # memory kept out of the budget (the KV cache of the context)
        try:
            self._attach(tensors, capacity, policy)
            if uncached_reads is None:
                # Bypass the page cache when it could not hold the experts beside the expert cache anyway:
                # then cached pages only double the memory and the kernel's reclaim work.
                uncached_reads = self.expert_disk_bytes() > available_memory()
            self.reader.uncached = uncached_reads
            self.read_ahead = self._new_switch()
            self._open_pack(pack)
        except BaseException:
            self.reader.close()
            raise

    def _open_pack(self, pack: str | Path | bool | None) -> None:
        """Read misses from the model's expert records (`moe pack`, `inference/packed.py`) where they are there
        and up to date: `pack` None looks in the default place, True insists on it, a path names the folder,
        False never uses them."""
        self.pack: Path | None = None  # the records in use
        self.pack_note = ""  # why records that are there are not used (the checkpoint changed since, ...)
        if pack is False or not self._layers:
            return
        sources = [layer.sources for layer in self._layers]
        directory = packs.default_pack_dir(packs.model_dir_of(sources)) if pack in (None, True) else Path(pack)
        packed, why = packs.open_pack(directory, sources, self.layout.num_experts, self.reader)
        if packed is None:
            if pack is not None:
                raise ModelLoadError(why)
            if (directory / packs.MANIFEST).exists():
                self.pack_note = why
            return
        for layer, records in zip(self._layers, packed, strict=True):
            layer.packed = records
        self.pack = directory

    def _attach(self, tensors, capacity, policy) -> None:
        blocks = find_moe_blocks(self.model)
        shapes = {k: tuple(v.shape) for k, v in tree_flatten(self.model.parameters())}
        dtypes = {k: v.dtype for k, v in tree_flatten(self.model.parameters())}
        num_experts = blocks[0].num_experts if blocks else 0
        layer_params = [expert_param_names(b) for b in blocks]
        sources = [locate(b, p, shapes, tensors, num_experts) for b, p in zip(blocks, layer_params, strict=False)]
        runtimes = [ExpertLayerRuntime(b) for b in blocks]  # reads projection shapes: before the swap
        # Drop the lazy full expert tensors before anything is evaluated: they are never read.
        for block, params in zip(blocks, layer_params, strict=False):
            for proj, names in params.items():
                for name in names:
                    block.projections[proj][name] = mx.zeros((1, 1), dtype=mx.float32)
        needs_f32 = mx.default_device() == mx.cpu  # CPU gather_mm runs only in float32
        half = (mx.bfloat16, mx.float16)
        expert_dtypes = {dtypes[f"{b.path}.{s.projection}.{s.param}"]
                         for b, src in zip(blocks, sources, strict=True) for s in src}
        if needs_f32 and blocks and expert_dtypes & set(half):
            # As stock mlx-lm needs here (model.set_dtype(float32)): upcast while loading, so outputs match it.
            # Quantized experts too: their bf16/f16 scales and biases run many times slower on the CPU.
            self.model.set_dtype(mx.float32, lambda d: d in half)
        mx.eval(self.model.parameters())
        expert_keys = {f"{b.path}.{proj}.{name}" for b, params in zip(blocks, layer_params, strict=False)
                       for proj, names in params.items() for name in names}
        self._dense_bytes = sum(v.nbytes for k, v in tree_flatten(self.model.parameters()) if k not in expert_keys)
        self._layers: list[_Layer] = []
        normalizes = False
        top_k = int(next((self.config[k] for k in TOP_K_KEYS if isinstance(self.config.get(k), int)), 0))
        for block, src, runtime in zip(blocks, sources, runtimes, strict=False):
            install(block, runtime)
            slot_dtypes = {}
            for s in src:
                dt = dtypes[f"{block.path}.{s.projection}.{s.param}"]
                if needs_f32 and dt in half:
                    dt = mx.float32
                slot_dtypes[(s.projection, s.param)] = dt
            probe = probe_block(runtime, runtime.output_dims, self._dense_dtype())
            if probe is not None:
                runtime.top_k = probe.top_k
                top_k = top_k or probe.top_k
                normalizes = normalizes or probe.normalizes
            self._layers.append(_Layer(block, runtime, LayerCache(num_experts, num_experts, policy), src,
                                       slot_dtypes))
        first = self._layers[0] if self._layers else None
        expert_bytes = sum(int(np.prod(s.expert_shape)) * first.slot_dtypes[(s.projection, s.param)].size
                           for s in first.sources) if first else 0
        self.layout = ModelLayout(
            model_type=self.config.get("model_type", "?"),
            num_layers=int(self.config.get("num_hidden_layers", len(blocks))),
            moe_layers=tuple(b.layer for b in blocks),
            num_experts=num_experts,
            top_k=top_k,
            expert_bytes=expert_bytes,
            dense_bytes=self._dense_bytes,
            quantized=any(is_quantized(b) for b in blocks),
            normalizes_topk=normalizes,
        )
        self.counters = LayerCounters(len(blocks), max(num_experts, 1))
        self.trace: list[deque[np.ndarray]] = [deque(maxlen=TRACE_STEPS) for _ in blocks]
        self.trace_resident = [ResidencyLog(num_experts) for _ in blocks]  # the cache as each traced step began
        self.traced_steps = 0  # every step ever traced, including those dropped from the ring
        self._step = 0
        self._decoding = False
        # The first layer's input is the token itself, so no layer before it can guess its experts: they are
        # guessed from the token's own last routing there (`token_routes[token]`, sorted ids, -1: not seen).
        self.token_routes = np.full((0, top_k), -1, dtype=np.int32)
        self._tokens: deque[int | mx.array] = deque()  # ids of the tokens the next forward passes read, in order
        self._step_tokens: list[int | mx.array] = []  # those of the step under way
        self.stop_tokens: frozenset[int] = frozenset()  # ids that end the generation under way (expect_tokens)
        self._stopped = False  # the token sampled last is one of them: the one sampled after it is never read
        self._policy = policy
        self._capacity = 0
        self.budget: SlotBudget | None = None  # one slot budget shared by the layers (while reading ahead)
        if blocks:
            self.set_capacity(capacity)
        for layer in self._layers:
            layer.runtime.handler = self._forward

    def _dense_dtype(self) -> mx.Dtype:
        for _, v in tree_flatten(self.model.parameters()):
            if mx.issubdtype(v.dtype, mx.floating):
                return v.dtype
        return mx.float32

    # ------------------------------------------------------------------ capacity, mode, policy

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def capacities(self) -> tuple[int, ...]:
        """Slots per MoE layer: `capacity` each, unless the shared slot budget moved some."""
        return tuple(layer.cache.capacity for layer in self._layers)

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def policy(self) -> str:
        return self._policy

    def memory_budget(self, share: float = MEMORY_FRACTION) -> int:
        """Bytes the expert cache may take: `share` of available RAM (and of Metal's working set), less the
        memory reserved for the KV cache. An automatic capacity takes the default share, leaving room for
        activations and the page cache; a capacity the user names may take all of it."""
        available = available_memory() + self._capacity * self.layout.expert_bytes * len(self._layers)
        budget = int(available * share) - self.reserve_bytes
        if mx.metal.is_available():
            info = mx.device_info()
            limit = info.get("max_recommended_working_set_size")
            if limit:
                budget = min(budget, int(limit * 0.9) - self._dense_bytes)
        return max(budget, 0)

    def _resolve_capacity(self, capacity: int | float | None) -> int:
        E, K = self.layout.num_experts, self.layout.top_k
        per_slot = self.layout.expert_bytes * len(self._layers)
        budget = self.memory_budget()
        if capacity is None:
            fit = budget // max(per_slot, 1)
            if fit < K:
                kept = (f", after {self.reserve_bytes / 2**30:.2f} GiB kept for the KV cache" if self.reserve_bytes
                        else "")
                raise ModelLoadError(
                    f"{self.name}: even {K} experts per layer ({K * per_slot / 2**30:.2f} GiB) do not fit "
                    f"in the memory available for the expert cache ({budget / 2**30:.2f} GiB{kept}); free memory, "
                    "use a shorter context or a quantized model (`moe plan` shows the numbers)"
                )
            return int(min(E, fit))
        if isinstance(capacity, float):
            if not 0.0 < capacity <= 1.0:
                raise ValueError(f"capacity fraction {capacity} must be in (0, 1]")
            capacity = max(1, round(capacity * E))
        capacity = int(capacity)
        if capacity < K:
            raise ValueError(f"capacity {capacity} is below top_k={K}: each token needs {K} experts per layer")
        if capacity > E:
            raise ValueError(f"capacity {capacity} exceeds the model's {E} experts per layer")
        budget = self.memory_budget(share=1.0)
        if capacity * per_slot > budget:
            raise ModelLoadError(
                f"capacity {capacity} needs {capacity * per_slot / 2**30:.2f} GiB of expert cache but only "
                f"{budget / 2**30:.2f} GiB is available; use capacity <= {max(K, budget // max(per_slot, 1))}"
            )
        return capacity

    def set_capacity(self, capacity: int | float | None) -> None:
        """Rebuild every layer's slots at a new size, keeping the highest-priority resident experts."""
        new = self._resolve_capacity(capacity)
        for layer in self._layers:  # reads ahead in flight finish (or fail) before anything changes
            self._await(layer)
        self.drain()
        self._decoding = False
        for layer in self._layers:
            old_cache = layer.cache
            resident = [int(e) for e in old_cache.resident()]
            prio = old_cache.priority(np.array(resident, dtype=np.int64), self._step) if resident else []
            by_priority = [e for _, e in sorted(zip(prio, resident, strict=False), key=lambda t: (-t[0], t[1]))]
            pins = [e for e in by_priority if e in old_cache.pinned][: max(new - self.layout.top_k, 0)]
            keep = pins + [e for e in by_priority if e not in pins][: new - len(pins)]
            cache = LayerCache(old_cache.num_experts, new, self._policy)
            cache.copy_policy_state(old_cache)
            cache.pinned = set(pins)
            layer.cache = cache
            slots = {(s.projection, s.param): mx.zeros((new, *s.expert_shape), dtype=layer.slot_dtypes[
                (s.projection, s.param)]) for s in layer.sources}
            for (proj, param), array in slots.items():
                layer.block.projections[proj][param] = array
            layer.views = slot_views(slots, layer.sources) if self.direct_writes else None
            layer.last_out = None
            layer.guess = None
            self._load(layer, cache.admit(sorted(keep), set(keep), self._step), count=False)
            self._sync_identity(layer)
        self._capacity = new
        self._restart_budget()
        self.read_ahead = self._new_switch()  # step times at the old capacity say nothing of the new one
        if new == self.layout.num_experts:
            # Room for every expert: load them all now (as stock mlx-lm would), so no step ever waits on a
            # miss and the forward pass runs with no host sync at all.
            self.warm()
        mx.eval(self.model.parameters())
        mx.clear_cache()

    def set_mode(self, mode: str) -> None:
        _check_mode(mode)

    def set_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self._policy = policy
        for layer in self._layers:
            layer.cache.policy = policy
        self._restart_budget()

    # ------------------------------------------------------------------ expert loading

    def _sync_identity(self, layer: _Layer) -> None:
        """After any change of residency: whether every expert now sits in the slot of its own id (then the
        stock call runs with the routing as is, no host sync)."""
        slot_of = layer.cache.slot_of
        layer.identity = bool(np.array_equal(slot_of, np.arange(len(slot_of))))

    def _load(self, layer: _Layer, placements: list[tuple[int, int, int]], count: bool = True) -> bool:
        """Read the placed experts from disk and write them into their slots; False when there were none."""
        if not placements:
            return False
        self._await(layer)
        started = time.perf_counter()
        placements = sorted(placements)  # ascending expert ids: adjacent experts are read in one call
        bytes_before = self.reader.bytes_read
        try:
            if layer.views is not None:
                self._settle(layer)
                # Its own byte count: reads ahead for another layer may be in flight on the same reader.
                nbytes = self.expert_reader.write_slots(layer.sources, placements, layer.views,
                                                         packed=layer.packed).nbytes
            else:
                self._load_through_mlx(layer, placements)
                nbytes = self.reader.bytes_read - bytes_before
        except BaseException:
            self._unmark(layer, placements)
            raise
        self._count_loads(layer, placements, nbytes, count)
        self._count_stall(layer, time.perf_counter() - started)
        self.counters.read_seconds += time.perf_counter() - started
        return True

    def _count_stall(self, layer: _Layer, seconds: float) -> None:
        self.counters.load_seconds[layer.block.index] += seconds
        if self._decoding:
            self.counters.decode_stall_seconds += seconds

    def _load_through_mlx(self, layer: _Layer, placements: list[tuple[int, int, int]]) -> None:
        """Where the slots' memory cannot be written directly: MLX arrays per expert, set into the slots."""
        # Bounded read buffers: at most LOAD_CHUNK_BYTES of one parameter is held outside the cache.
        per_chunk = max(1, LOAD_CHUNK_BYTES // max(s.expert_nbytes for s in layer.sources))
        for start in range(0, len(placements), per_chunk):
            chunk = placements[start : start + per_chunk]
            reads = self.expert_reader.read(layer.sources, [e for e, _, _ in chunk], layer.slot_dtypes)
            targets = []
            for (proj, param), values in reads:
                target = layer.block.projections[proj][param]
                for (_, slot, _), value in zip(chunk, values, strict=False):
                    target[slot] = value  # integer-index updates run in place; a scatter copies the tensor
                targets.append(target)
            mx.eval(targets)  # one evaluation for the chunk's slots of every parameter

    def _unmark(self, layer: _Layer, placements: list[tuple[int, int, int]]) -> None:
        """A slot whose read failed may hold part of another expert: none of them counts as resident."""
        for expert, slot, _ in placements:
            layer.cache.slot_of[expert] = -1
            layer.cache.expert_in_slot[slot] = -1
        self._sync_identity(layer)

    def _count_loads(self, layer: _Layer, placements: list[tuple[int, int, int]], nbytes: int, count: bool,
                     prefetched: bool = False) -> None:
        i = layer.block.index
        c = self.counters
        if count:
            experts = [e for e, _, _ in placements]
            c.loads[i, experts] += 1
            evicted = [old for _, _, old in placements if old >= 0]
            if evicted:
                c.evictions[i, evicted] += 1
                wasted = [e for e in evicted if layer.cache.prefetched[e]]
                c.prefetch_wasted[i, wasted] += 1
                layer.cache.prefetched[evicted] = False
            if prefetched:
                c.prefetches[i, experts] += 1
                c.prefetch_bytes[i] += nbytes
        c.bytes_read[i] += nbytes
        if self._decoding:
            c.decode_bytes += nbytes

    def _settle(self, layer: _Layer) -> None:
        """Finish any computation still reading the layer's slots before their memory is overwritten (a
        functional MLX update would not need this; a direct write does)."""
        if layer.last_out is not None:
            mx.eval(layer.last_out)
            layer.last_out = None

    def _await(self, layer: _Layer) -> None:
        """Wait for the layer's prefetch writes; the wait is time the forward pass stalls on reads."""
        if layer.inflight is None:
            return
        writes, placements = layer.inflight
        layer.inflight = None
        started = time.perf_counter()
        try:
            writes.wait()
        except BaseException:
            layer.cache.prefetched[[e for e, _, _ in placements]] = False
            self._unmark(layer, placements)
            raise
        self._count_stall(layer, time.perf_counter() - started)
        self.counters.read_seconds += writes.seconds
        self._count_loads(layer, placements, writes.nbytes, count=True, prefetched=True)
        layer.cache.prefetched[[e for e, _, _ in placements]] = True

    def warm(self, experts: Sequence[Sequence[int]] | None = None, batch: int | None = None) -> None:
        """Load experts ahead of use: per layer the given ids (default: as many as fit, lowest ids first),
        `batch` experts per read (default: all of a layer's at once, coalescing adjacent ones)."""
        for i, layer in enumerate(self._layers):
            self._await(layer)
            wanted = list(experts[i]) if experts is not None else list(range(layer.cache.capacity))
            wanted = [e for e in wanted if layer.cache.slot_of[e] < 0][: layer.cache.capacity]
            step = batch or max(len(wanted), 1)
            for start in range(0, len(wanted), step):
                group = wanted[start : start + step]
                self._load(layer, layer.cache.admit(group, set(group), self._step))
            self._sync_identity(layer)
        mx.clear_cache()  # hand bulk-load read buffers back to the OS instead of MLX's buffer pool

    # ------------------------------------------------------------------ forward (called by swapped switches)

    def _forward(self, runtime: ExpertLayerRuntime, stock, x: mx.array, indices: mx.array) -> mx.array:
        layer = self._layers[runtime.block.index]
        if runtime.block.index == 0:
            self._step += 1
            self._decoding = indices.size == indices.shape[-1]  # one token this step
            self._step_tokens = self._take_tokens(indices.size // max(indices.shape[-1], 1))
            self.counters.decode_steps += self._decoding
            if self._budgeting():
                move = self.budget.decide(self._step, time.perf_counter())
                if move is not None:
                    self._move_slot(*move)
        # A full cache is always warmed with expert e in slot e (set_capacity), so every other cache has
        # room for fewer experts than the model has and can miss (a layer the slot budget grew to every
        # expert may come to hold each in its own slot too).
        if layer.identity:  # the stock call as is, no host sync; routing is counted later from `pending`
            if runtime.block.index == 0:
                self._step_tokens = []  # no routing on the host to learn from
            layer.pending.append((self._step, indices))
            if len(layer.pending) > 4 * DRAIN_EVERY:  # direct model calls with no stream draining them
                self.drain(before_step=self._step)
            return stock(x, indices)
        return self._forward_exact(layer, stock, x, indices)

    def _forward_exact(self, layer: _Layer, stock, x, indices) -> mx.array:
        """Load every missing expert before the layer computes (host sync on the routing)."""
        target = self._prefetch_target(layer, indices)
        if target is not None:
            guess = self._predict(target, x)
            mx.eval(indices, guess)  # one sync for the routing and the guess
            guess = np.array(guess).reshape(-1)
        inds = np.array(indices)  # MLX computes up to here while this layer's prefetch writes run: then wait
        if self._step_tokens and layer.block.index == 0:
            self._learn_tokens(inds)
        needed = np.unique(inds)
        watched = self._budgeting()
        ranked, layer.ranked = layer.ranked or (), None
        ready = int((layer.cache.slot_of[needed] >= 0).sum()) if watched else 0
        met = layer.cache.slot_of.copy()  # the residency this step met, for the counters
        cache = layer.cache
        pinned_needed = [int(e) for e in needed if int(e) in cache.pinned]
        others = [int(e) for e in needed if int(e) not in cache.pinned]
        room = cache.capacity - len(cache.pinned)  # >= top_k: pins are capped at capacity - top_k
        if len(others) <= room:
            early = self._start_ready(layer, stock, x, inds)
            self._await(layer)
            if self._load(layer, cache.access(needed, self._step)):
                self._sync_identity(layer)
            if early is None:
                out = stock(x, mx.array(cache.slot_of[inds]))
            else:  # the rest of the token's experts, then every expert's output back in routing order
                here, rest, first = early
                out = mx.concatenate([first, stock(x, mx.array(cache.slot_of[inds[..., rest]]))], axis=-2)
                out = mx.take(out, mx.array(np.argsort(here + rest)), axis=-2)
            layer.last_out = out
            mx.async_eval(out)  # MLX computes the layer while the host does its bookkeeping below
            if target is not None:  # read while MLX computes this layer and the next one's attention
                self._prefetch_into(target, guess)
            self._score_guess(layer, needed)
            self._account(layer, [self._step], inds.reshape(1, -1), met, deferred=False)
            if watched:  # the budget's shadow replays
                self.budget.observe(layer.block.index, self._step, needed, ranked, ready)
            return out
        # More distinct experts than free slots (long prefill): expert-major, a group of experts at a time,
        # each needed expert read once and each routed (token, expert) pair computed once. Those already
        # resident go first: computed where they are, before any load could evict them, and MLX starts on them
        # with nothing to wait for. Where slots are written directly, a group takes half the room: the next
        # group is read into the other half while MLX computes this one.
        self._await(layer)
        self._score_guess(layer, needed)
        self._account(layer, [self._step], inds.reshape(1, -1), met, deferred=False)
        cache.touch(pinned_needed, self._step)
        routed = inds.reshape(-1)
        token_of = np.repeat(np.arange(routed.size // inds.shape[-1]), inds.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        overlap = PREFILL_OVERLAP and layer.views is not None and room >= 2
        size = room // 2 if overlap else room
        others.sort(key=lambda e: cache.slot_of[e] < 0)  # resident first (a stable sort: ids ascending in each)
        groups = [others[start : start + size] for start in range(0, len(others), size)]
        groups[0] += pinned_needed
        by_expert = np.argsort(routed, kind="stable")  # the routed pairs of each expert, found by bisection
        first_pair = np.searchsorted(routed[by_expert], np.arange(self.layout.num_experts + 1))
        order, outputs = [], []
        for i, group in enumerate(groups):
            # Slots of a group still being computed are not overwritten: only the one before may still run.
            mx.eval(outputs[:-1] if overlap else outputs)
            self._load(layer, cache.access(group, self._step, keep=groups[i - 1] if overlap and i else ()))
            pairs = np.concatenate([by_expert[first_pair[e] : first_pair[e + 1]] for e in group])
            y = stock(rows[mx.array(token_of[pairs])], mx.array(cache.slot_of[routed[pairs]])[:, None])[:, 0]
            mx.async_eval(y)
            order.append(pairs)
            outputs.append(y)
        self._sync_identity(layer)
        out = mx.concatenate(outputs)[mx.array(np.argsort(np.concatenate(order)))]
        layer.last_out = out  # computed before any later load overwrites these slots (_settle)
        return out.reshape(*inds.shape, out.shape[-1])

    def _start_ready(self, layer: _Layer, stock, x, inds: np.ndarray):
        """One token whose experts are not all resident: MLX starts on those that are (not being read ahead
        either) while the rest are read, where that takes a while (not a small copy from the page cache: on
        the demo model, splitting those made decoding 0.91x). Returns (their routing positions, the others',
        their output) or None when there is nothing to split. Exact: each routed expert's output is its own
        computation (mlx-lm's switch computes a token's experts independently below 64 routings); only their
        order changes, and is put back."""
        # Only where loads write the slots' memory directly: an MLX update of a slot tensor that a pending
        # computation still reads would copy the whole tensor.
        if not SPLIT_READY or layer.views is None or inds.size != inds.shape[-1] or inds.size >= 64:
            return None
        slot_of = layer.cache.slot_of
        busy = {e for e, _, _ in layer.inflight[1]} if layer.inflight is not None else set()
        row = inds.reshape(-1).tolist()  # a few ids: plain Python is quicker than numpy's set operations
        here = [i for i, e in enumerate(row) if slot_of[e] >= 0 and e not in busy]
        if not here or len(here) == len(row):
            return None
        # Worth its extra MLX work only while the rest takes a while: read ahead, or read on the reader threads.
        missing = {e for e in row if slot_of[e] < 0}
        if not busy.intersection(row) and self.expert_reader.may_copy_inline(
                len(missing) * sum(s.expert_nbytes for s in layer.sources)):
            return None
        rest = [i for i in range(len(row)) if i not in here]
        first = stock(x, mx.array(slot_of[inds[..., here]]))
        mx.async_eval(first)  # no slot it reads is written below: loads evict only experts this step does not need
        return here, rest, first

    # ------------------------------------------------------------------ one slot budget for all layers

    def _budgeting(self) -> bool:
        """Whether SlotBudget follows this step: decoding, reading ahead, a cache that can miss."""
        return self.budget is not None and self._decoding and self.reading_ahead

    def _uneven(self) -> bool:
        """Whether the slot budget has moved slots: the layers' capacities differ from the set one."""
        return any(c != self._capacity for c in self.capacities)

    def _new_switch(self) -> ReadAheadSwitch | None:
        """The automatic setting's switch (None when reads ahead were set on or off). Where reads bypass the page
        cache (the experts do not fit in memory), every miss waits for the disk, which reads ahead hide: they
        start on, and both settings are timed after HOLD steps. Timed from a reply's first step, about half of
        its first 38 steps ran without them; on this project's 2-core machine they were 1.13-1.22x faster than
        none, about even since the split (docs/performance.md)."""
        if self.prefetch is not None:
            return None
        return ReadAheadSwitch(start_on=self.reader.uncached)

    def _restart_budget(self) -> None:
        """Every layer at the same capacity again (set_capacity), or its caches changed wholesale."""
        several = self.slot_budget and len(self._layers) > 1 and 0 < self._capacity < self.layout.num_experts
        self.budget = SlotBudget([layer.cache for layer in self._layers], self.layout.top_k, self._step) if several \
            else None

    def _move_slot(self, giver: int, taker: int) -> None:
        """One expert slot from layer `giver` to layer `taker` (SlotBudget's call, between decoding steps):
        their slot tensors are made again, one row shorter and one row longer (computations still holding the
        old tensors keep them); the giver's last row moves into the slot it gave up."""
        started = time.perf_counter()
        self.drain()  # routing a layer recorded to count later met the residency before the move
        g, t = self._layers[giver], self._layers[taker]
        self._await(g)
        self._await(t)  # no read may still be writing into the old tensors through their views
        prefetched = g.cache.prefetched.copy()
        evicted, freed = g.cache.shrink(self._step)
        if evicted >= 0:
            self.counters.evictions[giver, evicted] += 1
            self.counters.prefetch_wasted[giver, evicted] += int(prefetched[evicted])
        t.cache.grow()
        last_into = freed if freed < g.cache.capacity else None
        for layer, into in ((g, last_into), (t, None)):
            layer.last_out = layer.views = None  # (numpy views keep the old tensors' memory alive)
            slots = {}
            for s in layer.sources:  # one tensor at a time: a move needs memory for one more, not a layer's
                params = layer.block.projections[s.projection]
                slots[(s.projection, s.param)] = params[s.param] = resized_rows(params[s.param],
                                                                                layer.cache.capacity, into)
                mx.clear_cache()  # the old tensor's memory back to the OS now, not kept in MLX's buffer cache
            layer.views = slot_views(slots, layer.sources) if self.direct_writes else None
            self._sync_identity(layer)
        self.budget.moved(self._step, giver, taker, time.perf_counter() - started, time.perf_counter())

    # ------------------------------------------------------------------ prediction and prefetch

    def _prefetch_target(self, layer: _Layer, indices: mx.array) -> _Layer | None:
        """The layer whose experts to predict and read now: the next one while decoding one token at a time
        with a cache that can miss; else None."""
        if not self.reading_ahead or indices.size != indices.shape[-1] or self._capacity >= self.layout.num_experts:
            return None
        # The next layer only: the last layer's input does not predict the next token's first layer (its
        # input is that token's embedding), and guesses there only evict useful experts.
        if layer.block.index + 1 >= len(self._layers):
            return None
        target = self._layers[layer.block.index + 1]
        if target.views is None or target.block.router is None or not self.prefetch_guesses(target):
            return None
        return target

    @property
    def reading_ahead(self) -> bool:
        return self.read_ahead.active if self.read_ahead is not None else bool(self.prefetch)

    def prefetch_guesses(self, layer: _Layer) -> int:
        """Experts to guess per layer, best first: up to 2 x top_k, fewer where the cache has little room
        beyond one token's. Which ranks are read is decided by their measured precision."""
        room = layer.cache.capacity - len(layer.cache.pinned) - self.layout.top_k
        return max(0, min(2 * self.layout.top_k, room))

    def _predict(self, target: _Layer, x: mx.array) -> mx.array:
        """Expert ids `target`'s router ranks highest for this layer's input `x` (lazy), best first: its
        routing, one layer early. Only decides what to read early, never what is computed."""
        out = target.block.router(x)
        arrays = out if isinstance(out, tuple) else (out,)
        E = self.layout.num_experts
        g = min(self.prefetch_guesses(target) + 1, 2 * self.layout.top_k)  # one more for SlotBudget's larger shadow
        scores = next((a for a in arrays if isinstance(a, mx.array) and a.shape[-1] == E
                       and mx.issubdtype(a.dtype, mx.floating)), None)
        if scores is not None:
            return mx.argsort(-scores.astype(mx.float32), axis=-1)[..., :g]
        ids = next(a for a in arrays if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.integer))
        return ids[..., :g]

    def _prefetch_into(self, target: _Layer, guess: np.ndarray) -> None:
        """Start reading the guessed experts that are not resident into `target`'s slots (background), those
        of ranks whose recent guesses were needed often enough."""
        cache = target.cache
        target.ranked = list(dict.fromkeys(int(e) for e in guess))
        ranked = target.ranked[: self.prefetch_guesses(target)]
        target.guess = np.array(sorted(ranked[: self.layout.top_k]))  # the predictor's own precision/recall
        target.guess_missing = [(r, e) for r, e in enumerate(ranked) if cache.slot_of[e] < 0]
        if len(target.rank_record) < len(ranked):
            target.rank_record = np.vstack([target.rank_record, np.zeros((len(ranked) - len(target.rank_record), 2))])
        used, scored = target.rank_record[:, 0], target.rank_record[:, 1]
        worth = (scored < PREFETCH_WARMUP) | (used >= PREFETCH_MIN_PRECISION * scored)
        guessed = set(ranked)
        evictable = sum(1 for e in cache.expert_in_slot if e < 0 or (e not in guessed and e not in cache.pinned))
        missing = [e for r, e in target.guess_missing if worth[r]][:evictable]
        if not missing or target.inflight is not None:
            return
        self._settle(target)
        placements = cache.admit(missing, guessed, self._step)
        target.inflight = (self.expert_reader.write_slots(target.sources, placements, target.views, wait=False,
                                                          packed=target.packed),
                           placements)

    # ------------------------------------------------------------------ the first layer, guessed from the token

    def expect_tokens(self, tokens: Sequence[int], stop: Iterable[int] = ()) -> None:
        """The ids of the tokens the next forward passes read, in order (a prompt about to be prefilled). The
        first layer's routing of each is kept against its id, to guess that layer's experts when it comes back.
        `stop`: the ids that end this generation (mlx-lm reads one and samples once more, then stops)."""
        self._tokens = deque(int(t) for t in tokens)
        self._step_tokens = []
        self.stop_tokens = frozenset(int(t) for t in stop)
        self._stopped = False

    def sampled(self, token: mx.array) -> None:
        """The generation loop sampled `token` (lazy, one id): the next forward pass's input. While reading ahead,
        the first layer's experts for it are read now, guessed from its last routing there: no layer before
        can guess them, and the reads have until that layer's routing is known (the embedding and the first
        attention). Otherwise the id is read after that routing, with no sync of its own."""
        if token.size != 1:  # a batch: not what the engine generates
            self.ended()
            return
        first = self._layers[0] if self._layers else None
        if first is None or not (self.reading_ahead and first.cache.capacity < self.layout.num_experts
                                 and first.views is not None and self.prefetch_guesses(first)):
            self._tokens.append(token)
            self._stopped = False  # not known without a sync
            return
        t = _token_id(token)  # the step's result is needed now: its last layers finish first
        self._tokens.append(t)
        after_stop, self._stopped = self._stopped, t in self.stop_tokens
        if not after_stop and t < len(self.token_routes) and self.token_routes[t, 0] >= 0:
            self._prefetch_into(first, self.token_routes[t])

    def ended(self) -> None:
        """A generation ended: tokens sampled but never read by a forward pass are forgotten, with the first
        layer's guesses for the last one (mlx-lm samples one token more than it reads); their reads finish
        now, so none is left writing while nothing waits for it."""
        self._tokens.clear()
        self._step_tokens = []
        self._stopped = False
        if not self._layers:
            return
        first = self._layers[0]
        first.guess = first.guess_missing = first.ranked = None
        self._decoding = False  # no forward pass waits on these reads: not a stall
        try:
            self._await(first)
        except Exception:  # noqa: BLE001 - its experts were unmarked; a read when one is needed reports it
            pass

    def _take_tokens(self, count: int) -> list[int | mx.array]:
        """The ids of the `count` tokens this forward pass reads; none when they were not announced (a direct
        model call), and then nothing announced before is trusted to line up any more."""
        if len(self._tokens) < count:
            self._tokens.clear()
            return []
        return [self._tokens.popleft() for _ in range(count)]

    def _learn_tokens(self, inds: np.ndarray) -> None:
        """Keep the first layer's routing of this step's tokens (`inds`: their expert ids, as routed)."""
        tokens = [_token_id(t) for t in self._step_tokens]
        self._step_tokens = []
        rows = inds.reshape(-1, inds.shape[-1])
        if len(rows) != len(tokens) or rows.shape[1] != self.token_routes.shape[1]:
            return
        if max(tokens) >= len(self.token_routes):
            grown = np.full((max(max(tokens) + 1, 2 * len(self.token_routes)), rows.shape[1]), -1, dtype=np.int32)
            grown[: len(self.token_routes)] = self.token_routes
            self.token_routes = grown
        self.token_routes[tokens] = np.sort(rows, axis=1)

    def _score_guess(self, layer: _Layer, needed: np.ndarray) -> None:
        """Precision and recall of the layer's last prediction against what it really needed."""
        if layer.guess is None:
            return
        i = layer.block.index
        c = self.counters
        right = int(np.isin(layer.guess, needed).sum())
        c.guess_hits[i] += right
        c.guesses[i] += len(layer.guess)
        c.guess_needed[i] += len(needed)
        for rank, expert in layer.guess_missing or ():
            layer.rank_record[rank] = layer.rank_record[rank] * PREFETCH_MEMORY + (expert in needed, 1)
        layer.guess = layer.guess_missing = None

    # ------------------------------------------------------------------ stats

    def _account(self, layer: _Layer, steps: list[int], inds: np.ndarray, slot_of: np.ndarray,
                 deferred: bool) -> None:
        """Fold the routing of forward steps into the counters: `inds` is [steps, routings] expert ids and
        `slot_of` the residency they met. Deferred steps (a full cache's, counted after the fact) also
        update the policy state."""
        i = layer.block.index
        c = self.counters
        n, E = inds.shape[0], c.requests.shape[1]
        keys = (np.arange(n)[:, None] * E + inds).ravel()
        per_step = np.bincount(keys, minlength=n * E).reshape(n, E)
        routed = per_step.sum(0)
        c.requests[i] += routed
        c.recent[i] = c.recent[i] * c.recent_decay**n + (c.recent_decay ** np.arange(n - 1, -1, -1)) @ per_step
        used = per_step > 0
        resident = slot_of >= 0
        c.hits[i] += (used & resident).sum(0)
        ready = (used & resident).any(0) & layer.cache.prefetched
        if ready.any():
            c.prefetch_hits[i] += ready
            layer.cache.prefetched[ready] = False
        missed = used & ~resident
        c.misses[i] += missed.sum(0)
        c.last_missed[i] = missed[-1]
        if deferred:
            for step, row in zip(steps, used & resident, strict=True):
                layer.cache.touch(np.flatnonzero(row), step)
        if self.record_trace:
            dtype = np.int16 if E < 2**15 else np.int32
            self.trace[i].extend(np.flatnonzero(row).astype(dtype) for row in used)
            self.trace_resident[i].extend(resident, n)
            if i == 0:
                self.traced_steps += n

    def drain(self, before_step: int | None = None) -> None:
        """Fold deferred routing records (a full cache's steps) into the counters.

        `before_step` leaves records of that step and later alone: mlx-lm builds the next token's graph
        before yielding this one, and reading its routing now would stall the pipeline.
        """
        for layer in self._layers:
            if not layer.pending:
                continue
            if before_step is None:
                records, layer.pending = layer.pending, []
            else:
                records = [r for r in layer.pending if r[0] < before_step]
                layer.pending = [r for r in layer.pending if r[0] >= before_step]
            # Runs of records with one shape are converted and counted together.
            runs: list[list[tuple[int, mx.array]]] = []
            for record in records:
                if runs and runs[-1][0][1].shape == record[1].shape:
                    runs[-1].append(record)
                else:
                    runs.append([record])
            for run in runs:
                # np.array per record: these are already evaluated. An MLX op here (mx.stack) would queue
                # behind the step in flight and stall the pipeline.
                inds = np.stack([np.array(r[1]).reshape(-1) for r in run])
                self._account(layer, [r[0] for r in run], inds, layer.cache.slot_of, deferred=True)

    def after_step(self) -> None:
        """Between tokens: a full cache's routing records are counted every few steps; the automatic
        read-ahead switch times the step."""
        if self.read_ahead is not None and self._capacity < self.layout.num_experts:
            self.read_ahead.step(self._decoding)
        if self._step % DRAIN_EVERY == 0:
            self.drain(before_step=self._step)

    def reset_stats(self) -> None:
        self.drain()
        self.counters.reset()
        self.trace = [deque(maxlen=TRACE_STEPS) for _ in self._layers]
        self.trace_resident = [ResidencyLog(self.layout.num_experts) for _ in self._layers]
        self.traced_steps = 0
        mx.reset_peak_memory()

    def snapshot(self, speed: dict[str, float]) -> CacheSnapshot:
        """A frozen copy of the cache state and counters (cheap; safe to hand to another thread), with the
        generation speeds in `speed` (decode_tps, prefill_tps, ttft_s, tokens)."""
        self.drain()
        E = max(self.layout.num_experts, 1)
        n = len(self._layers)
        resident = np.zeros((n, E), dtype=bool)
        pinned = np.zeros((n, E), dtype=bool)
        for i, layer in enumerate(self._layers):
            resident[i] = layer.cache.slot_of >= 0
            pinned[i, list(layer.cache.pinned)] = True
        c = self.counters
        return CacheSnapshot.build(
            model=self.name, mode=self._mode, policy=self._policy, capacity=self._capacity,
            num_experts=self.layout.num_experts, top_k=self.layout.top_k, layer_ids=self.layout.moe_layers,
            resident=resident, pinned=pinned, just_missed=c.last_missed, requests=c.requests, hits=c.hits,
            misses=c.misses, fallbacks=c.fallbacks, loads=c.loads, evictions=c.evictions, recent=c.recent,
            bytes_read=int(c.bytes_read.sum()), load_seconds=float(c.load_seconds.sum()),
            memory=MemorySample.take(self.cache_bytes(), self.memory_budget()),
            decode_tps=speed["decode_tps"], prefill_tps=speed["prefill_tps"], ttft_s=speed["ttft_s"],
            tokens_generated=int(speed["tokens"]), steps=self._step,
            trace_length=len(self.trace[0]) if self.trace else 0,
            trace_start_warm=any(len(log.at(len(t))) for log, t in zip(self.trace_resident, self.trace, strict=True)
                                 if len(t)),
            io=IOStats(
                decode_steps=c.decode_steps, decode_stall_seconds=c.decode_stall_seconds,
                decode_bytes=c.decode_bytes, read_seconds=c.read_seconds,
                prefetches=int(c.prefetches.sum()), prefetch_hits=int(c.prefetch_hits.sum()),
                prefetch_wasted=int(c.prefetch_wasted.sum()), prefetch_bytes=int(c.prefetch_bytes.sum()),
                demand_hits=int(c.hits.sum() - c.prefetch_hits.sum()),
                guesses=tuple(c.guesses.tolist()), guess_hits=tuple(c.guess_hits.tolist()),
                guess_needed=tuple(c.guess_needed.tolist()), prefetch=self.reading_ahead,
                prefetch_auto=self.read_ahead is not None,
                step_seconds_with=self.read_ahead.with_seconds if self.read_ahead else 0.0,
                step_seconds_without=self.read_ahead.without_seconds if self.read_ahead else 0.0,
                uncached_reads=self.reader.uncached,
            ),
            capacities=self.capacities if self._uneven() else (),
        )

    def load_notes(self) -> list[tuple[str, str]]:
        """(text, severity) for the user once the model is loaded: expert records there but not used, or, for a
        model read from the disk (bigger than memory) whose misses are several small reads, that `moe pack`
        would make each one read. A model that fits in memory gets neither: its reads are memory copies."""
        if self.pack_note:
            return [(f"expert records not used: {self.pack_note}", "warning")]
        sources = [layer.sources for layer in self._layers]
        if (self.pack is None and self.reader.uncached and self._capacity < self.layout.num_experts
                and packs.records_help(sources)):
            return [(f"each expert read from disk takes {len(sources[0])} reads, the smallest "
                     f"{packs.smallest_read(sources) / 2**10:.0f} KiB: `moe pack {packs.model_dir_of(sources)}` "
                     "makes it one (faster misses)", "information")]
        return []

    def expert_disk_bytes(self) -> int:
        """Bytes of every expert of every layer in the checkpoint files."""
        return sum(src.expert_nbytes for layer in self._layers for src in layer.sources) * self.layout.num_experts

    def cache_bytes(self) -> int:
        return self._capacity * self.layout.expert_bytes * len(self._layers)

    # ------------------------------------------------------------------ profiles and traces

    def apply_profile(self, profile: str | Path | dict, pin: bool = True) -> None:
        """Fill each layer's cache with the profile's most-used experts and (with `pin`) pin its universal ones."""
        from .profiles import load_profile, warm_plan

        data = load_profile(profile) if not isinstance(profile, dict) else profile
        plan = warm_plan(data, self.layout, self._capacity)
        if self._uneven():
            self.set_capacity(self._capacity)  # the plan is per layer at the same capacity: the budget's moves undone
        for layer, (warm, pins) in zip(self._layers, plan, strict=False):
            self._await(layer)
            layer.cache.pinned = set()
            missing = [e for e in warm if layer.cache.slot_of[e] < 0]
            self._load(layer, layer.cache.admit(missing, set(warm), self._step), count=False)
            layer.cache.pin(pins if pin else [])
            self._sync_identity(layer)
        self._restart_budget()
        mx.clear_cache()

    def hit_rates_vs_optimum(self, capacity: int | None = None, last_steps: int | None = None, warm: bool = True,
                             should_stop: Callable[[], bool] | None = None, layers: Sequence[int] | None = None,
                             ) -> dict[str, dict[str, float]] | None:
        """Hit rate every policy and Belady's MIN would get on this session's trace (or its last steps).

        `warm`: each replay starts from the experts the cache held when the first replayed step began, as the
        realized run did (so at the capacity it ran with, Belady is never below the hit rate it got there); else
        empty. `should_stop`: asked between layers; None when it said stop (see oracle.compare). `layers`: only these
        MoE layers (indexes from 0), e.g. a sample of a large model's.
        """
        from .oracle import compare

        self.drain()
        traces, starts = [], []
        chosen = range(len(self.trace)) if layers is None else layers
        for layer, log in ((self.trace[i], self.trace_resident[i]) for i in chosen):
            steps = list(layer)
            window = steps if last_steps is None else steps[len(steps) - min(last_steps, len(steps)):]
            traces.append(window)
            if warm and window:
                before = steps[max(len(steps) - 2 * len(window), 0) : len(steps) - len(window)]
                starts.append(_by_recency(log.at(len(window)), before))
            else:
                starts.append([])
        return compare(traces, self.layout.num_experts, capacity or self._capacity, starts=starts,
                       should_stop=should_stop)

    def close(self) -> None:
        for layer in self._layers:
            try:
                self._await(layer)
            except Exception:  # closing: a failed read ahead changes nothing now
                pass
        self.expert_reader.close()
        self.reader.close()


class ResidencyLog:
    """Which experts of one layer were resident as each traced step began: packed bits in a ring as long as the
    trace, so a replay of any steps the trace still holds can start from the cache the run had then."""

    def __init__(self, num_experts: int, size: int | None = None) -> None:
        self.num_experts = num_experts
        self.bits = np.zeros((size or TRACE_STEPS, (num_experts + 7) // 8), dtype=np.uint8)
        self.logged = 0  # steps ever logged; the ring keeps the newest len(bits)

    def extend(self, resident: np.ndarray, steps: int) -> None:
        """`steps` more steps, each begun with `resident` (a bool per expert)."""
        size = len(self.bits)
        if steps == 1:  # a decode step: no index arrays
            self.bits[self.logged % size] = np.packbits(resident)
        else:
            self.bits[(self.logged + np.arange(max(steps - size, 0), steps)) % size] = np.packbits(resident)
        self.logged += steps

    def at(self, back: int) -> list[int]:
        """The experts resident as the step `back` steps from the newest began (1: the newest step)."""
        if not 1 <= back <= min(self.logged, len(self.bits)):
            raise IndexError(f"step {back} back is not in the log ({min(self.logged, len(self.bits))} steps)")
        row = self.bits[(self.logged - back) % len(self.bits)]
        return np.flatnonzero(np.unpackbits(row, count=self.num_experts)).tolist()


def _by_recency(experts: list[int], earlier: list[np.ndarray]) -> list[int]:
    """`experts` most recently used first in the `earlier` steps (those not seen there last, by id): the order
    a replay at a smaller capacity keeps them in."""
    left, order = set(experts), []
    for step in reversed(earlier):
        for e in step.tolist():
            if e in left:
                left.discard(e)
                order.append(e)
        if not left:
            break
    return order + sorted(left)


def _token_id(token: int | mx.array) -> int:
    """A token id as the generation loop hands it over: an int, or a one-element MLX array."""
    return token if isinstance(token, int) else int(np.array(token).reshape(-1)[0])


def _check_mode(mode: str) -> None:
    if mode == "fast":
        raise ValueError(FAST_REMOVED)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; the engine has one mode, exact")


class ReadAheadSwitch:
    """Reads ahead cost CPU (a router call per layer, reading and converting guesses, some wrong) and save
    waiting on reads. Which wins depends on the disk, the page cache, the expert size and what else runs, so
    the automatic setting times decode steps with and without them, in turn, and keeps the faster for a
    while before timing both again.

    Steps drift while a reply starts (the cache fills, guesses gain a history) and the machine's load moves:
    timed once each, the setting timed second looked faster. So each is timed in two blocks, with, without,
    without, with (a steady drift weighs on both alike), and the first steps after each change are not timed
    (they run on the cache the other setting left)."""

    WINDOW = 16  # decode steps timed per setting, in two blocks
    SETTLE = 2  # steps after a change of setting (and at the start) that are not timed
    ORDER = (True, False, False, True)  # the blocks: reads ahead on, off, off, on
    TIMING = 2 * WINDOW + 3 * SETTLE  # decode steps from the start of a timing to its decision
    HOLD = 256  # decode steps the faster setting runs before both are timed again
    GAP = 1.0  # seconds: a longer pause between steps is a new request, not a step
    # Reads ahead stay on only when their steps are this much faster: they also cost CPU, disk reads and evictions,
    # and a near tie is the noise of 16 steps (docs/performance.md).
    MARGIN = 0.03

    def __init__(self, start_on: bool = False) -> None:
        """`start_on`: reads ahead run the first HOLD steps before the first timing (where every miss waits for
        the disk, see `ExpertCache`); else the first steps are a timing."""
        self.active = True
        self.with_seconds = self.without_seconds = 0.0  # median step times of the latest timing
        self._last: float | None = None
        self._start_timing()
        if start_on:
            self._phase, self._left = "hold", self.HOLD

    def _start_timing(self) -> None:
        self._phase, self._block, self.active = "time", 0, self.ORDER[0]
        self._left, self._settle = self.WINDOW // 2, self.SETTLE
        self._times: dict[bool, list[float]] = {True: [], False: []}

    def step(self, decoding: bool) -> None:
        now = time.perf_counter()
        last, self._last = self._last, now
        if not decoding or last is None or now - last > self.GAP:
            return
        if self._phase == "hold":
            self._left -= 1
            if self._left <= 0:
                self._start_timing()
            return
        if self._settle > 0:
            self._settle -= 1
            return
        self._times[self.active].append(now - last)
        self._left -= 1
        if self._left > 0:
            return
        self._block += 1
        if self._block < len(self.ORDER):
            setting = self.ORDER[self._block]
            self._settle = self.SETTLE if setting != self.active else 0
            self.active, self._left = setting, self.WINDOW // 2
            return
        self.with_seconds = float(np.median(self._times[True]))
        self.without_seconds = float(np.median(self._times[False]))
        self.active = self.with_seconds < self.without_seconds * (1 - self.MARGIN)
        self._phase, self._left = "hold", self.HOLD
