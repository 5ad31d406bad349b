"""Forcing a model's continuation, for tests of tool calling on the demo model (which cannot call tools itself).

`Script` wraps an engine's model so that each reply position gets a one-hot row of logits for the next token of
a scripted text (then EOS). Only the model's choice of tokens is scripted: the chat template builds the prompt,
mlx-lm's parser (inferred from the template) reads the calls, and the server's wire format or the app's agent
loop carries them, as they would for a model that calls tools. Installed by test fixtures, never by the code.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
from moe_tui.inference import Engine


def call(name: str, **arguments: Any) -> str:
    """A call as the demo's template writes one (Qwen/Hermes style)."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


class ForcedModel:
    """The engine's model, made to produce `script.ids` (then EOS) at the reply's positions."""

    def __init__(self, model: Any, script: Script) -> None:
        self.model = model
        self.script = script

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        logits = self.model(inputs, cache=cache, **kwargs)
        ids = self.script.ids
        position = cache[0].offset - self.script.prompt_length  # 0: the reply's first token
        if not ids or position < 0:
            return logits  # no script, or a prefill chunk whose logits are not sampled
        token = ids[position] if position < len(ids) else self.script.eos
        row = mx.where(mx.arange(logits.shape[-1]) == token, 0.0, -1e9).astype(logits.dtype)
        return mx.concatenate([logits[:, :-1, :], mx.broadcast_to(row, (logits.shape[0], 1, logits.shape[-1]))],
                              axis=1)


class Script:
    """What the model says next: `say(text)` before a request (it holds until `clear()`), or `queue(*texts)`:
    one text for each of the next replies, in order."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ids: list[int] = []
        self.queued: list[str] = []
        self.prompts: list[list[int]] = []  # every prompt the engine was given, in order
        self.prompt_length = 0
        self.eos = engine.tokenizer.eos_token_id
        engine.model = ForcedModel(engine.model, self)
        stream = engine.stream

        def scripted_stream(prompt, *args, **kwargs):
            self.prompt_length = len(prompt)  # the session hands the engine token ids
            self.prompts.append(list(prompt))
            if self.queued:
                self.say(self.queued.pop(0))
            return stream(prompt, *args, **kwargs)

        engine.stream = scripted_stream

    def say(self, text: str) -> None:
        self.ids = list(self.engine.tokenizer.encode(text, add_special_tokens=False))

    def queue(self, *texts: str) -> None:
        self.queued += texts

    def clear(self) -> None:
        self.ids, self.queued = [], []
