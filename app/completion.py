"""What the prompt can complete at its cursor: slash commands, and paths after `@` or `/add `. No UI here."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .commands import COMMANDS

MAX_PATHS = 50  # entries listed from one directory (a huge one is not read to its end)
MAX_SCANNED = 2000
_MENTION_AT_CURSOR = re.compile(r"(?:^|(?<=\s))@([\w./~+-]*)$")  # the characters coding.MENTION accepts
_QUOTED_AT_CURSOR = re.compile(r'(?:^|(?<=\s))@"([^"\n]*)$')  # @"a path with spaces, not closed yet
_PATH_COMMAND = re.compile(r"^/(?:add|drop)\s+(\S*)$")
_BARE_PATH = re.compile(r"[\w./~+-]+")


@dataclass(frozen=True)
class Candidate:
    insert: str
    """Replaces the text from the completion's start column to the cursor."""
    label: str
    """As listed."""


@dataclass(frozen=True)
class Completion:
    start: int
    """Column on the cursor's line where the completed word starts."""
    kind: str
    """"command" or "path"."""
    word: str
    """What is typed of it so far."""
    mention: bool = False
    """A path after `@` in a message (its candidates take mention_form)."""
    quoted: bool = False
    """After `@"`: the completion starts at the quote, and its candidates keep one."""

    @property
    def typed(self) -> str:
        """What the completion replaces: the word, and its opening quote."""
        return f'"{self.word}' if self.quoted else self.word


def completion_at(line_before_cursor: str, first_line: bool) -> Completion | None:
    """What the text before the cursor asks to complete, if anything."""
    if first_line and line_before_cursor.startswith("/") and " " not in line_before_cursor:
        return Completion(0, "command", line_before_cursor)
    if first_line and (match := _PATH_COMMAND.match(line_before_cursor)):
        return Completion(match.start(1), "path", match.group(1))
    if match := _MENTION_AT_CURSOR.search(line_before_cursor):
        return Completion(match.start(1), "path", match.group(1), mention=True)
    if match := _QUOTED_AT_CURSOR.search(line_before_cursor):
        return Completion(match.start(1) - 1, "path", match.group(1), mention=True, quoted=True)
    return None


def mention_form(candidate: Candidate, quoted: bool = False) -> Candidate:
    """A path completed after `@` in the form a mention can hold: in quotes where it has other characters than
    a bare @path takes (a space), or where the user opened one, so that the completed file is attached, not
    sent as text. A folder's quote stays open, for the completion to go on inside it."""
    if not quoted and _BARE_PATH.fullmatch(candidate.insert):
        return candidate
    close = "" if candidate.insert.endswith("/") else '"'
    return Candidate(f'"{candidate.insert}{close}', candidate.label)


def command_candidates(word: str) -> list[Candidate]:
    name = word.lstrip("/")
    return [Candidate(f"/{c.name} " if c.usage else f"/{c.name}", f"{c.usage_line}  {c.help}")
            for c in COMMANDS if c.name.startswith(name)]


def path_candidates(word: str, cwd: Path) -> list[Candidate]:
    """Entries of the directory `word` names (relative to `cwd`, `~` expanded) that start with its last part.
    Reads the file system: call it off the UI thread."""
    folder_text, _, prefix = word.rpartition("/")
    folder_text = folder_text + "/" if folder_text or word.startswith("/") else ""
    folder = Path(os.path.expanduser(folder_text)) if folder_text else Path(".")
    if not folder.is_absolute():
        folder = cwd / folder
    found = []
    try:
        with os.scandir(folder) as entries:
            for count, entry in enumerate(entries):
                if count >= MAX_SCANNED:
                    break
                if not entry.name.startswith(prefix) or (entry.name.startswith(".") and not prefix.startswith(".")):
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                found.append((not is_dir, entry.name + ("/" if is_dir else "")))
    except OSError:
        return []
    found.sort()
    return [Candidate(folder_text + name, folder_text + name) for _, name in found[:MAX_PATHS]]
