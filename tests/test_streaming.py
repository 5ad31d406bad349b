"""Engine.stream: streamed deltas always add up to the final text, and every way a generation ends leaves
the prompt cache in step with its token record (the next turn equals a fresh engine's)."""

from __future__ import annotations

import threading

import pytest
from moe_tui.inference import Engine, GenerationDone, TokenDelta

PROMPT = [{"role": "user", "content": "def add(a, b):"}]
FOLLOW_UP = "import os"


def run(engine, messages, **kwargs) -> tuple[str, GenerationDone]:
    streamed = ""
    done = None
    for event in engine.stream(messages, **kwargs):
        if isinstance(event, TokenDelta):
            streamed += event.text
        else:
            done = event
    return streamed, done


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe")


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine.load(model_path, capacity=4)


@pytest.fixture(scope="module")
def reference(engine) -> str:
    streamed, done = run(engine, PROMPT, max_tokens=40)
    assert streamed == done.text and len(done.text) > 20
    return done.text


def stop_strings(reply: str) -> list[str]:
    """Stop strings of every kind: inside one token, across tokens, absent but starting like the reply."""
    candidates = {reply[i : i + 2] for i in range(0, len(reply) - 2)}
    candidates |= {reply[i : i + n] for n in (3, 5, 8) for i in range(0, len(reply) - n, 4)}
    candidates |= {reply[:1] + "\u2603", reply[-3:] + "\u2603", "\u2603"}  # a prefix that never completes
    return sorted(candidates)


def test_streamed_text_equals_final_text_for_every_stop_string(engine, reference):
    for stop in stop_strings(reference):
        streamed, done = run(engine, PROMPT, max_tokens=40, stop=[stop])
        expected = reference[: reference.find(stop)] if stop in reference else reference
        assert done.text == expected, stop
        assert streamed == done.text, f"stop {stop!r}: streamed {streamed!r} != final {done.text!r}"
        assert done.finish_reason == ("stop" if stop in reference else "length")
        assert done.stop_sequence == (stop if stop in reference else None)


def test_several_stop_strings_end_at_the_earliest(engine, reference):
    late, early = reference[20:23], reference[6:8]
    streamed, done = run(engine, PROMPT, max_tokens=40, stop=[late, early])
    cut = min(reference.find(late), reference.find(early))
    assert streamed == done.text == reference[:cut]


FIRST_REPLY = "x = 1"  # a finished first turn: the second turn starts from a prompt cache already in use
SECOND = [*PROMPT, {"role": "assistant", "content": FIRST_REPLY}, {"role": "user", "content": "print(x)"}]


def third_turn(second_reply: str) -> list[dict]:
    return [*SECOND, {"role": "assistant", "content": second_reply}, {"role": "user", "content": FOLLOW_UP}]


def fresh_tokens(model_path, capacity: int, messages) -> tuple[int, ...]:
    return run(Engine.load(model_path, capacity=capacity), messages, max_tokens=16)[1].tokens


def end_early(engine, how: str) -> str:
    """Run the second turn and end it `how`; the text the user got."""
    cancel = threading.Event()
    stream = engine.stream(SECOND, max_tokens=40, cancel=cancel, stop=["\u2603"] if how == "stop" else ())
    text = ""
    for n, event in enumerate(stream):
        if isinstance(event, GenerationDone):
            return event.text
        text += event.text
        if n == 5:
            if how == "close":
                stream.close()
                return text
            if how == "break":
                break
            if how == "cancel":
                cancel.set()
    del stream  # a plain `break` leaves the generator to be closed when it is dropped
    return text


@pytest.mark.parametrize("how", ["length", "stop", "cancel", "break", "close"])
def test_every_exit_leaves_the_prompt_cache_in_step(model_path, how):
    engine = Engine.load(model_path, capacity=4)
    run(engine, [*PROMPT], max_tokens=8)
    second = end_early(engine, how)
    _, done = run(engine, third_turn(second), max_tokens=16)
    assert done.prefilled_tokens < done.prompt_tokens  # the cache was reused, not thrown away
    assert done.tokens == fresh_tokens(model_path, 4, third_turn(second))


@pytest.mark.parametrize("capacity", [2, 4])  # 2: every read on demand; 4: also next-layer reads ahead
def test_a_failed_read_mid_reply_leaves_the_engine_correct(model_path, monkeypatch, capacity):
    engine = Engine.load(model_path, capacity=capacity)  # top-2 of 8 experts: nearly every step reads
    run(engine, [*PROMPT], max_tokens=8)
    reader = engine.experts.reader
    real_read, reads = reader.read_into, []

    def failing_read(*args, **kwargs):
        reads.append(1)
        if len(reads) == 12:
            raise OSError(5, "Input/output error")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(reader, "read_into", failing_read)
    with pytest.raises(OSError):
        run(engine, SECOND, max_tokens=40)
    monkeypatch.setattr(reader, "read_into", real_read)
    snap = engine.snapshot()
    assert (snap.resident.sum(axis=1) <= capacity).all()
    assert run(engine, third_turn(""), max_tokens=16)[1].tokens == fresh_tokens(model_path, capacity, third_turn(""))


@pytest.mark.parametrize("temperature,top_p", [(1e-320, 1.0), (1.5, 0.0), (0.0, 0.5)])
def test_settings_that_leave_one_candidate_are_greedy(engine, temperature, top_p):
    greedy = run(engine, PROMPT, max_tokens=12, temperature=0.0)[1].tokens
    for seed in (1, 2):
        assert run(engine, PROMPT, max_tokens=12, temperature=temperature, top_p=top_p, seed=seed)[1].tokens == greedy


LONG_PROMPT = [5 + (i * 7) % 300 for i in range(1300)]  # three prefill chunks of 512


def test_a_long_prompt_reports_progress_and_cancels_between_chunks(model_path):
    engine = Engine.load(model_path, capacity=4)
    seen = []
    done = run(engine, LONG_PROMPT, max_tokens=3, progress=lambda d, t: seen.append((d, t)))[1]
    assert seen[0] == (0, 1300) and seen[-1][0] >= 1024 and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert done.finish_reason == "length" and done.generated_tokens == 3
    cancel = threading.Event()
    calls = []

    def cancel_after_first_chunk(d, t):
        calls.append(d)
        if d > 0:
            cancel.set()

    done = run(engine, LONG_PROMPT[::-1], max_tokens=3, cancel=cancel, progress=cancel_after_first_chunk)[1]
    assert done.finish_reason == "cancelled" and done.generated_tokens == 0 and max(calls) < 1300
    # The partly filled cache was dropped: the next turn equals a fresh engine's.
    assert run(engine, PROMPT, max_tokens=8)[1].tokens == fresh_tokens(model_path, 4, PROMPT)[:8]


def test_decode_speed_is_not_reported_for_a_single_token(engine):
    done = run(engine, PROMPT, max_tokens=1)[1]
    assert done.decode_tps == 0.0  # its clock starts after prefill: ~1/0
    assert 0 < run(engine, PROMPT, max_tokens=6)[1].decode_tps < 1e5


def test_a_logit_bias_outside_the_logits_is_left_out_not_written_out_of_bounds():
    """MLX does not check scatter indices: id 20 on 8 logits corrupted the heap, a huge one crashed the server."""
    import mlx.core as mx
    from moe_tui.inference.generation import Penalties

    logits = mx.zeros((1, 8))
    (process,) = Penalties(bias={20: 5.0, 2_000_000: 1.0, 3: 2.0}).processors(0)
    out = process(mx.array([1, 2]), logits)
    assert out.tolist() == [[0, 0, 0, 2.0, 0, 0, 0, 0]]
