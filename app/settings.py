"""One typed settings object, read from config.toml in the user config dir; CLI flags override it."""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

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
    return Settings(**data)


def save_settings(settings: Settings, path: Path | None = None) -> None:
    """Write the settings back (used to remember the theme)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    keymap = {}
    for key, value in asdict(settings).items():
        if key == "keymap":
            keymap = value
            continue
        lines.append(f"{key} = {_toml(value)}")
    if keymap:
        lines.append("\n[keymap]")
        lines.extend(f"{_toml(k)} = {_toml(v)}" for k, v in keymap.items())
    path.write_text("\n".join(lines) + "\n")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
