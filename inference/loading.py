"""Opening a model folder: its files, config, weights headers and tokenizer checked, the stock model built lazily."""

from __future__ import annotations

import fnmatch
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lm.utils import _get_classes, load_config, load_model, load_tokenizer

from .errors import ModelLoadError
from .expert_cache import TOP_K_KEYS
from .moe import find_moe_blocks
from .safetensors_io import TensorInfo, index_model, is_int, read_json, regular_file

# Files mlx-lm or transformers may open while loading: each must be a regular file (a FIFO would block open()).
READ_PATTERNS = ("*.json", "model*.safetensors", "*.jinja", "*.model", "*.tiktoken", "merges.txt", "vocab.txt")
# Any one of these gives transformers a tokenizer; without one it builds none, or a useless one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "spiece.model", "vocab.json", "vocab.txt")
MAX_INT32 = 2**31 - 1  # MLX shapes and token ids are 32-bit
POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


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
    if repo.count("/") != 1 or repo.startswith(("/", ".", "~")):
        raise ModelLoadError(f"{repo}: no such folder, and not a Hugging Face repo id (owner/name)")
    cached = cached_snapshot(repo)
    if cached is None:
        raise ModelLoadError(f"{repo}: not in the local Hugging Face cache; download it first "
                             f"(`hf download {repo}`) or pass a local folder")
    return cached


def cached_snapshot(repo: str) -> Path | None:
    """A Hugging Face repo's folder in the local hub cache, or None when it is not there (no network)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - hub raises several types for "not cached"
        return None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: the hub is not to be asked."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def check_hub_reachable(repo: str) -> None:
    """Fail at once when the Hugging Face hub's host name does not resolve, as without a network:
    huggingface_hub retries a failed lookup five times, about 24 s, before it gives up. Behind a proxy, which
    resolves names itself, nothing is checked.

    Raises:
        ModelLoadError: the host name does not resolve.
    """
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return
    host = urlsplit(constants.ENDPOINT).hostname
    if not host:
        return
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
        raise ModelLoadError(f"{repo}: not in the local Hugging Face cache, and the hub ({host}) cannot be "
                             f"reached: {reason}. Connect to the network, or pass a local folder") from exc


def check_model_folder(path_or_repo: str | Path) -> Path:
    """The model folder, if it looks like one (a folder with config.json); reads no weights.

    Raises:
        ModelLoadError: no such folder, not a folder, or no config.json in it.
    """
    path = resolve_model_path(path_or_repo)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a model folder (no config.json); pass a folder with config.json and "
                             "*.safetensors, or a Hugging Face repo id")
    return path


def open_checkpoint(path_or_repo: str | Path) -> Checkpoint:
    """Check the folder and build its stock model lazily (no weight is read here).

    Raises:
        ModelLoadError: the folder, one of its files, its config, its safetensors headers, its tokenizer or
            its chat template cannot be used (the message names the file and the problem).
    """
    path = resolve_model_path(path_or_repo)
    check_folder_files(path)
    config_path = path / "config.json"
    if not os.path.lexists(config_path):
        raise ModelLoadError(f"{config_path}: missing; a model folder needs config.json")
    raw = read_json(config_path, "config")
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object of model settings, got a "
                             f"{type(raw).__name__}; re-download it")
    check_config(raw, config_path)
    generation_path = path / "generation_config.json"
    if os.path.lexists(generation_path):  # mlx-lm takes eos_token_id from it
        generation = read_json(generation_path, "generation config")
        if not isinstance(generation, dict):
            raise ModelLoadError(f"{generation_path}: expected a JSON object, got a {type(generation).__name__}; "
                                 "fix or delete it")
        _check_eos(generation.get("eos_token_id"), generation_path)
    config = load_config(path)
    try:
        _get_classes(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{config_path}: model_type {config.get('model_type')!r} is unknown to the installed "
            "mlx-lm; upgrade mlx-lm (pip install -U mlx-lm) or check the model"
        ) from exc
    tensors = index_model(path)  # validates every header and byte range first
    try:
        model, config = load_model(path, lazy=True)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: weights do not match config.json: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - model code can fail on any config value it does not expect
        raise ModelLoadError(f"{config_path}: mlx-lm cannot build the model from it ({type(exc).__name__}: "
                             f"{exc}); check config.json or re-download the model") from exc
    _check_top_k_range(config, config_path, model)
    tokenizer = _open_tokenizer(path, config)
    return Checkpoint(path, str(path_or_repo), model, config, tokenizer, tensors)


def check_folder_files(path: Path) -> None:
    """Every file the loaders may open is a regular file: a FIFO would block open(), a symlink loop or a
    directory would end in a bare OSError deep inside mlx-lm or transformers."""
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot list the model folder ({exc.strerror})") from exc
    for name in names:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in READ_PATTERNS):
            regular_file(path / name)


def check_config(config: dict, config_path: Path) -> None:
    """The values mlx-lm and the engine use without checking: the wrong type or range would surface later as
    an overflow, a type error deep in a model class, or a routing kernel error mid-generation."""
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ModelLoadError(f"{config_path}: model_type must be a string, got {model_type!r}")
    for key in POSITIVE_INTS:
        value = config.get(key)
        if value is not None and not (is_int(value) and 1 <= value <= MAX_INT32):
            raise ModelLoadError(f"{config_path}: {key} must be an integer from 1 to {MAX_INT32}, got {value!r}")
    _check_eos(config.get("eos_token_id"), config_path)
    key, top_k = _top_k(config)
    if key is not None and not (is_int(top_k) and top_k >= 1):
        raise ModelLoadError(f"{config_path}: {key} (experts per token) must be a positive integer, got {top_k!r}")


def _check_eos(value: Any, source: Path) -> None:
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(is_int(i) and 0 <= i <= MAX_INT32 for i in ids):
        raise ModelLoadError(f"{source}: eos_token_id must be a token id (a non-negative integer) or a list of "
                             f"them, got {value!r}")


def _top_k(config: dict) -> tuple[str | None, Any]:
    """The experts-per-token setting the engine reads (the first of TOP_K_KEYS that is set)."""
    return next(((k, config[k]) for k in TOP_K_KEYS if config.get(k) is not None), (None, None))


def _check_top_k_range(config: dict, config_path: Path, model: Any) -> None:
    """top_k within the experts each MoE layer has: more fails in argpartition at the first token."""
    key, top_k = _top_k(config)
    blocks = find_moe_blocks(model)  # shapes only: the lazy weights stay unevaluated
    if key is None or not blocks:
        return
    num_experts = min(b.num_experts for b in blocks)
    if top_k > num_experts:
        raise ModelLoadError(f"{config_path}: {key} is {top_k} but the model has {num_experts} experts per "
                             f"layer; it must be 1 to {num_experts}")


def _open_tokenizer(path: Path, config: dict) -> Any:
    """The tokenizer, required at load: without one every request would fail later, one by one."""
    if not any(os.path.lexists(path / name) for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise ModelLoadError(f"{path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
                             "files from the original model into this folder")
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad tokenizer
        raise ModelLoadError(f"{path}: the tokenizer cannot be loaded ({type(exc).__name__}: {exc}); "
                             "re-download the tokenizer files") from exc
    _check_chat_template(path, tokenizer)
    # The engine holds prompts to the context itself and says so; transformers' own warning at the tokenizer's
    # model_max_length ("... will result in indexing errors") only misled a server's log.
    inner = getattr(tokenizer, "_tokenizer", None)
    if inner is not None and hasattr(inner, "model_max_length"):
        inner.model_max_length = 1 << 60
    return tokenizer


def _check_chat_template(path: Path, tokenizer: Any) -> None:
    """Compile the chat template now, so a broken one fails the load rather than every chat request."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        templates = {"default": template}
    elif isinstance(template, dict):
        templates = template
    elif isinstance(template, list):  # older tokenizer_config.json: [{"name": ..., "template": ...}]
        templates = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    else:
        return
    source = next((path / n for n in ("chat_template.jinja", "chat_template.json") if (path / n).exists()),
                  path / "tokenizer_config.json")
    import jinja2

    for name, text in templates.items():
        if not isinstance(text, str):
            raise ModelLoadError(f"{source}: chat template {name!r} is not a string ({text!r}); fix or remove it")
        try:
            _compile_template(text)
        except jinja2.TemplateError as exc:
            where = f", line {exc.lineno}" if getattr(exc, "lineno", None) else ""
            raise ModelLoadError(f"{source}: chat template {name!r} does not compile ({exc.message}{where}); "
                                 "fix or remove it") from exc


def _compile_template(text: str) -> None:
    """Compile as transformers will when it renders (same environment and extensions; cached there)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: the plain sandbox, as it used to be
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.from_string(text)
        return
    _compile_jinja_template(text)


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
