"""Opening a model folder: config, safetensors index and tokenizer checked, the stock model built lazily."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lm.utils import _get_classes, load_config, load_model, load_tokenizer

from .errors import ModelLoadError
from .safetensors_io import TensorInfo, index_model


@dataclass
class Checkpoint:
    """A model folder opened for the engine: the stock mlx-lm model (lazy, nothing evaluated yet), its
    config and tokenizer, and where every tensor lives on disk."""

    path: Path
    name: str
    model: Any
    config: dict
    tokenizer: Any
    tensors: dict[str, TensorInfo]


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local folder, or a Hugging Face repo id found in the local hub cache (no download here)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: expected a model folder (config.json + *.safetensors), got a file")
        return path
    repo = str(path_or_repo)
    if repo.count("/") != 1:
        raise ModelLoadError(f"{repo}: no such folder, and not a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - hub raises several types for "not cached"
        raise ModelLoadError(
            f"{repo}: not in the local Hugging Face cache; download it first "
            f"(`hf download {repo}`) or pass a local folder"
        ) from exc


def open_checkpoint(path_or_repo: str | Path) -> Checkpoint:
    """Check the folder and build its stock model lazily (no weight is read here).

    Raises:
        ModelLoadError: the folder, its config, its safetensors headers or its tokenizer cannot be used.
    """
    path = resolve_model_path(path_or_repo)
    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{config_path}: missing; a model folder needs config.json")
    try:
        config = load_config(path)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_path}: not valid JSON ({exc}); re-download it") from exc
    try:
        _get_classes(config)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"{config_path}: model_type {config.get('model_type')!r} is unknown to the installed "
            "mlx-lm; upgrade mlx-lm (pip install -U mlx-lm) or check the model"
        ) from exc
    tensors = index_model(path)  # validates every header and byte range first
    try:
        model, config = load_model(path, lazy=True)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: weights do not match config.json: {exc}") from exc
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return Checkpoint(path, str(path_or_repo), model, config, tokenizer, tensors)


def context_length(config: dict) -> int:
    """The model's context window in tokens (4096 where the config does not say)."""
    return int(config.get("max_position_embeddings") or 4096)


def kv_group_size(config: dict) -> int:
    """The KV-quantization group size: 64, or 32 where the head dimension needs it."""
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    for size in (64, 32):
        if head_dim and head_dim % size == 0:
            return size
    raise ValueError(f"kv_bits needs a head dimension divisible by 32; this model's is {head_dim}")
