"""Edits proposed in a reply: found in its code blocks, checked against the files on disk, shown as diffs.

Two formats (CODING_PROMPT asks the model for them; README documents them):

- a file-tagged code block holds a whole file: the path in the fence's info string (```python app/x.py),
  on the line just above the fence, or on the block's first line as a comment (# file: app/x.py);
- search/replace blocks (aider's form) inside a code block whose path is given the same ways:
  <<<<<<< SEARCH / old lines / ======= / new lines / >>>>>>> REPLACE, any number of them; an empty
  SEARCH on a file that does not exist creates it.

Each edit keeps the number its code block shows on screen ([N]). No UI here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import coding

MAX_EDIT_BYTES = coding.MAX_ATTACHMENT_BYTES  # a file over this is not edited (nor attached)

CODING_PROMPT = """You are a coding assistant working in the user's project. To change a file, use one of \
these two formats, and nothing else for edits.
A whole file: a code block whose info string holds the file's path after the language:
```python src/app.py
<the complete new file>
```
Part of a file: the path alone on a line, then a code block of search/replace blocks; SEARCH repeats \
existing lines exactly, REPLACE holds their new text:
src/app.py
```python
<<<<<<< SEARCH
old lines
=======
new lines
>>>>>>> REPLACE
```
Paths are relative to the project folder. Show other code in plain code blocks without a path."""

SEARCH = re.compile(r"^<{5,9} ?SEARCH\s*$")
DIVIDER = re.compile(r"^={5,9}\s*$")
REPLACE = re.compile(r"^>{5,9} ?REPLACE\s*$")
_PATH = re.compile(r"^(?:[\w.+~-]+/)*[\w.+-]*\w\.[\w+-]+$|^(?:[\w.+~-]+/)+[\w.+-]+$")
_COMMENT = re.compile(
    r"^\s*(?:#|//|--|;|<!--|/\*)\s*(?:file(?:name)?\s*[:=]\s*|path\s*[:=]\s*)?(\S+?)\s*(?:-->|\*/)?\s*$", re.I)
_LABEL = re.compile(r"^\s*(?:#+\s*)?(?:(?:file|path)\s*[:=]?\s*)?[*_`]*([^\s*`_][^\s`*]*?)[*_`]*:?\s*$", re.I)
LANGUAGE_NAMES = set(coding.LANGUAGES.values()) | {"py", "js", "ts", "sh", "shell", "console", "text", "txt", "diff",
                                                   "patch", "jsx", "tsx", "kotlin", "swift", "ruby", "php", "zsh"}


class EditError(coding.PathError):
    """An edit cannot be applied; the message says why, in one line."""


@dataclass(frozen=True)
class Edit:
    number: int
    """The number its code block shows on screen: /apply N takes it."""
    path_text: str
    """As the reply wrote it."""
    content: str | None
    """The whole new file (a file-tagged block), or None for search/replace hunks."""
    hunks: tuple[tuple[str, str], ...] = ()
    """(search, replace) pairs, applied in order."""


@dataclass(frozen=True)
class Change:
    """An edit checked against the disk: what writing it would do."""

    edit: Edit
    path: Path
    old: str | None
    """The file's text now (None: it does not exist, the edit creates it)."""
    new: str
    outside: bool
    """The path lies outside the working directory."""
    stale: bool
    """The file changed on disk since it was attached to this chat."""

    @property
    def diff(self) -> str:
        return unified_diff(self.old, self.new, self.path)


# Without a folder, a name counts as a path only with one of these suffixes (`# os.path` is not a file name).
SUFFIXES = set(coding.LANGUAGES) | {".txt", ".cfg", ".ini", ".rb", ".kt", ".swift", ".php", ".jsx", ".tsx", ".lua",
                                    ".zig", ".hpp", ".cc", ".hh", ".m", ".r", ".scala", ".vue", ".svelte", ".xml",
                                    ".csv", ".env", ".lock", ".rst", ".mk", ".cmake", ".gradle", ".pyi", ".ipynb",
                                    ".scss", ".less", ".proto", ".graphql", ".tf", ".nix", ".el", ".vim", ".zsh",
                                    ".bash", ".fish", ".ps1", ".bat", ".dockerfile", ".gitignore", ".cs", ".fs",
                                    ".ex", ".exs", ".erl", ".hs", ".ml", ".jl", ".dart", ".pl", ".pm", ".tex"}


def looks_like_path(text: str, strict: bool = True) -> bool:
    """Whether `text` reads as a file path; `strict` (prose, comments) also wants a folder or a known suffix."""
    if not _PATH.match(text) or "://" in text or text.lower() in LANGUAGE_NAMES:
        return False
    return not strict or "/" in text or Path(text).suffix.lower() in SUFFIXES or text.startswith(".")


def _info_path(info: str) -> str | None:
    """A path named in a fence's info string: ```python app/x.py, ```app/x.py, ```python:app/x.py, and after a
    language a path with spaces (```python pkg/new module.py, ```python "my file.py")."""
    parts = info.split(None, 1)
    if len(parts) == 2 and parts[0].lower() in LANGUAGE_NAMES:
        quoted = re.match(r"""\s*(["'`])([^"'`\n]+)\1""", parts[1])
        if quoted and looks_like_path(quoted.group(2).replace(" ", "_"), strict=False):
            return quoted.group(2)  # `python "my file.py" updated`: the quoted path, whatever follows
        rest = parts[1].strip().strip("\"'`")
        first = rest.split()[0] if rest.split() else ""
        # Spaces inside the path: its first word names no file of its own, and the whole ends in a known suffix
        # (`python app/x.py updated` is app/x.py and words about it).
        if (" " in rest and Path(first).suffix.lower() not in SUFFIXES
                and Path(rest).suffix.lower() in SUFFIXES and looks_like_path(rest.replace(" ", "_"))):
            return rest
    for word in re.split(r"[\s:]+", info.strip()):
        word = word.removeprefix("path=").removeprefix("file=").strip("\"'`")
        if looks_like_path(word, strict=False):
            return word
    return None


def _label_path(line: str) -> str | None:
    """A path alone on the line above a fence (`app/x.py`, **app/x.py**, File: app/x.py, ### app/x.py:)."""
    match = _LABEL.match(line)
    return match.group(1) if match and looks_like_path(match.group(1)) else None


def parse_hunks(code: str) -> tuple[tuple[str, str], ...] | None:
    """The (search, replace) pairs of a block, or None when it holds none; EditError when one is malformed."""
    lines = code.split("\n")
    if not any(SEARCH.match(line) for line in lines):
        return None
    hunks, state, search, replace = [], "out", [], []
    for line in lines:
        if state == "out":
            if SEARCH.match(line):
                state, search, replace = "search", [], []
            elif line.strip():
                raise EditError(f"text outside a SEARCH/REPLACE block: {coding.shorten(line.strip(), 40)!r}")
        elif state == "search":
            if DIVIDER.match(line):
                state = "replace"
            else:
                search.append(line)
        elif REPLACE.match(line):
            hunks.append(("\n".join(search), "\n".join(replace)))
            state = "out"
        else:
            replace.append(line)
    if state != "out":
        raise EditError("a SEARCH block is not closed (======= then >>>>>>> REPLACE)")
    return tuple(hunks)


def parse_edits(markdown: str) -> tuple[list[Edit], list[str]]:
    """The edits in a reply, and one line per code block that looks like an edit but is malformed."""
    edits, problems = [], []
    for number, match in enumerate(coding.FENCE.finditer(markdown), 1):
        info, code = match.group(2), match.group(3).rstrip("\n")
        before = markdown[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        path = _info_path(info) or (_label_path(before) if before.strip() else None)
        first, _, rest = code.partition("\n")
        comment = _COMMENT.match(first)
        if path is None and comment and looks_like_path(comment.group(1)):
            path, code = comment.group(1), rest
        try:
            hunks = parse_hunks(code)
        except EditError as exc:
            problems.append(f"[{number}] {exc}")
            continue
        if path is None:
            if hunks is not None:
                problems.append(f"[{number}] search/replace blocks without a file path")
            continue
        edits.append(Edit(number, path, None if hunks is not None else code + "\n", hunks or ()))
    return edits, problems


def replace_once(text: str, search: str, replace: str) -> str | None:
    """`text` with `search` replaced by `replace` at its first match: exact, else line by line ignoring trailing
    whitespace, else ignoring indentation (the replacement then gets the file's indentation). None: no match."""
    if search == "":
        return None
    at = text.find(search)
    while at >= 0:  # an exact match of whole lines
        end = at + len(search)
        if (at == 0 or text[at - 1] == "\n") and (end == len(text) or text[end] == "\n"):
            return text[:at] + replace + text[end:]
        at = text.find(search, at + 1)
    lines, wanted = text.split("\n"), search.split("\n")
    for strip in (str.rstrip, str.strip):
        keys = [strip(line) for line in wanted]
        for start in range(len(lines) - len(wanted) + 1):
            if [strip(line) for line in lines[start:start + len(wanted)]] == keys:
                new = replace.split("\n")
                if strip is str.strip:
                    new = _reindent(new, wanted[0], lines[start])
                return "\n".join(lines[:start] + new + lines[start + len(wanted):])
    return None


def _reindent(lines: list[str], model_first: str, file_first: str) -> list[str]:
    """The replacement's lines moved by the difference between the indentation the model wrote and the file's."""
    model_indent = model_first[: len(model_first) - len(model_first.lstrip())]
    file_indent = file_first[: len(file_first) - len(file_first.lstrip())]
    return [file_indent + line[len(model_indent):] if line.startswith(model_indent) else line for line in lines]


def new_text(edit: Edit, old: str | None) -> str:
    """The file's text after `edit`, in the file's own line endings (a file whose every line ends in CRLF
    keeps CRLF); EditError when a SEARCH is not found."""
    crlf = old is not None and old.count("\r\n") == old.count("\n") > 0
    if crlf:
        return _edited(edit, old.replace("\r\n", "\n")).replace("\n", "\r\n")
    return _edited(edit, old)


def _edited(edit: Edit, old: str | None) -> str:
    if edit.content is not None:
        return edit.content
    text = old
    for index, (search, replace) in enumerate(edit.hunks, 1):
        if text is None or (search.strip() == "" and text.strip() == ""):
            if search.strip():
                raise EditError(f"[{edit.number}] {edit.path_text} does not exist, and SEARCH block {index} "
                                "expects text in it")
            text = replace + "\n" if replace else ""
            continue
        if search.strip() == "":
            raise EditError(f"[{edit.number}] SEARCH block {index} is empty, but {edit.path_text} is not")
        changed = replace_once(text, search, replace)
        if changed is None:
            raise EditError(f"[{edit.number}] SEARCH block {index} is not in {edit.path_text}: "
                            f"{coding.shorten(search.strip().splitlines()[0], 50)!r}...")
        text = changed
    return text if text is not None else ""


def read_for_edit(path: Path) -> str | None:
    """The file's text (None when missing), or EditError for what edits refuse: binary, huge, not UTF-8."""
    try:
        existing = coding.existing_text(path, MAX_EDIT_BYTES)
    except coding.PathError as exc:
        raise EditError(str(exc)) from None
    except OSError as exc:
        raise EditError(f"{coding.shorten(str(path))}: {exc.strerror or exc}") from None
    if existing is None:
        return None
    size, text = existing
    if text is None:
        raise EditError(f"{coding.shorten(str(path))}: {size // 1024} KiB is over the {MAX_EDIT_BYTES // 1024} KiB "
                        "limit for edits; not changed")
    if "\0" in text[:8192]:
        raise EditError(f"{coding.shorten(str(path))}: looks binary; only text files are edited")
    if "\ufffd" in text:
        try:
            path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            raise EditError(f"{coding.shorten(str(path))}: not UTF-8 text; not changed") from None
    return text


def check(edit: Edit, cwd: Path, attached: dict[Path, str]) -> Change:
    """What `edit` would do now; EditError (or PathError) when it cannot be applied."""
    path, outside = coding.resolve(edit.path_text, cwd)
    old = read_for_edit(path)
    new = new_text(edit, old)
    if len(new.encode("utf-8", errors="replace")) > MAX_EDIT_BYTES:
        raise EditError(f"[{edit.number}] the new {edit.path_text} would be over the {MAX_EDIT_BYTES // 1024} KiB "
                        "limit for edits")
    stale = path in attached and old is not None and attached[path].rstrip("\n") != old.rstrip("\n")
    return Change(edit, path, old, new, outside, stale)


def plan(edits: list[Edit], cwd: Path, attached: dict[Path, str]) -> tuple[list[Change], list[str]]:
    """The changes the edits make, several edits of one file applied in turn; and one line per edit refused."""
    changes: dict[Path, Change] = {}
    problems = []
    for edit in edits:
        try:
            path, _ = coding.resolve(edit.path_text, cwd)
            earlier = changes.get(path)
            if earlier is None:
                changes[path] = check(edit, cwd, attached)
            else:  # a second edit of the same file builds on the first
                changes[path] = Change(edit, path, earlier.old, new_text(edit, earlier.new), earlier.outside,
                                       earlier.stale)
        except coding.PathError as exc:
            text = str(exc)
            problems.append(text if text.startswith("[") else f"[{edit.number}] {text}")
    return list(changes.values()), problems


def unified_diff(old: str | None, new: str, path: Path) -> str:
    import difflib

    before = (old or "").splitlines(keepends=True)
    after = new.splitlines(keepends=True)
    lines = list(difflib.unified_diff(before, after, fromfile=f"{path} (current)" if old is not None else "/dev/null",
                                      tofile=f"{path} (new)"))
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


_ATTACHED = re.compile(r"^File `(.+?)`:\n(`{3,})[^\n]*\n(.*?)\n\2$", re.S | re.M)


def attached_files(user_messages: list[str]) -> dict[Path, str]:
    """The text each file had when it was last attached to these messages (coding.Attachment.as_prompt)."""
    found: dict[Path, str] = {}
    for message in user_messages:
        for match in _ATTACHED.finditer(message):
            found[Path(match.group(1))] = match.group(3)
    return found


def listing(changes: list[Change], problems: list[str]) -> str:
    """The edits as Markdown: a line and a diff per file, then what was refused."""
    parts = []
    for change in changes:
        notes = [note for flag, note in ((change.old is None, "new file"), (change.outside, "outside the working "
                 "directory"), (change.stale, "changed on disk since it was attached")) if flag]
        head = f"**[{change.edit.number}]** `{change.path}`" + (f" ({', '.join(notes)})" if notes else "")
        body = change.diff or "(no change)\n"
        fence = "````" if "```" in body else "```"
        parts.append(f"{head}\n\n{fence}diff\n{body}{fence}")
    parts += [f"- refused: {p}" for p in problems]
    return "\n\n".join(parts)


@dataclass(frozen=True)
class Written:
    """A file an apply or an undo wrote: its text before (None: it did not exist) and after (None: removed)."""

    path: Path
    before: str | None
    after: str | None


def write_changes(changes: list[Change]) -> tuple[list[Written], list[str]]:
    """Write each change whose file still holds what it held when checked (the user was asked meanwhile);
    the files written, and one line per file not written."""
    written, problems = [], []
    for change in changes:
        try:
            now = read_for_edit(change.path)
            if now != change.old:
                problems.append(f"{coding.shorten(str(change.path))}: changed on disk while you were asked; "
                                "not written (/apply again shows the new diff)")
                continue
            coding.write_text_file(change.path, change.new)
        except coding.PathError as exc:
            problems.append(str(exc))
            continue
        except OSError as exc:
            problems.append(f"could not write {coding.shorten(str(change.path))}: {exc.strerror or exc}")
            continue
        written.append(Written(change.path, change.old, change.new))
    return written, problems


def changed_since(files: list[Written]) -> list[Path]:
    """The files whose text on disk is no longer what was written (edited since): undoing loses that."""
    changed = []
    for f in files:
        try:
            now = read_for_edit(f.path)
        except coding.PathError:
            now = ""
        if now != f.after:
            changed.append(f.path)
    return changed


def restore(files: list[Written]) -> tuple[list[Path], list[str]]:
    """Put each file back as it was before (a file the apply created is removed): those restored, and one
    line per file that could not be."""
    restored, problems = [], []
    for f in files:
        try:
            if f.before is None:
                f.path.unlink(missing_ok=True)
            else:
                coding.write_text_file(f.path, f.before)
        except coding.PathError as exc:
            problems.append(str(exc))
            continue
        except OSError as exc:
            problems.append(f"could not restore {coding.shorten(str(f.path))}: {exc.strerror or exc}")
            continue
        restored.append(f.path)
    return restored, problems
