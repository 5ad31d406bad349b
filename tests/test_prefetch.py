"""Reads that overlap compute: next-layer prediction and prefetch, direct writes into the slots' memory,
and reads that bypass the page cache. None of them may change a single output."""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from moe_tui.inference import Engine
from moe_tui.inference.demo_paths import DEMO_MODEL
from moe_tui.inference.errors import ModelLoadError
from moe_tui.inference.expert_cache import PREFETCH_MIN_PRECISION
from moe_tui.inference.experts import SlotWrites
from moe_tui.inference.safetensors_io import HUGE_PAGE, AlignedScratch, RangeReader
from moe_tui.inference.synthetic import ARCHS, MORE_ARCHS
from moe_tui.inference.telemetry import cgroup_memory_limit

PROMPT = [5, 17, 99, 3, 42, 7, 8, 200, 31, 11, 64, 90, 13, 250, 77, 4]
TOKENS = 24


def greedy(model, n: int = TOKENS) -> list[int]:
    return [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=n)]


@pytest.fixture(scope="module")
def stock_tokens(checkpoint):
    cached = {}

    def get(path) -> list[int]:
        if path not in cached:
            model, _ = load(str(path))
            cached[path] = greedy(model)
        return cached[path]

    return get


@pytest.mark.parametrize("arch", [*ARCHS, *MORE_ARCHS])
def test_prefetch_keeps_exact_mode_equal_to_stock(checkpoint, stock_tokens, arch):
    path = checkpoint(arch)
    engine = Engine.load(path, capacity=4)  # top-2 of 8: room for two guesses per layer beyond one token
    assert greedy(engine.model) == stock_tokens(path)
    c = engine.counters
    if len(engine.layout.moe_layers) > 1:  # the first layer has no layer before it to predict from
        assert c.guesses.sum() > 0
        assert 0 <= c.guess_hits.sum() <= c.guesses.sum()
        assert c.prefetch_hits.sum() + c.prefetch_wasted.sum() <= c.prefetches.sum()
    assert engine.snapshot().resident.sum(axis=1).max() <= 4


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize(("uncached", "direct"), [(True, True), (False, True), (True, False)])
def test_resident_experts_computed_while_the_others_are_read_keep_outputs_equal_to_stock(
        checkpoint, stock_tokens, arch, uncached, direct, monkeypatch):
    """A decoding token with some experts resident and some not: MLX computes the resident ones while the
    others are read from the disk, then the outputs are put back in routing order: tokens equal stock's. Where
    the others are a small copy from the page cache, or loads go through MLX, the experts are computed together."""
    path = checkpoint(arch)
    engine = Engine.load(path, capacity=3, prefetch=False, uncached_reads=uncached, direct_writes=direct)  # top-2 of 8
    splits = []
    start_ready = engine.experts._start_ready
    monkeypatch.setattr(engine.experts, "_start_ready", lambda *a: splits.append(start_ready(*a)) or splits[-1])
    assert greedy(engine.model) == stock_tokens(path)
    assert (sum(s is not None for s in splits) > 0) == (uncached and direct)


@pytest.mark.parametrize("arch", [*ARCHS, *MORE_ARCHS])
def test_every_switch_computes_a_tokens_experts_independently(checkpoint, arch):
    """What computing a token's experts in two parts relies on (`ExpertCache._start_ready`): each routed
    expert's output does not depend on which other experts are computed with it."""
    engine = Engine.load(checkpoint(arch))  # every expert in the slot of its id: slots are expert ids
    switch = engine.experts._layers[0].block.switch
    stock = super(type(switch), switch).__call__  # the model's own switch, without the engine's runtime
    x = mx.random.normal((1, 1, engine.config["hidden_size"]), key=mx.random.key(0))
    routed = np.array([[[6, 1]]], dtype=np.int32)
    whole = stock(x, mx.array(routed))
    parts = mx.concatenate([stock(x, mx.array(routed[..., [1]])), stock(x, mx.array(routed[..., [0]]))], axis=-2)
    assert mx.array_equal(mx.take(parts, mx.array([1, 0]), axis=-2), whole)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("quant", [None, 4])
def test_direct_writes_equal_writes_through_mlx(checkpoint, dtype, quant):
    """The direct path converts half precision on the reader threads (numpy); the MLX path in MLX."""
    path = checkpoint("qwen3_moe", quant, dtype=getattr(mx, dtype))
    direct = Engine.load(path, capacity=3)
    through_mlx = Engine.load(path, capacity=3, direct_writes=False, prefetch=False)
    assert all(layer.views is not None for layer in direct.experts._layers)
    assert all(layer.views is None for layer in through_mlx.experts._layers)
    assert greedy(direct.model) == greedy(through_mlx.model)
    for a, b in zip(direct.experts._layers, through_mlx.experts._layers, strict=True):
        for expert in range(direct.layout.num_experts):
            if a.cache.slot_of[expert] >= 0 and b.cache.slot_of[expert] >= 0:
                for s in a.sources:
                    left = a.block.projections[s.projection][s.param][int(a.cache.slot_of[expert])]
                    right = b.block.projections[s.projection][s.param][int(b.cache.slot_of[expert])]
                    assert mx.array_equal(left, right).item(), (expert, s.projection, s.param)


def demo_run(prefetch: bool) -> Engine:
    engine = Engine.load(DEMO_MODEL, capacity=0.25, prefetch=prefetch)
    prompt = engine.encode([{"role": "user", "content": "def fibonacci(n):\n    # print the first n numbers"}])
    engine.tokenizer.eos_token_ids = set()
    for _ in engine.stream(prompt, max_tokens=48):
        pass
    return engine


def test_prefetch_reads_ahead_on_a_trained_model_and_off_reads_only_on_demand():
    on, off = demo_run(True), demo_run(False)
    assert on.counters.prefetches.sum() > 0 and on.counters.prefetch_hits.sum() > 0
    assert off.counters.prefetches.sum() == 0 and off.counters.guesses.sum() == 0
    # Experts read ahead and used are misses without it: more of the needed experts were ready in time.
    assert on.snapshot().hit_rate > off.snapshot().hit_rate
    assert on.snapshot().demand_hit_rate < on.snapshot().hit_rate
    io = on.snapshot().io
    assert 47 <= io.decode_steps <= 49 and io.prefetch_hits + io.prefetch_wasted <= io.prefetches
    assert all(0 < r <= 1 for r in io.prediction_recall[1:])  # layer 0 has no layer before it


def test_reads_ahead_stop_where_guesses_are_mostly_wrong(checkpoint):
    """A random model's next-layer guesses are mostly wrong: after a few, they are only scored, not read."""
    engine = Engine.load(checkpoint("mixtral"), capacity=4)
    greedy(engine.model, 64)
    layer = engine.experts._layers[1]
    used, scored = layer.rank_record[:, 0], layer.rank_record[:, 1]
    assert (scored > 0).all() and (used < PREFETCH_MIN_PRECISION * scored).all()
    assert engine.counters.guesses[1] >= 2 * 60  # top_k guesses still made and scored on every decode step
    assert engine.counters.prefetches[1].sum() < 16


def test_a_failed_read_ahead_surfaces_and_leaves_the_engine_correct(checkpoint, stock_tokens, monkeypatch):
    path = checkpoint("mixtral")
    engine = Engine.load(path, capacity=4)
    reader = engine.experts.expert_reader
    real = reader.write_slots
    failed: list[tuple[dict, list]] = []

    def failing(sources, placements, views, wait=True, packed=None):
        if wait or failed:
            return real(sources, placements, views, wait, packed)
        # The read ahead claimed its slots, wrote part of them, then failed (in the background).
        failed.append((views, placements))
        for _, slot, _ in placements:
            for view in views.values():
                view[slot] = np.nan

        def fail():
            raise ModelLoadError("disk gone")

        return SlotWrites([reader._pool.submit(fail)], 0)

    greedy(engine.model, 2)  # the reader pool exists from here on
    monkeypatch.setattr(reader, "write_slots", failing)
    with pytest.raises(ModelLoadError, match="disk gone"):
        greedy(engine.model)
    monkeypatch.setattr(reader, "write_slots", real)
    views, placements = failed[0]
    layer = next(layer for layer in engine.experts._layers if layer.views is views)
    assert all(layer.cache.slot_of[e] < 0 and layer.cache.expert_in_slot[slot] < 0 for e, slot, _ in placements)
    # The half-written slots count as empty: the next run reads those experts again and matches stock.
    assert greedy(engine.model) == stock_tokens(path)


@pytest.mark.parametrize("offset,nbytes", [(0, 4096), (1, 10), (4095, 2), (4096 * 3 + 17, 9000), (100, 50_000)])
def test_uncached_reads_return_the_same_bytes(tmp_path, offset, nbytes):
    data = np.random.default_rng(0).integers(0, 256, 80_000, dtype=np.uint8)
    file = tmp_path / "blob.bin"
    file.write_bytes(data.tobytes())
    reader = RangeReader(uncached=True)
    got = reader.read_uncached(file, offset, nbytes, AlignedScratch())
    assert np.array_equal(got, data[offset : offset + nbytes])
    assert reader.bytes_read == nbytes
    with pytest.raises(ModelLoadError, match="unexpected end of file"):
        reader.read_uncached(file, 79_000, 2_000, AlignedScratch())
    reader.close()


def test_reads_in_flight_together_count_their_wall_time_once(tmp_path, monkeypatch):
    """`busy_seconds` is wall time with at least one read in flight: the reads' own bandwidth is
    bytes_read / busy_seconds, apart from what callers do with the bytes, however many threads read."""
    import moe_tui.inference.safetensors_io as sio

    clock = iter([10.0, 13.0, 20.0, 21.0])  # first read starts, both end; later a read from 20 to 21
    monkeypatch.setattr(sio.time, "perf_counter", lambda: next(clock))
    reader = RangeReader()
    with reader._reading():
        with reader._reading():  # a second read joins the first: no clock read
            pass  # one still in flight when it ends: no clock read
    assert reader.busy_seconds == 3.0  # the first ended at 13.0
    with reader._reading():
        pass
    assert reader.busy_seconds == 4.0
    monkeypatch.undo()
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 64)
    out = np.empty(4096, dtype=np.uint8)
    assert RangeReader().read_into(path, 0, out) and out[1] == 1
    cold = RangeReader(uncached=True)
    cold.read_uncached(path, 100, 1000, AlignedScratch())
    assert cold.bytes_read == 1000 and cold.busy_seconds > 0 and cold._in_flight == 0


def test_a_read_that_fails_or_gives_way_ends_its_busy_period(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(8192))
    reader = RangeReader(uncached=True)
    with pytest.raises(ModelLoadError, match="end of file"):
        reader.read_into(path, 4096, np.empty(8192, dtype=np.uint8))
    with pytest.raises(ModelLoadError, match="end of file"):
        reader.read_uncached(path, 4096, 8192, AlignedScratch())
    real = os.preadv

    def preadv(fd, buffers, offset, *flags):
        if flags:  # a nowait read whose bytes are not cached
            raise BlockingIOError
        if fd in reader._direct_fds.values():
            raise OSError(errno.EINVAL, "no direct I/O here")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    reader.read_into(path, 0, np.empty(16, dtype=np.uint8), nowait=True)  # gives way where RWF_NOWAIT exists
    out = reader.read_uncached(path, 10, 100, AlignedScratch())  # direct I/O refused: ordinary reads instead
    assert out.size == 100 and reader._direct_fds[path] is None
    assert reader._in_flight == 0
    busy = reader.busy_seconds
    assert reader.busy_seconds == busy  # nothing in flight: the clock is not read


def test_one_read_fills_several_buffers_from_consecutive_bytes(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8)
    file = tmp_path / "blob.bin"
    file.write_bytes(data.tobytes())
    reader = RangeReader()
    outs = [np.empty(n, dtype=np.uint8) for n in (1, 4096, 3000, 7)]
    assert reader.read_into(file, 5, outs)
    assert np.array_equal(np.concatenate(outs), data[5 : 5 + 7104]) and reader.bytes_read == 7104
    with pytest.raises(ModelLoadError, match="unexpected end of file"):
        reader.read_into(file, 9_000, [np.empty(800, np.uint8), np.empty(800, np.uint8)])
    reader.close()


def test_a_read_that_would_wait_for_the_disk_is_left_to_the_caller(tmp_path_factory):
    """`nowait`: what the page cache holds is a memory copy done on the spot; a read from the disk says so,
    and the engine hands it to its reader threads (several in flight) instead."""
    from moe_tui.inference.safetensors_io import NOWAIT

    if not NOWAIT or not hasattr(os, "posix_fadvise"):
        pytest.skip("no RWF_NOWAIT here: reads always wait (and small ones run on the calling thread)")
    folder = Path(os.environ.get("MOE_TEST_DISK_DIR", "/var/tmp"))
    file = folder / f"moe-nowait-{os.getpid()}.bin"
    data = np.random.default_rng(2).integers(0, 256, 1 << 20, dtype=np.uint8)
    try:
        with open(file, "wb") as f:
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        reader = RangeReader()
        out = np.empty(1 << 20, dtype=np.uint8)
        if reader.read_into(file, 0, out, nowait=True):
            pytest.skip(f"{folder} keeps its pages in memory (tmpfs?): nothing comes from a disk")
        assert reader.bytes_read == 0
        assert reader.read_into(file, 0, out) and np.array_equal(out, data)
        assert reader.read_into(file, 0, out, nowait=True)  # now cached
        reader.close()
    finally:
        file.unlink(missing_ok=True)


def test_a_kernel_or_file_system_without_nowait_reads_gets_ordinary_reads(tmp_path, monkeypatch):
    """preadv2's RWF_NOWAIT is refused by older kernels and some file systems (EOPNOTSUPP): the read goes on
    without it, and later reads do not ask again."""
    import errno

    from moe_tui.inference import safetensors_io

    monkeypatch.setattr(safetensors_io, "NOWAIT", 8)
    real, flagged = os.preadv, []

    def preadv(fd, buffers, offset, *flags):
        if flags and flags[0]:
            flagged.append(flags[0])
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(fd, buffers, offset)

    monkeypatch.setattr(safetensors_io.os, "preadv", preadv)
    data = np.arange(4096, dtype=np.uint8)
    file = tmp_path / "blob.bin"
    file.write_bytes(data.tobytes())
    reader = RangeReader()
    out = np.empty(4096, dtype=np.uint8)
    assert reader.read_into(file, 0, out, nowait=True) and np.array_equal(out, data)
    assert reader.read_into(file, 0, out, nowait=True) and flagged == [8]
    reader.close()


def test_a_layer_load_reads_consecutive_experts_of_a_parameter_in_one_call(checkpoint, stock_tokens, monkeypatch):
    path = checkpoint("qwen3_moe", 4)
    for file in path.glob("*.safetensors"):  # in the page cache (another test may have dropped it): no read gives way
        file.read_bytes()
    engine = Engine.load(path, capacity=0.5, prefetch=False)
    calls = []
    real = engine.experts.reader.read_into
    monkeypatch.setattr(engine.experts.reader, "read_into",
                        lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    engine.warm()  # each layer: its lowest experts, consecutive ids
    layers, params = len(engine.experts._layers), len(engine.experts._layers[0].sources)
    assert len(calls) == layers * params  # weight, scales and biases of 3 projections, once each per layer
    assert greedy(engine.model) == stock_tokens(path)


def test_a_load_hands_each_reader_thread_one_task_not_one_per_read(checkpoint, stock_tokens, monkeypatch):
    """A hand-off to the reader pool costs the calling thread more than a small read, and a 4-bit expert is
    nine reads: a load submits at most one task per reader thread, which take the reads in turn."""
    path = checkpoint("qwen3_moe", 4)
    engine = Engine.load(path, capacity=3, uncached_reads=True, prefetch=False)  # uncached: never inline
    reader = engine.experts.expert_reader
    reads, loads = [], []
    real_read, real_write = reader.reader.read_uncached, reader.write_slots
    monkeypatch.setattr(reader.reader, "read_uncached", lambda *a, **k: reads.append(a[1]) or real_read(*a, **k))

    def write_slots(*args, **kwargs):
        writes = real_write(*args, **kwargs)
        loads.append(len(writes.futures))
        return writes

    monkeypatch.setattr(reader, "write_slots", write_slots)
    assert greedy(engine.model) == stock_tokens(path)
    assert loads and max(loads) <= reader.threads
    assert len(reads) > 2 * sum(loads)  # several reads per task


def test_an_expert_read_again_is_not_checked_for_nan_again(checkpoint, stock_tokens, monkeypatch):
    """The NaN/Inf check runs once per expert's bytes: evicted and read again, they are the same bytes."""
    import moe_tui.inference.experts as experts

    path = checkpoint("qwen3_moe", dtype=mx.bfloat16)
    expected = greedy(Engine.load(path, capacity=1.0).model)
    checked = []
    real = experts._check_finite
    monkeypatch.setattr(experts, "_check_finite", lambda src, ids, raw: checked.extend(
        (src.stacked.name, e) for e in ids) or real(src, ids, raw))
    engine = Engine.load(path, capacity=2, prefetch=False)
    assert greedy(engine.model) == expected
    loads = int(engine.counters.loads.sum())
    assert len(checked) == len(set(checked)) and loads * len(engine.experts._layers[0].sources) > len(checked)


def test_uncached_reads_keep_the_outputs(checkpoint, stock_tokens):
    path = checkpoint("qwen3_moe")
    engine = Engine.load(path, capacity=3, uncached_reads=True)
    assert engine.experts.reader.uncached
    assert greedy(engine.model) == stock_tokens(path)


def test_uncached_reads_by_default_only_when_the_page_cache_could_not_hold_the_experts(checkpoint, monkeypatch):
    from moe_tui.inference.expert_cache import ExpertCache
    from moe_tui.inference.telemetry import available_memory

    path = checkpoint("qwen3_moe")
    assert not Engine.load(path, capacity=3).experts.reader.uncached  # a tiny model's experts fit
    monkeypatch.setattr(ExpertCache, "expert_disk_bytes", lambda self: 2 * available_memory())
    assert Engine.load(path, capacity=3).experts.reader.uncached
    assert not Engine.load(path, capacity=3, uncached_reads=False).experts.reader.uncached


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_memory_limit_is_read_from_the_own_cgroup(tmp_path, version):
    proc = tmp_path / "cgroup"
    if version == 1:
        proc.write_text("12:cpu,cpuacct:/x\n7:memory:/bench/run\n")
        folder = tmp_path / "memory" / "bench" / "run"
        folder.mkdir(parents=True)
        (folder / "memory.limit_in_bytes").write_text("1073741824\n")
    else:
        proc.write_text("0::/bench/run\n")
        folder = tmp_path / "bench" / "run"
        folder.mkdir(parents=True)
        (folder / "memory.max").write_text("536870912\n")
    assert cgroup_memory_limit(tmp_path, proc) == (1 << 30 if version == 1 else 1 << 29)
    (folder / ("memory.limit_in_bytes" if version == 1 else "memory.max")).write_text(
        "9223372036854771712\n" if version == 1 else "max\n")
    assert cgroup_memory_limit(tmp_path, proc) is None
    assert cgroup_memory_limit(tmp_path, tmp_path / "missing") is None


@pytest.mark.parametrize("faster_with", [True, False])
def test_automatic_reads_ahead_keep_the_faster_setting(monkeypatch, faster_with):
    from moe_tui.inference import expert_cache

    clock = [0.0]
    monkeypatch.setattr(expert_cache.time, "perf_counter", lambda: clock[0])
    switch = expert_cache.ReadAheadSwitch()
    seen = []

    def steps(n):
        for _ in range(n):
            fast = switch.active == faster_with
            clock[0] += 0.010 if fast else 0.030
            switch.step(decoding=True)
            seen.append(switch.active)

    switch.step(decoding=True)  # the first step only starts the clock
    steps(switch.TIMING)
    assert switch.active == faster_with
    assert (switch.with_seconds < switch.without_seconds) == faster_with
    clock[0] += 5.0  # a pause (a new request) is not timed as a step
    switch.step(decoding=True)
    steps(switch.HOLD - 1)
    assert switch.active == faster_with  # held
    steps(1)
    assert switch.active  # both timed again, starting with reads ahead
    switch.step(decoding=False)  # prefill steps are not timed
    assert switch.active


def test_automatic_reads_ahead_are_not_fooled_by_steps_getting_faster(monkeypatch):
    """Steps get faster as a reply starts (the cache fills, guesses gain a history): timed first with reads
    ahead and then without, the later setting looked faster. Reads ahead 10% faster here all along."""
    from moe_tui.inference import expert_cache

    clock = [0.0]
    monkeypatch.setattr(expert_cache.time, "perf_counter", lambda: clock[0])
    switch = expert_cache.ReadAheadSwitch()
    switch.step(decoding=True)
    for i in range(switch.TIMING):
        clock[0] += (0.150 - 0.001 * i) * (0.9 if switch.active else 1.0)
        switch.step(decoding=True)
    assert switch.active
    assert switch.with_seconds < switch.without_seconds


@pytest.mark.parametrize("with_ms,stays_on", [(9.6, True), (9.8, False), (10.0, False)])
def test_reads_ahead_stay_on_only_when_clearly_faster(monkeypatch, with_ms, stays_on):
    """A near tie (within MARGIN) turns them off: they cost CPU, reads and evictions for nothing measurable."""
    from moe_tui.inference import expert_cache

    clock = [0.0]
    monkeypatch.setattr(expert_cache.time, "perf_counter", lambda: clock[0])
    switch = expert_cache.ReadAheadSwitch()
    switch.step(decoding=True)
    for _ in range(switch.TIMING):
        clock[0] += (with_ms if switch.active else 10.0) / 1000
        switch.step(decoding=True)
    assert switch.active == stays_on


def test_a_capacity_change_times_reads_ahead_again(checkpoint):
    """Step times measured at one capacity say nothing of another: a change starts the timing over."""
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4)
    engine.tokenizer.eos_token_ids = set()
    *_, done = engine.stream(PROMPT, max_tokens=TOKENS)
    switch = engine.experts.read_ahead
    assert switch._times[True] or switch._times[False]
    engine.set_capacity(6)
    assert engine.experts.read_ahead is not switch
    assert not engine.experts.read_ahead._times[True] and not engine.experts.read_ahead._times[False]


def test_reads_ahead_start_on_where_every_miss_waits_for_the_disk(checkpoint, monkeypatch):
    """Experts that do not fit in memory are read bypassing the page cache: every miss waits for the disk, which
    is what reads ahead hide. There they start on and are held before the first timing. Timed from a reply's
    first step, about half of its first 38 steps ran without them (docs/performance.md)."""
    from moe_tui.inference import expert_cache

    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4, uncached_reads=True)
    clock = [0.0]
    monkeypatch.setattr(expert_cache.time, "perf_counter", lambda: clock[0])
    switch = engine.experts.read_ahead
    switch.step(decoding=True)
    for _ in range(switch.HOLD - 1):
        clock[0] += 0.010 if switch.active else 0.001  # off is faster: only a timing could tell
        switch.step(decoding=True)
        assert switch.active
    for _ in range(switch.TIMING + 1):  # then timed as anywhere else
        clock[0] += 0.010 if switch.active else 0.001
        switch.step(decoding=True)
    assert not switch.active
    engine.set_capacity(6)  # a new timing at the new capacity: held on again
    assert engine.experts.read_ahead.active and engine.experts.read_ahead._phase == "hold"
    cached = Engine.load(checkpoint("qwen3_moe"), capacity=4, uncached_reads=False).experts.read_ahead
    assert cached._phase == "time"


def test_reads_ahead_are_automatic_by_default(checkpoint):
    engine = Engine.load(checkpoint("mixtral"), capacity=4)
    assert engine.experts.read_ahead is not None and engine.experts.reading_ahead
    assert Engine.load(checkpoint("mixtral"), capacity=4, prefetch=False).experts.read_ahead is None
    io = engine.snapshot().io
    assert io.prefetch_auto and io.prefetch


def test_the_first_layer_is_guessed_from_the_token(checkpoint, stock_tokens):
    """The first layer's input is the token itself, so no layer before it can guess its experts: they are
    guessed from that token's last routing there, read as the token is sampled. Replies stay equal to stock;
    a second identical reply finds every token of the first one's routing kept."""
    path = checkpoint("qwen3_moe")
    engine = Engine.load(path, capacity=4, prefetch=True)
    engine.tokenizer.eos_token_ids = set()
    for _ in range(2):
        engine.reset_prompt_cache()
        engine.reset_stats()
        *_, done = engine.stream(PROMPT, max_tokens=TOKENS)
        assert list(done.tokens) == stock_tokens(path)
    routes = engine.experts.token_routes
    assert (routes[PROMPT] >= 0).all() and (routes[list(done.tokens)[:-1]] >= 0).all()
    c = engine.counters
    assert c.guesses[0] > 0 and c.guess_hits[0] >= 0.9 * c.guesses[0]  # the same tokens, routed the same way
    assert c.prefetch_hits[0].sum() > 0  # and read ahead in time to be used


def test_a_direct_model_call_between_replies_does_not_misplace_tokens(checkpoint):
    """Token ids announced for forward passes that never read them (the last sampled token, a direct model
    call in between) are not taken for another call's tokens."""
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4, prefetch=True)
    engine.tokenizer.eos_token_ids = set()
    *_, done = engine.stream(PROMPT, max_tokens=4)
    experts = engine.experts
    assert not experts._tokens  # the last token sampled was never read: forgotten at the end
    before = experts.token_routes.copy()
    engine.model(mx.array([[9, 10, 11]]))  # nothing announced: nothing learned
    assert (experts.token_routes[: len(before)] == before).all() and (experts.token_routes[len(before) :] < 0).all()


def test_the_first_layer_learns_only_its_own_routing(tmp_path):
    """With the first layer holding every expert (no routing on the host there: the slot budget can grow it so),
    no other layer's routing is kept as the first layer's."""
    from moe_tui.inference.synthetic import make_checkpoint

    path = make_checkpoint(tmp_path / "four", "qwen3_moe", router_scale=4.0, num_hidden_layers=4)
    kept = {}
    for grown in (False, True):
        engine = Engine.load(path, capacity=5, prefetch=True, slot_budget=True)
        engine.tokenizer.eos_token_ids = set()
        experts = engine.experts
        E = experts.layout.num_experts
        while grown and experts._layers[0].cache.capacity < E:
            experts._move_slot(max(range(1, 4), key=lambda i: experts._layers[i].cache.capacity), 0)
        experts.warm([list(range(E))] + [[] for _ in range(3)] if grown else None)
        experts.budget = None  # keep the slots where they are
        *_, done = engine.stream(PROMPT, max_tokens=8)
        routes = experts.token_routes  # grows to the highest token id learned
        kept[grown] = np.array([routes[t] if t < len(routes) else [-1] * routes.shape[1] for t in PROMPT])
    assert (kept[False] >= 0).all()  # each prompt token's first-layer routing
    learned = kept[True][:, 0] >= 0
    assert (kept[True][learned] == kept[False][learned]).all()


def test_a_reply_leaves_no_guess_or_read_ahead_behind(checkpoint):
    """mlx-lm samples one token more than it reads: the first layer's guesses for it are dropped when the reply
    ends and their reads finish, so a later call neither scores them nor meets their reads."""
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4, prefetch=True)
    engine.tokenizer.eos_token_ids = set()
    for _ in range(2):  # the second reply's tokens were all routed before: guessed
        engine.reset_prompt_cache()
        *_, done = engine.stream(PROMPT, max_tokens=TOKENS)
    first = engine.experts._layers[0]
    assert first.guess is None and first.guess_missing is None and first.inflight is None
    guesses = engine.counters.guesses[0]
    engine.model(mx.array([list(range(3, 43))]))
    assert engine.counters.guesses[0] == guesses


def test_the_token_sampled_after_a_replys_last_is_not_read_ahead(checkpoint, monkeypatch):
    """mlx-lm samples one token more than a reply of max_tokens yields, and never reads it: its first layer's
    experts are not read for it."""
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4, prefetch=True)
    engine.tokenizer.eos_token_ids = set()
    told = []
    sampled = engine.experts.sampled
    monkeypatch.setattr(engine.experts, "sampled", lambda token: told.append(token) or sampled(token))
    *_, done = engine.stream(PROMPT, max_tokens=TOKENS)
    assert done.generated_tokens == TOKENS
    assert len(told) == TOKENS  # the first token (sampled after the prompt) up to the last one yielded
    told.clear()  # mlx-lm's max_tokens=-1, no limit: every token is handed over (here until cancelled)
    cancel = threading.Event()
    events = []
    for event in engine.stream(PROMPT, max_tokens=-1, cancel=cancel):
        events.append(event)
        if len(events) == TOKENS:
            cancel.set()
    assert events[-1].finish_reason == "cancelled" and len(told) > TOKENS


def test_the_token_sampled_after_eos_is_not_read_ahead(checkpoint, stock_tokens, monkeypatch):
    """mlx-lm reads an EOS token, samples once more and stops: the first layer's experts are read ahead for
    every token up to EOS, not for the one after it."""
    path = checkpoint("qwen3_moe")
    engine = Engine.load(path, capacity=4, prefetch=True)
    tokens = stock_tokens(path)
    # EOS: a token whose successor the engine has routed before (else nothing is guessed for the successor)
    k = next(k for k in range(len(tokens) - 1)
             if tokens.index(tokens[k]) == k and tokens[k + 1] in {*PROMPT, *tokens[: k + 1]})
    engine.tokenizer.eos_token_ids = {tokens[k]}
    first = engine.experts._layers[0]
    read_for = []
    prefetch_into = engine.experts._prefetch_into
    monkeypatch.setattr(engine.experts, "_prefetch_into",
                        lambda target, guess: (read_for.append(1) if target is first else None,
                                               prefetch_into(target, guess))[1])
    for _ in range(2):  # the second reply's tokens were all routed before: each one is guessed
        engine.reset_prompt_cache()
        read_for.clear()
        *_, done = engine.stream(PROMPT, max_tokens=TOKENS)
    assert done.finish_reason == "stop" and list(done.tokens) == tokens[:k]
    assert len(read_for) == k + 1  # the reply's tokens and the EOS, which the model reads


def test_a_capacity_change_waits_for_reads_ahead_and_changes_nothing_when_one_failed(checkpoint):
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=4, prefetch=True)
    experts = engine.experts
    greedy(engine.model, 2)
    first = experts._layers[0]
    free = [e for e in range(experts.layout.num_experts) if first.cache.slot_of[e] < 0][:1]
    placements = first.cache.admit(free, set(free), experts._step)

    class Failed:
        nbytes, seconds = 0, 0.0

        def wait(self):
            raise ModelLoadError("disk gone")

    first.inflight = (Failed(), placements)  # a read ahead that failed in the background
    with pytest.raises(ModelLoadError, match="disk gone"):
        engine.set_capacity(3)
    assert engine.capacity == 4 and experts.capacities == (4,) * len(experts._layers)
    for layer in experts._layers:
        assert all(w.shape[0] == layer.cache.capacity for w in layer.block.projections["gate_proj"].values()
                   if hasattr(w, "shape"))
    engine.set_capacity(3)  # the failed read is forgotten: the change goes through now
    assert greedy(engine.model) and engine.capacity == 3


def _advised_huge(address: int) -> bool | None:
    """Whether the mapping holding `address` is advised for transparent huge pages (smaps' VmFlags "hg");
    None where the system does not say."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return "hg" in line.split()[1:]
    return None


@pytest.mark.parametrize("nbytes", [4096, 1_572_864, 5 << 20])
def test_direct_read_buffers_sit_in_whole_huge_pages(nbytes):
    """A direct read into 4 KiB pages goes to the disk as many small requests: on this project's VM a 1.5 MiB
    expert read ran at half the speed of the same read into a transparent huge page (docs/performance.md).
    So the scratch starts on a huge-page boundary, spans whole huge pages, and asks Linux for huge pages."""
    buf = AlignedScratch().get(nbytes)
    address = buf.ctypes.data
    assert address % HUGE_PAGE == 0 and buf.nbytes == nbytes
    buf[:] = 1  # writable, and the whole length is there
    if sys.platform.startswith("linux") and Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        advised = _advised_huge(address)
        if advised is None:
            pytest.skip("this kernel's smaps does not show a mapping's advice")
        assert advised


def test_a_kernel_refusing_huge_page_advice_still_gets_its_buffer(monkeypatch):
    """The advice is only a speed-up: a kernel without transparent huge pages answers EINVAL."""
    import mmap

    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 9999, raising=False)  # no such advice: EINVAL
    buf = AlignedScratch().get(3 << 20)
    buf[:] = 7
    assert buf.ctypes.data % HUGE_PAGE == 0 and int(buf.sum()) == 7 * (3 << 20)
