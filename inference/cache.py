"""Per-layer expert slot bookkeeping and eviction policies; pure numpy, no MLX, so simulators reuse it."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

POLICIES = ("lru", "lfu", "decay", "lrfu", "markov")
DEFAULT_POLICY = "markov"  # the best on held-out routing traces of the demo model (docs/performance.md)
DECAY_HALF_LIFE = 128.0  # steps; priority = uses weighted by 0.5 ** (age / half_life)
LRFU_HALF_LIFE = 16.0  # steps; tuned on a recorded routing trace (docs/performance.md): flat from 10 to 24
MARKOV_WEIGHT = 4.0  # markov: weight of the follow-on chance (x num_experts) beside the lrfu score; tuned too
TRANSITION_PRIOR = 0.1  # markov: pseudo-count of every (expert, next-step expert) pair before any is seen


class LayerCache:
    """Which expert sits in which slot of one MoE layer, and who to evict next.

    `access(needed, step)` makes every expert in `needed` resident (evicting by policy, never a
    pinned expert nor one needed in the same step) and returns the (expert, slot) pairs to load.
    """

    def __init__(self, num_experts: int, capacity: int, policy: str = "lru") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if not 1 <= capacity <= num_experts:
            raise ValueError(f"capacity {capacity} must be between 1 and {num_experts}")
        self.num_experts = num_experts
        self.capacity = capacity
        self.policy = policy
        self.slot_of = np.full(num_experts, -1, dtype=np.int32)
        self.expert_in_slot = np.full(capacity, -1, dtype=np.int32)
        self.pinned: set[int] = set()
        self.last_use = np.full(num_experts, -1.0)
        self.use_count = np.zeros(num_experts)
        # Use counts decayed with DECAY_HALF_LIFE (decay) and LRFU_HALF_LIFE (lrfu, markov) as of last_use: every
        # policy's state is kept whatever the policy, so a live policy change starts from the history.
        self.decayed = np.zeros(num_experts)
        self.decayed_short = np.zeros(num_experts)
        # markov: how often expert j was routed in the step after one routing expert i (transitions[i, j]).
        self.transitions = np.full((num_experts, num_experts), TRANSITION_PRIOR, dtype=np.float32)
        self.step = -1  # the latest step touched, its experts, and the experts of the step before it
        self.step_experts: list[int] = []
        self.previous_experts: list[int] = []
        self._counted: list[tuple[list[int], list[int]]] = []  # (from, to) transitions not yet in the matrix
        self.prefetched = np.zeros(num_experts, dtype=bool)  # read ahead of use and not used yet

    # ---- policy state
    POLICY_STATE = ("last_use", "use_count", "decayed", "decayed_short", "transitions", "step", "step_experts",
                    "previous_experts")

    def copy_policy_state(self, other: LayerCache) -> None:
        """Take over `other`'s policy history (a cache rebuilt at another capacity)."""
        other.counted_transitions()
        for name in self.POLICY_STATE:
            value = getattr(other, name)
            setattr(self, name, value.copy() if hasattr(value, "copy") else value)

    def touch(self, experts: Iterable[int], step: int) -> None:
        experts = [int(e) for e in experts]
        if step != self.step:
            self.step, self.previous_experts, self.step_experts = step, self.step_experts, []
        new = [e for e in experts if e not in self.step_experts]
        if new:
            self.step_experts = self.step_experts + new
            # Steps of one token only: a prompt chunk routes to most experts and says nothing of what follows.
            limit = max(self.num_experts // 4, 1)
            if 0 < len(self.previous_experts) <= limit and len(self.step_experts) <= limit:
                self._counted.append((self.previous_experts, new))  # added in bulk when next needed (cheaper)
                if len(self._counted) >= 256:
                    self.counted_transitions()
        for e in experts:
            last = self.last_use[e]
            age = step - last if last >= 0 else 0.0
            self.decayed[e] = self.decayed[e] * 0.5 ** (age / DECAY_HALF_LIFE) + 1.0
            self.decayed_short[e] = self.decayed_short[e] * 0.5 ** (age / LRFU_HALF_LIFE) + 1.0
            self.last_use[e] = step
            self.use_count[e] += 1

    def counted_transitions(self) -> np.ndarray:
        """`transitions` with every step touched so far counted in."""
        if self._counted:
            rows = [a for before, after in self._counted for a in before for _ in after]
            cols = [b for before, after in self._counted for _ in before for b in after]
            np.add.at(self.transitions, (np.array(rows), np.array(cols)), 1.0)
            self._counted = []
        return self.transitions

    def priority(self, experts: np.ndarray, step: int) -> np.ndarray:
        """Higher = keep. Ties break towards evicting the lower expert id (deterministic).

        lru: last use; lfu: uses; decay and lrfu: uses weighted by 0.5 ** (age / half-life), frequency and
        recency together (LRFU), at a long (128 steps) and a short (16 steps) half-life; markov: lrfu's score
        plus MARKOV_WEIGHT x num_experts x the chance, learned from this layer's routing so far, that an
        expert is routed in the step after one routing the latest step's experts.
        """
        if self.policy == "lru":
            return self.last_use[experts]
        if self.policy == "lfu":
            return self.use_count[experts]
        age = np.maximum(step - self.last_use[experts], 0)
        if self.policy == "decay":
            return self.decayed[experts] * 0.5 ** (age / DECAY_HALF_LIFE)
        score = self.decayed_short[experts] * 0.5 ** (age / LRFU_HALF_LIFE)
        if self.policy == "markov" and self.step_experts:
            follow = self.counted_transitions()[self.step_experts].sum(0)
            score = score + MARKOV_WEIGHT * self.num_experts * follow[experts] / follow.sum()
        return score

    # ---- residency
    def resident(self) -> np.ndarray:
        return np.sort(self.expert_in_slot[self.expert_in_slot >= 0])

    def free_slots(self) -> np.ndarray:
        return np.flatnonzero(self.expert_in_slot < 0)

    def victims(self, count: int, protected: set[int], step: int) -> list[int]:
        """`count` resident experts to evict, lowest priority first."""
        candidates = np.array(
            [e for e in self.expert_in_slot if e >= 0 and e not in protected and e not in self.pinned],
            dtype=np.int64,
        )
        if len(candidates) < count:
            raise RuntimeError(
                f"cache of {self.capacity} slots cannot make room for {count} experts "
                f"({len(self.pinned)} pinned)"
            )
        order = np.lexsort((candidates, self.priority(candidates, step)))
        return [int(e) for e in candidates[order[:count]]]

    def access(self, needed: Iterable[int], step: int, touch: bool = True,
               keep: Iterable[int] = ()) -> list[tuple[int, int, int]]:
        """Make `needed` resident, evicting neither them nor the experts in `keep`. Returns (expert, slot,
        evicted_expert or -1) for each miss."""
        needed = [int(e) for e in needed]
        if touch:
            self.touch(needed, step)
        missing = [e for e in needed if self.slot_of[e] < 0]
        return self.admit(missing, protected={*needed, *(int(e) for e in keep)}, step=step)

    def admit(self, experts: list[int], protected: set[int], step: int) -> list[tuple[int, int, int]]:
        """Give each expert in `experts` (not resident) a slot, evicting by policy where full."""
        if len(experts) > self.capacity:
            raise ValueError(f"{len(experts)} experts cannot fit in {self.capacity} slots at once")
        free = [int(f) for f in self.free_slots()]
        shortfall = max(0, len(experts) - len(free))
        evicted = self.victims(shortfall, protected, step) if shortfall else []
        placements = []
        for e in experts:
            if free:
                # An expert's own id as its slot where free: a full cache then needs no lookup table.
                slot = e if e in free else int(free[0])
                free.remove(slot)
                old = -1
            else:
                old = evicted.pop(0)
                slot = int(self.slot_of[old])
                self.slot_of[old] = -1
            self.slot_of[e] = slot
            self.expert_in_slot[slot] = e
            placements.append((e, slot, old))
        return placements

    # ---- size (`inference/budget.py` moves slots between layers' caches)
    def grow(self) -> None:
        """One slot more, empty, at the end."""
        self.expert_in_slot = np.append(self.expert_in_slot, np.int32(-1))
        self.capacity += 1

    def shrink(self, step: int) -> tuple[int, int]:
        """One slot fewer: the last one goes. A free slot is given up where there is one, else the policy's
        victim's (never a pinned expert); the last slot's expert then moves into the slot given up. Returns
        (the evicted expert or -1, the slot given up): when that slot is not the last, whoever holds the slots'
        contents copies the last row into it."""
        free = self.free_slots()
        if len(free):
            evicted, slot = -1, int(free[-1])
        else:
            evicted = self.victims(1, set(), step)[0]
            slot = int(self.slot_of[evicted])
            self.slot_of[evicted] = -1
            self.prefetched[evicted] = False
        last = self.capacity - 1
        moved = int(self.expert_in_slot[last])
        if slot != last:
            self.expert_in_slot[slot] = moved
            if moved >= 0:
                self.slot_of[moved] = slot
        self.expert_in_slot = self.expert_in_slot[:last].copy()
        self.capacity = last
        return evicted, slot

    def pin(self, experts: Iterable[int]) -> None:
        experts = [int(e) for e in experts]
        if len(set(experts) | self.pinned) > self.capacity:
            raise ValueError(f"cannot pin {len(experts)} experts in {self.capacity} slots")
        self.pinned.update(experts)


class LayerCounters:
    """Counters for every MoE layer x expert; owned by the inference thread, copied into snapshots."""

    FIELDS = ("requests", "hits", "misses", "fallbacks", "loads", "evictions",
              "prefetches", "prefetch_hits", "prefetch_wasted")  # read early; of those used; evicted unused

    def __init__(self, num_layers: int, num_experts: int, recent_half_life: float = 64.0) -> None:
        shape = (num_layers, num_experts)
        for name in self.FIELDS:
            setattr(self, name, np.zeros(shape, dtype=np.int64))
        self.bytes_read = np.zeros(num_layers, dtype=np.int64)
        self.prefetch_bytes = np.zeros(num_layers, dtype=np.int64)
        self.load_seconds = np.zeros(num_layers, dtype=np.float64)  # the forward pass waiting on reads
        # Next-layer prediction per layer: experts guessed, of those needed, experts needed when guessed.
        self.guesses = np.zeros(num_layers, dtype=np.int64)
        self.guess_hits = np.zeros(num_layers, dtype=np.int64)
        self.guess_needed = np.zeros(num_layers, dtype=np.int64)
        # Decoding only (one token per forward step): steps, seconds waiting on reads, bytes read.
        self.decode_steps = 0
        self.decode_stall_seconds = 0.0
        self.decode_bytes = 0
        self.read_seconds = 0.0  # wall time with expert reads in flight (demand and ahead)
        self.recent = np.zeros(shape, dtype=np.float64)  # routing counts decayed per step
        self.recent_decay = 0.5 ** (1.0 / recent_half_life)
        self.last_missed = np.zeros(shape, dtype=bool)

    def reset(self) -> None:
        for name in self.FIELDS:
            getattr(self, name)[:] = 0
        for name in ("bytes_read", "prefetch_bytes", "load_seconds", "guesses", "guess_hits", "guess_needed"):
            getattr(self, name)[:] = 0
        self.decode_steps = self.decode_bytes = 0
        self.decode_stall_seconds = self.read_seconds = 0.0
        self.recent[:] = 0
        self.last_missed[:] = False
