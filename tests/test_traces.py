"""Recorded routing traces: the npz format round-trips, bad files fail with a message saying why, the
engine's routing and next-layer guesses are recorded step for step, and `moe bench --replay` reads them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from moe_tui.app.cli import main
from moe_tui.inference import Engine
from moe_tui.inference.cache import POLICIES
from moe_tui.inference.oracle import compare
from moe_tui.inference.traces import Trace, TraceError, TraceRecorder, load_trace, save_trace

DATA = Path(__file__).parent / "data"
DEMO_TRACES = sorted(DATA.glob("demo-*.trace.npz"))


def small_trace(guesses: bool = True) -> Trace:
    steps = [[np.array([0, 3]), np.array([1, 2, 3, 5]), np.array([2])],
             [np.array([4]), np.array([0, 7]), np.array([6, 7])]]
    g = [[np.array([], dtype=np.int64)] * 3, [np.array([], dtype=np.int64), np.array([7, 0, 1]), np.array([5, 6])]]
    return Trace("m", 8, 2, (1, 3), steps, tokens=9, segments=(0, 1, 3), guesses=g if guesses else None,
                 model_type="qwen3_moe", mode="exact", capacity=4, source="test")


@pytest.mark.parametrize("guesses", [True, False])
def test_round_trip(tmp_path, guesses):
    trace = small_trace(guesses)
    path = save_trace(trace, tmp_path / "t.npz")
    back = load_trace(path)
    assert (back.model, back.num_experts, back.top_k, back.layer_ids, back.tokens, back.segments) == \
        ("m", 8, 2, (1, 3), 9, (0, 1, 3))
    assert (back.model_type, back.mode, back.capacity, back.source) == ("qwen3_moe", "exact", 4, "test")
    def ids(table):
        return [[s.tolist() for s in layer] for layer in table]

    assert ids(back.steps) == ids(trace.steps)
    if guesses:  # best first: the order is kept
        assert [g.tolist() for g in back.guesses[1]] == [[], [7, 0, 1], [5, 6]]
    else:
        assert back.guesses is None
    assert back.accesses == 12 and back.num_steps == 3


def write(path: Path, **arrays) -> Path:
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def good_arrays(tmp_path) -> dict:
    with np.load(save_trace(small_trace(), tmp_path / "good.npz")) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a.pop("counts"), "lacks counts"),
    (lambda a: a.update(version=np.array(7)), "version 7"),
    (lambda a: a.update(format=np.array("something else")), "not a routing trace"),
    (lambda a: a.update(experts=a["experts"][:-1]), "add up to"),
    (lambda a: a.update(experts=np.where(a["experts"] == 7, 9, a["experts"])), "outside 0..7"),
    (lambda a: a.update(experts=a["experts"][::-1].copy()), "ascending"),
    (lambda a: a.update(layer_ids=np.array([1, 3, 5])), "counts has shape"),
    (lambda a: a.update(segments=np.array([0, 5])), "segments"),
    (lambda a: a.pop("guess_counts"), "come together"),
    (lambda a: a.update(top_k=np.array(9)), "top_k"),
])
def test_bad_traces_say_what_is_wrong(tmp_path, change, message):
    arrays = good_arrays(tmp_path)
    change(arrays)
    with pytest.raises(TraceError, match=message):
        load_trace(write(tmp_path / "bad.npz", **arrays))


def test_not_a_trace(tmp_path):
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(TraceError, match="not a routing trace"):
        load_trace(tmp_path / "text.npz")
    with pytest.raises(TraceError, match="not a routing trace"):
        load_trace(write(tmp_path / "other.npz", x=np.zeros(3)))


def test_recorder_keeps_the_engines_routing_and_guesses(checkpoint):
    engine = Engine.load(checkpoint("qwen3_moe"), capacity=6)  # 8 experts, top 2: room to guess ahead
    recorder = TraceRecorder(engine, source="test")
    runs = []
    for prompt in ([5, 17, 99, 3, 42], [7, 8, 200, 31, 11, 12]):
        recorder.begin()
        for _event in engine.stream(prompt, max_tokens=12):
            pass
        runs.append([list(layer) for layer in engine.trace])
        recorder.collect()
    recorder.close()
    trace = recorder.trace()
    assert "_prefetch_into" not in vars(engine.experts)  # closed: the engine is as it was
    n0 = len(runs[0][0])
    assert trace.segments == (0, n0, n0 + len(runs[1][0]))
    for i in range(len(engine.layout.moe_layers)):
        recorded = [s.tolist() for s in trace.steps[i]]
        assert recorded == [np.asarray(s).tolist() for run in runs for s in run[i]]
    assert trace.guesses is not None
    for i in range(len(trace.steps)):
        guessed = [t for t, g in enumerate(trace.guesses[i]) if len(g)]
        assert 0 not in guessed and n0 not in guessed  # decode steps only: never a run's prefill (its first step)
        assert guessed or i == 0  # the first layer only for tokens it routed before, the others at every step
    assert trace.tokens > 5 + 6  # prompt and generated tokens
    # The LRU replay of the recorded trace counts what compare counts on the engine's own trace.
    last = trace.window(n0, trace.num_steps)
    assert compare(last.steps, 8, 6)["lru"]["accesses"] == sum(len(s) for layer in runs[1] for s in layer)


def test_profile_and_replay_commands(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("def merge(a, b):\n    return sorted(a + b)\n" * 20)
    out = tmp_path / "t.npz"
    assert main(["profile", str(checkpoint("qwen3_moe")), "--text", str(text), "--tokens", "40", "--window", "16",
                 "--capacity", "6", "--trace", str(out)]) == 0
    trace = load_trace(out)
    assert (trace.num_steps, trace.tokens, trace.segments, trace.capacity) == (40, 40, (0, 16, 32, 40), 6)
    assert trace.guesses is not None
    assert any(len(g) for g in trace.guesses[0])  # the first layer too, from tokens routed before
    capsys.readouterr()
    assert main(["bench", "--replay", str(out), "--replay-capacities", "25,50,75"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [c["capacity"] for c in report["capacities"]] == [2, 4, 6]
    at50 = report["capacities"][1]["rates"]
    assert set(at50) == {*POLICIES, "belady", *(p + "+prediction" for p in POLICIES)}
    told = report["capacities"][1]["told_next_step"]
    assert at50[told["policy"]]["hit_rate"] <= told["hit_rate"] <= at50["belady"]["hit_rate"]
    assert report["capacities"][0]["prediction"].startswith("not simulated")  # no room to guess at top_k
    assert "belady" in captured.err and "+prediction" in captured.err
    assert main(["bench", "--replay", str(tmp_path / "none.npz")]) == 2  # a one-line error, exit 2


@pytest.mark.parametrize("path", DEMO_TRACES, ids=lambda p: p.name)
def test_recorded_demo_traces(path):
    trace = load_trace(path)
    assert (trace.num_experts, trace.top_k, len(trace.layer_ids)) == (16, 2, 4)
    assert trace.guesses is not None and trace.num_steps >= 1000
    assert path.stat().st_size < 100_000


def test_the_default_policy_is_the_best_on_held_out_text():
    """lrfu's half-life was tuned on the doctest.py trace; logging/handlers.py is held out from that and
    from the demo's training (docs/performance.md has the whole table)."""
    from moe_tui.inference.cache import DEFAULT_POLICY

    trace = load_trace(DATA / "demo-handlers.trace.npz").window(0, 2048)
    for capacity in (4, 8):  # 25% and 50%
        rates = {name: r["hit_rate"] for name, r in compare(trace.steps, 16, capacity).items()}
        assert max((r, name) for name, r in rates.items() if name != "belady")[1] == DEFAULT_POLICY, rates


def test_bench_records_the_traced_run(checkpoint):
    from moe_tui.inference.bench import _run_engine

    _result, engine, trace = _run_engine(checkpoint("qwen3_moe"), [5, 17, 99, 3, 42, 7], 10, 6, "exact", record=True)
    assert trace is not None and trace.capacity == 6 and trace.segments == (0, trace.num_steps)
    assert [[s.tolist() for s in layer] for layer in trace.steps] == \
        [[np.asarray(s).tolist() for s in layer] for layer in engine.trace]  # the warm pass only
    engine.close()
