"""Settings: config.toml values are type- and range-checked; remember() writes back one key and nothing else."""

from __future__ import annotations

import tomllib
from dataclasses import asdict

import pytest
from moe_tui.app.settings import Settings, load_settings, remember


@pytest.mark.parametrize(("line", "key", "expected", "bad"), [
    ('refresh_hz = "fast"', "refresh_hz", "number", "'fast'"),
    ("refresh_hz = 0", "refresh_hz", "0.1", "0"),
    ("refresh_hz = 1000", "refresh_hz", "30", "1000"),
    ('max_tokens = "many"', "max_tokens", "integer", "'many'"),
    ("max_tokens = 1.5", "max_tokens", "integer", "1.5"),
    ("max_tokens = true", "max_tokens", "integer", "True"),
    ("max_tokens = 0", "max_tokens", ">= 1", "0"),
    ("temperature = -0.5", "temperature", "from 0 to 2", "-0.5"),
    ("temperature = 5.0", "temperature", "from 0 to 2", "5.0"),
    ("temperature = nan", "temperature", "from 0 to 2", "nan"),
    ("temperature = inf", "temperature", "from 0 to 2", "inf"),
    ('inference_process = "yes"', "inference_process", "true or false", "'yes'"),
    ("theme = 3", "theme", "string", "3"),
    ('glyphs = "fancy"', "glyphs", "auto", "'fancy'"),
    ('keymap = "ctrl+c"', "keymap", "table", "'ctrl+c'"),
    ('[keymap]\n"app.cancel" = 3', "keymap", "string", "3"),
])
def test_a_bad_value_names_the_file_key_expected_type_and_value(tmp_path, line, key, expected, bad):
    path = tmp_path / "config.toml"
    path.write_text(line + "\n")
    with pytest.raises(SystemExit) as exc:
        load_settings(path)
    message = str(exc.value)
    assert str(path) in message and key in message and expected in message and bad in message, message


def test_ints_are_accepted_for_float_fields(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('refresh_hz = 4\ntemperature = 1\nglyphs = "ascii"\n[keymap]\n"app.cancel" = "ctrl+c"\n')
    settings = load_settings(path)
    assert settings.refresh_hz == 4.0 and isinstance(settings.refresh_hz, float)
    assert settings.temperature == 1.0 and isinstance(settings.temperature, float)
    assert settings.glyphs == "ascii" and settings.keymap == {"app.cancel": "ctrl+c"}


def test_no_file_gives_the_defaults(tmp_path):
    assert load_settings(tmp_path / "absent.toml") == Settings()


def test_a_cli_override_is_not_written_by_remember(tmp_path, monkeypatch):
    """As `moe --data-dir X` then /theme: cli.py sets data_dir on the loaded Settings; only the theme is saved."""
    path = tmp_path / "config.toml"
    monkeypatch.setenv("MOE_CONFIG", str(path))
    path.write_text('theme = "moe-dark"\nmax_tokens = 100\n')
    settings = load_settings()
    settings.data_dir = str(tmp_path / "elsewhere")
    settings.theme = "moe-colorblind"
    remember("theme", "moe-colorblind")
    assert tomllib.loads(path.read_text()) == {"theme": "moe-colorblind", "max_tokens": 100}
    assert load_settings().data_dir == ""


def test_remember_keeps_the_other_keys_and_the_keymap(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('# mine\ndefault_model = "org/model"\nrefresh_hz = 4\n'
                    '[keymap]\n"app.cancel" = "ctrl+c"\n"app.new_chat" = "ctrl+n"\n')
    remember("theme", "moe-colorblind", path)
    assert tomllib.loads(path.read_text()) == {
        "default_model": "org/model", "refresh_hz": 4, "theme": "moe-colorblind",
        "keymap": {"app.cancel": "ctrl+c", "app.new_chat": "ctrl+n"}}


def test_remember_creates_the_file_with_only_that_key(tmp_path):
    path = tmp_path / "sub" / "config.toml"
    remember("theme", "moe-colorblind", path)
    assert tomllib.loads(path.read_text()) == {"theme": "moe-colorblind"}


def test_round_trip_load_remember_load(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('theme = "moe-dark"\ndefault_model = "a \\"quoted\\" \\\\ path\\n\\u00e9"\nrefresh_hz = 0.5\n'
                    'data_dir = "~/chats"\nmax_tokens = 64\ntemperature = 1e-05\nglyphs = "ascii"\n'
                    'inference_process = false\n[keymap]\n"app.cancel" = "ctrl+c"\n"we ird\\"key" = "f5"\n')
    before = load_settings(path)
    remember("theme", before.theme, path)
    assert load_settings(path) == before
    remember("max_tokens", 99, path)
    assert asdict(load_settings(path)) == {**asdict(before), "max_tokens": 99}


def test_remember_refuses_bad_keys_and_values_and_a_broken_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('theme = "moe-dark"\n')
    with pytest.raises(ValueError, match="unknown setting"):
        remember("colour", "red", path)
    with pytest.raises(ValueError, match="refresh_hz"):
        remember("refresh_hz", "fast", path)
    path.write_text("theme = [unclosed\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        remember("theme", "moe-colorblind", path)
    assert path.read_text() == "theme = [unclosed\n"  # the user's file is not overwritten
