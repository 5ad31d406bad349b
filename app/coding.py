"""Coding helpers with no UI: file attachments, code blocks in replies, diffs before writing files."""

from __future__ import annotations

import difflib
import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

MAX_ATTACHMENT_BYTES = 256 * 1024
MAX_DIFF_BYTES = 1024 * 1024  # a file over this is overwritten after a plain question: no diff on the UI thread
FENCE = re.compile(r"^(`{3,}|~{3,})([^\n`]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
# @path, @"a path with spaces" or @a\ path\ with\ spaces (resolve() takes the quotes and backslashes off)
MENTION = re.compile(r'(?<![\w@])@(?:"([^"\n]+)"|((?:[\w./~+-]|\\ )+))')
LANGUAGES = {".py": "python", ".js": "javascript", ".ts": "typescript", ".rs": "rust", ".go": "go", ".c": "c",
             ".h": "c", ".cpp": "cpp", ".java": "java", ".sh": "bash", ".md": "markdown", ".toml": "toml",
             ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".html": "html", ".css": "css", ".sql": "sql"}


@dataclass(frozen=True)
class Attachment:
    path: Path
    text: str
    tokens: int
    label: str = ""
    """For a command's output (/run, /diff): how it is introduced, e.g. "Output of `make` (exit status 0)"."""
    frozen: bool = False
    """Sent as it is, not read again at send time (a file outside the project that Ctrl+E took back)."""

    @property
    def name(self) -> str:
        """As /files lists it and /drop takes it."""
        return self.label or str(self.path)

    def as_prompt(self) -> str:
        # Longer than any run of backticks in the text: the text cannot close it (split_message reads it back).
        fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", self.text)), default=0) + 1)
        if self.label:
            return f"{self.label}:\n{fence}\n{self.text}\n{fence}"
        return f"File `{self.path}`:\n{fence}{LANGUAGES.get(self.path.suffix, '')}\n{self.text}\n{fence}"


# One attachment at the start of a stored message, as Attachment.as_prompt wrote it, and the blank line after it.
_ATTACHED = re.compile(r"(?:File `(?P<path>[^`\n]+)`|(?P<label>Output of `[^\n]*)):\n(?P<fence>`{3,})[^\n`]*\n"
                       r"(?P<text>.*?)\n(?P=fence)\n\n", re.S)


def split_message(message: str, cwd: Path) -> tuple[list[Attachment], str]:
    """A stored user message as it was sent: the files and command outputs attached before it (as_prompt;
    an output's path is `cwd`, as /run's) and what the user typed."""
    attachments, at = [], 0
    while (match := _ATTACHED.match(message, at)) is not None:
        label = match["label"] or ""
        attachments.append(Attachment(cwd if label else Path(match["path"]), match["text"], 0, label))
        at = match.end()
    return attachments, message[at:]


def typed_part(message: str) -> str:
    """What the user typed of a stored message: the attached files put before it (as_prompt) left out."""
    return split_message(message, Path("."))[1]


class PathError(Exception):
    """A path the user typed cannot be used (to attach, save or export); the message says why, in one line."""


class AttachmentError(PathError):
    """A file cannot be attached; the message says why."""


def unquoted(path_text: str) -> str:
    """A path as typed for a shell: one pair of surrounding quotes taken off, or its escaped spaces unescaped."""
    text = path_text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text.replace("\\ ", " ")


def resolve(path_text: str, cwd: Path) -> tuple[Path, bool]:
    """(absolute path, whether it lies outside `cwd`) for a path that is missing or a regular file.

    Raises PathError for what would otherwise surface as a traceback or a hang later: an unknown `~user`, a
    name too long for the file system, a directory, and anything not a regular file (a FIFO would block the
    UI thread as soon as it is opened, so it is refused from its stat, never opened). A path typed as a shell
    would take it, in quotes or with its spaces escaped (`"my file.py"`, `my\\ file.py`), names the file."""
    path_text = unquoted(path_text)
    try:
        path = Path(path_text).expanduser()
    except RuntimeError:  # pathlib's only word for "~name: no such user" (or no home directory at all)
        user = path_text.split("/", 1)[0][1:]
        raise PathError(f"{shorten(path_text)}: no user {user!r}" if user else
                        f"{shorten(path_text)}: no home directory to expand ~ to") from None
    try:
        path = (cwd / path if not path.is_absolute() else path).resolve()
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None  # to be written, or a mention of nothing (a decorator, a handle)
    except RuntimeError as exc:  # a symlink loop, from resolve()
        raise PathError(f"{shorten(path_text)}: {exc}") from None
    except ValueError:  # a NUL byte: no path can hold one
        raise PathError(f"{shorten(path_text)}: a path cannot contain a NUL character") from None
    except OSError as exc:
        reason = "file name too long" if exc.errno == errno.ENAMETOOLONG else exc.strerror or str(exc)
        raise PathError(f"{shorten(path_text)}: {reason}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise PathError(f"{shorten(str(path))}: is a directory, not a file")
    if mode is not None and not stat.S_ISREG(mode):
        raise PathError(f"{shorten(str(path))}: not a regular file (a FIFO, socket or device); refused")
    return path, not path.is_relative_to(cwd.resolve())


def shorten(text: str, limit: int = 80) -> str:
    """A path cut in its middle to fit one line of a notice."""
    return text if len(text) <= limit else f"{text[: limit // 2 - 1]}…{text[-(limit // 2):]}"


def read_text_file(path: Path) -> str:
    """The file's text, or AttachmentError saying why not. Opened without blocking and checked on the open
    file: a FIFO put in its place after resolve() must not hang the UI thread."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        raise AttachmentError(f"{shorten(str(path))}: no such file") from None
    except PathError as exc:
        raise AttachmentError(str(exc)) from None
    except OSError as exc:
        raise AttachmentError(f"{shorten(str(path))}: {exc.strerror or exc}") from None
    with open(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if info.st_size > MAX_ATTACHMENT_BYTES:
            raise AttachmentError(f"{shorten(str(path))}: {info.st_size // 1024} KiB is over the "
                                  f"{MAX_ATTACHMENT_BYTES // 1024} KiB limit")
        try:
            data = file.read(MAX_ATTACHMENT_BYTES + 1)
        except OSError as exc:
            raise AttachmentError(f"{shorten(str(path))}: {exc.strerror or exc}") from None
    if b"\0" in data[:8192]:
        raise AttachmentError(f"{path}: looks binary; only text files can be attached")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AttachmentError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def open_regular(path: Path, flags: int) -> int:
    """A file descriptor for `path`, opened without blocking (O_NONBLOCK: a FIFO's open waits for its other end)
    and refused unless it is a regular file. A file it creates gets 0o666 less the umask (os.open's default
    is 0o777: executable). OSError or PathError."""
    fd = os.open(path, flags | os.O_NONBLOCK, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PathError(f"{shorten(str(path))}: not a regular file (a FIFO, socket or device); refused")
    return fd


def existing_text(path: Path, limit: int = MAX_DIFF_BYTES) -> tuple[int, str | None] | None:
    """None when `path` does not exist, else (its size, its text, or None when it is over `limit` bytes)."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with open(fd, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        return size, None if size > limit else file.read(limit + 1).decode("utf-8", errors="replace")


def write_text_file(path: Path, text: str) -> None:
    """Write `text` to `path` (created with its folders), never blocking on what is not a regular file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w", encoding="utf-8") as file:
        file.write(text)


def mentions(message: str) -> list[str]:
    """`@path` mentions in a message (emails and decorators like @property are skipped by the caller)."""
    return [quoted or bare for quoted, bare in MENTION.findall(message)]


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, code) for each fenced block, in order."""
    return [(m.group(2).strip(), m.group(3).rstrip("\n")) for m in FENCE.finditer(markdown)]


def reply_code_blocks(markdown: str) -> tuple[list[tuple[str, str]], bool]:
    """A reply's code blocks, the one it ended inside (cut short) included as the last, and whether it did."""
    blocks = code_blocks(close_open_fence(markdown))
    # Cut only if closing the fence made a block: one opened indented (in a list item) is no block of
    # code_blocks' either way, and the mark must not land on the last whole one.
    return blocks, len(blocks) > len(code_blocks(markdown))


def number_code_blocks(markdown: str) -> str:
    """`markdown` with a label line "[N] language" above each fenced block: the N that /save and /copy take."""
    parts, last = [], 0
    for number, match in enumerate(FENCE.finditer(markdown), 1):
        language = match.group(2).strip()
        parts += [markdown[last:match.start()], f"\n**[{number}]**{' *' + language + '*' if language else ''}\n\n"]
        last = match.start()
    return "".join(parts) + markdown[last:]


def diff(old: str, new: str, path: Path) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"{path} (current)", tofile=f"{path} (new)"))


def close_open_fence(markdown: str) -> str:
    """`markdown` with a closing fence added if it ends inside a fenced code block (a reply cut mid-code)."""
    fence = None
    for line in markdown.splitlines():
        stripped = line.lstrip()
        if fence is None:
            if stripped.startswith(("```", "~~~")):
                fence = stripped[: len(stripped) - len(stripped.lstrip(stripped[0]))]
        elif stripped.startswith(fence) and not stripped.strip(fence[0]).strip():
            fence = None
    return markdown if fence is None else markdown.rstrip("\n") + "\n" + fence
