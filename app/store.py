"""Chat sessions in SQLite: WAL, schema versioned with PRAGMA user_version, one migration per version.

Every message is committed as soon as it is complete; a reply in progress is stored as 'partial' and
updated as it grows, so killing the app mid-reply keeps everything said so far.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .sanitize import revealed

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; two apps on one data dir are not caught
    fcntl = None


def _v1(db: sqlite3.Connection) -> None:
    # One execute per statement, never executescript: that COMMITs the open transaction first, so a
    # failure half-way would leave some tables behind at the old user_version.
    for statement in (
        """CREATE TABLE chats (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL,
            model TEXT NOT NULL DEFAULT '',
            system_prompt TEXT NOT NULL DEFAULT '',
            settings TEXT NOT NULL DEFAULT '{}',
            created REAL NOT NULL,
            updated REAL NOT NULL
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'complete',
            created REAL NOT NULL
        )""",
        "CREATE INDEX messages_by_chat ON messages(chat_id, id)",
    ):
        db.execute(statement)


def _v2(db: sqlite3.Connection) -> None:
    # What /apply changed, so that /undo can put it back after a restart: one row per apply, each file's
    # text before (NULL: the apply created it) and after.
    for statement in (
        """CREATE TABLE applied_edits (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            chat_id INTEGER,
            created REAL NOT NULL,
            undone REAL
        )""",
        """CREATE TABLE applied_files (
            apply_id INTEGER NOT NULL REFERENCES applied_edits(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            before TEXT,
            after TEXT NOT NULL
        )""",
    ):
        db.execute(statement)


# Index i upgrades version i -> i + 1. Each runs inside the transaction _migrate opens: it must use
# db.execute only (no executescript, COMMIT or BEGIN), so that a failure undoes all of it.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2]


@dataclass(frozen=True)
class Chat:
    id: int
    title: str
    model: str
    system_prompt: str
    settings: dict
    updated: float


@dataclass(frozen=True)
class StoredMessage:
    id: int
    role: str
    content: str
    status: str  # complete, partial (reply in progress or interrupted), cancelled


@dataclass(frozen=True)
class AppliedFile:
    path: str
    before: str | None  # None: the apply created the file
    after: str


@dataclass(frozen=True)
class AppliedEdits:
    id: int
    chat_id: int | None
    created: float
    files: tuple[AppliedFile, ...]


class StoreInUse(ValueError):
    """Another moe-tui has this data dir open. A ValueError: the `moe` command prints it as one line."""


class DataDirLock:
    """One app per chat database: two would write into the same chat, and /clear in one would delete what the
    other shows. An advisory flock on `<db>.lock` beside it, held until release() or the process ends (a
    killed app leaves no stale lock); the file holds the holder's pid, for the message."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.path = db_path.with_name(db_path.name + ".lock")
        self.file = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            file = open(self.path, "a+")  # held open for as long as the lock: not a with block
        except OSError:
            return  # a folder we cannot write to: the database will say so itself
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip()
            file.close()
            raise StoreInUse(
                f"{self.db_path.parent} is in use by another moe-tui{f' (pid {holder})' if holder.isdigit() else ''}; "
                "close that one, or start this one with --data-dir DIR for a separate set of chats") from None
        except OSError:  # ENOLCK, e.g. some network file systems: run unlocked, as before
            file.close()
            return
        file.truncate(0)
        file.write(str(os.getpid()))
        file.flush()
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the flock
            self.file = None


class ChatStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # No fsync per commit (the UI thread commits a reply in progress every second): with WAL, a
        # killed process still loses nothing committed; only a power cut can lose the last commits.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        """Apply the pending migrations, each in one transaction with its user_version bump.

        A step that fails is rolled back whole: the database stays exactly at the version before it, and
        the error names the file and the version it failed to reach.
        """
        while True:
            # IMMEDIATE takes the write lock before reading the version, so two apps starting at once
            # cannot both run the same step; the second sees the version the first committed.
            self.db.execute("BEGIN IMMEDIATE")
            try:
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version > len(MIGRATIONS):
                    raise RuntimeError(
                        f"{self.path}: written by a newer moe-tui (schema {version}); upgrade moe-tui")
                if version == len(MIGRATIONS):
                    self.db.execute("COMMIT")
                    return
                try:
                    MIGRATIONS[version](self.db)
                    if not self.db.in_transaction:
                        raise RuntimeError("the migration ended the transaction itself (executescript, COMMIT?)")
                    self.db.execute(f"PRAGMA user_version={version + 1}")
                except Exception as exc:
                    raise RuntimeError(
                        f"{self.path}: schema migration to version {version + 1} failed ({exc}); "
                        f"the database is left at version {version}") from exc
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    # ---- chats
    def create_chat(self, title: str = "New chat", model: str = "", system_prompt: str = "") -> Chat:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO chats(title, model, system_prompt, created, updated) VALUES (?, ?, ?, ?, ?)",
            (title, model, system_prompt, now, now))
        return self.chat(cur.lastrowid)

    def chat(self, chat_id: int) -> Chat:
        row = self.db.execute("SELECT id, title, model, system_prompt, settings, updated FROM chats WHERE id=?",
                              (chat_id,)).fetchone()
        if row is None:
            raise KeyError(f"no chat {chat_id}")
        return Chat(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5])

    def chats(self, query: str = "") -> list[Chat]:
        if query:
            rows = self.db.execute(
                "SELECT DISTINCT c.id FROM chats c LEFT JOIN messages m ON m.chat_id = c.id "
                "WHERE c.title LIKE ? OR m.content LIKE ? ORDER BY c.updated DESC",
                (f"%{query}%", f"%{query}%")).fetchall()
        else:
            rows = self.db.execute("SELECT id FROM chats ORDER BY updated DESC").fetchall()
        return [self.chat(r[0]) for r in rows]

    def search_messages(self, query: str, limit: int = 200) -> list[tuple[int, int, str]]:
        """(chat id, message id, content) of messages containing `query` (case-insensitive for ASCII),
        the most recently updated chats first, each chat's messages in order."""
        pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return self.db.execute(
            "SELECT m.chat_id, m.id, m.content FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE m.content LIKE ? ESCAPE '\\' ORDER BY c.updated DESC, m.id LIMIT ?", (pattern, limit)).fetchall()

    def update_chat(self, chat_id: int, **fields) -> None:
        allowed = {"title", "model", "system_prompt", "settings"}
        for key, value in fields.items():
            if key not in allowed:
                raise KeyError(key)
            self.db.execute(f"UPDATE chats SET {key}=?, updated=? WHERE id=?",
                            (json.dumps(value) if key == "settings" else value, time.time(), chat_id))

    def delete_chat(self, chat_id: int) -> None:
        self.db.execute("DELETE FROM chats WHERE id=?", (chat_id,))

    # ---- messages
    def add_message(self, chat_id: int, role: str, content: str, status: str = "complete") -> int:
        now = time.time()
        cur = self.db.execute("INSERT INTO messages(chat_id, role, content, status, created) VALUES (?, ?, ?, ?, ?)",
                              (chat_id, role, content, status, now))
        self.db.execute("UPDATE chats SET updated=? WHERE id=?", (now, chat_id))
        return cur.lastrowid

    def update_message(self, message_id: int, content: str, status: str) -> None:
        self.db.execute("UPDATE messages SET content=?, status=? WHERE id=?", (content, status, message_id))

    def delete_message(self, message_id: int) -> None:
        self.db.execute("DELETE FROM messages WHERE id=?", (message_id,))

    def messages(self, chat_id: int) -> list[StoredMessage]:
        rows = self.db.execute("SELECT id, role, content, status FROM messages WHERE chat_id=? ORDER BY id",
                               (chat_id,)).fetchall()
        return [StoredMessage(*r) for r in rows]

    # ---- applied edits (/apply, /undo)
    def record_apply(self, chat_id: int | None, files: list[AppliedFile]) -> int:
        """Keep what an apply changed, in one transaction: an undo record is all of it or nothing."""
        self.db.execute("BEGIN")
        try:
            cur = self.db.execute("INSERT INTO applied_edits(chat_id, created) VALUES (?, ?)", (chat_id, time.time()))
            for f in files:
                self.db.execute("INSERT INTO applied_files(apply_id, path, before, after) VALUES (?, ?, ?, ?)",
                                (cur.lastrowid, f.path, f.before, f.after))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return cur.lastrowid

    def last_apply(self) -> AppliedEdits | None:
        """The newest apply not undone yet, or None."""
        row = self.db.execute("SELECT id, chat_id, created FROM applied_edits WHERE undone IS NULL "
                              "ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
        files = self.db.execute("SELECT path, before, after FROM applied_files WHERE apply_id=? ORDER BY rowid",
                                (row[0],)).fetchall()
        return AppliedEdits(row[0], row[1], row[2], tuple(AppliedFile(*f) for f in files))

    def mark_undone(self, apply_id: int) -> None:
        self.db.execute("UPDATE applied_edits SET undone=? WHERE id=?", (time.time(), apply_id))

    # ---- export
    def export_markdown(self, chat_id: int, system: str | None = None) -> str:
        """The chat as Markdown to read, every control character as its visible picture (`cat` of the file
        must not act on what a reply or an attached file carried). `system`: the prompt the chat was sent
        with, where it is not the chat's own (the built-in coding prompt)."""
        chat = self.chat(chat_id)
        system = chat.system_prompt if system is None else system
        parts = [f"# {revealed(chat.title)}\n"]
        if system:
            parts.append(f"**system**: {revealed(system)}\n")
        for m in self.messages(chat_id):
            note = "" if m.status == "complete" else f" ({m.status})"
            parts.append(f"## {m.role}{note}\n\n{revealed(m.content)}\n")
        return "\n".join(parts)

    def export_json(self, chat_id: int, system: str | None = None) -> str:
        """The chat as data, as stored (JSON escapes control characters itself)."""
        chat = self.chat(chat_id)
        return json.dumps({
            "title": chat.title, "model": chat.model,
            "system_prompt": chat.system_prompt if system is None else system,
            "settings": chat.settings,
            "messages": [{"role": m.role, "content": m.content, "status": m.status} for m in self.messages(chat_id)],
        }, indent=2)

    def close(self) -> None:
        self.db.close()
