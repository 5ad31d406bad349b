"""Coding helpers with no UI: file attachments, code blocks in replies, diffs before writing files."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

MAX_ATTACHMENT_BYTES = 256 * 1024
FENCE = re.compile(r"^(`{3,}|~{3,})([^\n`]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
MENTION = re.compile(r"(?<![\w@])@([\w./~+-]+)")
LANGUAGES = {".py": "python", ".js": "javascript", ".ts": "typescript", ".rs": "rust", ".go": "go", ".c": "c",
             ".h": "c", ".cpp": "cpp", ".java": "java", ".sh": "bash", ".md": "markdown", ".toml": "toml",
             ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".html": "html", ".css": "css", ".sql": "sql"}


@dataclass(frozen=True)
class Attachment:
    path: Path
    text: str
    tokens: int

    def as_prompt(self) -> str:
        fence = "```" if "```" not in self.text else "````"
        return f"File `{self.path}`:\n{fence}{LANGUAGES.get(self.path.suffix, '')}\n{self.text}\n{fence}"


class AttachmentError(Exception):
    """A file cannot be attached; the message says why."""


def resolve(path_text: str, cwd: Path) -> tuple[Path, bool]:
    """(absolute path, whether it lies outside `cwd`)."""
    path = Path(path_text).expanduser()
    path = (cwd / path if not path.is_absolute() else path).resolve()
    return path, not path.is_relative_to(cwd.resolve())


def read_text_file(path: Path) -> str:
    if not path.exists():
        raise AttachmentError(f"{path}: no such file")
    if not path.is_file():
        raise AttachmentError(f"{path}: not a file")
    size = path.stat().st_size
    if size > MAX_ATTACHMENT_BYTES:
        raise AttachmentError(f"{path}: {size // 1024} KiB is over the {MAX_ATTACHMENT_BYTES // 1024} KiB limit")
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise AttachmentError(f"{path}: looks binary; only text files can be attached")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AttachmentError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def mentions(message: str) -> list[str]:
    """`@path` mentions in a message (emails and decorators like @property are skipped by the caller)."""
    return MENTION.findall(message)


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, code) for each fenced block, in order."""
    return [(m.group(2).strip(), m.group(3).rstrip("\n")) for m in FENCE.finditer(markdown)]


def diff(old: str, new: str, path: Path) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"{path} (current)", tofile=f"{path} (new)"))
