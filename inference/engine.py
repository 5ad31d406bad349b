"""The lazy-expert engine: a stock mlx-lm model whose experts are read on demand into per-layer caches.

`Engine` composes three parts: loading (loading.py), the expert cache and its accounting
(expert_cache.py), and generation with its prompt-cache bookkeeping (generation.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from .cache import DEFAULT_POLICY
from .expert_cache import MODES, ExpertCache, ModelLayout
from .generation import Penalties, PromptCache, Speed, generate
from .loading import context_length, kv_group_size, open_checkpoint, resolve_model_path
from .plan import DEFAULT_CONTEXT, kv_bytes_per_token
from .prompts import control_strings, encode_prompt, max_token_bytes
from .telemetry import CacheSnapshot, GenerationDone, TokenDelta

__all__ = ["MODES", "Engine", "ModelLayout", "resolve_model_path"]


class Engine:
    """Use `Engine.load(...)`. All methods must be called from one thread (MLX streams are per thread)."""

    def __init__(self) -> None:
        raise TypeError("use Engine.load(path_or_repo, ...)")

    @classmethod
    def load(cls, path_or_repo: str | Path, capacity: int | float | None = None, mode: str = "exact",
             policy: str = DEFAULT_POLICY, profile: str | Path | dict | None = None, kv_bits: int | None = None,
             record_trace: bool = True, pin: bool = True,
             prefetch: bool | None = None, uncached_reads: bool | None = None, direct_writes: bool = True,
             context: int | None = None, slot_budget: bool = False, pack: str | Path | bool | None = None) -> Engine:
        """Open a model with its experts left on disk and make its expert cache.

        Args:
            path_or_repo: a model folder, or a Hugging Face repo id already in the local hub cache.
            capacity: experts cached per MoE layer: a count, a fraction of the experts (float in (0, 1]),
                or None to fit a share of the available memory.
            mode: "exact", the one mode: a missed expert is read before its layer runs, so outputs equal stock
                mlx-lm ("fast", which dropped missed experts, was removed: it was slower than exact mode).
            policy: eviction policy, one of inference.cache.POLICIES.
            profile: an expert profile (path or dict) to warm the cache from.
            kv_bits: quantize the KV cache to 4 or 8 bits.
            record_trace: keep every step's routing (for the optimum replay and miss curves).
            pin: pin the profile's universal experts (else it only warms the cache).
            prefetch: predict each next layer's experts while decoding and read them early (never changes
                outputs); False: every miss is read when its layer runs; None: reads ahead only while they
                make decoding faster (decode steps timed with and without them in turn).
            uncached_reads: read experts bypassing the page cache (O_DIRECT / F_NOCACHE); None: where the
                page cache could not hold the experts anyway (their bytes on disk exceed available memory).
            direct_writes: read experts straight into the slots' memory where the backend shares it with
                numpy (CPU, Metal); off, or elsewhere, they are written through MLX operations.
            context: tokens of context to allow (at most the model's): prompts are checked against it, and
                an automatic capacity keeps its KV cache's memory free (default: the model's context, with
                plan.DEFAULT_CONTEXT tokens of KV cache reserved).
            slot_budget: while reading ahead, move expert slots between layers to where they make more experts
                ready (`inference/budget.py`). Off by default: its shadow replays cost the host CPU, and with the
                first layer guessed from the token it no longer made more experts ready (docs/performance.md).
            pack: the model's expert records (`moe pack`: each expert's parameters in one contiguous record, so a
                miss is one read instead of one per parameter). None: used where they are in their default
                place and up to date (`engine.experts.pack_note` says why records there were not); True:
                required there; a folder: required there; False: never.

        Raises:
            ModelLoadError: the model cannot be used as it is (the message names the file and the fix).
            ValueError: a bad mode, policy, capacity or kv_bits.
        """
        self = object.__new__(cls)
        checkpoint = open_checkpoint(path_or_repo)
        self.path = checkpoint.path
        self.name = checkpoint.name
        self.model = checkpoint.model
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.kv_bits = kv_bits
        self._kv_args = ({"kv_bits": kv_bits, "kv_group_size": kv_group_size(self.config), "quantized_kv_start": 0}
                         if kv_bits else {})
        model_context = context_length(self.config)
        if context is not None and context < 1:
            raise ValueError(f"context {context} must be at least 1 token")
        self._context = context  # None: the model's
        float_bytes = 4 if mx.default_device() == mx.cpu else 2
        reserve = kv_bytes_per_token(self.config, float_bytes, kv_bits) * min(context or DEFAULT_CONTEXT, model_context)
        self.experts = ExpertCache(self.model, self.config, checkpoint.tensors, self.name, capacity, mode,
                                   policy, record_trace, prefetch=prefetch,
                                   uncached_reads=uncached_reads, direct_writes=direct_writes,
                                   reserve_bytes=reserve, slot_budget=slot_budget, pack=pack)
        self.prompt_cache = PromptCache(self.model)
        self._control_strings = control_strings(self.tokenizer)
        self.max_token_bytes = max_token_bytes(self.tokenizer)
        self._speed = Speed()
        if profile is not None:
            self.experts.apply_profile(profile, pin=pin)
        return self

    # ---------------------------------------------------------------- the expert cache

    @property
    def layout(self) -> ModelLayout:
        return self.experts.layout

    @property
    def counters(self):
        return self.experts.counters

    @property
    def trace(self) -> list[list[Any]]:
        return self.experts.trace

    @property
    def traced_steps(self) -> int:
        """Steps routed since the statistics were last reset (the trace itself keeps only the newest)."""
        return self.experts.traced_steps

    @property
    def expert_reader(self):
        return self.experts.expert_reader

    @property
    def capacity(self) -> int:
        return self.experts.capacity

    @property
    def mode(self) -> str:
        return self.experts.mode

    @property
    def policy(self) -> str:
        return self.experts.policy

    @property
    def context_length(self) -> int:
        """Tokens a prompt and its reply may take: the model's context, or less where the user asked."""
        model_context = context_length(self.config)
        return min(self._context, model_context) if self._context else model_context

    def set_capacity(self, capacity: int | float | None) -> None:
        """Rebuild every layer's slots at a new size (count, fraction or None for automatic).

        Raises:
            ValueError: below top_k or above the model's experts; ModelLoadError: it does not fit in memory.
        """
        self.experts.set_capacity(capacity)
        self.prompt_cache.reset()

    def set_mode(self, mode: str) -> None:
        self.experts.set_mode(mode)

    def set_policy(self, policy: str) -> None:
        self.experts.set_policy(policy)

    def warm(self, experts: Sequence[Sequence[int]] | None = None, batch: int | None = None) -> None:
        self.experts.warm(experts, batch)

    def apply_profile(self, profile: str | Path | dict, pin: bool = True) -> None:
        self.experts.apply_profile(profile, pin=pin)

    def memory_budget(self) -> int:
        return self.experts.memory_budget()

    def cache_bytes(self) -> int:
        return self.experts.cache_bytes()

    def hit_rates_vs_optimum(self, capacity: int | None = None, last_steps: int | None = None,
                             should_stop: Callable[[], bool] | None = None, layers: Sequence[int] | None = None,
                             ) -> dict[str, dict[str, float]] | None:
        return self.experts.hit_rates_vs_optimum(capacity, last_steps, should_stop=should_stop, layers=layers)

    def reset_stats(self) -> None:
        self.experts.reset_stats()
        self._speed.reset()

    def snapshot(self) -> CacheSnapshot:
        """A frozen copy of the cache state, counters and latest speeds (safe to hand to another thread)."""
        return self.experts.snapshot(self._speed.values)

    # ---------------------------------------------------------------- generation

    def encode(self, messages_or_prompt: str | Sequence[dict] | Sequence[int],
               tools: Sequence[dict] | None = None, continue_final: bool = False) -> list[int]:
        """Token ids of a raw string, chat messages (with the chat template, given `tools` if any; special-token
        text inside a message stays text; `continue_final`: the reply goes on from the last message) or ids as
        they are."""
        return encode_prompt(self.tokenizer, messages_or_prompt, self._control_strings, tools, continue_final)

    def reset_prompt_cache(self) -> None:
        """Forget the KV cache kept across turns (the next prompt is prefilled in full)."""
        self.prompt_cache.reset()

    def stream(self, messages_or_prompt: str | Sequence[dict] | Sequence[int], max_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: Sequence[str] = (), cancel: threading.Event | None = None,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logit_bias: Mapping[int, float] | None = None,
               progress: Callable[[int, int], None] | None = None) -> Iterator[TokenDelta | GenerationDone]:
        """Generate a reply, reusing the KV cache of earlier turns for the prompt's common prefix.

        Args:
            messages_or_prompt: chat messages, a raw prompt string, or token ids.
            stop: strings that end the reply; no part of one is ever streamed.
            cancel: set it to end the reply after the current token, or a long prompt between two of its
                chunks (finish_reason "cancelled").
            progress: called with (prompt tokens processed, prompt tokens to process) between prompt chunks.
            presence_penalty, frequency_penalty, logit_bias: as OpenAI's. The penalties count the tokens
                generated so far in this reply (not the prompt): logit - count x frequency - presence if used.

        Yields:
            `TokenDelta`s whose texts concatenate to the final text, then one `GenerationDone`.
            However the generator ends (finished, cancelled, an exception, the consumer closing it), the
            prompt cache is left consistent with its token record.

        Raises:
            ValueError: an empty prompt. Errors from reading experts (OSError) propagate.
        """
        return generate(self.model, self.tokenizer, self.prompt_cache, self.encode(messages_or_prompt),
                        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                        stop=stop, penalties=Penalties(presence_penalty, frequency_penalty, dict(logit_bias or {})),
                        cancel=cancel, speed=self._speed, kv_args=self._kv_args,
                        after_step=self.experts.after_step, finish=self._finish, progress=progress,
                        expect=functools.partial(self.experts.expect_tokens, stop=self.tokenizer.eos_token_ids),
                        sampled=self.experts.sampled)

    def route_tokens(self, ids: Sequence[int]) -> None:
        """Run the model on `ids` one token at a time with a fresh KV cache, each token one decode step (a
        text's routing as decoding meets it, for traces and profiles). Each next token is announced as a
        reply's sampler announces it, so the first layer's guesses are made and read ahead as in a reply."""
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        self.experts.expect_tokens(ids[:1])
        try:
            for i, token in enumerate(ids):
                mx.eval(self.model(mx.array([[token]]), cache=cache))
                self.experts.after_step()
                if i + 1 < len(ids):
                    self.experts.sampled(mx.array([ids[i + 1]]))
        finally:
            self.experts.ended()

    def _finish(self) -> None:
        self.experts.drain()
        self.experts.ended()

    def close(self) -> None:
        self.experts.close()
