"""Themes from themes/*.toml: a Textual Theme (its [variables] table included) plus the heatmap gradient each."""

from __future__ import annotations

import tomllib
from pathlib import Path

from textual.theme import Theme

THEMES_DIR = Path(__file__).resolve().parent.parent / "themes"
THEME_KEYS = ("primary", "secondary", "accent", "background", "surface", "panel", "foreground", "warning",
              "error", "success", "dark")


def load_themes(folder: Path = THEMES_DIR) -> dict[str, tuple[Theme, tuple[str, ...]]]:
    """name -> (Textual theme, heatmap gradient). A broken file is skipped with its error named."""
    themes = {}
    for path in sorted(folder.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
            variables = data.get("variables", {})
            if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
                raise ValueError("[variables] maps CSS variable names to colours (strings)")
            theme = Theme(name=data["name"], variables=dict(variables),
                          **{k: data[k] for k in THEME_KEYS if k in data})
            gradient = tuple(data.get("heatmap") or ())
            if len(gradient) < 2:
                raise ValueError("heatmap needs at least two colours")
        except (tomllib.TOMLDecodeError, KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: bad theme ({exc})") from exc
        themes[theme.name] = (theme, gradient)
    return themes


# CSS variables the app's own styles use, for a theme that does not set them.
VARIABLE_DEFAULTS = {"divider": "#5a5a5a"}
