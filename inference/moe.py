"""Find MoE blocks structurally and swap their expert projections for per-layer slot caches.

A "switch" is any module whose direct children include `SwitchLinear`/`QuantizedSwitchLinear`
(mlx-lm's `SwitchGLU`, `SwitchMLP`, or a model's own variant). Its parent is the MoE block; the
block's router is the child that maps hidden states to one score per expert. The switch keeps its
stock class behaviour: its instance's class becomes a subclass whose `__call__` maps expert ids to
slot ids (and, where needed, loads experts first) before running the stock computation on slot
tensors of shape [capacity, ...].
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

EXPERT_PROJECTIONS = (SwitchLinear, QuantizedSwitchLinear)


@dataclass
class MoEBlock:
    """One MoE layer of the model as found by `find_moe_blocks`."""

    index: int  # 0..num_moe_layers-1
    layer: int  # decoder layer number parsed from the path, or `index` where there is none
    path: str  # dotted path of the switch module
    switch: nn.Module
    block: nn.Module | None  # the switch's parent (router + switch + shared experts)
    router: nn.Module | None
    projections: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return next(iter(self.projections.values()))["weight"].shape[0]


def _children(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in module.children().items() if isinstance(v, nn.Module)}


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    modules = dict(model.named_modules())
    blocks: list[MoEBlock] = []
    for path, module in modules.items():
        projections = {name: child for name, child in _children(module).items()
                       if isinstance(child, EXPERT_PROJECTIONS)}
        if not projections or isinstance(module, EXPERT_PROJECTIONS):
            continue
        parent_path = path.rsplit(".", 1)[0] if "." in path else ""
        block = modules.get(parent_path) if parent_path != path else None
        num_experts = next(iter(projections.values()))["weight"].shape[0]
        router = _find_router(block, module, num_experts) if block is not None else None
        numbers = re.findall(r"\.(\d+)\.", f".{path}.")
        blocks.append(MoEBlock(0, int(numbers[-1]) if numbers else -1, path, module, block, router, projections))
    blocks.sort(key=lambda b: (b.layer, b.path))
    for i, b in enumerate(blocks):
        b.index = i
        if b.layer < 0:
            b.layer = i
    return blocks


def _find_router(block: nn.Module, switch: nn.Module, num_experts: int) -> nn.Module | None:
    """The block's child producing one score per expert: a linear layer with E outputs, or a gate module
    that owns one (e.g. DeepSeek's MoEGate, Bailing's gate wrapping `gate_proj`)."""
    for child in _children(block).values():
        if child is switch:
            continue
        for _, sub in child.named_modules():
            weight = sub.get("weight") if isinstance(sub, dict) else None
            if isinstance(weight, mx.array) and weight.ndim == 2 and weight.shape[0] == num_experts:
                return child
    return None


# ------------------------------------------------------------------ class swapping

_CACHED_CLASSES: dict[type, type] = {}


class _CachedSwitchMixin:
    """Routes every call through the layer's `ExpertLayerRuntime` (set as `_moe_runtime`)."""

    def __call__(self, x, indices, *args, **kwargs):
        runtime = self.__dict__["_moe_runtime"]
        stock = super().__call__  # type: ignore[misc]
        return runtime.forward(lambda h, idx: stock(h, idx, *args, **kwargs), x, indices)


def _swap_class(module: nn.Module, mixin: type, registry: dict[type, type]) -> None:
    cls = type(module)
    if issubclass(cls, mixin):
        return
    if cls not in registry:
        registry[cls] = type(f"Cached{cls.__name__}", (mixin, cls), {"__module__": __name__})
    module.__class__ = registry[cls]


def install(block: MoEBlock, runtime: ExpertLayerRuntime) -> None:
    """Swap the switch in place so calls go through `runtime`."""
    block.switch.__dict__["_moe_runtime"] = runtime
    _swap_class(block.switch, _CachedSwitchMixin, _CACHED_CLASSES)


# ------------------------------------------------------------------ per-layer runtime

class ExpertLayerRuntime:
    """What one swapped switch needs at call time. Owned by the engine; called on the inference thread.

    The engine sets `handler`: a callable (runtime, stock, x, indices) -> output. While `probe_value` is
    set, the switch returns that constant instead (used once at load time to learn how the block combines
    expert outputs).
    """

    def __init__(self, block: MoEBlock) -> None:
        self.block = block
        self.handler: Callable[..., mx.array] | None = None
        self.probe_value: Callable[[mx.array, mx.array], mx.array] | None = None
        self.top_k: int | None = None
        self.output_dims = _output_dims(block)

    def forward(self, stock: Callable[[mx.array, mx.array], mx.array], x: mx.array, indices: mx.array) -> mx.array:
        if self.top_k is None:
            self.top_k = int(indices.shape[-1])
        if self.probe_value is not None:
            return self.probe_value(x, indices)
        if self.handler is None:
            raise RuntimeError("expert layer used before the engine attached its cache")
        return self.handler(self, stock, x, indices)


def _output_dims(block: MoEBlock) -> int:
    names = list(block.projections)
    last = block.projections["down_proj"] if "down_proj" in block.projections else block.projections[names[-1]]
    return int(last["weight"].shape[1])


# ------------------------------------------------------------------ probing the block


@dataclass(frozen=True)
class ProbeResult:
    top_k: int
    normalizes: bool  # the block's routed weights sum to a constant per token


def probe_block(runtime: ExpertLayerRuntime, hidden_size: int, dtype: mx.Dtype, tokens: int = 16) -> ProbeResult | None:
    """Learn how the block weighs expert outputs by feeding it constant expert outputs.

    The block is linear in the switch output, so y(onehot_k) - y(0) is the weight of the k-th routed
    expert for every token (shared experts cancel). Returns None when the block cannot be probed.
    """
    block = runtime.block.block
    if block is None:
        return None
    mx.random.seed(0)
    x = (mx.random.normal((1, tokens, hidden_size)) * 4.0).astype(dtype)

    def run(fill: Callable[[int], float]) -> mx.array:
        def value(h, indices):
            k = indices.shape[-1]
            row = mx.array([fill(i) for i in range(k)], dtype=mx.float32)
            shape = (*indices.shape, runtime.output_dims)
            return mx.broadcast_to(row[:, None], shape).astype(h.dtype)

        runtime.probe_value = value
        try:
            out = block(x)
            out = out[0] if isinstance(out, tuple) else out
            return out.astype(mx.float32).reshape(tokens, -1)[:, 0]
        finally:
            runtime.probe_value = None

    try:
        base = run(lambda i: 0.0)
        top_k = runtime.top_k or 0
        weights = mx.stack([run(lambda i, k=k: 1.0 if i == k else 0.0) - base for k in range(top_k)], axis=-1)
        mx.eval(weights)
    except Exception:  # noqa: BLE001 - any block we cannot drive falls back to config flags
        return None
    weights_np = np.array(weights, dtype=np.float64)
    sums = weights_np.sum(-1)
    tol = 1e-3 if dtype == mx.float32 else 3e-2
    normalizes = bool(np.all(np.abs(sums - sums.mean()) <= tol * max(abs(sums.mean()), 1e-6)))
    return ProbeResult(top_k, normalizes)


def is_quantized(block: MoEBlock) -> bool:
    return any(isinstance(p, QuantizedSwitchLinear) for p in block.projections.values())


def expert_param_names(block: MoEBlock) -> dict[str, list[str]]:
    """projection name -> its per-expert parameter names (weight, scales, biases, bias...)."""
    out = {}
    for name, proj in block.projections.items():
        params = [k for k, v in proj.items() if isinstance(v, mx.array) and v.ndim >= 1
                  and v.shape[0] == block.num_experts]
        out[name] = params
    return out


def nbytes_of(shape: tuple[int, ...], dtype: mx.Dtype) -> int:
    return math.prod(shape) * dtype.size
