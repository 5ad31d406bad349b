"""Where the built-in demo model and its expert profile live (inside the repository checkout)."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo"
DEMO_PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "demo.json"
DEMO_CAPACITY = 0.5  # default cache size for the demo in the app: half of each layer's experts
