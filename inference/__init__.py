"""moe-tui's engine: MLX MoE inference with experts read on demand into bounded per-layer caches.

The data types import without MLX (front ends that talk to a server need none); `Engine` loads it on
first use.
"""

from .errors import ModelLoadError
from .telemetry import CacheSnapshot, GenerationDone, MemorySample, TokenDelta

__all__ = ["CacheSnapshot", "Engine", "GenerationDone", "MemorySample", "ModelLayout", "ModelLoadError",
           "TokenDelta"]


def __getattr__(name: str):
    if name in ("Engine", "ModelLayout"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
