"""`moe bench --offload` at a tiny size (no root needed: the page-cache-drop fallback is forced)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from moe_tui.app.cli import main
from moe_tui.inference.offload_bench import (
    EMBED_STD,
    WARM_PREFILL_ROUNDS,
    MemoryCgroup,
    parse_percents,
    prefill_rounds,
    ratios,
)


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_offload_bench_tiny(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    rc = main(["bench", "--offload", "--offload-size", "tiny", "--offload-model", str(ckpt),
               "--offload-capacities", "25,100", "--offload-modes", "exact,exact-noprefetch", "--offload-no-cgroup",
               "--prompt-tokens", "12", "--decode-tokens", "6"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)

    env = report["environment"]
    assert env["isolation"] == "fadvise" and env["cgroup"] is None
    assert env["page_cache_dropped_before_each_run"] is True
    assert env["file_bytes"] > 0 and env["file_bytes"] < 20 << 20
    assert report["synthetic"]["size"] == "tiny" and report["synthetic"]["embed_std"] == EMBED_STD
    assert (ckpt / "config.json").exists()  # made at --offload-model and kept

    layout = report["layout"]
    assert layout["num_experts"] == 64 and layout["top_k"] == 4

    routing = report["routing"]
    for key in ("demo_lru", "synthetic_lru", "synthetic_belady", "benchmark_decode_lru"):
        assert set(routing[key]) == {"0.25", "0.5"}
        assert all(0.0 <= v <= 1.0 for v in routing[key].values())
    for f in ("0.25", "0.5"):
        assert routing["synthetic_lru"][f] <= routing["synthetic_belady"][f] + 1e-9

    io = report["io"]
    assert _positive(io["sequential_read_bandwidth"])
    assert _positive(io["engine_cold_load_bandwidth"]) and _positive(io["engine_warm_load_bandwidth"])
    # The reads alone are at least as fast as the loads, which also widen and write what was read.
    assert io["engine_cold_read_bandwidth"] >= io["engine_cold_load_bandwidth"] > 0
    assert 0 < io["engine_vs_sequential"]
    assert _positive(report["limits"]["compute_decode_tps"])
    assert _positive(report["limits"]["compute_prefill_tps"])

    records = report["records"]  # the tiny model's expert parameters are small reads: records pay
    assert records["path"] and _positive(records["bytes"]) and "expert records (moe pack): " in err

    warm = report["warm_prefill"]  # prefill at 25% against 100%, files warm, taking turns
    assert "error" not in warm, warm
    assert warm["rounds"] == WARM_PREFILL_ROUNDS and warm["prompt_tokens"] == 12
    [part] = warm["configs"]
    assert part["capacity_fraction"] == 0.25 and part["capacity"] == 16
    assert _positive(part["prefill_tps"]) and _positive(part["full_prefill_tps"])
    rounds = part["vs_full"]["per_round"]
    assert len(rounds) == WARM_PREFILL_ROUNDS and all(map(_positive, rounds))
    assert WARM_PREFILL_ROUNDS % 2 == 0  # each order of the two engines counted equally often
    assert min(part["vs_full"]["per_round"]) <= part["vs_full"]["median"] <= max(part["vs_full"]["per_round"])
    assert "prefill with files warm" in err and "25% " in err

    configs = report["configs"]
    assert [(c["mode"], c["capacity_fraction"]) for c in configs] == [
        ("exact", 0.25), ("exact", 1.0), ("exact-noprefetch", 0.25), ("exact-noprefetch", 1.0)]
    for c in configs:
        assert "error" not in c, c
        assert _positive(c["prefill_tps"]) and _positive(c["decode_tps"])
        assert c["generated_tokens"] == 6 and c["decode"]["tokens"] == 5
        assert 0.0 <= c["hit_rate"] <= 1.0 and 0.0 <= c["decode"]["hit_rate"] <= 1.0
        assert c["compute_limit_tps"] == report["limits"]["compute_decode_tps"]
        assert c["decode"]["stall_s_per_token"] >= 0 and 0 <= c["stall_share"] <= 1.5
        if c["capacity_fraction"] < 1.0:
            assert c["capacity"] == 16
            assert c["decode"]["bytes_per_token"] > 0 and _positive(c["io_limit_tps"])
            assert _positive(c["load_bandwidth"]) and _positive(c["decode"]["stall_s_per_token"])
            assert c["read_bandwidth"] >= c["load_bandwidth"]
            assert c["decode"]["hit_rate"] < 1.0
        else:
            assert c["decode"]["bytes_per_token"] == 0 and c["io_limit_tps"] is None
            assert c["decode"]["hit_rate"] == 1.0
        if c["mode"] == "exact":
            assert c["fallback_rate"] == 0.0
    assert "isolation fadvise" in err and "exact@25%" in err and "exact-noprefetch@100%" in err


class _FakeEngine:
    """Records the order of prefills; each reports the prefill speed it is given."""

    def __init__(self, name, log, tps):
        self.name, self.log, self.tps = name, log, iter(tps)

    def reset_prompt_cache(self):
        self.log.append(("reset", self.name))

    def stream(self, prompt, max_tokens):
        assert max_tokens == 1
        self.log.append(("prefill", self.name))
        return [SimpleNamespace(prefill_tps=next(self.tps))]


def test_prefill_rounds_take_turns_and_leave_out_the_first_round():
    log = []
    a = _FakeEngine("a", log, [99.0, 10.0, 12.0, 14.0])
    b = _FakeEngine("b", log, [99.0, 5.0, 9.0, 7.0])
    hooks = []
    speeds = prefill_rounds([("a", a, lambda: hooks.append("a")), ("b", b, None)], [1, 2, 3], rounds=3)
    assert speeds == {"a": [10.0, 12.0, 14.0], "b": [5.0, 9.0, 7.0]}  # round 0 (99) not counted
    order = [name for what, name in log if what == "prefill"]
    assert order == ["b", "a", "a", "b", "b", "a", "a", "b"]  # reversed every other round
    assert log[:2] == [("reset", "b"), ("prefill", "b")]  # each prefill starts from an empty prompt cache
    assert hooks == ["a"] * 4
    r = ratios(speeds["b"], speeds["a"])
    assert r["per_round"] == [0.5, 0.75, 0.5] and r["median"] == 0.5
    assert math.isclose(r["geometric_mean"], (0.5 * 0.75 * 0.5) ** (1 / 3))


def test_parse_percents():
    assert parse_percents("12.5,25, 50%,100") == [0.125, 0.25, 0.5, 1.0]
    for bad in ("", "0", "150", "-5"):
        with pytest.raises(ValueError):
            parse_percents(bad)


def _fake_v1(root, own="/jobs/42"):
    (root / "memory" / own.lstrip("/")).mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc = root / "proc_cgroup"
    proc.write_text(f"5:devices:/\n4:memory:{own}\n0::/\n")
    return proc


def test_cgroup_detect_v1_nests_under_own_cgroup(tmp_path):
    proc = _fake_v1(tmp_path)
    cg = MemoryCgroup.detect(root=tmp_path, proc_cgroup=proc, name="moe-bench-test")
    assert cg is not None and cg.kind == "cgroup-v1"
    assert cg.path == tmp_path / "memory" / "jobs" / "42" / "moe-bench-test" and cg.path.is_dir()
    cg.set_limit(123 << 20)
    assert (cg.path / "memory.limit_in_bytes").read_text() == str(123 << 20)
    assert cg.procs == cg.path / "cgroup.procs"


def test_cgroup_detect_v2_and_none(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu io memory pids\n")
    (v2 / "cgroup.subtree_control").write_text("cpu memory\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/user.slice/session-1.scope\n")
    cg = MemoryCgroup.detect(root=v2, proc_cgroup=proc, name="moe-bench-test")
    assert cg is not None and cg.kind == "cgroup-v2" and cg.path == v2 / "moe-bench-test"
    cg.set_limit(1 << 30)
    assert (cg.path / "memory.max").read_text() == str(1 << 30)

    (v2 / "cgroup.subtree_control").write_text("cpu\n")  # memory not delegated: no cgroup
    assert MemoryCgroup.detect(root=v2, proc_cgroup=proc, name="moe-bench-other") is None
    assert MemoryCgroup.detect(root=tmp_path / "missing", proc_cgroup=tmp_path / "nope") is None


def test_sequential_read_is_the_faster_of_ordinary_and_direct_reads(tmp_path, monkeypatch):
    """Ordinary reads alone under-rate a disk that direct reads (and the engine's) go faster on; each figure
    the benchmark divides by must be the disk's best, or the shares it reports go past 100%."""
    from moe_tui.inference import bench

    file = tmp_path / "blob.bin"
    file.write_bytes(bytes(4 << 20))
    direct = []
    monkeypatch.setattr(bench, "measure_read_bandwidth", lambda files, nbytes: direct.append(nbytes) or 1e15)
    assert bench.sequential_read_bandwidth([file]) == 1e15 and direct == [4 << 20]
    monkeypatch.setattr(bench, "measure_read_bandwidth", lambda files, nbytes: 1.0)
    assert 1.0 < bench.sequential_read_bandwidth([file]) < 1e15


def test_bench_ratios_to_stock_pair_runs_of_the_same_repeat():
    """One lucky stock run must not decide `moe bench`'s x-stock column: ratios are taken within each repeat
    (stock and the configurations run back to back) and their median reported."""
    from moe_tui.inference.bench import _paired

    stock = [{"decode_tps": t} for t in (200.0, 100.0, 100.0)]
    engine = [{"decode_tps": t} for t in (100.0, 98.0, 101.0)]
    assert max(e["decode_tps"] for e in engine) / max(s["decode_tps"] for s in stock) == 0.505  # best of each
    assert _paired(engine, stock, "decode_tps") == 0.98


def test_bench_stdout_is_json_alone_when_it_makes_a_quantized_checkpoint(monkeypatch, capsys):
    """mlx-lm prints "[INFO] Quantized model with ... bits per weight." on stdout while quantizing: `moe bench
    --synthetic --quantized > report.json` must still write a JSON file."""
    from moe_tui.inference import bench

    monkeypatch.setattr(bench, "run_bench", lambda model, **kwargs: {"model": str(model)})
    monkeypatch.setattr(bench, "format_table", lambda report: "table")
    assert main(["bench", "--synthetic", "--quantized"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["model"].endswith("synthetic-qwen3-moe") and "table" in err


def test_offload_bench_quantized_runs_the_same_model_in_4_bits(tmp_path, capsys):
    """`--quantized` makes the offload checkpoint as mlx-community's 4-bit models are (mlx_lm.convert: packed
    weights, bf16 scales and biases), and runs it; stdout stays the JSON report (convert prints as it goes)."""
    from moe_tui.inference.safetensors_io import read_header, weight_files

    ckpt = tmp_path / "q4"
    rc = main(["bench", "--offload", "--quantized", "--offload-size", "tiny", "--offload-model", str(ckpt),
               "--offload-capacities", "25", "--offload-modes", "exact", "--offload-no-cgroup",
               "--prompt-tokens", "12", "--decode-tokens", "6"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)
    assert report["quantization"] == {"bits": 4, "group_size": 64}
    assert report["synthetic"]["quantization"] == {"bits": 4, "group_size": 64}
    assert report["synthetic"]["embed_std"] == EMBED_STD
    tensors = {}
    for f in weight_files(ckpt):
        tensors.update(read_header(f))
    expert = "model.layers.0.mlp.switch_mlp.gate_proj"
    assert tensors[f"{expert}.weight"].dtype == "U32" and tensors[f"{expert}.scales"].dtype == "BF16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4"]  # no temporary folder left beside it
    [config] = report["configs"]
    assert "error" not in config, config
    assert config["generated_tokens"] == 6 and config["decode"]["hit_rate"] < 1.0
    assert config["decode"]["bytes_per_token"] > 0
    assert "(4-bit, group 64)" in err


def test_offload_bench_quantized_refuses_an_existing_bf16_checkpoint(tmp_path, capsys):
    """An existing checkpoint is run as it is: with `--quantized` it must be one made in 4 bits, not silently
    the bf16 one (the report would be read as 4-bit)."""
    from moe_tui.inference.offload_bench import make_offload_checkpoint

    ckpt = tmp_path / "bf16"
    make_offload_checkpoint(str(ckpt), "tiny")
    rc = main(["bench", "--offload", "--quantized", "--offload-model", str(ckpt), "--offload-no-cgroup"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert "--quantized" in err and "a bf16 one" in err and str(ckpt) in err


def test_offload_bench_will_not_make_its_checkpoint_among_other_files(tmp_path, capsys):
    """A folder that exists without a checkpoint in it is not written into: mlx-lm would load any safetensors
    already there beside the new ones."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    rc = main(["bench", "--offload", "--offload-size", "tiny", "--offload-model", str(folder), "--offload-no-cgroup"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "not a checkpoint" in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
