"""`GET /v1/stats/miss-curve`: the hit rate every policy and Belady's MIN would get at each capacity, replayed on
the engine's routing trace by the session's thread between jobs, as the app's own panel gets it. The event loop
only waits for the answers, and the session replays one capacity at a time, so a request that comes meanwhile
waits at most for one capacity's replay."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass

from starlette.responses import JSONResponse

from ..events import MissCurveDone, MissCurveRequest
from ..oracle import MISS_CURVE_LAYERS, curve_capacities
from ..session import OPTIMUM_WINDOW, Session, SessionClosed
from ..telemetry import CacheSnapshot
from .errors import openai_body

REPLAY_TIMEOUT = 600.0  # seconds a request waits for its replay (a large model's takes a while between jobs)
MOST_CAPACITIES = 256


class BadQuery(ValueError):
    """The query names capacities or a window the model cannot have."""


@dataclass
class _Waiter:
    after: int  # the newest job id when the replay was asked for: a later job's first event means it was dropped
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def settle(self, answer: MissCurveDone | SessionClosed | None) -> None:
        def put() -> None:
            if self.future.done():  # a request that timed out has cancelled it
                return
            if isinstance(answer, SessionClosed):
                self.future.set_exception(answer)
            else:
                self.future.set_result(answer)

        try:
            self.loop.call_soon_threadsafe(put)
        except RuntimeError:  # the server's event loop has closed: nobody waits any more
            pass


class MissCurves:
    """Hands each replay's `MissCurveDone` to the request that asked for it.

    The session replays requests in the order they were queued and drops one (answering nothing) when a job
    arrives first; it runs jobs in order too. So a request's answer, if any, comes before the first event of
    any job submitted after it, and that event tells a request still waiting that its replay was dropped.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self._lock = threading.Lock()
        self._waiting: deque[_Waiter] = deque()  # in the order their requests were queued
        self._newest_job = 0

    # ---- the session's thread
    def on_event(self, event) -> None:
        """Every event that belongs to no job (the session's sink)."""
        if isinstance(event, MissCurveDone):
            with self._lock:
                waiter = self._waiting.popleft() if self._waiting else None
            if waiter is not None:
                waiter.settle(event)

    def on_job_event(self, event) -> None:
        """Every event of a job: the first one of a job submitted after a waiting request ends its wait."""
        if not self._waiting:  # the common case, every token: no lock
            return
        job_id = getattr(event, "job_id", 0)
        with self._lock:
            while self._waiting and self._waiting[0].after < job_id:
                self._waiting.popleft().settle(None)

    def close(self) -> None:
        """The session stopped (any thread): every request still waiting gets SessionClosed now, not after its
        timeout (the replays queued will not run)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for waiter in waiting:
            waiter.settle(SessionClosed("the inference session has stopped"))

    # ---- the event loop
    def submitted(self, job_id: int) -> None:
        self._newest_job = max(self._newest_job, job_id)

    async def replay(self, request: MissCurveRequest, timeout: float = REPLAY_TIMEOUT) -> MissCurveDone | None:
        """The replay's answer; None when a reply came first (the session is busy: ask again when it is idle).

        One capacity at a time: between two, the session tokenizes and starts the requests that came meanwhile.

        Raises:
            SessionClosed: the session has stopped. TimeoutError: no answer within `timeout`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        newest_job = self._newest_job
        rates: dict[str, list[float]] = {}
        steps = None
        for capacity in request.capacities:
            done = await self._replay_one(MissCurveRequest((capacity,), request.last_steps, request.layers),
                                          deadline - loop.time())
            if done is None or self._newest_job != newest_job or steps not in (None, done.steps):
                return None  # the trace moved on: the capacities replayed so far would not match the others
            steps = done.steps
            for name, values in done.rates.items():
                rates.setdefault(name, []).extend(values)
        return MissCurveDone(tuple(request.capacities), {name: tuple(v) for name, v in rates.items()}, steps or 0)

    async def _replay_one(self, request: MissCurveRequest, timeout: float) -> MissCurveDone | None:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(self._newest_job, loop, loop.create_future())
        with self._lock:  # queued in the order of `_waiting`
            self.session.miss_curve(request)
            self._waiting.append(waiter)
        # Left in `_waiting` on a timeout: its answer may still come, and must not go to the next request.
        return await asyncio.wait_for(waiter.future, max(timeout, 0.0))


def parse_query(params, num_experts: int, capacity: int) -> MissCurveRequest:
    """`capacities=1,2,8` (default: the ones the app's panel asks for), `layers=N` (MoE layers replayed, spread
    evenly; default the panel's MISS_CURVE_LAYERS; `all`) and `last_steps=N` (default: the panel's
    window; `all`: the whole trace) from a query string.

    Raises:
        BadQuery: a capacity outside 1..num_experts, too many of them, or a window below one step.
    """
    raw = params.get("capacities")
    try:
        capacities = (tuple(int(c) for c in raw.split(",") if c.strip()) if raw
                      else curve_capacities(num_experts, capacity))
        window = params.get("last_steps", str(OPTIMUM_WINDOW))
        last_steps = None if window == "all" else int(window)
        sample = params.get("layers", str(MISS_CURVE_LAYERS))
        layers = None if sample == "all" else int(sample)
    except ValueError as exc:
        raise BadQuery("'capacities' must be integers separated by commas, 'last_steps' and 'layers' an integer or "
                       "'all'") from exc
    if not capacities or len(capacities) > MOST_CAPACITIES or not all(1 <= c <= num_experts for c in capacities):
        raise BadQuery(f"'capacities' must name 1 to {MOST_CAPACITIES} capacities between 1 and {num_experts}")
    if last_steps is not None and last_steps < 1:
        raise BadQuery("'last_steps' must be at least 1")
    if layers is not None and layers < 1:
        raise BadQuery("'layers' must be at least 1")
    return MissCurveRequest(capacities, last_steps, layers)


async def respond(curves: MissCurves, params, snap: CacheSnapshot) -> JSONResponse:
    """The endpoint's answer: {"capacities": [...], "rates": {name: [rate per capacity]}, "steps": traced steps,
    "last_steps": the window, "layers": how many layers were sampled (null: all)}, or an error in the OpenAI
    format (409 before any routing, 503 with Retry-After when a reply started first)."""
    try:
        request = parse_query(params, snap.num_experts, snap.capacity)
    except BadQuery as exc:
        return JSONResponse(openai_body(str(exc), param="capacities"), status_code=400)
    if not snap.trace_length or not snap.num_moe_layers:
        return JSONResponse(openai_body("no routing recorded yet: the miss curve replays earlier replies' routing"),
                            status_code=409)
    try:
        done = await curves.replay(request)
    except SessionClosed:
        return JSONResponse(openai_body("the server is shutting down", "server_error"), status_code=503)
    except TimeoutError:
        return JSONResponse(openai_body("the replay took too long", "server_error"), status_code=504)
    if done is None:
        return JSONResponse(openai_body("a reply started before the replay ended: ask again when the engine is idle",
                                        "server_error"), status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"capacities": list(done.capacities),
                         "rates": {name: list(rates) for name, rates in done.rates.items()},
                         "steps": done.steps, "last_steps": request.last_steps,
                         "layers": request.layers if (request.layers or 0) < snap.num_moe_layers else None})
