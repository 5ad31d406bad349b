"""Replay routing traces: hit rates of each eviction policy and of Belady's MIN (the offline optimum).

A trace for one layer is a sequence of steps; each step is the set of distinct experts one forward
pass routed to. An access hits when the expert is resident at the start of the step, the same unit
the engine counts. Every replay starts from the same cache: empty, or `start`, the experts the realized
cache held when the trace's first step began (so Belady's MIN is compared with the run it replays).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import numpy as np

from .cache import DEFAULT_POLICY, POLICIES, LayerCache

Step = Sequence[int]


def _counts(hits: int, accesses: int) -> dict[str, float]:
    return {"hits": hits, "accesses": accesses, "hit_rate": hits / accesses if accesses else 0.0}


# The engine's reads-ahead gate (inference/expert_cache.py), repeated here so replays stay pure numpy;
# tests/test_oracle.py checks they agree.
PREFETCH_MIN_PRECISION = 0.4
PREFETCH_MEMORY = 0.95
PREFETCH_WARMUP = 4.0


def prediction_guesses(capacity: int, top_k: int, pinned: int = 0) -> int:
    """Experts the engine guesses per layer at `capacity` (as its `prefetch_guesses`)."""
    return max(0, min(2 * top_k, capacity - pinned - top_k))


def _seeded(num_experts: int, capacity: int, policy: str, start: Sequence[int]) -> LayerCache:
    """A cache holding the first `capacity` experts of `start` (most valuable first), as if each had been used
    once before the trace in that order: the policy inherits the residency, not the history behind it."""
    cache = LayerCache(num_experts, capacity, policy)
    kept = list(dict.fromkeys(int(e) for e in start))[:capacity]
    if kept:
        cache.admit(kept, set(kept), -1)
        for rank, e in enumerate(kept):
            cache.last_use[e] = -1 - rank
            cache.use_count[e] = 1
            cache.decayed[e] = cache.decayed_short[e] = 1.0
    return cache


class LayerReplay:
    """One layer's cache replayed step by step as the engine runs it. With guesses (the experts predicted for
    the step, best first), the first `prediction_guesses` of them that are not resident are read first, as the
    engine's next-layer prefetch does: the same admission and protection and the same per-rank precision gate.
    Then the step's experts are made resident. A hit means ready: resident when the layer runs, whether kept or
    read ahead. `prefetches` counts experts read ahead, `prefetch_hits` those used before eviction."""

    def __init__(self, cache: LayerCache, top_k: int) -> None:
        self.cache = cache
        self.top_k = top_k
        self.record = np.zeros((2 * top_k, 2))  # per guess rank: recent (needed, scored) guesses not resident
        self.hits = self.accesses = self.prefetches = self.prefetch_hits = 0

    def step(self, step: int, experts: Step, guesses: Step = ()) -> int:
        """Replay one step; returns its hits."""
        experts = sorted(set(int(e) for e in experts))
        self.read_ahead(step, experts, guesses)
        return self.run(step, experts)

    def read_ahead(self, step: int, experts: list[int], guesses: Step) -> None:
        """The guesses made for this step read into the cache (`experts`, sorted: what it will need, for the
        precision gate)."""
        cache = self.cache
        g = prediction_guesses(cache.capacity, self.top_k, len(cache.pinned))
        ranked = list(dict.fromkeys(int(e) for e in guesses))[:g] if g else []
        missing = [(r, e) for r, e in enumerate(ranked) if cache.slot_of[e] < 0]
        if missing:
            used, scored = self.record[:, 0], self.record[:, 1]
            worth = (scored < PREFETCH_WARMUP) | (used >= PREFETCH_MIN_PRECISION * scored)
            guessed = set(ranked)
            evictable = sum(1 for e in cache.expert_in_slot if e < 0 or (e not in guessed and e not in cache.pinned))
            for e, _, old in cache.admit([e for r, e in missing if worth[r]][:evictable], guessed, step):
                if old >= 0:
                    cache.prefetched[old] = False
                cache.prefetched[e] = True
                self.prefetches += 1
            for r, e in missing:
                self.record[r] = self.record[r] * PREFETCH_MEMORY + (e in experts, 1)

    def run(self, step: int, experts: list[int]) -> int:
        """The step's experts (sorted) made resident; returns how many were ready."""
        cache = self.cache
        hits = 0
        if experts:
            resident = cache.slot_of[experts] >= 0
            hits = int(resident.sum())
            ready = [e for e, r in zip(experts, resident, strict=True) if r and cache.prefetched[e]]
            self.prefetch_hits += len(ready)
            cache.prefetched[ready] = False
        self.hits += hits
        self.accesses += len(experts)
        for group in _groups(experts, cache.capacity):
            for _, _, old in cache.access(group, step):
                if old >= 0:
                    cache.prefetched[old] = False
        return hits


def simulate_policy(trace: Sequence[Step], num_experts: int, capacity: int, policy: str,
                    guesses: Sequence[Step] | None = None, top_k: int = 1,
                    start: Sequence[int] = ()) -> dict[str, float]:
    """Hit rate the engine's own `LayerCache` gets on `trace` with `policy`, from `start` (see `_seeded`); with
    `guesses` (per step, as in a recorded trace) the ready rate with the engine's reads ahead (`LayerReplay`)."""
    replay = LayerReplay(_seeded(num_experts, capacity, policy, start), top_k)
    for step, experts in enumerate(trace):
        replay.step(step, experts, guesses[step] if guesses is not None else ())
    result = _counts(replay.hits, replay.accesses)
    if guesses is not None:
        result.update(prefetches=replay.prefetches, prefetch_hits=replay.prefetch_hits)
    return result


class _ToldCache(LayerCache):
    """A policy's cache that also knows which experts the next steps route to (`soon`): it evicts one of
    those only when every candidate is."""

    soon: frozenset[int] = frozenset()

    def priority(self, experts: np.ndarray, step: int) -> np.ndarray:
        scores = super().priority(experts, step).astype(np.float64)
        if not len(scores):
            return scores
        lift = scores.max() - scores.min() + 1.0  # above every score of an expert not needed soon
        return scores + lift * np.isin(experts, list(self.soon))


def told_next(trace: Sequence[Step], num_experts: int, capacity: int, policy: str = DEFAULT_POLICY,
              steps: int = 1) -> dict[str, float]:
    """Hit rate of `policy` as a demand cache told the experts of the next `steps` steps (an expert one of
    them routes to is evicted last; among the rest the policy ranks as usual): what a perfect predictor of
    the next steps would make of the same slots without reading anything ahead. Not a bound in theory,
    but on the demo's traces `steps=1` reaches 88-92% of Belady's hit rate at 25% and 50%: a policy that
    only predicts the next step, however well, gets little closer (docs/performance.md)."""
    replay = LayerReplay(_ToldCache(num_experts, capacity, policy), top_k=1)
    sets = [sorted({int(e) for e in experts}) for experts in trace]
    for t, experts in enumerate(sets):
        replay.cache.soon = frozenset(e for later in sets[t + 1 : t + 1 + steps] for e in later)
        replay.run(t, experts)
    return _counts(replay.hits, replay.accesses)


def belady(trace: Sequence[Step], capacity: int, start: Sequence[int] = ()) -> dict[str, float]:
    """Belady's MIN: on a miss with a full cache, evict the expert whose next use is furthest away. It starts
    with the experts of `start` (those used soonest where more than `capacity`: it knows the future)."""
    steps = [sorted(set(int(e) for e in experts)) for experts in trace]
    uses: dict[int, list[int]] = {}
    for t, experts in enumerate(steps):
        for e in experts:
            uses.setdefault(e, []).append(t)

    def next_use(expert: int, after: int) -> float:
        times = uses.get(expert, ())
        i = bisect.bisect_right(times, after)
        return times[i] if i < len(times) else float("inf")

    resident = set(sorted({int(e) for e in start}, key=lambda e: (next_use(e, -1), e))[:capacity])
    hits = accesses = 0
    for t, experts in enumerate(steps):
        accesses += len(experts)
        hits += sum(1 for e in experts if e in resident)
        groups = _groups(experts, capacity)
        for g, group in enumerate(groups):
            protected = set(group)
            pending = {e for later in groups[g + 1 :] for e in later}
            for e in group:
                if e in resident:
                    continue
                if len(resident) >= capacity:
                    # An expert a later group of this step still needs is used sooner than any future step.
                    victim = max(
                        (r for r in resident if r not in protected),
                        key=lambda r: (t + 0.5 if r in pending else next_use(r, t), r),
                    )
                    resident.discard(victim)
                resident.add(e)
    return _counts(hits, accesses)


def _groups(experts: list[int], capacity: int) -> list[list[int]]:
    """A step needing more experts than slots is processed in cache-sized groups, as the engine does."""
    return [experts[i : i + capacity] for i in range(0, len(experts), capacity)] or [[]]


def compare(traces: Sequence[Sequence[Step]], num_experts: int, capacity: int,
            guesses: Sequence[Sequence[Step]] | None = None, top_k: int = 1,
            policies: Sequence[str] = POLICIES,
            starts: Sequence[Sequence[int]] | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict[str, dict[str, float]] | None:
    """Hit rates over all layers for every policy and for Belady, at one capacity.

    With `guesses` (per layer, per step, as in a recorded trace) each policy is also replayed with the
    engine's next-layer prefetch, as "POLICY+prediction" (hit rate = ready rate). With `starts` (per layer,
    the experts resident when its first step began, most valuable first) every replay starts from them.
    `should_stop` is asked before each layer's replay: None comes back when it says stop (a 48-layer model's
    replay at one capacity takes seconds; whoever waits on the CPU meanwhile waits at most one layer's).
    """
    result: dict[str, dict[str, float]] = {}
    runs = [(name, False) for name in (*policies, "belady")]
    if guesses is not None:
        runs += [(name, True) for name in policies]
    for name, predicted in runs:
        total: dict[str, float] = {}
        for i, trace in enumerate(traces):
            if should_stop is not None and should_stop():
                return None
            start = starts[i] if starts is not None else ()
            if name == "belady":
                r = belady(trace, capacity, start)
            else:
                r = simulate_policy(trace, num_experts, capacity, name, guesses[i] if predicted else None, top_k,
                                    start)
            for key, value in r.items():
                if key != "hit_rate":
                    total[key] = total.get(key, 0) + value
        result[name + ("+prediction" if predicted else "")] = {
            **total, **_counts(total.get("hits", 0), total.get("accesses", 0))}
    return result


MISS_CURVE_LAYERS = 8  # layers a miss curve replays (spread evenly): all 48 of a large model took ~5 min of CPU


def sampled_layers(num_layers: int, most: int | None) -> list[int]:
    """`most` layer indexes spread evenly from the first to the last (all of them when there are no more)."""
    if most is None or num_layers <= most:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / max(most - 1, 1)) for i in range(most)})


def curve_capacities(num_experts: int, current: int, most: int = 24) -> tuple[int, ...]:
    """Capacities a miss curve replays: every one from 1 to all experts when there are few, else `most` spread
    evenly (the current capacity always among them)."""
    if num_experts <= most:
        return tuple(range(1, num_experts + 1))
    spread = {max(1, round(1 + i * (num_experts - 1) / (most - 1))) for i in range(most)}
    return tuple(sorted(spread | {min(max(current, 1), num_experts)}))


def hit_curve(trace: Sequence[Step], num_experts: int, policy: str = "belady") -> list[int]:
    """Hits of one layer's trace at every capacity 1..num_experts (index c - 1)."""
    return [int((belady(trace, c) if policy == "belady" else simulate_policy(trace, num_experts, c, policy))["hits"])
            for c in range(1, num_experts + 1)]


def shared_budget(curves: Sequence[Sequence[int]], capacity: int, minimum: int = 1) -> dict:
    """Hits with `capacity` slots in every layer vs the best split of the same total across layers.

    `curves[layer][c - 1]` are the layer's hits with c slots (`hit_curve`); each layer keeps at least
    `minimum` (top_k: a token's own experts must fit). Exact (dynamic programming over the split).
    """
    n, E = len(curves), len(curves[0]) if curves else 0
    total = capacity * n
    best = {0: (0, ())}  # slots used so far -> (hits, allocation)
    for curve in curves:
        nxt: dict[int, tuple[int, tuple[int, ...]]] = {}
        for used, (hits, alloc) in best.items():
            for c in range(minimum, E + 1):
                if used + c > total:
                    break
                cand = (hits + curve[c - 1], (*alloc, c))
                if cand[0] > nxt.get(used + c, (-1, ()))[0]:
                    nxt[used + c] = cand
        best = nxt
    hits, alloc = max(best.values(), key=lambda v: v[0]) if best else (0, ())
    return {"uniform_hits": int(sum(curve[capacity - 1] for curve in curves)), "shared_hits": int(hits),
            "allocation": list(alloc)}


REPLAY_FRACTIONS = (0.125, 0.25, 0.5, 0.75)


def replay_report(trace, fractions: Sequence[float] = REPLAY_FRACTIONS) -> dict:
    """Every policy (and, where the trace holds guesses, with prediction) beside Belady at each capacity,
    plus what one budget shared across layers would gain: the JSON of `moe bench --replay`."""
    E, K = trace.num_experts, trace.top_k
    accesses = trace.accesses
    shared_names = ("belady", DEFAULT_POLICY, "lru")
    curves = {name: [hit_curve(layer, E, name) for layer in trace.steps] for name in shared_names}
    report: dict = {
        "model": trace.model, "source": trace.source, "num_experts": E, "top_k": K,
        "layers": list(trace.layer_ids), "steps": trace.num_steps, "tokens": trace.tokens, "accesses": accesses,
        "guesses": trace.guesses is not None, "capacities": [],
    }
    for f in fractions:
        capacity = max(K, min(E, round(f * E)))
        g = prediction_guesses(capacity, K)
        recorded = max((len(x) for layer in trace.guesses for x in layer), default=0) if trace.guesses else 0
        simulate = trace.guesses is not None and 0 < g <= recorded
        rates = compare(trace.steps, E, capacity, trace.guesses if simulate else None, K)
        told = sum(told_next(layer, E, capacity)["hits"] for layer in trace.steps)
        entry = {"fraction": f, "capacity": capacity, "rates": rates,
                 "told_next_step": {"policy": DEFAULT_POLICY, **_counts(told, accesses)},
                 "per_layer_belady": [belady(layer, capacity)["hit_rate"] for layer in trace.steps],
                 "prediction": "simulated" if simulate else
                 ("no guesses in this trace" if trace.guesses is None else
                  "not simulated: the engine makes no guess at this capacity" if not g else
                  f"not simulated: the engine guesses {g} experts per layer at this capacity, the trace holds "
                  f"{recorded} (record it at a capacity with room for {g})")}
        shared = {}
        for name, per_layer in curves.items():
            s = shared_budget(per_layer, capacity, minimum=K)
            shared[name] = {**s, "uniform_hit_rate": s["uniform_hits"] / max(accesses, 1),
                            "shared_hit_rate": s["shared_hits"] / max(accesses, 1)}
        entry["shared_budget"] = shared
        if simulate:  # the engine's own budget shared by the layers (while reading ahead), replayed
            from .budget import replay_shared

            entry["slot_budget"] = replay_shared(trace.steps, trace.guesses, E, capacity, DEFAULT_POLICY, K)
        report["capacities"].append(entry)
    return report


def format_replay(report: dict) -> str:
    names = [n for n in (*POLICIES, "belady")]
    lines = [f"replay of {report['model']}: {len(report['layers'])} MoE layers x {report['num_experts']} experts, "
             f"top {report['top_k']}, {report['steps']} steps, {report['accesses']} expert accesses"
             + ("" if report["guesses"] else " (no next-layer guesses recorded: prediction not simulated)"),
             f"{'capacity':<14}" + "".join(f"{n:>9}" for n in names) + f"{'best/Belady':>13}"]
    for entry in report["capacities"]:
        rates = entry["rates"]
        label = f"{entry['fraction']:.1%} ({entry['capacity']})"
        best = max(rates[n]["hit_rate"] for n in POLICIES)
        lines.append(f"{label:<14}" + "".join(f"{rates[n]['hit_rate']:>9.1%}" for n in names)
                     + f"{best / max(rates['belady']['hit_rate'], 1e-12):>13.0%}")
        told = entry["told_next_step"]["hit_rate"]
        lines.append(f"  {DEFAULT_POLICY} told the next step's experts (a perfect one-step predictor, demand "
                     f"caching): {told:.1%}, {told / max(rates['belady']['hit_rate'], 1e-12):.0%} of Belady")
        if any(k.endswith("+prediction") for k in rates):
            lines.append(f"{'  +prediction':<14}" + "".join(
                f"{rates[n + '+prediction']['hit_rate']:>9.1%}" if n + "+prediction" in rates else f"{'':>9}"
                for n in names) + "   (ready rate: kept or read ahead)")
        elif report["guesses"]:
            lines.append(f"  +prediction  {entry['prediction']}")
        if "slot_budget" in entry:
            b = entry["slot_budget"]
            lines.append(f"  {DEFAULT_POLICY}+prediction, one budget moved between layers (the engine's SlotBudget): "
                         f"{b['hit_rate']:.1%}, slots per layer at the end {b['capacities']}, {b['moves']} moves")
    lines.append("one budget shared across layers: the same slots per layer -> the best split of them (oracle):")
    for entry in report["capacities"]:
        sb = entry["shared_budget"]
        parts = [f"{n} {r['uniform_hit_rate']:.1%} -> {r['shared_hit_rate']:.1%}" for n, r in sb.items()]
        lines.append(f"  {entry['fraction']:.1%}: " + ", ".join(parts)
                     + f" (Belady's split {sb['belady']['allocation']})")
    return "\n".join(lines)


def replay_main(path, fractions: Sequence[float] = REPLAY_FRACTIONS) -> int:
    """`moe bench --replay TRACE.npz`: the table on stderr, JSON on stdout."""
    import json
    import sys

    from .traces import load_trace

    report = replay_report(load_trace(path), fractions)
    print(format_replay(report), file=sys.stderr)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
