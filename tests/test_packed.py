"""Expert records (`moe pack`, `inference/packed.py`): each expert's parameters in one contiguous record, so a
miss is one read. Outputs stay equal to stock mlx-lm's; a pack that does not match its checkpoint is not used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from moe_tui.app.cli import main
from moe_tui.inference import Engine, ModelLoadError
from moe_tui.inference import packed as packs

PROMPT = [5, 17, 99, 3, 42, 7, 8, 200, 31, 11, 64, 90]


def greedy(model, n: int = 16) -> list[int]:
    return [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=n)]


def pack(path: Path, out: Path) -> Path:
    engine = Engine.load(path, capacity=3, pack=False)
    packs.write_pack([layer.sources for layer in engine.experts._layers], engine.layout.num_experts, out)
    engine.close()
    return out


@pytest.fixture
def default_packs(tmp_path, monkeypatch):
    """`default_pack_dir` in a temporary folder (not the user's cache)."""
    monkeypatch.setattr(packs, "default_pack_dir", lambda model_dir: tmp_path / "packs" / Path(model_dir).name)
    return lambda path: tmp_path / "packs" / Path(path).name


@pytest.mark.parametrize(("arch", "quant_bits", "layout"),
                         [("qwen3_moe", None, "stacked"), ("qwen3_moe", 4, "stacked"), ("mixtral", None, "per_expert"),
                          ("gpt_oss", None, "stacked")])
@pytest.mark.parametrize("uncached", [True, False])
def test_misses_read_from_records_keep_outputs_equal_to_stock(checkpoint, tmp_path, arch, quant_bits, layout,
                                                               uncached):
    path = checkpoint(arch, quant_bits=quant_bits, layout=layout)
    stock = greedy(load(str(path))[0])
    records = pack(path, tmp_path / "pack")
    engine = Engine.load(path, capacity=3, pack=records, uncached_reads=uncached)  # top-2 of 8: misses
    reads = []
    reader = engine.experts.reader
    for name in ("read_into", "read_uncached"):
        real = getattr(reader, name)
        setattr(reader, name, lambda p, *a, real=real, **k: reads.append(p) or real(p, *a, **k))
    assert greedy(engine.model) == stock
    assert engine.experts.pack == records
    assert reads and set(reads) == {records / packs.RECORDS}  # every load reads records, nothing else
    assert engine.counters.misses.sum() > 0


def test_each_record_holds_the_checkpoints_bytes_of_one_expert(checkpoint, tmp_path):
    path = checkpoint("qwen3_moe", quant_bits=4)
    records = pack(path, tmp_path / "pack")
    engine = Engine.load(path, capacity=3, pack=False)
    layers = [layer.sources for layer in engine.experts._layers]
    opened, why = packs.open_pack(records, layers, 8)
    assert why == ""
    data = (records / packs.RECORDS).read_bytes()
    for sources, layer in zip(layers, opened, strict=True):
        assert layer.stride % 4096 == 0 and len(layer.params) == len(sources) == 9  # 3 x weight, scales, biases
        for expert in (0, 5, 7):
            start = layer.location(expert)
            for src, (at, nbytes) in zip(sources, layer.params, strict=True):
                file, offset = src.location(expert)
                with open(file, "rb") as f:
                    f.seek(offset)
                    assert data[start + at : start + at + nbytes] == f.read(nbytes)


def test_records_in_the_default_place_are_used_until_the_checkpoint_changes(checkpoint, tmp_path, default_packs):
    path = checkpoint("qwen3_moe", quant_bits=4)
    assert Engine.load(path, capacity=3).experts.pack is None  # none made yet: no note either
    assert Engine.load(path, capacity=3).experts.pack_note == ""
    with pytest.raises(ModelLoadError, match="moe pack"):
        Engine.load(path, capacity=3, pack=True)
    records = pack(path, default_packs(path))
    assert Engine.load(path, capacity=3).experts.pack == records
    assert Engine.load(path, capacity=3, pack=False).experts.pack is None
    weights = next(path.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # re-downloaded, say
    engine = Engine.load(path, capacity=3)
    assert engine.experts.pack is None and "changed since it was packed" in engine.experts.pack_note
    assert greedy(engine.model) == greedy(load(str(path))[0])  # read from the checkpoint itself
    with pytest.raises(ModelLoadError, match="changed since it was packed"):
        Engine.load(path, capacity=3, pack=records)


def test_a_copy_that_kept_sizes_and_times_but_not_the_bytes_is_noticed(checkpoint, tmp_path):
    path = checkpoint("qwen3_moe", quant_bits=4, seed=3)  # its own copy: its bytes are changed below
    records = pack(path, tmp_path / "pack")
    engine = Engine.load(path, capacity=3, pack=False)
    src = engine.experts._layers[-1].sources[0]
    engine.close()
    file, offset = src.location(7)
    stat = file.stat()
    with open(file, "r+b") as f:
        f.seek(offset)
        data = f.read(16)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_size == stat.st_size and file.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(ModelLoadError, match="changed since it was packed"):
        Engine.load(path, capacity=3, pack=records)


def test_an_engine_keeps_reading_its_records_when_they_are_deleted_or_packed_again(checkpoint, tmp_path):
    path = checkpoint("qwen3_moe", quant_bits=4)
    stock = greedy(load(str(path))[0])
    records = pack(path, tmp_path / "pack")
    for uncached in (True, False):
        engine = Engine.load(path, capacity=3, pack=records, uncached_reads=uncached)
        for entry in records.iterdir():
            entry.unlink()
        assert greedy(engine.model) == stock  # misses still read from the records it opened
        pack(path, records)  # packed again while it runs
        engine.reset_prompt_cache()
        assert greedy(engine.model) == stock


def test_records_split_into_runs_keep_outputs(checkpoint, tmp_path, monkeypatch):
    from moe_tui.inference import experts

    path = checkpoint("qwen3_moe", quant_bits=4)
    records = pack(path, tmp_path / "pack")
    monkeypatch.setattr(experts, "RUN_BYTES", 1)  # every record its own read
    engine = Engine.load(path, capacity=6, pack=records, uncached_reads=True, prefetch=False)
    assert greedy(engine.model) == greedy(load(str(path))[0])


def test_records_cut_short_or_of_another_model_are_not_used(checkpoint, tmp_path):
    path = checkpoint("qwen3_moe", quant_bits=4)
    records = pack(path, tmp_path / "pack")
    with open(records / packs.RECORDS, "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ModelLoadError, match="4096 bytes where the manifest says"):
        Engine.load(path, capacity=3, pack=records)
    other = pack(checkpoint("qwen3_moe"), tmp_path / "other")  # the same model unquantized
    with pytest.raises(ModelLoadError, match="another model"):
        Engine.load(path, capacity=3, pack=other)
    manifest = json.loads((other / packs.MANIFEST).read_text())
    (other / packs.MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ModelLoadError, match="not a manifest this version reads"):
        Engine.load(checkpoint("qwen3_moe"), capacity=3, pack=other)


def test_a_pack_interrupted_or_without_room_leaves_no_usable_records(checkpoint, tmp_path, monkeypatch):
    path = checkpoint("qwen3_moe", quant_bits=4)
    records = pack(path, tmp_path / "pack")
    engine = Engine.load(path, capacity=3, pack=False)
    layers = [layer.sources for layer in engine.experts._layers]

    def fail(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # packed again over the old one, stopped after the first layer
        packs.write_pack(layers, 8, records, progress=fail)
    assert sorted(p.name for p in records.iterdir()) == []  # the old pack was dropped first, the new one unfinished
    (records / (packs.RECORDS + ".partial")).write_bytes(b"left by a pack that was killed")
    monkeypatch.setattr(packs.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    with pytest.raises(ModelLoadError, match="free some space"):
        packs.write_pack(layers, 8, records)
    assert sorted(p.name for p in records.iterdir()) == []  # the leftover went too
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ModelLoadError, match="cannot write expert records"):
        packs.write_pack(layers, 8, tmp_path / "a-file" / "pack")


def test_moe_pack_writes_records_the_engine_then_uses(checkpoint, default_packs, capsys, monkeypatch):
    path = checkpoint("qwen3_moe", quant_bits=4)
    assert main(["pack", str(path)]) == 0
    out = capsys.readouterr()
    assert str(default_packs(path)) in out.out and "layer 2/2" in out.err
    assert Engine.load(path, capacity=3).experts.pack == default_packs(path)
    assert main(["info", str(path), "--capacity", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["expert_records"] == str(default_packs(path))
    assert main(["pack", str(path)]) == 0
    assert "are up to date" in capsys.readouterr().out
    # Where every expert parameter is already a large read, records would only take disk space.
    monkeypatch.setattr(packs, "SMALL_READ_BYTES", 1)
    unquantized = checkpoint("qwen3_moe")
    assert main(["pack", str(unquantized)]) == 1
    assert "already a large read" in capsys.readouterr().err
    assert not default_packs(unquantized).exists()
    assert main(["pack", str(unquantized), "--force"]) == 0


def test_the_user_hears_of_records_where_they_would_help_and_of_records_not_used(checkpoint, tmp_path, default_packs):
    from moe_tui.inference.events import Notice, SessionReady
    from moe_tui.inference.session import Session

    path = checkpoint("qwen3_moe", quant_bits=4)
    [(hint, severity)] = Engine.load(path, capacity=3, uncached_reads=True).experts.load_notes()
    assert "moe pack" in hint and "9 reads" in hint and severity == "information"
    assert Engine.load(path, capacity=3).experts.load_notes() == []  # fits in memory: misses are memory copies
    assert Engine.load(path, capacity=1.0, uncached_reads=True).experts.load_notes() == []  # nothing to miss
    records = pack(path, default_packs(path))
    assert Engine.load(path, capacity=3, uncached_reads=True).experts.load_notes() == []
    manifest = json.loads((records / packs.MANIFEST).read_text())
    (records / packs.MANIFEST).write_text(json.dumps({**manifest, "layers": []}))
    [(note, severity)] = Engine.load(path, capacity=3).experts.load_notes()
    assert "expert records not used" in note and "moe pack" in note and severity == "warning"

    events = []
    session = Session(lambda: Engine.load(path, capacity=3), events.append)  # the app and `moe serve` hear it
    session.start()
    try:
        session.ready.wait(60)
        for _ in range(100):
            if any(isinstance(e, Notice) for e in events):
                break
            session.join(0.05)
    finally:
        session.stop()
        session.join(10)
    kinds = [type(e) for e in events]
    assert SessionReady in kinds
    assert any(isinstance(e, Notice) and "expert records not used" in e.text for e in events)
