"""What goes into an engine session (requests) and what comes out (events): frozen data, no MLX.

Events cross threads and, for the app's child-process placement, a pipe: each is plain picklable data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .telemetry import CacheSnapshot, GenerationDone

# ---------------------------------------------------------------- requests


def reply_reserve(max_tokens: int, context: int) -> int:
    """Tokens of the context window kept for the reply when a chat is fitted (Generate.fit_context): its
    max_tokens, but never more than half the window (a budget near or over the window would drop every older
    turn of every chat). The reply may still use all the room the kept turns leave."""
    return min(max_tokens, context // 2)


MIN_REPLY = 32  # tokens: a prompt leaving less room than this in the context window is refused


class ContextOverflow(ValueError):
    """The prompt does not fit the model's context window even with every older turn dropped."""


def fit_messages(messages: Sequence[dict], encode: Callable[[list[dict]], Any], context: int, max_tokens: int,
                 opening: int = 0, size: Callable[[Any], int] = len, encoded: Any = None
                 ) -> tuple[Any, list[dict], int, int]:
    """Chat messages fitted to the context window: the oldest turns dropped (never the system prompt or the last
    message) until the prompt leaves the reply its `reply_reserve` (and `opening` tokens forced after the
    prompt). Returns the prompt as `encode` makes it (`size` of it: its tokens; `encoded`: the whole chat's,
    made already), the messages kept, how many were dropped, and the reply's token budget (max_tokens, or
    less where even the newest turns leave less room).

    Raises:
        ContextOverflow: the last message alone leaves less than MIN_REPLY tokens.
    """
    messages = list(messages)
    prompt = encode(messages) if encoded is None else encoded
    limit = context - reply_reserve(max_tokens, context) - opening
    dropped = 0
    first = 1 if messages and messages[0]["role"] == "system" else 0
    most = len(messages) - first - 1  # never the system prompt or the last message
    if size(prompt) > limit and most > 0:
        # The fewest oldest messages to drop, by bisection (dropping more never makes a prompt longer): a few
        # encodings, not one per message (each is a request to a server's /tokenize for a remote chat).
        low, high = 1, most
        found: tuple[int, Any] | None = None
        while low <= high:
            middle = (low + high) // 2
            candidate = encode(messages[:first] + messages[first + middle:])
            if size(candidate) <= limit:
                found, high = (middle, candidate), middle - 1
            else:
                low = middle + 1
        dropped, prompt = found if found is not None else (most, encode(messages[:first] + messages[-1:]))
        messages = messages[:first] + messages[first + dropped:]
    room = context - size(prompt) - opening
    if room < min(MIN_REPLY, max_tokens):
        raise ContextOverflow(f"the prompt takes {size(prompt)} tokens even without older turns, leaving "
                              f"{max(room, 0)} of the context window's {context} for the reply: shorten the "
                              "message or its attachments")
    return prompt, messages, dropped, min(max_tokens, room)


@dataclass(frozen=True)
class Generate:
    """One reply to generate. `tag` is the caller's own (e.g. a chat id), echoed in every event of the job."""

    messages: Sequence[dict] | Sequence[int]  # chat messages, or prompt token ids already templated
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # sample among the k likeliest tokens; 0: all
    stop: tuple[str, ...] = ()
    seed: int | None = None
    fit_context: bool = False  # drop the oldest turns (never the system prompt or the last message) to fit
    tag: Any = None
    tools: tuple[dict, ...] | None = None  # OpenAI function-tool form: given to the chat template, calls parsed
    tool_choice: str = "auto"  # "auto", "required" (a call must start the reply) or "named" (a call of tool_name)
    tool_name: str | None = None
    call_id_prefix: str = "call_"  # of the ids given to parsed calls that carry none of their own
    # OpenAI's penalties on the tokens generated so far (count x frequency + presence once used) and logit bias
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Configure:
    """Live engine changes: any field left None is unchanged."""

    capacity: int | float | None = None
    mode: str | None = None
    policy: str | None = None
    reset_stats: bool = False


@dataclass(frozen=True)
class Tokenize:
    """`prompt` (a string, or chat messages with the chat template) as this model's token ids; `tools`
    (OpenAI function-tool form) are given to the chat template."""

    prompt: str | Sequence[dict]
    tools: Sequence[dict] | None = None
    continue_final: bool = False  # chat messages whose last one (an assistant prefill) the reply goes on from


@dataclass(frozen=True)
class MissCurveRequest:
    """Replay the recorded routing (its last `last_steps` steps) at each capacity under every policy and
    Belady's MIN, between jobs; a `MissCurveDone` answers (none when a job arrives first: ask again)."""

    capacities: tuple[int, ...]
    last_steps: int | None = None
    layers: int | None = None  # replay this many MoE layers, spread evenly (oracle.sampled_layers); None: all


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts about the loaded model, for headers and panels."""

    model: str
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    expert_bytes: int
    dense_bytes: int
    context_length: int
    max_token_bytes: int = 64  # no token stands for more UTF-8 bytes than this
    vocab_size: int = 0  # the model's logits (token ids below it)
    tool_parser: str = ""  # the model's tool-call format (an mlx-lm parser's name); "" when it has none
    no_tool_calling: str = ""  # why it has none (a phrase), when known

    @staticmethod
    def of(engine: Any, tool_parser: str = "", no_tool_calling: str = "") -> ModelInfo:
        from .plan import config_int

        layout = engine.layout
        return ModelInfo(model=engine.name, model_type=layout.model_type, num_layers=layout.num_layers,
                         moe_layers=layout.moe_layers, num_experts=layout.num_experts, top_k=layout.top_k,
                         expert_bytes=layout.expert_bytes, dense_bytes=layout.dense_bytes,
                         context_length=engine.context_length,
                         max_token_bytes=getattr(engine, "max_token_bytes", 64),
                         vocab_size=config_int(engine.config, ("vocab_size",)),
                         tool_parser=tool_parser,
                         no_tool_calling=no_tool_calling)


@dataclass(frozen=True)
class SessionReady:
    info: ModelInfo


@dataclass(frozen=True)
class SessionFailed:
    """The model did not load, or the session ended unexpectedly."""

    error: str


@dataclass(frozen=True)
class JobStarted:
    job_id: int
    tag: Any
    prompt_tokens: int
    dropped_messages: int  # oldest turns left out to fit the context window
    max_tokens: int = 0  # the reply's budget: the request's, or less where the context window leaves less
    requested_max_tokens: int = 0


@dataclass(frozen=True)
class Progress:
    """How far the prompt's prefill has come (before the first token of a long prompt)."""

    job_id: int
    tag: Any
    done: int
    total: int
    seconds: float


@dataclass(frozen=True)
class Delta:
    """Reply text since the job's last Delta, with a fresh snapshot when one was due (one repaint for both)."""

    job_id: int
    tag: Any
    text: str
    snapshot: CacheSnapshot | None = None


@dataclass(frozen=True)
class ToolCall:
    """A call the model made, as its format's parser read it: `arguments` is a JSON object."""

    id: str
    name: str
    arguments: dict

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ToolCalled:
    """A tool call of a job offered tools, in its place in the reply: after the Delta of the text before it."""

    job_id: int
    tag: Any
    call: ToolCall


@dataclass(frozen=True)
class JobDone:
    """The job's last event when it ended normally, by a stop, a length limit or a cancel. With tools offered,
    `done.text` is the text outside the calls and `tool_calls` the calls, in order."""

    job_id: int
    tag: Any
    done: GenerationDone
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class JobFailed:
    """The job's last event when it raised; `text` is what had been generated (and sent) until then."""

    job_id: int
    tag: Any
    text: str
    error: str


@dataclass(frozen=True)
class Notice:
    """A one-line notice for the user (setting changed, statistics reset, refused input...)."""

    text: str
    severity: str = "information"


@dataclass(frozen=True)
class Snapshot:
    """The cache state, with the hit rates of every policy and Belady's MIN on the recent trace when known."""

    snapshot: CacheSnapshot
    optimum: dict[str, float] | None = None


@dataclass(frozen=True)
class MissCurveDone:
    """Hit rates against capacity: `rates[name][i]` is `hit_rates_vs_optimum(capacities[i])[name]["hit_rate"]`."""

    capacities: tuple[int, ...]
    rates: dict[str, tuple[float, ...]]
    steps: int  # the engine's traced steps when replayed


Event = (SessionReady | SessionFailed | JobStarted | Progress | Delta | ToolCalled | JobDone | JobFailed | Notice
         | Snapshot | MissCurveDone)
