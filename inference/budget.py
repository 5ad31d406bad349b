"""One memory budget for the expert slots of all MoE layers, moved to where a slot makes more experts ready.

With reads ahead, layers differ in what one more slot buys: a layer whose experts are guessed well needs
little beyond a token's experts and its guesses, while the first layer (its input is the next token: guessed
only from that token's last routing) and poorly guessed layers turn extra slots into hits. Each layer runs
two shadow replays of its own cache (`LayerReplay`), one slot larger and one smaller, on the routing and
guesses the engine sees; every
MOVE_EVERY decoding steps a slot moves from the layer that would lose the fewest ready experts without it to
the one that would gain the most with it, when the gain clearly exceeds the loss. Pure numpy: the engine
applies the moves to its slot tensors, and the replays use the same class on recorded traces.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from .cache import LayerCache
from .oracle import LayerReplay, Step

MOVE_EVERY = 32  # decoding steps between decisions
SCORE_DECAY = 0.995  # per step: recent routing counts most (half-life ~140 steps)
MOVE_MARGIN = 0.25  # a slot moves when the gain beats the loss by this share...
MOVE_MIN_GAIN = 1.0  # ...and by this many (decayed) ready experts
MOVE_TIME_SHARE = 0.01  # moves take at most this share of the time: a move copies two layers' slot tensors


class SlotBudget:
    """Shadow replays of every layer's cache, and the slot moves they call for.

    `observe` each decoding layer call before the engine makes its experts resident; `decide` once per
    decoding step; after applying a move with the caches' `shrink` and `grow`, call `moved`.
    """

    def __init__(self, caches: Sequence[LayerCache], top_k: int, step: int = 0) -> None:
        self.caches = list(caches)
        self.top_k = top_k
        self.score = np.zeros((len(self.caches), 3))  # decayed ready experts one slot smaller, as is, one larger
        self.shadows = [self._shadows(i, step) for i in range(len(self.caches))]
        self.steps = 0
        self.moves = 0
        self._last_step = step
        self._quiet_until = 0.0  # no move before this time (a move's cost, spread by MOVE_TIME_SHARE)

    def floor(self, i: int) -> int:
        """A layer keeps room for one token's experts and as many guesses beside its pinned experts."""
        return 2 * self.top_k + len(self.caches[i].pinned)

    def _shadows(self, i: int, step: int) -> tuple[LayerReplay | None, LayerReplay | None]:
        cache = self.caches[i]
        larger = smaller = None
        if cache.capacity < cache.num_experts:
            larger = LayerReplay(copy.deepcopy(cache), self.top_k)
            larger.cache.grow()
        if cache.capacity > self.floor(i):
            smaller = LayerReplay(copy.deepcopy(cache), self.top_k)
            smaller.cache.shrink(step)
        return smaller, larger

    def observe(self, i: int, step: int, experts: Step, guesses: Step = (), ready: int | None = None) -> None:
        """Layer `i` runs `experts` this step after guessing `guesses` for it (best first; empty where it made
        none). `ready`: how many were resident when it ran; by default its cache is asked now (call before
        the layer's own accesses, after its reads ahead)."""
        experts = sorted(set(int(e) for e in experts))
        if ready is None:
            ready = int((self.caches[i].slot_of[experts] >= 0).sum()) if experts else 0
        smaller, larger = self.shadows[i]
        down = smaller.step(step, experts, guesses) if smaller is not None else ready
        up = larger.step(step, experts, guesses) if larger is not None else ready
        if len(experts) <= self.top_k:  # a prompt chunk's many experts say little about decoding
            self.score[i] += (down, ready, up)

    def decide(self, step: int, now: float | None = None) -> tuple[int, int] | None:
        """At the start of each decoding step: (layer giving a slot, layer taking it) when one should move
        now, else None. `now`: seconds on the clock `moved` was given.

        Shadows coming back after steps they did not see (a prompt, reads ahead off) restart from the caches.
        (Shadows replaying only some of the steps, restarted for each look, cost less but decided worse: on the
        offload benchmark's trace the first layer never got its slots, docs/performance.md.)"""
        phase = self.steps % MOVE_EVERY
        self.steps += 1
        if step != self._last_step + 1:
            self.restart(step, *range(len(self.caches)), keep_scores=True)
        self._last_step = step
        self.score *= SCORE_DECAY
        if phase or self.steps == 1 or len(self.caches) < 2 or (now is not None and now < self._quiet_until):
            return None
        gain = self.score[:, 2] - self.score[:, 1]
        loss = self.score[:, 1] - self.score[:, 0]
        takers = [i for i, (_, larger) in enumerate(self.shadows) if larger is not None]
        if not takers:
            return None
        taker = max(takers, key=lambda i: gain[i])
        givers = [j for j, (smaller, _) in enumerate(self.shadows) if smaller is not None and j != taker]
        if not givers:
            return None
        giver = min(givers, key=lambda j: loss[j])
        if gain[taker] <= loss[giver] * (1 + MOVE_MARGIN) + MOVE_MIN_GAIN:
            return None
        return giver, taker

    def moved(self, step: int, giver: int, taker: int, seconds: float = 0.0, now: float = 0.0) -> None:
        """A slot moved from `giver` to `taker` (taking `seconds`, ending at `now`): their shadows restart from
        the caches as they are now."""
        self.restart(step, giver, taker)
        self.moves += 1
        self._quiet_until = now + seconds / MOVE_TIME_SHARE

    def restart(self, step: int, *layers: int, keep_scores: bool = False) -> None:
        """Shadows of `layers` made again from their caches (which changed, or went on without them)."""
        for i in layers:
            self.shadows[i] = self._shadows(i, step)
            if not keep_scores:
                self.score[i] = 0.0

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(c.capacity for c in self.caches)


def replay_shared(traces: Sequence[Sequence[Step]], guesses: Sequence[Sequence[Step]] | None, num_experts: int,
                  capacity: int, policy: str, top_k: int) -> dict:
    """Ready rate over all layers when `capacity` slots per layer are one budget moved by `SlotBudget`: every
    layer's cache replayed step by step (`LayerReplay`), all layers in step. Returns hits, accesses,
    hit_rate, the final capacities and the number of moves."""
    caches = [LayerCache(num_experts, capacity, policy) for _ in traces]
    replays = [LayerReplay(cache, top_k) for cache in caches]
    budget = SlotBudget(caches, top_k)
    for step in range(max((len(t) for t in traces), default=0)):
        # As the engine: a decision at the start of each decoding step (a prompt chunk is neither decided nor
        # watched), then every layer's reads ahead, the budget's look, and the layer's own accesses.
        decoding = not any(step < len(t) and len(set(t[step])) > top_k for t in traces)
        if decoding:
            move = budget.decide(step)
            if move is not None:
                giver, taker = move
                caches[giver].shrink(step)
                caches[taker].grow()
                budget.moved(step, giver, taker)
        for i, (trace, replay) in enumerate(zip(traces, replays, strict=True)):
            if step >= len(trace):
                continue
            experts = sorted(set(int(e) for e in trace[step]))
            g = guesses[i][step] if guesses is not None else ()
            replay.read_ahead(step, experts, g)
            if decoding:
                budget.observe(i, step, experts, g)
            replay.run(step, experts)
    hits, accesses = sum(r.hits for r in replays), sum(r.accesses for r in replays)
    return {"hits": hits, "accesses": accesses, "hit_rate": hits / accesses if accesses else 0.0,
            "capacities": list(budget.capacities), "moves": budget.moves}
