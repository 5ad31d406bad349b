"""Textual widgets of the moe-tui app: thin views over engine snapshots."""
