"""Chat storage: versioned schema, search, rename, delete, export, and partial replies kept."""

from __future__ import annotations

import json
import sqlite3

import pytest
from moe_tui.app.store import MIGRATIONS, ChatStore


def test_schema_is_versioned_and_wal(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    db = sqlite3.connect(tmp_path / "chats.sqlite3")
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="newer moe-tui"):
        ChatStore(tmp_path / "chats.sqlite3")


def test_chats_search_rename_delete_export(tmp_path):
    store = ChatStore(tmp_path / "c.db")
    a = store.create_chat(title="sorting", system_prompt="be brief")
    b = store.create_chat(title="files")
    store.add_message(a.id, "user", "quicksort please")
    store.add_message(a.id, "assistant", "```python\ndef qs(): ...\n```")
    partial = store.add_message(a.id, "assistant", "half a rep", status="partial")
    store.add_message(b.id, "user", "read a csv")
    assert [c.title for c in store.chats("quick")] == ["sorting"]
    assert [c.title for c in store.chats("csv")] == ["files"]
    store.update_chat(b.id, title="csv files")
    assert store.chat(b.id).title == "csv files"
    md = store.export_markdown(a.id)
    assert md.startswith("# sorting") and "be brief" in md and "def qs()" in md and "(partial)" in md
    data = json.loads(store.export_json(a.id))
    assert data["system_prompt"] == "be brief" and [m["status"] for m in data["messages"]][-1] == "partial"
    store.update_message(partial, "half a reply", "cancelled")
    assert store.messages(a.id)[-1].status == "cancelled"
    store.delete_chat(a.id)
    assert [c.id for c in store.chats()] == [b.id]
    assert store.messages(a.id) == []  # messages went with the chat


def test_a_reply_in_progress_survives_a_kill(tmp_path):
    """Every update is committed at once: a second connection (a restarted app) sees it."""
    store = ChatStore(tmp_path / "c.db")
    chat = store.create_chat()
    store.add_message(chat.id, "user", "hello")
    reply = store.add_message(chat.id, "assistant", "", status="partial")
    store.update_message(reply, "Hel", "partial")
    reopened = ChatStore(tmp_path / "c.db")  # no close() on the first: as after a kill
    assert [(m.role, m.content, m.status) for m in reopened.messages(chat.id)] == [
        ("user", "hello", "complete"), ("assistant", "Hel", "partial")]
