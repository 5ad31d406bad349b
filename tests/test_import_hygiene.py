"""Each layer imports only what it needs: the engine never imports the UI, and the data types, the heatmap
renderer and the remote front ends (moe attach, moe chat --base-url) import without MLX."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def loaded_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_the_engine_never_imports_the_ui():
    loaded = top_level(loaded_after("import moe_tui.inference.engine, moe_tui.inference.session, "
                                    "moe_tui.inference.server.app"))
    assert not loaded & {"textual", "rich"}
    assert not any(m.startswith("moe_tui.app") for m in loaded_after("import moe_tui.inference.server.app"))


@pytest.mark.parametrize("statement", [
    "import moe_tui.inference, moe_tui.inference.telemetry, moe_tui.inference.events",
    "import moe_tui.app.heatmap",
    "import moe_tui.app.remote, moe_tui.app.main",
    "from moe_tui.app.cli import build_parser, cmd_attach",
])
def test_front_ends_and_data_types_import_without_mlx(statement):
    loaded = loaded_after(statement)
    assert not {m for m in loaded if m == "mlx" or m.startswith(("mlx.", "mlx_lm"))}, statement


def test_cli_and_app_import_no_circle():
    loaded = loaded_after("import moe_tui.app.main")
    assert "moe_tui.app.cli" not in loaded
