"""moe-tui's engine: MLX MoE inference with experts read on demand into bounded per-layer caches."""

from .engine import Engine, ModelLayout
from .errors import ModelLoadError
from .telemetry import CacheSnapshot, GenerationDone, MemorySample, TokenDelta

__all__ = ["CacheSnapshot", "Engine", "GenerationDone", "MemorySample", "ModelLayout", "ModelLoadError",
           "TokenDelta"]
