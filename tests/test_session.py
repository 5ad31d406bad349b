"""The engine session: jobs with their own cancel flags, tokenizing on its thread, and a thread that
survives whatever one job or one snapshot throws."""

from __future__ import annotations

import queue
import threading

import pytest
from moe_tui.inference import Engine
from moe_tui.inference.events import (
    Configure,
    Delta,
    Generate,
    JobDone,
    JobFailed,
    JobStarted,
    MissCurveRequest,
    Notice,
    Progress,
    SessionFailed,
    SessionReady,
    Snapshot,
    Tokenize,
)
from moe_tui.inference.session import QueueFull, Session, SessionClosed

PROMPT = [{"role": "user", "content": "def add(a, b):"}]


class Recorder:
    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def __call__(self, event) -> None:
        self.events.put(event)

    def until(self, kind, timeout: float = 60.0):
        """Events up to and including the first of type `kind`."""
        seen = []
        while True:
            event = self.events.get(timeout=timeout)
            seen.append(event)
            if isinstance(event, kind):
                return seen


@pytest.fixture
def started(checkpoint):
    sessions = []

    def start(**kwargs) -> tuple[Session, Recorder]:
        path = checkpoint("qwen3_moe")
        sink = Recorder()
        session = Session(lambda: Engine.load(path, capacity=4), sink, stats_interval=0.1, **kwargs)
        session.start()
        sink.until(SessionReady)
        sessions.append(session)
        return session, sink

    yield start
    for session in sessions:
        session.stop()
        session.join(10)


def test_a_job_streams_deltas_that_add_up_to_its_reply(started):
    session, sink = started()
    job = session.submit(Generate(PROMPT, max_tokens=12, temperature=0.0, tag="chat-1"))
    events = [e for e in sink.until(JobDone) if getattr(e, "job_id", None) == job.id]
    assert isinstance(events[0], JobStarted) and events[0].prompt_tokens > 0 and events[0].tag == "chat-1"
    text = "".join(e.text for e in events if isinstance(e, Delta))
    assert text == events[-1].done.text and events[-1].done.generated_tokens == 12


def test_the_thread_survives_a_failing_job_and_a_failing_snapshot(started, monkeypatch):
    session, sink = started()
    engine = session.engine
    real_stream, real_snapshot = engine.stream, engine.snapshot

    def broken_stream(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(engine, "stream", broken_stream)
    job = session.submit(Generate(PROMPT, max_tokens=4))
    failed = sink.until(JobFailed)[-1]
    assert failed.job_id == job.id and "Too many open files" in failed.error
    monkeypatch.setattr(engine, "stream", real_stream)

    snapshots = []

    def flaky_snapshot():
        snapshots.append(1)
        if len(snapshots) <= 3:
            raise OSError(24, "Too many open files")
        return real_snapshot()

    monkeypatch.setattr(engine, "snapshot", flaky_snapshot)
    sink.until(Snapshot, timeout=10)  # idle snapshots failed three times, then came back
    assert session.state == "ready"
    session.submit(Generate(PROMPT, max_tokens=4, temperature=0.0))
    assert sink.until(JobDone)[-1].done.generated_tokens == 4


def test_cancel_ends_only_its_own_job(started):
    session, sink = started()
    first = session.submit(Generate(PROMPT, max_tokens=200, temperature=0.0))
    second = session.submit(Generate(PROMPT, max_tokens=6, temperature=0.0))
    third = session.submit(Generate(PROMPT, max_tokens=6, temperature=0.0))
    session.cancel(third.id)  # still queued: it never starts
    sink.until(Delta)
    session.cancel(first.id)
    done = {}
    while len(done) < 3:
        event = sink.events.get(timeout=60)
        if isinstance(event, JobDone):
            done[event.job_id] = event.done
    assert done[first.id].finish_reason == "cancelled" and done[first.id].generated_tokens < 200
    assert done[second.id].finish_reason == "length" and done[second.id].generated_tokens == 6
    assert done[third.id].finish_reason == "cancelled" and done[third.id].generated_tokens == 0


def test_tokenize_runs_on_the_session_thread_even_mid_reply(started):
    session, sink = started()
    assert session.tokenize(Tokenize("def f(): pass")).result(10) == session.engine.encode("def f(): pass")
    session.submit(Generate(PROMPT, max_tokens=400, temperature=0.0))
    sink.until(Delta)
    seen = []
    real = session.engine.encode
    session.engine.encode = lambda prompt, *args: seen.append(threading.current_thread().name) or real(prompt, *args)
    assert len(session.tokenize(Tokenize(PROMPT)).result(10)) > 0
    assert seen == ["moe-inference"] and session.current is not None  # answered while the reply ran
    session.cancel()


def test_a_bounded_queue_refuses_and_a_stopped_session_ends_queued_jobs(started):
    session, sink = started(max_queue=1)
    session.submit(Generate(PROMPT, max_tokens=300, temperature=0.0))
    sink.until(JobStarted)
    queued = session.submit(Generate(PROMPT, max_tokens=4))
    with pytest.raises(QueueFull):
        session.submit(Generate(PROMPT, max_tokens=4))
    session.stop()
    session.join(10)
    ends = [e for e in list(sink.events.queue) if isinstance(e, JobDone)]
    assert {e.job_id for e in ends} >= {queued.id} and all(e.done.finish_reason == "cancelled" for e in ends)
    assert session.state == "stopped"
    with pytest.raises(SessionClosed):
        session.submit(Generate(PROMPT))


def test_configure_reports_and_a_failed_load_is_an_event(started, tmp_path):
    session, sink = started()
    session.configure(Configure(capacity=99))
    assert sink.until(Notice)[-1].severity == "error"
    sink2 = Recorder()
    broken = Session(lambda: Engine.load(tmp_path / "missing"), sink2)
    broken.start()
    assert "missing" in sink2.until(SessionFailed)[-1].error
    assert broken.state == "failed"


def test_a_message_too_long_for_the_context_fails_with_the_numbers(started, caplog):
    session, sink = started()
    session.engine.config["max_position_embeddings"] = 64
    huge = [{"role": "user", "content": "word " * 200}]
    job = session.submit(Generate(huge, max_tokens=16, fit_context=True))
    failed = sink.until(JobFailed)[-1]
    assert failed.job_id == job.id and "of the context window's 64 for the reply" in failed.error
    # The user's message, not a bug: no exception class name for the app to show, no traceback in the log.
    assert failed.error.startswith("the prompt takes")
    assert "Traceback" not in caplog.text


def test_a_reply_budget_over_half_the_window_does_not_drop_the_turns_that_fit(started):
    """max_tokens = 100000 in config.toml on a 2048-token model dropped every older turn of every chat (it made
    room for the whole budget), and the gauge said so for good."""
    session, sink = started()
    session.engine.config["max_position_embeddings"] = 256
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "and now?"}]
    session.submit(Generate(history, max_tokens=100_000, fit_context=True, temperature=0.0))
    started_event = sink.until(JobStarted)[-1]
    assert started_event.dropped_messages == 0  # the turns fit in half the window: kept
    assert started_event.max_tokens == 256 - started_event.prompt_tokens  # the reply may use all the rest
    sink.until(JobDone)


def test_a_long_prompt_reports_progress(started):
    session, sink = started()
    session.submit(Generate([5 + (i * 7) % 300 for i in range(1100)], max_tokens=2, temperature=0.0))
    events = sink.until(JobDone)
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and progress[0].done == 0 and progress[-1].done >= 1024 and progress[-1].total == 1100


def test_wake_ups_and_settings_never_take_a_waiting_jobs_place(started):
    session, sink = started(max_queue=1)
    session.submit(Generate(PROMPT, max_tokens=400, temperature=0.0))
    sink.until(JobStarted)
    answers = [session.tokenize(Tokenize("def f(): pass")) for _ in range(3)]  # each wakes the loop
    session.configure(Configure(policy="lfu"))
    assert session.waiting() == 0
    queued = session.submit(Generate(PROMPT, max_tokens=2))  # the one place is still free
    assert session.waiting() == 1
    with pytest.raises(QueueFull):
        session.submit(Generate(PROMPT, max_tokens=2))
    assert all(len(answer.result(30)) > 0 for answer in answers)
    session.cancel()
    done = [e for e in sink.until(JobDone) if isinstance(e, JobDone)]
    while not any(e.job_id == queued.id for e in done):
        done += [e for e in sink.until(JobDone) if isinstance(e, JobDone)]
    assert session.waiting() == 0


def test_idle_replays_stop_between_layers_when_a_job_comes(started, monkeypatch):
    """Belady's replay beside every policy (after each reply) and the miss curve (one per capacity) take seconds
    per capacity on a 48-layer model: a job that comes meanwhile waits at most one layer's replay, not the rest."""
    import time

    from moe_tui.inference import oracle

    session, sink = started(replay_optimum=True)
    session.submit(Generate(PROMPT, max_tokens=8, temperature=0.0))
    sink.until(JobDone)
    started_while_waiting = []
    replaying = threading.Event()

    def slow(real):
        def replay(*args, **kwargs):
            started_while_waiting.append(session._waiting > 0)
            replaying.set()
            time.sleep(0.1)
            return real(*args, **kwargs)
        return replay

    monkeypatch.setattr(oracle, "simulate_policy", slow(oracle.simulate_policy))
    monkeypatch.setattr(oracle, "belady", slow(oracle.belady))
    session.miss_curve(MissCurveRequest(tuple(range(1, 9))))
    assert replaying.wait(30)
    session.submit(Generate(PROMPT, max_tokens=4, temperature=0.0))
    sink.until(JobDone)
    assert sum(started_while_waiting) <= 1  # the replay under way when it came, at most


def test_belady_is_replayed_again_at_a_new_capacity(started):
    """After /capacity the panel's Belady figure is of the new capacity, not the old one's until more steps."""
    from moe_tui.inference.session import OPTIMUM_WINDOW

    session, sink = started(replay_optimum=True)
    session.submit(Generate(PROMPT, max_tokens=12, temperature=0.0))
    sink.until(JobDone)
    while sink.until(Snapshot)[-1].optimum is None:  # replayed at capacity 4 first
        pass
    session.configure(Configure(capacity=2))
    expected = None
    for _ in range(200):
        snap = sink.until(Snapshot)[-1]
        if snap.snapshot.capacity == 2 and snap.optimum is not None:
            expected = {name: r["hit_rate"] for name, r in session.engine.hit_rates_vs_optimum(
                2, OPTIMUM_WINDOW).items()}
            assert snap.optimum == expected
            break
    assert expected is not None


def test_fitting_a_long_chat_drops_the_fewest_oldest_turns_in_a_few_encodings():
    """The remote worker fitted a 200-message chat with one /tokenize request per dropped turn (188 requests
    before every reply, found in review): the fewest turns to drop are now found by bisection."""
    from moe_tui.inference.events import ContextOverflow, fit_messages

    chat = [{"role": "system", "content": "s" * 10}] + [{"role": "user" if i % 2 == 0 else "assistant",
                                                         "content": "x" * (10 + i % 7)} for i in range(200)]
    calls = []

    def encode(messages):
        calls.append(1)
        return "".join(m["content"] for m in messages)  # one token per character

    for context in (300, 700, 2000, 5000):
        calls.clear()
        prompt, kept, dropped, budget = fit_messages(chat, encode, context, 64)
        assert len(calls) <= 10  # the whole chat, then about log2(200) candidates
        linear = next(d for d in range(200) if len(encode(chat[:1] + chat[1 + d:])) <= context - 64)
        assert dropped == linear and kept == chat[:1] + chat[1 + dropped:] and prompt == encode(kept)
        assert budget == min(64, context - len(prompt))
    with pytest.raises(ContextOverflow):
        fit_messages([{"role": "user", "content": "x" * 500}], encode, 300, 64)
