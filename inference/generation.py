"""Turning a prompt into streamed text: stop strings that never leak, and a prompt cache whose token
record always matches the KV cache, however a generation ends. Knows nothing about experts."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .telemetry import GenerationDone, TokenDelta


class StopText:
    """The text of one reply as tokens arrive, released only once it cannot be the start of a stop string.

    `add(piece)` returns the text now safe to show; after a match, `matched` is the stop string and the
    text ends before it. `flush()` releases what was held back (at the end of a reply without a match).
    Everything released, concatenated, always equals `text`.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max(map(len, self.stops), default=0)
        self.text = ""
        self.released = 0
        self.matched: str | None = None

    def add(self, piece: str) -> str:
        if not self.stops:
            self.text += piece
            return self._release(len(self.text))
        start = max(0, len(self.text) - self.longest + 1)  # a new match ends inside the new piece
        self.text += piece
        hits = [(found, stop) for stop in self.stops if (found := self.text.find(stop, start)) >= 0]
        if hits:
            cut, self.matched = min(hits)
            self.text = self.text[:cut]
            return self._release(cut)
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest end of the text that a stop string starts with."""
        for size in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self.released)
        out, self.released = self.text[self.released : end], end
        return out


class PromptCache:
    """The KV cache carried across turns and the tokens it holds; the two are changed only together."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.kv: list[Any] | None = None
        self.tokens: list[int] = []

    def reset(self) -> None:
        self.kv = None
        self.tokens = []

    def reuse(self, tokens: list[int]) -> int:
        """How many leading `tokens` the cache already holds, after trimming it to them (0: a new cache)."""
        common = 0
        if self.kv is not None and self.tokens:
            for a, b in zip(self.tokens, tokens, strict=False):
                if a != b:
                    break
                common += 1
            common = min(common, len(tokens) - 1)  # the model must see at least one new token
            extra = len(self.tokens) - common
            if extra and not can_trim_prompt_cache(self.kv):
                common = 0
            elif extra:
                trim_prompt_cache(self.kv, extra)
                self.tokens = self.tokens[:common]
        if common == 0:
            self.kv = make_prompt_cache(self.model)
            self.tokens = []
        return common

    def settle(self, known: list[int]) -> None:
        """Record which of `known` (prompt + generated tokens) the KV cache holds: a token computed ahead of
        them is trimmed; a cache whose extent cannot be read or trimmed is dropped."""
        offset = getattr(self.kv[0], "offset", None) if self.kv else None
        if offset is None:
            self.reset()
            return
        if offset > len(known):
            if not can_trim_prompt_cache(self.kv):
                self.reset()
                return
            trim_prompt_cache(self.kv, offset - len(known))
            offset = len(known)
        self.tokens = known[:offset]


GREEDY_BELOW = 1e-5  # a temperature this small samples the argmax anyway: take it without dividing by ~0


def sampling(temperature: float, top_p: float, top_k: int = 0) -> dict[str, float]:
    """mlx-lm sampler settings. Greedy when any leaves one candidate: temperature ~0, top_p 0 (only the most
    likely token is inside the nucleus; mlx-lm reads top_p 0 as "no nucleus", i.e. all of them) or top_k 1.
    top_k 0 (or below): every token."""
    if temperature < GREEDY_BELOW or top_p <= 0.0 or top_k == 1:
        return {"temp": 0.0, "top_p": 0.0, "top_k": 0}
    return {"temp": temperature, "top_p": top_p if top_p < 1.0 else 0.0, "top_k": max(top_k, 0)}


@dataclass(frozen=True)
class Penalties:
    """OpenAI's presence and frequency penalties and logit bias, as an mlx-lm logits processor.

    The penalties count the tokens generated so far in this reply, not the prompt (OpenAI's definition:
    logit - count x frequency_penalty - presence_penalty once the token was generated). mlx-lm's own
    penalties look at the last 20 tokens given to the model, prompt included, so they would change with how
    much of the prompt the KV cache already held."""

    presence: float = 0.0
    frequency: float = 0.0
    bias: dict[int, float] = field(default_factory=dict)

    def processors(self, prompt_tokens: int) -> list[Callable[[mx.array, mx.array], mx.array]]:
        """The processors for a reply whose prompt hands `prompt_tokens` tokens to mlx-lm (none when there is
        nothing to do: mlx-lm then keeps no token record)."""
        if not (self.presence or self.frequency or self.bias):
            return []
        bias: list[tuple[mx.array, mx.array] | None] = [None]  # (ids, values), made on the first call

        def process(tokens: mx.array, logits: mx.array) -> mx.array:
            if self.bias and bias[0] is None:
                # Ids past the logits are left out: MLX does not check scatter indices (out of bounds it
                # corrupts memory). The server refuses them; this guards every other caller.
                inside = [(t, b) for t, b in self.bias.items() if 0 <= t < logits.shape[-1]]
                bias[0] = (mx.array([t for t, _ in inside], dtype=mx.int32),
                           mx.array([b for _, b in inside], dtype=mx.float32)) if inside else ()
            if bias[0]:
                ids, values = bias[0]
                logits = logits.at[:, ids].add(values.astype(logits.dtype))
            generated = tokens[prompt_tokens:]
            if generated.size and (self.presence or self.frequency):
                counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[generated].add(1)
                logits = logits - (self.frequency * counts + self.presence * (counts > 0)).astype(logits.dtype)
            return logits

        return [process]


class Speed:
    """The latest reply's speeds, shown in snapshots."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.values = {"decode_tps": 0.0, "prefill_tps": 0.0, "ttft_s": 0.0, "tokens": 0}


PREFILL_STEP = 512  # prompt tokens per forward pass: progress is reported, and a cancel honoured, between them


class PrefillCancelled(Exception):
    """Raised from mlx-lm's prompt-progress callback to stop a prefill between two chunks."""


def generate(model: Any, tokenizer: Any, prompt_cache: PromptCache, tokens: list[int], *, max_tokens: int,
             temperature: float, top_p: float, top_k: int = 0, seed: int | None, stop: Sequence[str],
             penalties: Penalties | None = None,
             cancel: threading.Event | None, speed: Speed, kv_args: dict,
             after_step: Callable[[], None], finish: Callable[[], None],
             progress: Callable[[int, int], None] | None = None,
             expect: Callable[[Sequence[int]], None] | None = None,
             sampled: Callable[[mx.array], None] | None = None) -> Iterator[TokenDelta | GenerationDone]:
    """The generation loop behind `Engine.stream` (see there). `after_step` runs after every token,
    `finish` once at the end however the loop ends (before the prompt cache is settled), `progress` with
    (prompt tokens processed, prompt tokens to process) between prefill chunks. `expect` is told the prompt
    tokens the model is about to read and `sampled` each token as it is sampled (lazy), before the model reads
    it (the engine guesses the first layer's experts from the token)."""
    if not tokens:
        raise ValueError("empty prompt")
    if seed is not None:
        mx.random.seed(seed % (1 << 64))  # OpenAI seeds are signed 64-bit
    reuse = prompt_cache.reuse(tokens)
    settings, made = sampling(temperature, top_p, top_k), []

    def sampler(logprobs: mx.array) -> mx.array:
        if not made:  # top_k at or above the vocabulary leaves every token (mlx-lm refuses it): made at first use
            if settings["top_k"] >= logprobs.shape[-1]:
                settings["top_k"] = 0
            made.append(make_sampler(**settings))
        return made[0](logprobs)

    if sampled is not None:
        choose, count = sampler, itertools.count(1)

        def sampler(logprobs: mx.array) -> mx.array:
            token = choose(logprobs)
            # mlx-lm samples one token after the last it yields, never read (max_tokens -1: no last one)
            if next(count) <= max_tokens or max_tokens < 0:
                sampled(token)
            return token
    text = StopText(stop)
    generated: list[int] = []
    reason = "length"
    started = time.perf_counter()
    first_token_at = None
    speed.values["decode_tps"] = 0.0

    def prefilled(done: int, total: int) -> None:
        if cancel is not None and cancel.is_set() and done < total:
            raise PrefillCancelled
        if progress is not None:
            progress(done, total)

    if expect is not None:
        expect(tokens[reuse:])
    processors = penalties.processors(len(tokens) - reuse) if penalties is not None else []
    steps = stream_generate(model, tokenizer, tokens[reuse:], max_tokens=max_tokens, sampler=sampler,
                            prompt_cache=prompt_cache.kv, prefill_step_size=PREFILL_STEP,
                            prompt_progress_callback=prefilled, logits_processors=processors or None, **kv_args)
    broken = False
    try:
        for response in steps:
            after_step()
            if first_token_at is None:
                first_token_at = time.perf_counter()
                speed.values["prefill_tps"] = response.prompt_tps
                speed.values["ttft_s"] = first_token_at - started
            if response.finish_reason in (None, "length"):  # a final "stop" carries the EOS token
                generated.append(response.token)
            if response.generation_tokens > 1:  # the first token's rate is ~1/0: its clock starts after prefill
                speed.values["decode_tps"] = response.generation_tps
            speed.values["tokens"] += 1
            if response.finish_reason is not None:
                reason = response.finish_reason
            elif cancel is not None and cancel.is_set():
                reason = "cancelled"
            ending = response.finish_reason is not None or reason == "cancelled"
            safe = text.add(response.text) if response.text else ""
            if text.matched is not None:
                reason, ending = "stop", True
            elif ending:
                safe += text.flush()  # nothing held back can become a stop string now
            if safe:
                yield TokenDelta(safe, response.token)
            if ending:
                break
    except GeneratorExit:  # the consumer left at a yield: the forward pass is complete
        raise
    except PrefillCancelled:  # between two prompt chunks: the reply ends before its first token
        broken, reason = True, "cancelled"
    except BaseException:
        # An exception may have stopped the forward pass between layers, so the KV cache's layers may
        # disagree with each other: the next turn starts from a fresh cache.
        broken = True
        raise
    finally:
        steps.close()  # leaves mlx-lm's wired-memory context now, not when the generator is collected
        finish()
        if broken:
            prompt_cache.reset()
        else:
            prompt_cache.settle(tokens + generated)
    yield GenerationDone(
        text=text.text, finish_reason=reason, prompt_tokens=len(tokens), prefilled_tokens=len(tokens) - reuse,
        generated_tokens=len(generated), prefill_tps=speed.values["prefill_tps"],
        decode_tps=speed.values["decode_tps"], ttft_s=(first_token_at - started) if first_token_at else 0.0,
        tokens=tuple(generated), stop_sequence=text.matched,
    )

