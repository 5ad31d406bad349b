"""`moe plan` and the memory the engine keeps for the KV cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from moe_tui.inference import Engine, expert_cache, loading
from moe_tui.inference import plan as plan_module
from moe_tui.inference.errors import ModelLoadError
from moe_tui.inference.loading import context_length
from moe_tui.inference.plan import (
    MEMORY_FRACTION,
    expected_hit_rate,
    format_plan,
    kv_bytes_per_token,
    make_plan,
    measure_read_bandwidth,
    parse_size,
)
from moe_tui.inference.safetensors_io import read_header, weight_files


@pytest.mark.parametrize("arch,quant,layout", [("qwen3_moe", None, "stacked"), ("mixtral", 4, "stacked"),
                                               ("mixtral", None, "per_expert"), ("deepseek_v3", None, "stacked")])
def test_plan_from_headers_matches_the_loaded_engine(checkpoint, arch, quant, layout):
    path = checkpoint(arch, quant, layout)
    engine = Engine.load(path, capacity=1.0)
    plan = make_plan(path, memory=8 << 30, measure=False, float32_compute=True)
    assert plan.expert_bytes == engine.layout.expert_bytes
    assert plan.dense_bytes == engine.layout.dense_bytes
    assert (plan.moe_layers, plan.num_experts, plan.top_k) == (len(engine.layout.moe_layers), 8, 2)
    assert plan.expert_disk_bytes * plan.num_experts * plan.moe_layers == engine.experts.expert_disk_bytes()
    sources = engine.experts._layers[0].sources  # what the engine reads for one miss: one read per parameter
    assert plan.reads_per_miss == len(sources)
    assert plan.smallest_read_bytes == min(s.expert_nbytes for s in sources)
    per_slot = plan.expert_bytes * plan.moe_layers
    some = make_plan(path, memory=plan.dense_bytes + int((4.5 * per_slot + plan.kv_bytes) / MEMORY_FRACTION),
                     measure=False, float32_compute=True)
    assert some.fits and not some.all_experts_fit
    assert "`moe pack` makes each miss one read" in format_plan(some)  # a tiny model's reads are all small


def test_plan_sizes_the_cache_from_memory_less_dense_and_kv(checkpoint):
    path = checkpoint("qwen3_moe")
    probe = make_plan(path, memory=1 << 30, context=64, measure=False, float32_compute=True)
    per_slot = probe.expert_bytes * probe.moe_layers
    # Exactly enough memory for 5 experts per layer.
    memory = int((5 * per_slot + probe.kv_bytes) / MEMORY_FRACTION) + probe.dense_bytes + 2
    plan = make_plan(path, memory=memory, context=64, measure=False, float32_compute=True)
    assert plan.fits and plan.capacity == 5 and plan.kv_bytes == 64 * plan.kv_bytes_per_token
    longer = make_plan(path, memory=memory, context=512, measure=False, float32_compute=True)
    assert longer.capacity < 5  # a longer context's KV cache leaves fewer slots
    tiny = make_plan(path, memory=probe.dense_bytes + per_slot, context=64, measure=False, float32_compute=True)
    assert not tiny.fits and tiny.capacity == 0
    text = format_plan(tiny)
    assert "does not fit" in text and "GiB of memory would do" in text


def test_expected_hit_rate_is_the_top_experts_share_of_routings():
    profile = {"counts": [[10, 5, 3, 2], [1, 1, 1, 17]]}
    assert expected_hit_rate(profile, 1) == pytest.approx((10 + 17) / 40)
    assert expected_hit_rate(profile, 2) == pytest.approx((15 + 18) / 40)
    assert expected_hit_rate(profile, 4) == 1.0


def test_plan_reports_an_io_limit_from_the_bandwidth(checkpoint):
    path = checkpoint("qwen3_moe")
    counts = np.ones((2, 8), dtype=int).tolist()
    plan = make_plan(path, memory=1 << 30, context=64, profile={"num_experts": 8, "counts": counts, "model": "x"},
                     bandwidth=100 << 20, float32_compute=True)
    assert plan.hit_rate == 1.0 and plan.all_experts_fit  # a tiny model: everything fits
    small = make_plan(path, memory=plan.dense_bytes + int(4 * plan.expert_bytes * plan.moe_layers / MEMORY_FRACTION)
                      + int(plan.kv_bytes / MEMORY_FRACTION) + 8, context=64,
                      profile={"num_experts": 8, "counts": counts, "model": "x"}, bandwidth=100 << 20,
                      float32_compute=True)
    assert small.capacity == 4 and small.hit_rate == pytest.approx(0.5)
    assert small.bytes_per_token == pytest.approx(small.moe_layers * 2 * 0.5 * small.expert_disk_bytes)
    assert small.io_limit_tps == pytest.approx((100 << 20) / small.bytes_per_token)
    assert "tok/s from the disk" in format_plan(small)


def test_plan_refuses_what_is_not_a_moe_model(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ModelLoadError, match="not a mixture-of-experts"):
        make_plan(tmp_path, memory=1 << 30, measure=False)
    with pytest.raises(ModelLoadError, match="no config.json"):
        make_plan(tmp_path / "missing", memory=1 << 30, measure=False)


def test_kv_bytes_per_token():
    config = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256}
    assert kv_bytes_per_token(config, 4, None) == 2 * 4 * 2 * 32 * 4
    assert kv_bytes_per_token(config, 2, 4) == int(2 * 4 * 2 * 32 * (0.5 + 8 / 64))


@pytest.mark.parametrize("text,value", [("16G", 16 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("1000", 1000),
                                        ("2 gb", 2 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_junk():
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_measure_read_bandwidth(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\0" * (40 << 20))
    assert measure_read_bandwidth([file], nbytes=32 << 20) > 0


def test_automatic_capacity_keeps_the_kv_cache_of_the_context_free(checkpoint, monkeypatch):
    path = checkpoint("qwen3_moe")
    full = Engine.load(path, capacity=1.0)
    per_slot = full.layout.expert_bytes * len(full.layout.moe_layers)
    kv_token = kv_bytes_per_token(full.config, 4, None)
    # Memory for exactly 6 experts per layer once 64 tokens of KV cache are kept free.
    available = int((6 * per_slot + 64 * kv_token) / MEMORY_FRACTION) + 1
    monkeypatch.setattr(expert_cache, "available_memory", lambda: available)
    assert Engine.load(path, context=64).capacity == 6
    assert Engine.load(path, context=80).capacity < 6
    with pytest.raises(ModelLoadError, match="GiB kept for the KV cache"):
        Engine.load(path, context=4096)
    assert Engine.load(path, context=64).context_length == 64
    assert full.context_length == context_length(full.config)  # no context asked: the model's


def test_moe_plan_cli(checkpoint, capsys):
    from moe_tui.app.cli import main

    path = checkpoint("qwen3_moe")
    assert main(["plan", str(path), "--memory", "1G", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "fits: 8 of 8 experts per layer" in out and "KV cache" in out
    assert main(["plan", str(path), "--memory", "300K", "--no-measure"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert main(["plan", str(path), "--memory", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err


def test_plan_of_a_hub_repo_reads_headers_only(checkpoint, monkeypatch):
    """A repo not downloaded: config.json and the safetensors headers come from the hub, no weights."""
    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
    from moe_tui.inference.safetensors_io import read_header, weight_files

    path = checkpoint("qwen3_moe")
    files = {}
    for file in weight_files(path):
        tensors = {name: TensorInfo(dtype=i.dtype, shape=list(i.shape), data_offsets=(0, i.nbytes))
                   for name, i in read_header(file).items()}
        files[file.name] = SafetensorsFileMetadata(metadata={}, tensors=tensors)
    meta = SafetensorsRepoMetadata(metadata=None, sharded=False, weight_map={}, files_metadata=files)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", lambda repo: meta)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(path / name))
    monkeypatch.setattr(loading, "check_hub_reachable", lambda repo: None)  # CI resolves no host names
    remote = make_plan("owner/some-moe", memory=1 << 30, measure=False, float32_compute=True)
    local = make_plan(path, memory=1 << 30, measure=False, float32_compute=True)
    assert (remote.dense_bytes, remote.expert_bytes, remote.capacity) == (local.dense_bytes, local.expert_bytes,
                                                                          local.capacity)
    assert remote.model == "owner/some-moe" and remote.read_bandwidth is None


def test_a_named_capacity_may_use_all_available_memory(checkpoint, monkeypatch):
    """The automatic capacity leaves room (60%); a capacity the user names is refused only when it cannot
    fit at all (inside `moe bench --offload`'s cgroups it was refused at 60%)."""
    path = checkpoint("qwen3_moe")
    full = Engine.load(path, capacity=1.0)
    per_slot = full.layout.expert_bytes * len(full.layout.moe_layers)
    kv = 16 * kv_bytes_per_token(full.config, 4, None)
    monkeypatch.setattr(expert_cache, "available_memory", lambda: 6 * per_slot + kv + 1)
    assert Engine.load(path, capacity=6, context=16).capacity == 6
    assert Engine.load(path, context=16).capacity == 3  # automatic: 60%
    with pytest.raises(ModelLoadError, match="use capacity <= 6"):
        Engine.load(path, capacity=7, context=16)


def _no_network(monkeypatch) -> list:
    """Name lookups fail as without a network; the hub's downloads are recorded instead of made."""
    import socket

    import huggingface_hub

    def no_lookup(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    asked = []

    def download(repo, *args, local_files_only=False, **kwargs):
        if local_files_only:
            raise FileNotFoundError(repo)  # not in the local cache
        asked.append(repo)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    return asked


def test_a_hub_repo_without_a_network_fails_at_once(monkeypatch, capsys):
    """Offline, `moe plan owner/name` and `moe run owner/name` waited out huggingface_hub's five retries of a
    name lookup that had failed (24 s) before they said so."""
    from moe_tui.app.cli import ensure_local, main

    asked = _no_network(monkeypatch)
    assert main(["plan", "owner/some-moe", "--no-measure"]) == 2
    err = capsys.readouterr().err
    assert "owner/some-moe" in err and "cannot be reached" in err and "Name or service not known" in err
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        ensure_local("owner/some-moe")
    assert asked == []  # the hub was never asked


def test_plan_of_a_repo_in_the_local_hub_cache_reads_it_there(checkpoint, monkeypatch, capsys):
    """A repo id downloaded before is planned from its files, as a folder, without the network."""
    import huggingface_hub

    path = checkpoint("qwen3_moe")
    asked = _no_network(monkeypatch)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, local_files_only=False, **kwargs:
                        str(path) if local_files_only else asked.append(repo))
    remote = make_plan("owner/some-moe", memory=1 << 30, measure=False, float32_compute=True)
    local = make_plan(path, memory=1 << 30, measure=False, float32_compute=True)
    assert (remote.dense_bytes, remote.expert_bytes, remote.capacity) == (local.dense_bytes, local.expert_bytes,
                                                                          local.capacity)
    assert asked == []


def test_plan_of_a_repo_whose_cache_holds_only_its_config_asks_the_hub(checkpoint, monkeypatch, tmp_path):
    """A first `moe plan owner/name` caches config.json alone; the second found that folder and failed with "no
    model*.safetensors files" instead of asking the hub again (found in review)."""
    import huggingface_hub

    path = checkpoint("qwen3_moe")
    partial = tmp_path / "snapshot"
    partial.mkdir()
    (partial / "config.json").write_text((path / "config.json").read_text())
    asked = []
    tensors = [(n, i.dtype, tuple(i.shape), i.nbytes) for f in weight_files(path) for n, i in read_header(f).items()]

    def hub_model(repo):
        asked.append(repo)
        return json.loads((path / "config.json").read_text()), tensors

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, local_files_only=False, **kw: str(partial))
    monkeypatch.setattr(plan_module, "_hub_model", hub_model)
    remote = make_plan("owner/some-moe", memory=1 << 30, measure=False, float32_compute=True)
    assert asked == ["owner/some-moe"] and remote.capacity > 0
