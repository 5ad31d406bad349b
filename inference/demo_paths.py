"""Where the built-in demo model and its expert profile live (inside the repository checkout)."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo"
DEMO_PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "demo.json"
