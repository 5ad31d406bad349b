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


def test_a_failing_migration_leaves_the_database_at_the_old_version(tmp_path, monkeypatch):
    """A migration step is one transaction: if it fails half-way, nothing of it stays and a later start works."""
    from moe_tui.app import store as store_module

    path = tmp_path / "chats.sqlite3"
    real = list(MIGRATIONS[:1])  # a database at version 1, whose next step fails
    monkeypatch.setattr(store_module, "MIGRATIONS", real)
    store = ChatStore(path)
    chat = store.create_chat(title="kept")
    store.add_message(chat.id, "user", "hello")
    store.close()

    def bad_v2(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE tags (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        raise sqlite3.OperationalError("boom half-way through v2")

    monkeypatch.setattr(store_module, "MIGRATIONS", [real[0], bad_v2])
    with pytest.raises(RuntimeError, match=r"chats\.sqlite3.*version 2") as failed:
        ChatStore(path)
    assert "boom half-way" in str(failed.value.__cause__)

    monkeypatch.setattr(store_module, "MIGRATIONS", real)
    reopened = ChatStore(path)
    assert reopened.db.execute("PRAGMA user_version").fetchone()[0] == 1
    tables = {r[0] for r in reopened.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "tags" not in tables
    assert [c.title for c in reopened.chats()] == ["kept"]
    assert [(m.role, m.content) for m in reopened.messages(chat.id)] == [("user", "hello")]
    reopened.close()

    def good_v2(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE tags (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")

    monkeypatch.setattr(store_module, "MIGRATIONS", [real[0], good_v2])
    upgraded = ChatStore(path)
    assert upgraded.db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert upgraded.db.execute("SELECT count(*) FROM tags").fetchone()[0] == 0
    assert [c.title for c in upgraded.chats()] == ["kept"]
    upgraded.close()


def test_a_version_1_database_gains_the_undo_tables_and_keeps_its_chats(tmp_path, monkeypatch):
    from moe_tui.app import store as store_module

    path = tmp_path / "chats.sqlite3"
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:1])
    old = ChatStore(path)
    chat = old.create_chat(title="from v1")
    old.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    upgraded = ChatStore(path)
    assert upgraded.db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert [c.title for c in upgraded.chats()] == ["from v1"] and upgraded.last_apply() is None
    upgraded.record_apply(chat.id, [])
    assert upgraded.last_apply().chat_id == chat.id
    upgraded.close()


def test_v1_failing_half_way_creates_no_tables(tmp_path):
    """The real v1 is atomic too: a clash on its second table must not leave its first one behind."""
    path = tmp_path / "chats.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE messages (x)")  # v1's second CREATE TABLE fails on this
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match=r"chats\.sqlite3.*version 1"):
        ChatStore(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")} == {"messages"}
    db.close()


def test_a_markdown_export_holds_no_escape_sequence_and_names_the_prompt_used(tmp_path):
    """`cat export.md` acted on what a reply or a file had carried (a title change, a clipboard write), and the
    exports left out the built-in coding prompt the chat was sent with."""
    store = ChatStore(tmp_path / "c.db")
    chat = store.create_chat(title="t\x1b]0;pwned\x07")
    store.add_message(chat.id, "user", "look \x1b]52;c;cHduZWQ=\x07 here")
    md = store.export_markdown(chat.id, system="You are a coding assistant.")
    assert "\x1b" not in md and "\x07" not in md and "␛]52;c;cHduZWQ=␇" in md
    assert "You are a coding assistant." in md
    data = json.loads(store.export_json(chat.id, system="You are a coding assistant."))
    assert data["system_prompt"] == "You are a coding assistant."
    assert data["messages"][0]["content"] == "look \x1b]52;c;cHduZWQ=\x07 here"  # data: as it was
