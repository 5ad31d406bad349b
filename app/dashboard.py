"""What the cache dashboard's boxes say: pure functions of a snapshot (and of the history the panel keeps).

Every number carries its unit, every share its percentage, every gauge a total that means something.
The widgets in app/widgets/dashboard.py only lay these rows out in titled boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_tui.inference.oracle import MISS_CURVE_LAYERS as MISS_CURVE_LAYERS  # the widgets ask for these
from moe_tui.inference.oracle import curve_capacities as curve_capacities
from moe_tui.inference.telemetry import CacheSnapshot
from rich.text import Text

LABEL = 8  # the label column of every box (Readout indents wrapped rows to match)


def human_bytes(n: float) -> str:
    """Binary units with their names: 512 B, 1.5 KiB, 200 MiB, 16.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n:.0f} B"
            return f"{n:.0f} {unit}" if abs(n) >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def percent(fraction: float) -> str:
    return f"{fraction:.1%}" if fraction < 0.995 or fraction >= 1 else f"{fraction:.2%}"


def bar(fraction: float, width: int, unicode: bool = True) -> Text:
    """A threshold-coloured bar: green below 70%, yellow below 90%, red above."""
    fraction = min(max(fraction, 0.0), 1.0)
    width = max(width, 1)
    filled = round(fraction * width)
    color = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"
    full, empty = ("█", "░") if unicode else ("#", ".")
    return Text(full * filled, style=color) + Text(empty * (width - filled), style="dim")


def row(label: str, *parts: str | Text) -> Text:
    """`label` bold in its column, then the parts separated by two spaces."""
    line = Text(f"{label:<{LABEL}}", style="bold", end="")
    for i, part in enumerate(parts):
        line.append("  " if i else " ")
        line.append_text(part if isinstance(part, Text) else Text(part))
    return line


def gauges(rows: list[tuple[str, float, float, str]], width: int, unicode: bool = True) -> list[Text]:
    """(label, used, total, value) rows as btop draws them: the label, a bar (all bars one length, filling what
    the widest value leaves), the share of `total` in percent, then `value` with its units."""
    value_width = max(len(value) for *_, value in rows)
    room = max(width - LABEL - 1 - 1 - 4 - 2 - value_width, 4)
    return [row(label, bar(share(used, total), room, unicode) + Text(f" {share(used, total):>4.0%}"), value)
            for label, used, total, value in rows]


def by_layer(snap: CacheSnapshot) -> str:
    """The slots per layer where the shared budget moved some (the capacity is then their mean)."""
    return f"; {min(snap.capacities)}-{max(snap.capacities)} by layer" if snap.capacities else ""


def memory_rows(snap: CacheSnapshot, width: int, unicode: bool = True) -> list[Text]:
    m = snap.memory
    ram = m.system_total_bytes
    slots = snap.capacity * snap.num_moe_layers
    resident = int(snap.resident.sum())
    dot = "·" if unicode else "-"
    rows = gauges([
        ("cache", m.expert_cache_bytes, m.expert_cache_budget_bytes,
         f"{human_bytes(m.expert_cache_bytes)} / {human_bytes(m.expert_cache_budget_bytes)}"),
        ("slots", resident, slots, f"{resident:,} / {slots:,}"),
        ("RSS", m.rss_bytes, ram, f"{human_bytes(m.rss_bytes)} / {human_bytes(ram)}"),
        ("MLX", m.mlx_active_bytes, ram, f"{human_bytes(m.mlx_active_bytes)} / {human_bytes(ram)}"),
        ("RAM", m.system_used_bytes, ram, f"{human_bytes(m.system_used_bytes)} / {human_bytes(ram)}"),
    ], width, unicode)
    rows += [
        Text("cache: of its budget; slots: filled; RSS, MLX, RAM: of the machine's", style="dim"),
        row("experts", f"{snap.capacity} of {snap.num_experts} per layer cached "
                       f"({share(snap.capacity, snap.num_experts):.0%}{by_layer(snap)}), "
                       f"{human_bytes(snap.expert_bytes)} each"),
        row("MLX", f"peak {human_bytes(m.mlx_peak_bytes)} {dot} free cache {human_bytes(m.mlx_cache_bytes)}"),
    ]
    return rows


# ---------------------------------------------------------------- hit rate


@dataclass
class Replay:
    """Hit rates of the idle replay (every policy and Belady's MIN) and the steps it covered."""

    rates: dict[str, float]
    steps: int  # the engine's step count when it was replayed
    window: int  # steps replayed (the last ones of each layer's trace)


def hit_rows(snap: CacheSnapshot, replay: Replay | None, unicode: bool = True) -> list[Text]:
    needed = int(snap.hits.sum() + snap.misses.sum())
    dot = "·" if unicode else "-"
    rows = [
        row("ready", Text(percent(snap.hit_rate), style="bold"),
            f"{int(snap.hits.sum()):,}/{needed:,} resident when needed"),
        row("demand", Text(percent(snap.demand_hit_rate), style="bold"),
            f"{snap.io.demand_hits:,}/{needed:,} without reads ahead"),
    ]
    if replay is not None and "belady" in replay.rates:
        policy = snap.policy
        rows.append(row("Belady", Text(percent(replay.rates["belady"]), style="bold"),
                        f"vs {policy} {percent(replay.rates.get(policy, 0.0))} on the same replay"))
    else:
        rows.append(row("Belady", Text(f"replayed when idle {dot} /help cache", style="dim")))
    window = (f" (last {replay.window:,} steps, {replay_start(snap, replay.window)})"
              if replay is not None and replay.window else "")
    rows.append(Text(f"Belady: best any cache could do at this capacity, knowing the future{window}",
                     style="italic dim"))
    return rows


def warm_start(snap: CacheSnapshot, window: int) -> bool:
    """Whether the replay of the trace's last `window` steps starts with experts in the cache: the oldest traced
    step found some, or the window starts later (every step leaves its experts resident)."""
    return snap.trace_start_warm or snap.trace_length > window


def replay_start(snap: CacheSnapshot, window: int) -> str:
    return "warm start" if warm_start(snap, window) else "empty start"  # the same width: reserved rows hold


# ---------------------------------------------------------------- speed


def speed_rows(snap: CacheSnapshot, speeds: list[float]) -> list[Text]:
    avg = sum(speeds) / len(speeds) if speeds else 0.0
    top = max(speeds) if speeds else 0.0
    return [
        row("decode", Text(f"{snap.decode_tps:.1f} tok/s", style="bold"), f"avg {avg:.1f}  max {top:.1f} tok/s"),
        row("prefill", f"{snap.prefill_tps:,.0f} tok/s", f"TTFT {snap.ttft_s * 1000:,.0f} ms"),
        row("tokens", f"{snap.tokens_generated:,} generated", f"{snap.steps:,} steps"),
    ]


# ---------------------------------------------------------------- I/O


def io_rows(snap: CacheSnapshot, unicode: bool = True) -> list[Text]:
    io = snap.io
    dot = " · " if unicode else " - "
    token_time = 1.0 / snap.decode_tps if snap.decode_tps > 0 else 0.0
    stall = io.stall_per_token
    rows = [
        row("stall", Text(f"{stall * 1000:.1f} ms/token", style="bold"),
            f"{share(stall, token_time):.0%} of token time" if token_time else "no decode yet"),
        row("read", f"{human_bytes(io.bytes_per_token)}/token",
            f"at {human_bytes(io.read_bandwidth(snap.bytes_read))}/s"),
    ]
    limit = io.io_limit_tps(snap.bytes_read)
    rows.append(row("I/O cap", Text(f"{limit:,.1f} tok/s" if limit else "—" if unicode else "-", style="bold"),
                    f"vs decode {snap.decode_tps:.1f} tok/s"))
    # Always the same rows (a row that comes and goes would re-lay out the screen at a stats tick).
    none = "—" if unicode else "-"
    if io.prefetches or io.prefetch:
        pending = max(io.prefetches - io.prefetch_hits - io.prefetch_wasted, 0)
        rows.append(row("ahead", f"{io.prefetches:,} read",
                        f"used {io.prefetch_hits:,} ({share(io.prefetch_hits, io.prefetches):.0%}){dot}"
                        f"wasted {io.prefetch_wasted:,} ({share(io.prefetch_wasted, io.prefetches):.0%}){dot}"
                        f"pending {pending:,}" + ("" if io.prefetch else f"{dot}off now (timed slower)")))
    else:
        rows.append(row("ahead", "off", "no reads ahead (--no-prefetch, a full cache, or timed slower)"))
    precision, recall = io.prediction_precision, io.prediction_recall
    guessed = [i for i, g in enumerate(io.guesses) if g]  # a layer with no guess yet has no precision
    if precision and guessed:
        worst = min(guessed, key=lambda i: precision[i])
        layer = snap.layer_ids[worst] if worst < len(snap.layer_ids) else worst
        rows.append(row("predict", f"precision {sum(precision[i] for i in guessed) / len(guessed):.0%}",
                        f"recall {sum(recall[i] for i in guessed) / len(guessed):.0%} (mean of layers; "
                        f"worst L{layer} {precision[worst]:.0%} / {recall[worst]:.0%})"))
    else:
        rows.append(row("predict", none, "no next-layer guesses yet"))
    rows.append(row("loaded", f"{int(snap.loads.sum()):,} experts",
                    f"{human_bytes(snap.bytes_read)} in {snap.load_seconds:.2f} s"
                    + (f"{dot}page cache bypassed" if io.uncached_reads else "")))
    return rows


# ---------------------------------------------------------------- history for the plots


@dataclass
class History:
    """What the plots draw over time, sampled at each stats refresh (bounded)."""

    size: int = 240
    steps: list[int] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)  # hit rate since the previous sample
    demand: list[float] = field(default_factory=list)
    belady: list[tuple[int, float]] = field(default_factory=list)  # (steps, rate) of each replay
    replayed: list[tuple[int, float]] = field(default_factory=list)  # the current policy on the same replay
    tokens: list[int] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    bytes_per_token: list[float] = field(default_factory=list)
    _last: tuple[int, int, int, int] | None = None  # steps, hits, misses, demand hits

    def add(self, snap: CacheSnapshot, replay: Replay | None) -> bool:
        """Record `snap`; True when something the plots draw changed."""
        hits, misses = int(snap.hits.sum()), int(snap.misses.sum())
        now = (snap.steps, hits, misses, snap.io.demand_hits)
        changed = False
        if self._last is not None and snap.steps > self._last[0]:
            d_hits, d_misses, d_demand = hits - self._last[1], misses - self._last[2], now[3] - self._last[3]
            needed = d_hits + d_misses
            if needed > 0:
                self.steps.append(snap.steps)
                self.ready.append(d_hits / needed)
                self.demand.append(max(d_demand, 0) / needed)
                changed = True
        if self._last is None or snap.steps != self._last[0]:
            self._last = now
        if replay is not None and "belady" in replay.rates and (not self.belady or self.belady[-1][0] != replay.steps):
            self.belady.append((replay.steps, replay.rates["belady"]))
            self.replayed.append((replay.steps, replay.rates.get(snap.policy, 0.0)))
            changed = True
        if snap.decode_tps > 0 and (not self.tokens or snap.tokens_generated != self.tokens[-1]):
            self.tokens.append(snap.tokens_generated)
            self.decode_tps.append(snap.decode_tps)
            self.bytes_per_token.append(snap.io.bytes_per_token)
            changed = True
        for name in ("steps", "ready", "demand", "belady", "replayed", "tokens", "decode_tps", "bytes_per_token"):
            values = getattr(self, name)
            del values[: max(len(values) - self.size, 0)]
        return changed


# ---------------------------------------------------------------- miss curve


@dataclass(frozen=True)
class MissCurve:
    """Hit rate against capacity for every policy and Belady, replayed on the recorded routing trace. Without
    capacities: the backend has none to give (a server that replays no trace)."""

    capacities: tuple[int, ...]
    rates: dict[str, tuple[float, ...]]  # name -> one hit rate per capacity
    steps: int  # the engine's step count when it was replayed
    window: int = 0  # trace steps replayed (0: not known yet)

    def at(self, capacity: int) -> dict[str, float]:
        """Each curve's rate at `capacity` (the nearest replayed capacity)."""
        if not self.capacities:
            return {}
        i = min(range(len(self.capacities)), key=lambda j: abs(self.capacities[j] - capacity))
        return {name: values[i] for name, values in self.rates.items()}

    def needed_for(self, target: float, name: str) -> int | None:
        """The smallest replayed capacity at which `name` reaches `target` (None: not even at the largest)."""
        for capacity, rate in zip(self.capacities, self.rates.get(name, ()), strict=False):
            if rate >= target:
                return capacity
        return None


def curve_names(curve: MissCurve) -> list[str]:
    """The replayed policies in the engine's order, Belady last."""
    return [n for n in curve.rates if n != "belady"] + (["belady"] if "belady" in curve.rates else [])


NO_CURVE = "not available from this server"


def curve_placeholder(curve: MissCurve | None) -> str:
    """What the plot says until it has a curve to draw."""
    return NO_CURVE if curve is not None and not curve.capacities else "replayed when idle"


def curve_rows(curve: MissCurve | None, snap: CacheSnapshot | None, cursor: int | None,
               unicode: bool = True) -> list[Text]:
    if curve is not None and not curve.capacities:
        return [Text(f"{NO_CURVE}: it replays no routing trace (another server than moe serve, or an older one)",
                     style="dim")]
    if snap is None:
        return [Text("")]
    if curve is None:
        return [Text("replayed from the routing trace when the engine is idle (after a reply)", style="dim")]
    dot = " · " if unicode else " - "
    names = curve_names(curve)
    current = curve.at(snap.capacity)
    rows = [row("now", f"{snap.capacity}/layer: " + dot.join(f"{n} {current[n]:.0%}" for n in names))]
    if cursor is not None:
        there = curve.at(cursor)
        size = human_bytes(cursor * snap.expert_bytes * snap.num_moe_layers)
        rows.append(row("cursor", Text(f"{cursor}/layer ({size}): ", style="bold")
                        + Text(dot.join(f"{n} {there[n]:.0%}" for n in names))))
    needs = []
    for name in (snap.policy, "belady"):
        c = curve.needed_for(0.9, name)
        needs.append(f"{name} {c} ({human_bytes(c * snap.expert_bytes * snap.num_moe_layers)})" if c else
                     f"{name} never")
    rows.append(row("90% hits", "need " + dot.join(needs)))
    arrows = "←/→" if unicode else "Left/Right"
    start = "the cache they began with (warm start)" if warm_start(snap, curve.window) else "an empty cache"
    sampled = (f" of {MISS_CURVE_LAYERS} of the {snap.num_moe_layers} layers (spread evenly)"
               if snap.num_moe_layers > MISS_CURVE_LAYERS else "")
    rows.append(Text(f"replay of the last {curve.window:,} steps{sampled} from {start}; {arrows} move the cursor, "
                     "Enter sets /capacity", style="dim"))
    return rows


CACHE_HELP = """**The cache dashboard, number by number** (`/reset` sets every counter and plot back to zero)

*Experts*: rows are MoE layers, columns experts (or groups of experts). Colour: routings lately
(decayed count, scaled to the hottest cell). `•` resident, `◆` pinned, `×` missed in the latest step;
the row ends with the layer's ready hit rate. A cell's details: **routings** (token-expert pairs routed
to it), **hits** and **misses** (steps that needed it and found it resident or not), **loads** (reads
into a slot), **evictions**, whether it is **resident** or **pinned**, and the step it was **last used**
(to the refresh: the panel notices a new routing at its next refresh).

*Hit rate*
- **ready** = hits / (hits + misses): of the experts a forward step needed, the share already resident
  when their layer ran, reads ahead included.
- **demand** = demand hits / (hits + misses): the same without the reads ahead, i.e. hits on experts
  that were resident before any prediction (what a plain cache would have got).
- **Belady** = hit rate of Belady's MIN replayed on the last steps of the recorded routing (at most
  1,024 per layer) at the current capacity: on a miss it evicts the expert whose next use is furthest away.
  It is the best any cache could do at this capacity, knowing the future. The replay starts from the
  experts the cache held when the first of those steps began (**warm start**, as the run had it: after a
  profile, a `/reset` or earlier steps; **empty start** only when the run itself started empty), so on
  those steps no cache of this capacity, reads ahead included, hits more often than Belady.
  Compare it with **POLICY on the same replay** (same steps, same start; the policy inherits the experts,
  not the history that put them there). The ready and demand rates above count every step since the
  last `/reset`, which can be more steps than the replay's.
- The plot: ready and demand rates between two refreshes (Δhits / Δ(hits + misses)) against the engine's
  step; Belady and the policy replay as points at the step each replay was made.

*Speed*: **decode** tok/s of the latest reply's one-token steps (prefill excluded), its average and
maximum over the replies plotted; **prefill** tok/s and **TTFT** (time to first token) of the latest
reply; **tokens** generated and engine **steps** (forward passes).

*Memory*: **experts** = bytes of the cache's slots (capacity x MoE layers x bytes per expert) / the
budget the engine may give the cache (a share of available memory plus the cache, less the KV reserve).
**slots** = resident experts / (capacity x MoE layers). **RSS**, **MLX** active and **RAM** used are
drawn against the machine's RAM (used + available). MLX peak: the most MLX held since the last reset;
MLX free cache: buffers MLX keeps for reuse.

*I/O* (decode steps only)
- **stall** = time the forward pass waited on expert reads / decode steps, in ms per token, and its
  share of a token's time (1 / decode tok/s).
- **read** = expert bytes read while decoding / decode steps (MiB per token); **MiB/s while reading**
  = bytes read / wall time with reads in flight.
- **I/O cap** = read bandwidth / bytes per token: the tok/s the reads alone would allow, beside the
  realized decode tok/s (far above it: compute-bound; close: reads are the limit).
- **ahead**: experts read ahead on the next-layer prediction; **used** = read ahead and needed before
  being evicted, **wasted** = evicted unused, **pending** = neither yet.
- **predict**: per layer, precision = predicted and needed / predicted, recall = predicted and needed /
  needed (in steps with a prediction); the mean over layers and the worst layer.
- **loaded**: experts read into slots, their bytes and the time spent reading.

*Miss curve*: the hit rate every policy and Belady would get at each capacity (1 to all experts; about
two dozen spread over them for large models), replayed while idle on the same last steps as Belady's
figure, from the same start (at a capacity below the experts it held: Belady keeps those used soonest, a
policy the most recently used). On a model with more than 8 MoE layers it replays 8 of them, spread evenly
from the first to the last (all 48 of a large model took minutes of CPU after every reply; the 8 estimate
their average). The current capacity is marked; Left/Right move the cursor, Enter sets
`/capacity` to it. **90% hits need** the smallest replayed capacity whose rate reaches 90%, with the
memory its slots take.
"""
