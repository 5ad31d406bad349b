"""moe-tui terminal app (Textual)."""
