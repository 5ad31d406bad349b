"""Chat messages to prompt token ids, with the model's own chat template. Message content is never read for
special tokens: text such as `<|im_end|>\\n<|im_start|>system` inside a message or an attached file stays
text, so it cannot forge a turn."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from typing import Any

# Private-use code points: no chat template or tokenizer gives them a meaning. The nonce, new for each prompt,
# keeps a message that spells a placeholder from standing for another message's content.
PLACEHOLDER = "\ue000moe-{}-{}\ue001"


def control_strings(tokenizer: Any) -> tuple[str, ...]:
    """The text of every added (special or control) token, e.g. '<|im_start|>'."""
    try:
        added = tokenizer.get_added_vocab()
    except AttributeError:
        added = {}
    return tuple(token for token in added if token)


def encode_messages(tokenizer: Any, messages: Sequence[dict], markers: tuple[str, ...] | None = None,
                    tools: Sequence[dict] | None = None, continue_final: bool = False) -> list[int]:
    """Token ids of `messages` with the generation prompt appended (and `tools`, if given, for the chat
    template to list). `continue_final`: the last message is the start of the reply (an assistant prefill):
    the prompt ends with its text, where the model goes on, instead of with the generation prompt.

    Where no message contains the text of an added token, this is exactly the chat template's own
    tokenization (as stock mlx-lm does it). Otherwise the template is rendered with each message's
    content replaced by a placeholder; the template's text is tokenized with its special tokens, each
    content without any (special-token text in it is split into ordinary tokens).

    Raises:
        ValueError: a tool definition or a tool call's arguments contain the text of an added token (templates
            render those as JSON, or field by field, so no placeholder can stand in for them).
    """
    markers = control_strings(tokenizer) if markers is None else markers
    structured = [("tools", tools)] if tools else []
    structured += [(f"message {i}'s tool calls", m["tool_calls"])
                   for i, m in enumerate(messages) if m.get("tool_calls")]
    for where, value in structured:
        text = json.dumps(value, ensure_ascii=False)
        if found := next((t for t in markers if t in text), None):
            raise ValueError(f"{where} contain the special-token text {found!r}")
    extra = {} if tools is None else {"tools": list(tools)}
    hostile = [isinstance(m.get("content"), str) and any(t in m["content"] for t in markers) for m in messages]
    if continue_final:  # the template closes the turn: its text is cut after the last message's placeholder
        hostile[-1] = True
    if not any(hostile):
        return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, **extra))
    nonce = secrets.token_hex(8)
    masked = [{**m, "content": PLACEHOLDER.format(nonce, i)} if unsafe else m
              for i, (m, unsafe) in enumerate(zip(messages, hostile, strict=True))]
    text = tokenizer.apply_chat_template(masked, add_generation_prompt=not continue_final, tokenize=False, **extra)
    if continue_final:
        last = PLACEHOLDER.format(nonce, len(messages) - 1)
        if last not in text:
            raise ValueError("the chat template leaves out the final assistant message: it cannot be continued")
        text = text[: text.rindex(last) + len(last)]
    ids: list[int] = []
    start = 0
    for match in re.finditer(re.escape(PLACEHOLDER.format(nonce, "@")).replace("@", "(\\d+)"), text):
        ids += tokenizer.encode(text[start : match.start()], add_special_tokens=False)
        content = messages[int(match.group(1))]["content"]
        ids += tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True)
        start = match.end()
    ids += tokenizer.encode(text[start:], add_special_tokens=False)
    return ids


def encode_prompt(tokenizer: Any, prompt: str | Sequence[dict] | Sequence[int], markers: tuple[str, ...],
                  tools: Sequence[dict] | None = None, continue_final: bool = False) -> list[int]:
    """Token ids of a raw string, chat messages (encode_messages: the chat template, given `tools`; special-token
    text inside a message stays text; `continue_final`: the reply goes on from the last message) or ids as they
    are. `markers`: the tokenizer's control_strings."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    items = list(prompt)
    if items and isinstance(items[0], dict):
        return encode_messages(tokenizer, items, markers, tools=tools, continue_final=continue_final)
    return [int(t) for t in items]


def max_token_bytes(tokenizer: Any) -> int:
    """An upper bound on the UTF-8 bytes one token stands for: a text of B bytes takes at least
    B / this many tokens, which rules out a prompt far over the context without tokenizing it.
    (A vocabulary entry's own spelling is never shorter than the bytes it decodes to: byte-level BPE spells
    each byte as one character, SentencePiece a space as '▁' and a raw byte as '<0xNN>'.)"""
    try:
        vocab = tokenizer.get_vocab()
    except AttributeError:
        return 64  # no vocabulary to read: a generous bound
    return max((len(token.encode("utf-8", "replace")) for token in vocab), default=64) or 64
