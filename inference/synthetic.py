"""Tiny random MoE checkpoints in mlx-lm format, for tests and benchmarks (no downloads).

`make_checkpoint(path, "qwen3_moe", quant_bits=4, layout="per_expert", shards=2)` writes config.json,
safetensors (single or sharded with an index) and a small byte-level BPE tokenizer with a ChatML
chat template. `stock mlx_lm.load(path)` loads every variant written here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

BASE = {
    "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "max_position_embeddings": 1024, "tie_word_embeddings": False,
}
ARCHS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "moe_intermediate_size": 32, "head_dim": 16, "norm_topk_prob": True},
    "qwen2_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "olmoe": {"num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False},
    "deepseek_v3": {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
                    "moe_intermediate_size": 32, "first_k_dense_replace": 1, "num_hidden_layers": 3,
                    "n_group": 2, "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": None,
                    "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 16, "moe_layer_freq": 1,
                    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                    "norm_topk_prob": True},
    "gpt_oss": {"num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 32,
                "layer_types": ["sliding_attention", "full_attention"]},
}
# More mlx-lm MoE architectures (hybrid attention/SSM, shared experts, unnormalized routers), tested
# stacked and unquantized to check the structural discovery beyond the six above.
MORE_ARCHS: dict[str, dict[str, Any]] = {
    "phimoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "minimax": {"num_local_experts": 8, "num_experts_per_tok": 2, "rotary_dim": 8, "head_dim": 16,
                "shared_intermediate_size": 0},
    "qwen3_next": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16,
                   "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "norm_topk_prob": True, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                   "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
                   "full_attention_interval": 2, "partial_rotary_factor": 0.25},
    "dots1": {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32,
              "first_k_dense_replace": 1, "num_hidden_layers": 3, "n_group": 1, "topk_group": 1, "head_dim": 16,
              "routed_scaling_factor": 1.0, "norm_topk_prob": True},
    "bailing_moe": {"num_experts": 8, "num_experts_per_tok": 2, "num_shared_experts": 1, "moe_intermediate_size": 32,
                    "first_k_dense_replace": 1, "num_hidden_layers": 3, "norm_topk_prob": True},
    "jamba": {"num_experts": 8, "num_experts_per_tok": 2, "expert_layer_period": 1, "expert_layer_offset": 0,
              "attn_layer_period": 2, "attn_layer_offset": 1, "mamba_d_state": 8, "mamba_d_conv": 4,
              "mamba_expand": 2},
}
# Per-expert (original HF) names of the stacked projections, where they differ.
HF_EXPERT_NAMES = {"mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}}
# Stock sanitize() stacks per-expert quantized tensors only for these.
PER_EXPERT_QUANTIZED_OK = {"mixtral", "qwen2_moe", "olmoe", "deepseek_v3"}
PER_EXPERT_OK = {"mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "qwen3_moe"}

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOKENIZER_TEXT = [
    "def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
    "import os\nprint(os.getcwd())\n", "Mixture of experts routes each token to a few experts.",
    "for i in range(10):\n    print(i * i)\n", "class Cache:\n    def __init__(self):\n        self.slots = {}\n",
]


def write_tokenizer(path: Path, vocab_size: int = 400) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_TEXT * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }, indent=2))


def make_config(arch: str, **overrides: Any) -> dict:
    config = {**BASE, **{**ARCHS, **MORE_ARCHS}[arch], "model_type": arch, **overrides}
    config["eos_token_id"] = 2
    return config


def make_checkpoint(path: str | Path, arch: str, *, quant_bits: int | None = None, layout: str = "stacked",
                    shards: int = 1, dtype: mx.Dtype = mx.float32, seed: int = 0,
                    router_scale: float = 1.0, **overrides: Any) -> Path:
    """Write a random `arch` model to `path` and return the path."""
    from mlx_lm.utils import _get_classes, quantize_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = make_config(arch, **overrides)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    params = dict(tree_flatten(model.parameters()))
    # Spread router logits so routing is decisive, as in trained models.
    for key, value in params.items():
        if re.search(r"\.(gate|router)\.weight$", key) and value.ndim == 2:
            params[key] = value * router_scale
        elif key.endswith("e_score_correction_bias"):
            params[key] = mx.random.normal(value.shape) * 0.1
    model.load_weights(list(params.items()))
    model.set_dtype(dtype)
    if quant_bits:
        model, config = quantize_model(model, config, group_size=32, bits=quant_bits)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    if layout == "per_expert":
        weights = _split_experts(weights, arch, config)
    elif layout != "stacked":
        raise ValueError(f"unknown layout {layout!r}")
    _save(path, weights, shards)
    from mlx_lm.utils import save_config

    save_config(config, path / "config.json")
    write_tokenizer(path)
    return path


def _split_experts(weights: dict[str, mx.array], arch: str, config: dict) -> dict[str, mx.array]:
    names = HF_EXPERT_NAMES.get(arch, {})
    out = {}
    pattern = re.compile(r"^(.*)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
    for key, value in weights.items():
        m = pattern.match(key)
        if not m:
            out[key] = value
            continue
        prefix, proj, param = m.groups()
        for e in range(value.shape[0]):
            out[f"{prefix}.experts.{e}.{names.get(proj, proj)}.{param}"] = value[e]
    return out


def _save(path: Path, weights: dict[str, mx.array], shards: int) -> None:
    keys = sorted(weights)
    if shards <= 1:
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
        return
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[i * per : (i + 1) * per]}
        mx.save_safetensors(str(path / name), part, metadata={"format": "mlx"})
        weight_map.update({k: name for k in part})
    total = sum(v.nbytes for v in weights.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def module_count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for _, m in model.named_modules())
