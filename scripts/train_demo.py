"""Train the built-in demo MoE (mlx-lm qwen3_moe format) on PSF-licensed Python text, on CPU.

A dev-only tool: needs `pip install torch==2.13.0 tokenizers transformers` (never runtime deps).
Reproducible: fixed seed, fixed token budget. The documented command (docs/demo-model.md):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
        python scripts/train_demo.py --work /tmp/demo-train --out inference/demo

Stages: corpus -> tokenizer -> training (checkpoints every --ckpt-every steps, resumable) -> export
(bf16 safetensors with parameter names identical to mlx-lm's qwen3_moe) -> report JSON.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sys
import textwrap
import time
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 8192,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 256,
    "intermediate_size": 768,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def is_held_out(rel_path: str, fraction: float = 0.02) -> bool:
    """Stable split: a file is held out when the hash of its path falls in the first `fraction`."""
    digest = hashlib.sha1(rel_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


# ---------------------------------------------------------------- corpus


def stdlib_files(stdlib: Path) -> list[Path]:
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        if skip.intersection(path.relative_to(stdlib).parts):
            continue
        files.append(path)
    return files


def chat_pairs(source: str) -> list[tuple[str, str]]:
    """(user, assistant) pairs from the public top-level functions of one module."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    pairs = []
    functions = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions.append((node, "function"))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            functions.extend((n, f"method of class `{node.name}`") for n in node.body
                             if isinstance(n, ast.FunctionDef))
    for node, kind in functions:
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        summary = " ".join(doc.strip().split("\n\n")[0].split())
        if not 20 <= len(summary) <= 300:
            continue
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        body = "\n".join(lines[start : node.end_lineno])
        if len(body) > 3000:
            continue
        args = ast.unparse(node.args)
        body = textwrap.dedent(body)
        user = f"Write a Python {kind} `{node.name}({args})`: {summary}"
        pairs.append((user, f"```python\n{body}\n```"))
    return pairs


def render_chat(user: str, assistant: str) -> str:
    return (
        f"<|im_start|>user\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{assistant}<|im_end|>\n"
    )


def build_corpus(stdlib: Path, docs: Path) -> dict[str, list[str]]:
    """Documents split into train/heldout by a stable hash of their source path."""
    split: dict[str, list[str]] = {"train": [], "heldout": []}
    counts = {"py": 0, "rst": 0, "chat": 0}
    for path in stdlib_files(stdlib):
        rel = "stdlib/" + str(path.relative_to(stdlib))
        text = path.read_text(encoding="utf-8", errors="replace")
        bucket = "heldout" if is_held_out(rel) else "train"
        split[bucket].append(text)
        counts["py"] += 1
        for user, assistant in chat_pairs(text):
            split[bucket].append(render_chat(user, assistant))
            counts["chat"] += 1
    for path in sorted(docs.rglob("*.rst.txt")):
        rel = "docs/" + str(path.relative_to(docs))
        bucket = "heldout" if is_held_out(rel) else "train"
        split[bucket].append(path.read_text(encoding="utf-8", errors="replace"))
        counts["rst"] += 1
    print(f"corpus: {counts}, train docs {len(split['train'])}, heldout docs {len(split['heldout'])}",
          file=sys.stderr)
    return split


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(train_docs: list[str], out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def encode_docs(docs: list[str], tokenizer_path: Path):
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    n_bytes = 0
    for enc, doc in zip(tok.encode_batch(docs), docs, strict=False):
        ids.extend(enc.ids)
        ids.append(eot)
        n_bytes += len(doc.encode("utf-8"))
    return np.asarray(ids, dtype=np.int32), n_bytes


# ---------------------------------------------------------------- model (torch)


def build_model(cfg: dict):
    import torch
    import torch.nn.functional as F
    from torch import nn

    D, H, KV, HD = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, K, FF = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    eps = cfg["rms_norm_eps"]

    class RMSNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            return (xf * self.weight.float()).to(x.dtype)

    def rope(x, base):  # x: B, heads, L, HD (non-traditional: rotate halves, as mlx nn.RoPE)
        L = x.shape[-2]
        inv = base ** (-torch.arange(0, HD, 2, dtype=torch.float32) / HD)
        ang = torch.arange(L, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., : HD // 2], x[..., HD // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(D, H * HD, bias=False)
            self.k_proj = nn.Linear(D, KV * HD, bias=False)
            self.v_proj = nn.Linear(D, KV * HD, bias=False)
            self.o_proj = nn.Linear(H * HD, D, bias=False)
            self.q_norm = RMSNorm(HD)
            self.k_norm = RMSNorm(HD)

        def forward(self, x):
            B, L, _ = x.shape
            q = self.q_norm(self.q_proj(x).view(B, L, H, HD)).transpose(1, 2)
            k = self.k_norm(self.k_proj(x).view(B, L, KV, HD)).transpose(1, 2)
            v = self.v_proj(x).view(B, L, KV, HD).transpose(1, 2)
            q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return self.o_proj(out.transpose(1, 2).reshape(B, L, H * HD))

    class SwitchLinearT(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(E, n_out, n_in) * n_in**-0.5)

    class SwitchGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = SwitchLinearT(D, FF)
            self.up_proj = SwitchLinearT(D, FF)
            self.down_proj = SwitchLinearT(FF, D)

        def forward(self, x_sorted, offs):
            def mm(a, w):
                if a.dtype == torch.bfloat16:
                    return F.grouped_mm(a, w.to(a.dtype).transpose(-1, -2), offs=offs)
                # float32 reference path (export check): one matmul per expert
                bounds = [0, *offs.tolist()]
                return torch.cat([a[s:e] @ w[i].T for i, (s, e) in enumerate(zip(bounds, bounds[1:], strict=False))])

            h = F.silu(mm(x_sorted, self.gate_proj.weight)) * mm(x_sorted, self.up_proj.weight)
            return mm(h, self.down_proj.weight)

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(D, E, bias=False)
            self.switch_mlp = SwitchGLU()

        def forward(self, x):
            B, L, _ = x.shape
            flat = x.reshape(-1, D)
            logits = self.gate(flat).float()
            probs = logits.softmax(-1)
            scores, inds = probs.topk(K, dim=-1)
            if cfg["norm_topk_prob"]:
                scores = scores / scores.sum(-1, keepdim=True)
            flat_e = inds.reshape(-1)
            order = flat_e.argsort(stable=True)
            token_of = order // K
            counts = torch.bincount(flat_e, minlength=E)
            offs = counts.cumsum(0).to(torch.int32)
            x_sorted = flat[token_of]
            if torch.is_autocast_enabled("cpu"):
                x_sorted = x_sorted.to(torch.bfloat16)
            y_sorted = self.switch_mlp(x_sorted, offs)
            weighted = y_sorted.float() * scores.reshape(-1)[order][:, None]
            out = torch.zeros(flat.shape[0], D, dtype=torch.float32).index_add_(0, token_of, weighted)
            # Switch-Transformer balance loss and router z-loss.
            frac = counts.float() / flat_e.numel()
            balance = E * (frac * probs.mean(0)).sum()
            zloss = torch.logsumexp(logits, -1).pow(2).mean()
            return out.to(x.dtype).view(B, L, D), balance, zloss, counts

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()
            self.mlp = MoE()
            self.input_layernorm = RMSNorm(D)
            self.post_attention_layernorm = RMSNorm(D)

        def forward(self, x):
            h = x + self.self_attn(self.input_layernorm(x))
            r, balance, zloss, counts = self.mlp(self.post_attention_layernorm(h))
            return h + r, balance, zloss, counts

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(cfg["vocab_size"], D)
            nn.init.normal_(self.embed_tokens.weight, std=0.02)
            self.layers = nn.ModuleList([Layer() for _ in range(cfg["num_hidden_layers"])])
            self.norm = RMSNorm(D)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def hidden(self, tokens):
            h = self.model.embed_tokens(tokens)
            aux = {"balance": 0.0, "zloss": 0.0, "counts": []}
            for layer in self.model.layers:
                h, balance, zloss, counts = layer(h)
                aux["balance"] = aux["balance"] + balance
                aux["zloss"] = aux["zloss"] + zloss
                aux["counts"].append(counts)
            return self.model.norm(h), aux

        def loss(self, tokens, targets, chunk=2048):
            """Mean CE with the tied lm-head applied chunk by chunk (no full B*L*V logits buffer)."""
            h, aux = self.hidden(tokens)
            h = h.reshape(-1, D)
            targets = targets.reshape(-1)
            w = self.model.embed_tokens.weight
            total = h.new_zeros((), dtype=torch.float32)
            for s in range(0, h.shape[0], chunk):
                logits = h[s : s + chunk] @ w.to(h.dtype).T
                total = total + F.cross_entropy(logits.float(), targets[s : s + chunk], reduction="sum")
            return total / targets.numel(), aux

    return Model()


# ---------------------------------------------------------------- training


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor` x peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_loss(model, heldout, seq_len: int, n_windows: int) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(min(n_windows, (len(heldout) - 1) // seq_len)):
            chunk = torch.from_numpy(heldout[i * seq_len : (i + 1) * seq_len + 1].astype("int64"))
            loss, _ = model.loss(chunk[None, :-1], chunk[None, 1:])
            total += loss.item() * seq_len
            count += seq_len
    model.train()
    return total / count


def train(args, train_ids, heldout_ids) -> dict:
    import numpy as np
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = build_model(CONFIG)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    ckpt_path = args.work / "ckpt.pt"
    step, log = 0, []
    if args.init_from and not ckpt_path.exists():
        # A further stage: start from an earlier run's weights and optimizer moments, with a new schedule.
        state = torch.load(args.init_from, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        print(f"initialised from {args.init_from} (step {state['step']} of that run)")
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        print(f"resumed at step {step}")
    tokens_per_step = args.batch * args.seq_len
    total_steps = args.tokens // tokens_per_step
    rng = np.random.default_rng(args.seed + step)
    started = time.time()
    elapsed_before = log[-1]["elapsed_s"] if log else 0.0
    while step < total_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, args.lr, args.warmup, args.lr_floor)
        starts = rng.integers(0, len(train_ids) - args.seq_len - 1, size=args.batch)
        batch = np.stack([train_ids[s : s + args.seq_len + 1] for s in starts]).astype("int64")
        batch_t = torch.from_numpy(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ce, aux = model.loss(batch_t[:, :-1], batch_t[:, 1:])
        loss = ce + 0.01 * aux["balance"] + 1e-3 * aux["zloss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = elapsed_before + time.time() - started
        if step % 10 == 0 or step == total_steps:
            tps = step * tokens_per_step / elapsed
            print(f"step {step}/{total_steps} ce {ce.item():.3f} bal {aux['balance'].item():.3f} "
                  f"{tps:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
        if step % args.ckpt_every == 0 or step == total_steps:
            held = heldout_loss(model, heldout_ids, args.seq_len, 16)
            log.append({"step": step, "train_ce": ce.item(), "heldout_ce": held, "elapsed_s": elapsed})
            print(f"  heldout ce {held:.3f}", flush=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log},
                       ckpt_path)
    return {"model": model, "log": log, "tokens_per_step": tokens_per_step, "steps": total_steps}


def export(model, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {name: p.detach().to(torch.bfloat16).contiguous() for name, p in model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")


def verify_export(out_dir: Path, tokens) -> float:
    """Max |log-prob diff| between torch (float32) and stock mlx-lm (upcast to float32) on `tokens`."""
    import mlx.core as mx
    import numpy as np
    import torch
    from mlx_lm import load
    from safetensors.torch import load_file

    model = build_model(CONFIG)
    model.load_state_dict({k: v.float() for k, v in load_file(str(out_dir / "model.safetensors")).items()})
    model.eval()
    tokens_t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
    with torch.no_grad():
        h, _ = model.hidden(tokens_t)
        ref = torch.log_softmax(h @ model.model.embed_tokens.weight.T, -1)[0].numpy()
    mlx_model, _ = load(str(out_dir))
    mlx_model.set_dtype(mx.float32)
    logits = mlx_model(mx.array(np.asarray(tokens, dtype=np.int32))[None])
    got = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]
    return float(np.abs(got - ref).max())


def main(argv: list[str] | None = None) -> int:
    import sysconfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (corpus, checkpoints)")
    parser.add_argument("--out", type=Path, required=True, help="where the exported model goes")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--docs", type=Path, default=Path("/usr/share/doc/python3.11/html/_sources"))
    parser.add_argument("--tokens", type=int, default=13_000_000, help="training token budget")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--lr-floor", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    parser.add_argument("--init-from", type=Path, help="ckpt.pt of an earlier stage to continue training from")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ckpt-every", type=int, default=200)
    args = parser.parse_args(argv)
    random.seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    import numpy as np

    if not args.docs.is_dir():
        sys.exit(f"{args.docs} not found: install the docs sources (apt-get install python3.11-doc)")
    tok_dir = args.work / "tokenizer"
    ids_path = args.work / "ids.npz"
    if not ids_path.exists():
        corpus = build_corpus(args.stdlib, args.docs)
        t0 = time.time()
        train_tokenizer(corpus["train"], tok_dir, CONFIG["vocab_size"])
        print(f"tokenizer trained in {time.time() - t0:.1f}s")
        train_ids, train_bytes = encode_docs(corpus["train"], tok_dir / "tokenizer.json")
        held_ids, held_bytes = encode_docs(corpus["heldout"], tok_dir / "tokenizer.json")
        np.savez(ids_path, train=train_ids, heldout=held_ids,
                 bytes=np.array([train_bytes, held_bytes]))
    data = np.load(ids_path)
    train_ids, held_ids = data["train"], data["heldout"]
    train_bytes, held_bytes = (int(b) for b in data["bytes"])
    print(f"train tokens {len(train_ids):,} ({train_bytes / len(train_ids):.2f} bytes/token), "
          f"heldout tokens {len(held_ids):,}")
    result = train(args, train_ids, held_ids)
    export(result["model"], args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (args.out / name).write_bytes((tok_dir / name).read_bytes())
    diff = verify_export(args.out, held_ids[:256])
    print(f"export check: max |log-prob diff| torch vs mlx = {diff:.2e}")
    if diff > 1e-4:
        sys.exit(f"export check failed: {diff:.2e} > 1e-4")
    full_held = heldout_loss(result["model"], held_ids, args.seq_len, 10_000)
    report = {
        "seed": args.seed,
        "train_tokens_seen": result["steps"] * result["tokens_per_step"],
        "train_corpus_tokens": int(len(train_ids)),
        "heldout_tokens": int(len(held_ids)),
        "export_max_logprob_diff": diff,
        "heldout_ce": full_held,
        "heldout_ppl": math.exp(full_held),
        "heldout_bits_per_byte": full_held * len(held_ids) / held_bytes / math.log(2),
        "train_minutes": result["log"][-1]["elapsed_s"] / 60,
        "log": result["log"],
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
