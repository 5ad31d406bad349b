"""Edits in replies: the two formats found in code blocks, checked against the disk, written and undone."""

from __future__ import annotations

import pytest
from moe_tui.app import coding, edits
from moe_tui.app.store import AppliedFile, ChatStore

REPLY = """Here is the new helper:

```python util.py
def twice(x):
    return 2 * x
```

And the call site:

app/main.py
```python
<<<<<<< SEARCH
    print(x)
=======
    print(twice(x))
>>>>>>> REPLACE
```

Not an edit:

```python
print("hello")
```

```
# notes/todo.md
- [ ] ship it
```
"""


def test_both_formats_are_found_with_their_code_block_numbers():
    found, problems = edits.parse_edits(REPLY)
    assert problems == []
    assert [(e.number, e.path_text) for e in found] == [(1, "util.py"), (2, "app/main.py"), (4, "notes/todo.md")]
    assert found[0].content == "def twice(x):\n    return 2 * x\n"
    assert found[1].content is None and found[1].hunks == (("    print(x)", "    print(twice(x))"),)
    assert found[2].content == "- [ ] ship it\n"  # the path comment is not part of the file
    assert len(coding.code_blocks(REPLY)) == 4  # the numbers are those the screen shows


@pytest.mark.parametrize("fence_line, before", [
    ("```python:src/x.py", ""), ("```src/x.py", ""), ("```", "`src/x.py`:"), ("```py", "**src/x.py**"),
    ("```", "File: src/x.py"), ("```", "### src/x.py"),
])
def test_a_path_is_read_from_the_info_string_or_the_line_above(fence_line, before):
    found, _ = edits.parse_edits(f"{before}\n{fence_line}\nx = 1\n```\n")
    assert [e.path_text for e in found] == ["src/x.py"]


@pytest.mark.parametrize("text", [
    "Then:\n```python\nx = 1\n```\n", "```bash\nls -l\n```\n", "```python\n# compute the totals\nx = 1\n```\n",
    "```python\n#!/usr/bin/env python\nx = 1\n```\n", "see https://x.org/a.py\n```\nx\n```\n",
    "```python\n# os.path\nx = 1\n```\n", "e.g.\n```\nx\n```\n",
])
def test_plain_code_blocks_are_not_edits(text):
    assert edits.parse_edits(text) == ([], [])


def test_malformed_search_replace_blocks_are_reported_not_guessed():
    found, problems = edits.parse_edits("a.py\n```\n<<<<<<< SEARCH\nx\n=======\ny\n```\n"
                                        "```\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n```\n")
    assert found == []
    assert problems == ["[1] a SEARCH block is not closed (======= then >>>>>>> REPLACE)",
                        "[2] search/replace blocks without a file path"]


def test_search_matches_whole_lines_then_ignores_whitespace_keeping_the_files_indentation():
    text = "def f():\n    yx = 1\n    x = 1\n    return x\n"
    assert edits.replace_once(text, "    x = 1", "    x = 2") == "def f():\n    yx = 1\n    x = 2\n    return x\n"
    assert edits.replace_once(text, "x = 1   \nreturn x", "x = 3\nreturn -x") == (
        "def f():\n    yx = 1\n    x = 3\n    return -x\n")
    assert edits.replace_once(text, "x = 9", "x = 2") is None


def test_plan_applies_hunks_refuses_what_it_cannot_and_flags_stale_and_outside(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    (project / "a.py").write_text("one\ntwo\nthree\n")
    (project / "blob.bin").write_bytes(b"\0\1\2" * 10)
    (project / "huge.txt").write_text("x" * (edits.MAX_EDIT_BYTES + 1))
    reply = ("a.py\n```\n<<<<<<< SEARCH\ntwo\n=======\n2\n>>>>>>> REPLACE\n```\n"
             "a.py\n```\n<<<<<<< SEARCH\nthree\n=======\n3\n>>>>>>> REPLACE\n```\n"
             "new/b.py\n```\n<<<<<<< SEARCH\n=======\nb = 1\n>>>>>>> REPLACE\n```\n"
             "```text blob.bin\nnot binary\n```\n```text huge.txt\nsmall\n```\n"
             "a.py\n```\n<<<<<<< SEARCH\nfour\n=======\n4\n>>>>>>> REPLACE\n```\n"
             "```text ../outside.txt\nhi\n```\n")
    found, _ = edits.parse_edits(reply)
    attached = {(project / "a.py").resolve(): "one\nTWO\nthree\n"}
    changes, problems = edits.plan(found, project, attached)
    by_name = {c.path.name: c for c in changes}
    assert by_name["a.py"].new == "one\n2\n3\n" and by_name["a.py"].stale
    assert by_name["b.py"].old is None and by_name["b.py"].new == "b = 1\n"
    assert by_name["outside.txt"].outside and not by_name["b.py"].outside
    assert "+2" in by_name["a.py"].diff and "-two" in by_name["a.py"].diff
    assert any("blob.bin: looks binary" in p for p in problems)
    assert any("huge.txt" in p and "limit for edits" in p for p in problems)
    assert any(p.startswith("[6] SEARCH block 1 is not in a.py") for p in problems)


def test_write_then_restore_and_a_file_changed_meanwhile_is_not_written(tmp_path):
    (tmp_path / "a.py").write_text("old\n")
    found, _ = edits.parse_edits("```python a.py\nnew\n```\n```python b.py\nbee\n```\n```python c.py\nsee\n```\n")
    changes, _ = edits.plan(found, tmp_path, {})
    (tmp_path / "c.py").write_text("appeared meanwhile\n")
    written, problems = edits.write_changes(changes)
    assert [w.path.name for w in written] == ["a.py", "b.py"]
    assert problems and "c.py: changed on disk while you were asked" in problems[0]
    assert (tmp_path / "a.py").read_text() == "new\n" and (tmp_path / "b.py").read_text() == "bee\n"
    assert edits.changed_since(written) == []
    (tmp_path / "a.py").write_text("new, then edited by hand\n")
    assert edits.changed_since(written) == [(tmp_path / "a.py").resolve()]
    restored, problems = edits.restore(written)
    assert problems == [] and len(restored) == 2
    assert (tmp_path / "a.py").read_text() == "old\n" and not (tmp_path / "b.py").exists()


def test_attached_file_texts_are_read_back_from_the_messages(tmp_path):
    path = (tmp_path / "x.py").resolve()
    one = coding.Attachment(path, "a = '```'\n", 3).as_prompt()
    two = coding.Attachment(path, "b = 2", 3).as_prompt()
    assert edits.attached_files([one + "\n\nfirst", "plain", two + "\n\nsecond"]) == {path: "b = 2"}
    assert edits.attached_files([one]) == {path: "a = '```'\n"}


def test_applied_edits_survive_a_reopened_store_and_undo_marks_them(tmp_path):
    store = ChatStore(tmp_path / "c.db")
    first = store.record_apply(1, [AppliedFile("/p/a.py", "old", "new"), AppliedFile("/p/b.py", None, "b")])
    second = store.record_apply(1, [AppliedFile("/p/a.py", "new", "newer")])
    reopened = ChatStore(tmp_path / "c.db")
    last = reopened.last_apply()
    assert last.id == second and last.files == (AppliedFile("/p/a.py", "new", "newer"),)
    reopened.mark_undone(second)
    assert reopened.last_apply().id == first and reopened.last_apply().files[1].before is None
    reopened.mark_undone(first)
    assert reopened.last_apply() is None


def test_files_the_app_creates_are_not_executable(tmp_path):
    """os.open's default mode is 0o777: every file /save, /export and /apply created was 0755 (and went into git
    as 100755)."""
    import os

    umask = os.umask(0o022)
    try:
        coding.write_text_file(tmp_path / "new" / "made.py", "x = 1\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "new" / "made.py").stat().st_mode & 0o777 == 0o644
    existing = tmp_path / "script.sh"
    existing.write_text("echo old\n")
    existing.chmod(0o755)
    coding.write_text_file(existing, "echo new\n")  # a file that exists keeps its mode
    assert existing.stat().st_mode & 0o777 == 0o755 and existing.read_text() == "echo new\n"


def test_a_reply_cut_inside_an_indented_fence_does_not_mark_a_whole_block_cut():
    """The cut mark went to the last block the fence pattern found (a whole one): /apply 1 refused it."""
    blocks, cut = coding.reply_code_blocks("```py\na = 1\n```\n\n1. Then run:\n   ```sh\n   pytest -q")
    assert blocks == [("py", "a = 1")] and not cut
    blocks, cut = coding.reply_code_blocks("```py\na = 1\n```\n\n```sh\npytest -q")
    assert blocks == [("py", "a = 1"), ("sh", "pytest -q")] and cut


def test_a_crlf_file_keeps_its_line_endings(tmp_path):
    """/apply on a CRLF file wrote the replaced lines with LF: mixed line endings."""
    (tmp_path / "crlf.py").write_bytes(b'print("windows")\r\nx = 1\r\ny = 2\r\n')
    (tmp_path / "whole.py").write_bytes(b"a = 1\r\n")
    found, problems = edits.parse_edits(
        "```python crlf.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 10\nz = 3\n>>>>>>> REPLACE\n```\n"
        "```python whole.py\na = 2\nb = 3\n```\n")
    changes, problems = edits.plan(found, tmp_path, {})
    assert problems == []
    edits.write_changes(changes)
    assert (tmp_path / "crlf.py").read_bytes() == b'print("windows")\r\nx = 10\r\nz = 3\r\ny = 2\r\n'
    assert (tmp_path / "whole.py").read_bytes() == b"a = 2\r\nb = 3\r\n"
    assert [line for line in changes[0].diff.splitlines() if line.startswith(("+", "-"))][2:] == ["-x = 1",
                                                                                                  "+x = 10", "+z = 3"]


@pytest.mark.parametrize("info, path", [("python ünïcode modül.py", "ünïcode modül.py"),
                                        ("python pkg/new module.py", "pkg/new module.py"),
                                        ('python "my file.py"', "my file.py"), ("python app/x.py", "app/x.py"),
                                        # a path, then words about it (found in review)
                                        ("python app/x.py updated", "app/x.py"),
                                        ("python src/app.py - updated version", "src/app.py"),
                                        ("diff a/b.py b/b.py", "a/b.py"),
                                        ('python "my file.py" updated', "my file.py")])
def test_a_path_with_spaces_in_the_info_string_is_read_whole(info, path):
    """`python pkg/new module.py` was read as pkg/new, and /apply created that file."""
    found, _ = edits.parse_edits(f"```{info}\nx = 1\n```\n")
    assert [e.path_text for e in found] == [path]
