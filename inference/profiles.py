"""Expert profiles: routing counts per layer x expert recorded on sample prompts, to warm and pin a cache.

Schema (documented in profiles/README.md): {"version": 1, "model": str, "model_type": str,
"num_experts": int, "top_k": int, "moe_layers": [int], "prompts": int, "tokens": int,
"counts": [[int] * num_experts] * len(moe_layers), "universal": [[int], ...]}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelLoadError

VERSION = 1
UNIVERSAL_MIN_SHARE = 1.0  # x the uniform share 1/num_experts


def build_profile(model: str, layout: Any, per_prompt_counts: list[np.ndarray], tokens: int) -> dict:
    """Profile from per-prompt routing counts ([moe_layers, num_experts] each).

    An expert is "universal" in a layer when every prompt routed to it and its overall share is at
    least the uniform share: pinning those keeps the experts every kind of input needs.
    """
    stacked = np.stack(per_prompt_counts)  # prompts x layers x experts
    counts = stacked.sum(0)
    used_by_all = (stacked > 0).all(0)
    share = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
    universal = used_by_all & (share >= UNIVERSAL_MIN_SHARE / layout.num_experts)
    return {
        "version": VERSION,
        "model": model,
        "model_type": layout.model_type,
        "num_experts": layout.num_experts,
        "top_k": layout.top_k,
        "moe_layers": list(layout.moe_layers),
        "prompts": len(per_prompt_counts),
        "tokens": tokens,
        "counts": counts.astype(int).tolist(),
        "universal": [np.flatnonzero(u).tolist() for u in universal],
    }


def load_profile(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: profile not found") from exc
    except OSError as exc:  # a folder, no permission
        raise ModelLoadError(f"{path}: cannot read the profile ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc}); re-create it with `moe profile`") from exc
    for key in ("num_experts", "moe_layers", "counts", "universal"):
        if key not in data:
            raise ModelLoadError(f"{path}: profile lacks {key!r}; re-create it with `moe profile`")
    return data


def warm_plan(profile: dict, layout: Any, capacity: int) -> list[tuple[list[int], list[int]]]:
    """Per layer: experts to load (most used first, up to capacity) and experts to pin.

    Pins are the universal experts, at most capacity - top_k so a token's own experts always fit.
    """
    if profile["num_experts"] != layout.num_experts or list(profile["moe_layers"]) != list(layout.moe_layers):
        raise ModelLoadError(
            f"profile is for {len(profile['moe_layers'])} MoE layers x {profile['num_experts']} experts but "
            f"the model has {len(layout.moe_layers)} x {layout.num_experts}; make one for this model "
            "with `moe profile`"
        )
    plan = []
    max_pins = max(capacity - layout.top_k, 0)
    for counts, universal in zip(profile["counts"], profile["universal"], strict=False):
        order = sorted(range(layout.num_experts), key=lambda e: (-counts[e], e))
        pins = sorted(universal, key=lambda e: (-counts[e], e))[:max_pins]
        warm = pins + [e for e in order if e not in pins][: capacity - len(pins)]
        plan.append((warm, pins))
    return plan
