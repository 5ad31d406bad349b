"""One typed settings object, read from config.toml in the user config dir; CLI flags override it."""

from __future__ import annotations

import datetime
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs

APP_NAME = "moe-tui"


@dataclass
class Settings:
    theme: str = "moe-dark"
    """UI theme name (see themes/); changed live with /theme and remembered."""
    default_model: str = ""
    """Model opened by `moe` with no argument; empty means the built-in demo model."""
    refresh_hz: float = 2.0
    """How often the cache panels refresh while idle or generating (1-4 is typical)."""
    data_dir: str = ""
    """Where chats are stored (SQLite); empty means the platform's user data dir."""
    max_tokens: int = 512
    """Longest reply, in tokens."""
    temperature: float = 0.7
    """Sampling temperature for new chats."""
    glyphs: str = "auto"
    """'unicode', 'ascii' (plain glyphs, no colour in the heatmap) or 'auto' (ascii on dumb terminals)."""
    inference_process: bool = True
    """Run the inference thread in its own process (faster decoding on few cores); false keeps it in the UI's."""
    coding_prompt: bool = True
    """Chats without a system prompt of their own get the built-in coding one (it asks for edits in the
    formats /apply reads); false: no system prompt."""
    keymap: dict[str, str] = field(default_factory=dict)
    """Binding id -> keys, e.g. {"app.cancel" = "ctrl+c"}; applied with App.set_keymap."""

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else Path(platformdirs.user_data_dir(APP_NAME))

    def unicode(self) -> bool:
        if self.glyphs != "auto":
            return self.glyphs == "unicode"
        return os.environ.get("TERM", "") not in ("dumb", "linux", "vt100")


def config_path() -> Path:
    return Path(os.environ.get("MOE_CONFIG") or Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml")


def load_settings(path: Path | None = None) -> Settings:
    """Read the config file; a missing file gives the defaults, a bad one exits naming the file and key."""
    path = path or config_path()
    if not path.exists():
        return Settings()
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"moe: {path}: not valid TOML ({exc}); fix or delete it") from exc
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SystemExit(f"moe: {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return Settings(**{key: _checked(key, value) for key, value in data.items()})
    except ValueError as exc:
        raise SystemExit(f"moe: {path}: {exc}; fix or delete it") from exc


def remember(key: str, value: Any, path: Path | None = None) -> None:
    """Set one key in the config file as it is on disk, keeping the user's other keys and [keymap].

    Only what the user changed in the app is written: values set on the Settings object from CLI flags
    (such as --data-dir) never reach the file. The file is re-read and rewritten whole, so its comments
    and formatting are not preserved. A file that is not valid TOML is left alone (ValueError).
    """
    known = {f.name for f in fields(Settings)}
    if key not in known:
        raise ValueError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
    value = _checked(key, value)
    path = path or config_path()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc}); not overwriting it") from exc
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside it, then rename: a crash mid-write leaves the old file, never half of a new one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(_dumps(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_GLYPHS = ("auto", "unicode", "ascii")
MAX_TEMPERATURE = 2.0  # as the OpenAI API (and /temp, moe generate --temperature): beyond it sampling is noise


def _checked(key: str, value: Any) -> Any:
    """The value, converted to the field's type (int -> float), or ValueError naming key, expectation and value."""
    kind = {f.name: f.type for f in fields(Settings)}[key]  # annotations are strings (from __future__)

    def bad(expected: str) -> ValueError:
        return ValueError(f"{key} must be {expected}, got {value!r} ({type(value).__name__})")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false (bool)")
    elif kind == "str":
        if not isinstance(value, str):
            raise bad("a string (str)")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass; true is no length
            raise bad("an integer (int)")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number (float)")
        value = float(value)
    elif kind == "dict[str, str]":
        if not isinstance(value, dict):
            raise bad("a table of strings ([keymap] with \"binding.id\" = \"keys\")")
        for k, v in value.items():
            if not isinstance(v, str):
                raise ValueError(f"{key}.{k} must be a string (str), got {v!r} ({type(v).__name__})")
        value = dict(value)
    else:  # a new field with a type this function does not know yet
        raise TypeError(f"settings: no check for {key}: {kind}")

    if key == "glyphs" and value not in _GLYPHS:
        raise bad("one of " + ", ".join(_GLYPHS))
    if key == "refresh_hz" and not 0.1 <= value <= 30:  # NaN fails this too
        raise bad("between 0.1 and 30 (times a second)")
    if key == "max_tokens" and value < 1:
        raise bad(">= 1")
    if key == "temperature" and not 0 <= value <= MAX_TEMPERATURE:  # NaN fails this too
        raise bad(f"from 0 to {MAX_TEMPERATURE:g}")
    return value


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _dumps(data: dict[str, Any]) -> str:
    """TOML text for a dict as tomllib returns it: plain keys first, then one [section] per table."""
    lines = [f"{_key(k)} = {_toml(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{_key(name)}]")
            lines.extend(f"{_key(k)} = {_toml(v)}" for k, v in table.items())
    return "\n".join(lines).lstrip("\n") + "\n"


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml(key)


def _toml(value: Any) -> str:
    """One TOML value (no writer in the stdlib; this covers every type tomllib reads)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # repr is already TOML: 2.0, 1e-05, 1e+16, inf, -inf, nan.
        return repr(value)
    if isinstance(value, str):
        escaped = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
        return '"' + "".join(escaped.get(c, f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                             for c in value) + '"'
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")
