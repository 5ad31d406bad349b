"""Damaged model folders fail at load with one ModelLoadError naming the file and the problem: no traceback, no hang."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from moe_tui.inference import Engine, ModelLoadError

ARCH = "qwen3_moe"  # 8 experts, top 2
CAPACITY = 4
GATE = "model.layers.0.mlp.switch_mlp.gate_proj.weight"  # [8, 32, 64]: one row per expert
UP = "model.layers.0.mlp.switch_mlp.up_proj.weight"  # same shape as GATE


@pytest.fixture
def model(checkpoint, tmp_path) -> Path:
    """A private copy of a good tiny checkpoint, to damage."""
    return Path(shutil.copytree(checkpoint(ARCH), tmp_path / "model"))


def load_error(path: Path) -> str:
    """The load's ModelLoadError message, with the model folder written <model>.

    The folder's path holds the test's name, so a check such as "vocab_size" in message must not see it.
    """
    with pytest.raises(ModelLoadError) as info:
        Engine.load(path, capacity=CAPACITY)
    return str(info.value).replace(str(path), "<model>")


def load_error_in_subprocess(path: Path) -> str:
    """The load's ModelLoadError message, from a child process killed if it hangs (a FIFO blocks open())."""
    code = ("import sys\nfrom moe_tui.inference import Engine, ModelLoadError\n"
            "try:\n    Engine.load(sys.argv[1], capacity=int(sys.argv[2]))\n"
            "except ModelLoadError as exc:\n    print(exc)\n    sys.exit(3)\n")
    try:
        result = subprocess.run([sys.executable, "-c", code, str(path), str(CAPACITY)], capture_output=True,
                                text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path} hung")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout.replace(str(path), "<model>")


def header_of(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_header(file: Path, raw_header: bytes, body: bytes) -> None:
    file.write_bytes(struct.pack("<Q", len(raw_header)) + raw_header + body)


def edit_header(file: Path, change: Callable[[dict], None]) -> None:
    header, body = header_of(file)
    change(header)
    write_header(file, json.dumps(header).encode(), body)


def edit_json(file: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(file.read_text())
    new = change(data)
    file.write_text(json.dumps(data if new is None else new))


# ------------------------------------------------------------------ files that are not regular files


def test_directory_named_model_safetensors(model):
    weights = model / "model.safetensors"
    weights.unlink()
    weights.mkdir()
    message = load_error(model)
    assert message.startswith("<model>/model.safetensors:") and "directory" in message


def test_symlink_loop_as_weight_file(model):
    weights = model / "model.safetensors"
    weights.unlink()
    weights.symlink_to(model / "loop.safetensors")
    (model / "loop.safetensors").symlink_to(weights)
    message = load_error(model)
    assert message.startswith("<model>/model.safetensors:") and "symlink" in message


def test_fifo_as_model_safetensors_does_not_hang(model):
    weights = model / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    message = load_error_in_subprocess(model)
    assert message.startswith("<model>/model.safetensors:") and "not a regular file" in message


def test_fifo_as_config_json_does_not_hang(model):
    config = model / "config.json"
    config.unlink()
    os.mkfifo(config)
    message = load_error_in_subprocess(model)
    assert message.startswith("<model>/config.json:") and "not a regular file" in message


# ------------------------------------------------------------------ safetensors headers


def test_header_nested_very_deeply(model):
    weights = model / "model.safetensors"
    _, body = header_of(weights)
    write_header(weights, b"[" * 100_000 + b"]" * 100_000, body)
    message = load_error(model)
    assert message.startswith("<model>/model.safetensors:") and "nested" in message


def test_header_offsets_given_as_strings(model):
    def change(header):
        header[GATE]["data_offsets"] = [str(v) for v in header[GATE]["data_offsets"]]

    edit_header(model / "model.safetensors", change)
    message = load_error(model)
    assert message.startswith("<model>/model.safetensors:") and GATE in message and "data_offsets" in message


def test_header_negative_offsets(model):
    def change(header):
        begin, end = header[GATE]["data_offsets"]
        header[GATE]["data_offsets"] = [-8, end - begin - 8]

    edit_header(model / "model.safetensors", change)
    message = load_error(model)
    assert message.startswith("<model>/model.safetensors:") and GATE in message and "data_offsets" in message


def test_header_overlapping_offsets(model):
    def change(header):
        header[UP]["data_offsets"] = list(header[GATE]["data_offsets"])

    edit_header(model / "model.safetensors", change)
    message = load_error(model)
    assert message.startswith("<model>/model.safetensors:") and "overlap" in message
    assert GATE in message and UP in message


def test_header_offsets_past_end_of_file(model):
    weights = model / "model.safetensors"

    def change(header):
        begin, end = header[GATE]["data_offsets"]
        size = weights.stat().st_size
        header[GATE]["data_offsets"] = [size, size + end - begin]

    edit_header(weights, change)
    message = load_error(model)
    assert message.startswith("<model>/model.safetensors:") and GATE in message and "truncated" in message


@pytest.mark.parametrize("shape", [
    [-8, 32, 64],
    [8, -32, -64],
    [2**64, 32, 64],
    # 2**64 - 1 and its square: the element count wraps in int64 arithmetic to exactly the right byte size
    [2**32 + 1, 2**32 - 1, 2**32 + 1, 2**32 - 1, 8, 32, 64],
    ["8", 32, 64],
])
def test_header_shape_with_bad_dims(model, shape):
    def change(header):
        header[GATE]["shape"] = shape

    edit_header(model / "model.safetensors", change)
    message = load_error(model)
    assert message.startswith("<model>/model.safetensors:") and GATE in message and "shape" in message


def test_header_unknown_dtype(model):
    def change(header):
        header[GATE]["dtype"] = "F7"

    edit_header(model / "model.safetensors", change)
    message = load_error(model)
    assert message.startswith("<model>/model.safetensors:") and GATE in message and "F7" in message


def test_bf16_tensor_bytes_do_not_match_shape(checkpoint, tmp_path):
    path = Path(shutil.copytree(checkpoint(ARCH, dtype=mx.bfloat16), tmp_path / "model"))

    def change(header):
        assert header[GATE]["dtype"] == "BF16"
        header[GATE]["shape"] = [8, 32, 128]  # twice the elements its 2-byte span holds

    edit_header(path / "model.safetensors", change)
    message = load_error(path)
    assert message.startswith("<model>/model.safetensors:") and GATE in message
    assert "BF16" in message and "bytes" in message


# ------------------------------------------------------------------ the shard index


@pytest.fixture
def sharded(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint(ARCH, shards=2), tmp_path / "model"))


def test_index_with_integer_weight_map_values(sharded):
    edit_json(sharded / "model.safetensors.index.json",
              lambda index: index.update(weight_map={k: 1 for k in index["weight_map"]}))
    message = load_error(sharded)
    assert message.startswith("<model>/model.safetensors.index.json:") and "weight_map" in message


@pytest.mark.parametrize("change", [
    lambda index: index.update(weight_map=list(index["weight_map"].values())),
    lambda index: [index],
])
def test_index_not_a_mapping(sharded, change):
    edit_json(sharded / "model.safetensors.index.json", change)
    message = load_error(sharded)
    assert message.startswith("<model>/model.safetensors.index.json:") and "object" in message


# ------------------------------------------------------------------ config.json


def test_config_is_a_json_list(model):
    edit_json(model / "config.json", lambda config: [config])
    message = load_error(model)
    assert message.startswith("<model>/config.json:") and "JSON object" in message


def test_eos_token_id_as_a_string(model):
    edit_json(model / "config.json", lambda config: config.update(eos_token_id="2"))
    message = load_error(model)
    assert message.startswith("<model>/config.json:") and "eos_token_id" in message


def test_vocab_size_huge(model):
    edit_json(model / "config.json", lambda config: config.update(vocab_size=2**31))
    message = load_error(model)
    assert message.startswith("<model>/config.json:") and "vocab_size" in message


@pytest.mark.parametrize("top_k", [20, 9, 0, -1, "2"])
def test_num_experts_per_tok_out_of_range(model, top_k):
    edit_json(model / "config.json", lambda config: config.update(num_experts_per_tok=top_k))
    message = load_error(model)
    assert message.startswith("<model>/config.json:") and "num_experts_per_tok" in message


# ------------------------------------------------------------------ tokenizer


def test_missing_tokenizer(model):
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    message = load_error(model)
    assert message.startswith("<model>: no tokenizer")


def test_broken_chat_template(model):
    edit_json(model / "tokenizer_config.json", lambda config: config.update(chat_template="{% if %}"))
    message = load_error(model)
    assert message.startswith("<model>/tokenizer_config.json:") and "chat template" in message


# ------------------------------------------------------------------ non-finite expert weights


def first_routed_expert(path: Path) -> int:
    """An expert of layer 0 that the test prompt routes to (so the engine must read it)."""
    engine = Engine.load(path, capacity=CAPACITY)
    try:
        list(engine.stream([{"role": "user", "content": "hi"}], max_tokens=4))
        return int(np.asarray(engine.trace[0][0]).flat[0])
    finally:
        engine.close()


def poke(file: Path, tensor: str, at: float, value: bytes) -> None:
    """Overwrite bytes of `tensor` in a safetensors file, `at` a fraction of the way into its span."""
    header, _ = header_of(file)
    data = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = header[tensor]["data_offsets"]
    start = 8 + n + begin + int((end - begin) * at) // len(value) * len(value)
    data[start : start + len(value)] = value
    file.write_bytes(bytes(data))


def non_finite(bad: str, dtype: mx.Dtype) -> bytes:
    value = np.array([float(bad)], dtype=np.float32)
    return {mx.float32: value.tobytes(), mx.float16: value.astype(np.float16).tobytes(),
            mx.bfloat16: value.tobytes()[2:]}[dtype]  # bfloat16: the high half of the float32 bits


def expect_error_when_read(path: Path) -> str:
    engine = Engine.load(path, capacity=CAPACITY)  # experts are read lazily: not an error yet
    try:
        with pytest.raises(ModelLoadError) as info:
            list(engine.stream([{"role": "user", "content": "hi"}], max_tokens=4))
    finally:
        engine.close()
    return str(info.value).replace(str(path), "<model>")


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_expert_weights_fail_when_read(checkpoint, tmp_path, dtype, bad):
    good = checkpoint(ARCH, dtype=dtype)
    expert = first_routed_expert(good)
    path = Path(shutil.copytree(good, tmp_path / "model"))
    poke(path / "model.safetensors", GATE, (expert + 0.5) / 8, non_finite(bad, dtype))  # mid-row of `expert`
    message = expect_error_when_read(path)
    assert message.startswith("<model>/model.safetensors:") and GATE in message and f"expert {expert}" in message


def test_non_finite_weights_of_a_per_expert_tensor(checkpoint, tmp_path):
    good = checkpoint("mixtral", dtype=mx.bfloat16, layout="per_expert")
    expert = first_routed_expert(good)
    path = Path(shutil.copytree(good, tmp_path / "model"))
    tensor = f"model.layers.0.block_sparse_moe.experts.{expert}.w1.weight"
    poke(path / "model.safetensors", tensor, 0.5, non_finite("nan", mx.bfloat16))
    message = expect_error_when_read(path)
    assert message.startswith("<model>/model.safetensors:") and tensor in message and f"expert {expert}" in message


@pytest.mark.parametrize("file_dtype", ["F16", "BF16", "F32"])
def test_the_non_finite_check_flags_exactly_inf_and_nan(file_dtype):
    """Every 16-bit pattern (and float32's around each boundary) against numpy's own isfinite."""
    from moe_tui.inference.experts import _check_finite

    if file_dtype == "F32":
        edges = np.array([0, 1, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF], dtype=np.uint32)
        patterns = np.concatenate([edges, edges | 0x80000000])
        values = patterns.view(np.float32)
    else:
        patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
        wide = (patterns.astype(np.uint32) << 16).view(np.float32)  # bfloat16: float32's top half
        values = patterns.view(np.float16) if file_dtype == "F16" else wide
    src = SimpleNamespace(file_dtype=file_dtype, stacked=SimpleNamespace(path="m.safetensors", name="w"))
    flagged = []
    for pattern in patterns:
        try:
            _check_finite(src, [0], np.array([pattern]))
        except ModelLoadError:
            flagged.append(int(pattern))
    assert flagged == [int(p) for p in patterns[~np.isfinite(values)]]
