"""Errors the engine raises for bad models or settings: one message naming the file and the fix."""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model folder or checkpoint file cannot be used as it is; the message says why and what to do."""
