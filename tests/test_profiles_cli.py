"""`moe profile` writes a profile that `Engine.load(profile=...)` warms and pins from; CLI basics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from moe_tui.app.cli import main
from moe_tui.inference import Engine, ModelLoadError


def test_profile_round_trip(checkpoint, tmp_path, capsys):
    path = checkpoint("qwen3_moe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return a + b\n\nimport os\n\nThe quick brown fox")
    out = tmp_path / "profiles" / "tiny.json"
    assert main(["profile", str(path), "--prompts", str(prompts), "--out", str(out), "--max-tokens", "8"]) == 0
    profile = json.loads(out.read_text())
    assert profile["num_experts"] == 8 and profile["moe_layers"] == [0, 1] and profile["prompts"] == 3
    counts = profile["counts"]
    assert len(counts) == 2 and all(len(row) == 8 for row in counts) and sum(map(sum, counts)) > 0
    for layer, universal in enumerate(profile["universal"]):
        assert all(counts[layer][e] > 0 for e in universal)

    engine = Engine.load(path, capacity=4, profile=out)
    snap = engine.snapshot()
    for layer in range(2):
        top = sorted(range(8), key=lambda e: (-counts[layer][e], e))[:4]
        assert sorted(snap.layer(layer).resident) == sorted(top)  # warmed with the most used experts
        most_used_universal = sorted(profile["universal"][layer], key=lambda e: (-counts[layer][e], e))
        assert set(snap.layer(layer).pinned) == set(most_used_universal[:2])  # at most capacity - top_k pins
    # Pinned experts survive a run at this capacity.
    for _ in engine.stream(list(range(3, 90, 3)), max_tokens=16):
        pass
    after = engine.snapshot()
    assert (after.resident | ~after.pinned).all()

    warm_only = Engine.load(path, capacity=4, profile=out, pin=False).snapshot()
    assert (warm_only.resident == snap.resident).all() and not warm_only.pinned.any()


def test_profile_and_pin_choice_from_the_command_line(tmp_path):
    from moe_tui.app.cli import DEMO_PROFILE, _profile, build_parser

    parse = build_parser().parse_args
    # The demo warms from its own profile without pins (pins measured worse there); --pin asks for them.
    assert _profile(parse(["chat"]), demo=True) == (DEMO_PROFILE, False)
    assert _profile(parse(["chat", "--pin"]), demo=True) == (DEMO_PROFILE, True)
    # An explicit profile pins unless told not to.
    mine = tmp_path / "p.json"
    assert _profile(parse(["chat", "--profile", str(mine)]), demo=False) == (mine, True)
    assert _profile(parse(["chat", "--profile", str(mine), "--no-pin"]), demo=False) == (mine, False)
    assert _profile(parse(["chat", "some/model"]), demo=False) == (None, False)


def test_profile_for_another_model_is_refused(checkpoint, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_experts": 64, "moe_layers": [0], "counts": [[0] * 64], "universal": [[]]}))
    with pytest.raises(ModelLoadError, match="make one for this model"):
        Engine.load(checkpoint("qwen3_moe"), capacity=4, profile=bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        Engine.load(checkpoint("qwen3_moe"), capacity=4, profile=broken)


def test_cli_errors_are_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "moe_tui.app.cli", "info", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("moe: ") and "Traceback" not in result.stderr


def test_cli_generate_and_info(checkpoint, capsys):
    path = str(checkpoint("olmoe"))
    assert main(["info", path, "--capacity", "50%"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["capacity"] == 4 and info["num_experts"] == 8
    # Every flag `moe info` takes shows in what it prints (policy, reads ahead, KV bits, context and pins were
    # accepted and then not shown).
    assert (info["policy"], info["reads_ahead"], info["kv_bits"]) == ("markov", "auto", None)
    assert info["pinned_experts"] == 0 and info["context_length"] > 0
    assert main(["info", path, "--capacity", "50%", "--policy", "lru", "--no-prefetch", "--context", "32"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["policy"], info["reads_ahead"], info["context_length"]) == ("lru", "off", 32)
    assert main(["generate", path, "--prompt", "def f():", "--max-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert "tokens" in err and "hit rate" in err
    # The reply ends its line on stdout (redirected to a file it had no final newline), and the stats line
    # says how it ended.
    assert out.endswith("\n") and ("stopped at --max-tokens" in err or "end of the model's reply" in err)


def test_cli_generate_keeps_to_the_context(checkpoint, capsys):
    path = str(checkpoint("olmoe"))
    assert main(["generate", path, "--raw", "--prompt", "x " * 40, "--context", "16"]) == 2
    assert "over the context of 16 tokens" in capsys.readouterr().err
    # A prompt that fits: the reply stops where the context ends, not at --max-tokens.
    assert main(["generate", path, "--raw", "--prompt", "def f():", "--context", "12", "--max-tokens", "50",
                 "--temperature", "1"]) == 0
    generated = int(capsys.readouterr().err.split("[")[1].split()[0])
    from moe_tui.inference import Engine

    engine = Engine.load(path, capacity=8)
    assert 1 <= generated <= 12 - len(engine.encode("def f():"))
    engine.close()


def test_repo_id_resolves_from_the_local_hub_cache(checkpoint, tmp_path, monkeypatch):
    import shutil

    from moe_tui.app.cli import ensure_local

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-moe" / "snapshots" / ("a" * 40)
    shutil.copytree(checkpoint("olmoe"), snapshot)
    (cache / "models--someone--tiny-moe" / "refs").mkdir()
    (cache / "models--someone--tiny-moe" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert Path(ensure_local("someone/tiny-moe")) == snapshot
    assert Engine.load(ensure_local("someone/tiny-moe"), capacity=2).layout.num_experts == 8


def test_uncached_repo_offline_is_a_clear_message(tmp_path):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "moe_tui.app.cli", "info", "nobody/no-such-model"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "not in the local Hugging Face cache" in result.stderr and "Traceback" not in result.stderr


def test_options_without_a_command_open_the_chat():
    from moe_tui.app.cli import build_parser, with_command

    parser = build_parser()
    args = parser.parse_args(with_command(["--capacity", "8", "--data-dir", "/tmp/x"], parser.commands))
    assert args.command == "chat" and args.capacity == 8 and str(args.data_dir) == "/tmp/x"
    assert parser.parse_args(with_command(["./my-model"], parser.commands)).model == "./my-model"
    assert parser.parse_args(with_command([], parser.commands)).command == "chat"
    assert parser.parse_args(with_command(["info", "m"], parser.commands)).command == "info"
    assert with_command(["--help"], parser.commands) == ["--help"]


@pytest.mark.parametrize("argv,expected", [
    (["--version"], "moe 0."),
    (["/nonexistent"], "no such folder"),  # one slash: not to be taken for a hub repo id
    (["attach", "http://127.0.0.1:1"], "no server answers there"),
    (["chat", "--base-url", "localhost:8000"], "starts with http"),
])
def test_the_cli_checks_before_the_app_opens(argv, expected):
    result = subprocess.run([sys.executable, "-m", "moe_tui.app.cli", *argv], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert expected in output and "Traceback" not in output
    assert result.returncode == (0 if argv == ["--version"] else 2)
    assert "\x1b[?1049h" not in output  # the app (alternate screen) never opened


def test_an_empty_folder_is_not_a_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "moe_tui.app.cli", str(tmp_path)], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "no config.json" in result.stderr and "\x1b[?1049h" not in result.stdout


def test_every_command_has_help():
    from moe_tui.app.cli import build_parser

    parser = build_parser()
    assert parser.format_help()
    for name, sub in parser.subcommands.items():
        text = sub.format_help()  # argparse %-formats each option's help: a bare "%" raises here
        assert f"moe {name}" in text, name


@pytest.mark.parametrize("argv,expected", [
    (["generate", "--prompt", "hi", "--profile", "{dir}"], "is a folder"),
    (["plan", "--profile", "{dir}"], "is a folder"),
    (["profile", "--prompts", "{dir}", "--out", "{dir}/p.json"], "is a folder"),
    (["profile", "--prompts", "{file}", "--out", "{dir}"], "is a folder"),
    (["profile", "--prompts", "{file}", "--trace", "{dir}"], "is a folder"),
    (["profile", "--prompts", "{file}", "--out", "{dir}/p.json", "--max-tokens", "-3"], "must be at least 1"),
    (["generate", "--prompt", "hi", "--max-tokens", "-5"], "must be at least 1"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "must be a number from 0 to 2"),
    (["generate", "--prompt", "hi", "--temperature", "inf"], "must be a number from 0 to 2"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "must be a number from 0 to 2"),
    (["generate", "--prompt", "hi", "--capacity", "1.5"], "over 100%"),
    (["chat", "--capacity", "200%"], "over 100%"),
    (["web", "--capacity", "200%"], "over 100%"),
    (["serve", "--max-tokens-cap", "0"], "must be at least 1"),
    (["serve", "--max-queue", "-1"], "must be at least 0"),
    (["plan", "--bandwidth", "-3"], "must be a number above 0"),
    (["plan", "--bandwidth", "0"], "must be a number above 0"),
    (["plan", "--bandwidth", "nan"], "must be a number above 0"),
    (["bench", "--decode-tokens", "0"], "must be at least 1"),
])
def test_bad_option_values_are_usage_errors(argv, expected, tmp_path, capsys):
    from moe_tui.app.cli import build_parser

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n")
    argv = [a.format(dir=tmp_path, file=prompts) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err


def test_plan_refuses_no_memory_and_a_closed_pipe_is_no_traceback(tmp_path):
    """`moe plan --memory 0` planned for 0 bytes; `moe plan | head -3` ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    from moe_tui.app.cli import main

    assert main(["plan", "--memory", "0"]) == 2
    proc = subprocess.Popen([sys.executable, "-m", "moe_tui.app.cli", "plan"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader leaves before the plan is written, as `| head` does after its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_capacity_text():
    from moe_tui.app.commands import parse_capacity

    assert parse_capacity("12") == 12 and parse_capacity("0.5") == 0.5 and parse_capacity("100%") == 1.0
    assert parse_capacity("1.0") == 1.0
    for bad in ("1.5", "200%", "0", "-3", "abc"):
        with pytest.raises(ValueError):
            parse_capacity(bad)


def test_unreadable_prompts_and_profiles_are_messages(tmp_path):
    from moe_tui.app.cli import _read_prompts
    from moe_tui.inference.profiles import load_profile

    empty = tmp_path / "empty.json"
    with pytest.raises(ValueError, match="empty.json: not valid JSON"):
        empty.write_text("[1,")
        _read_prompts(empty)
    for text in ("[]", '["", "  "]'):
        empty.write_text(text)
        with pytest.raises(ValueError, match="no prompts"):
            _read_prompts(empty)
    with pytest.raises(ModelLoadError, match="cannot read the profile"):
        load_profile(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        _read_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("argv,expected", [
    (["profile", "--prompts", "{prompts}"], "moe: profile: nothing to write"),
    (["profile", "--prompts", "{missing}", "--out", "{out}"], "missing.txt: no such file"),
])
def test_profile_errors_are_said_like_every_commands(argv, expected, tmp_path, capsys):
    from moe_tui.app.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n")
    argv = [a.format(missing=tmp_path / "missing.txt", out=tmp_path / "p.json", prompts=prompts) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe: ") and expected in err
