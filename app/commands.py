"""The app's one command table: slash commands, the command palette's entries and /help all come from it."""

from __future__ import annotations

from dataclasses import dataclass

from moe_tui.inference.cache import POLICIES


@dataclass(frozen=True)
class Command:
    name: str
    """Typed as /name; the app's handler is cmd_<name>."""
    usage: str
    """Arguments, as shown in /help ("" for none)."""
    help: str
    """What it does, in a few words (palette and /help)."""
    group: str
    """/help's heading."""
    presets: tuple[tuple[str, str], ...] = ()
    """(argument, palette title) pairs offered ready-made in the palette, e.g. ("50%", "Capacity: 50%")."""
    details: str = ""
    """More than `help`, for /help NAME (examples, what it does without an argument)."""

    @property
    def usage_line(self) -> str:
        return f"/{self.name}{' ' + self.usage if self.usage else ''}"

    @property
    def needs_argument(self) -> bool:
        return bool(self.usage) and not self.usage.startswith("[")


COMMANDS: tuple[Command, ...] = (
    Command("add", "PATH", "attach a file to your next message (or @path in a message)", "Coding",
            details='The file goes with your next message, with its token count. `@path` in a message does the same.'),
    Command("files", "", "list the files (and command output) attached to your next message", "Coding"),
    Command("drop", "PATH|CMD", "remove an attached file (or a command's output) from your next message", "Coding",
            details='`/drop util.py` leaves that file out of your next message; `/drop make test` leaves out the '
                    'output `/run make test` attached. Without an argument: what is attached.'),
    Command("edits", "[N]", "show the edits the last reply proposes, as diffs", "Coding",
            details='A reply proposes an edit with a code block that names a file: the path in its info string '
                    '(```python src/app.py) or alone on the line above it, or search/replace blocks '
                    '(<<<<<<< SEARCH / ======= / >>>>>>> REPLACE) under a path line. The built-in coding '
                    'system prompt asks for these formats. N: only code block N.'),
    Command("apply", "[N]", "write the last reply's edits (all, or code block N) after showing the diff", "Coding",
            details='Shows the diff of every file and asks first (No is the default). A path outside the working '
                    'directory, or a file that changed on disk since it was attached to this chat, asks before '
                    'that. Binary files and files over 256 KiB are refused. `/undo` puts the files back. '
                    'Formats: see `/help edits`.'),
    Command("undo", "", "restore the files the last /apply changed (asks first)", "Coding",
            details='Kept in the chat store, so it works after a restart too. A file the apply created is '
                    'removed. Again: the apply before it.'),
    Command("run", "CMD", "run a shell command here (asks first); its output goes with your next message", "Coding",
            details='Runs in the working directory with your shell, stdin closed, at most 120 s (Esc stops it); '
                    'it ends with the shell (what it left running in the background on its output is stopped). '
                    'The exit status and the end of the output are shown; the output (its middle cut when over '
                    '32 KiB) is attached to your next message (`/drop CMD` removes it).'),
    Command("agent", "[on|off|reads]", "agent mode: the model reads, edits and runs commands through tools", "Coding",
            details='With a model that can call tools (the local one, when its chat template renders tools) or a '
                    'server that takes them (`moe attach URL`, `moe chat --base-url URL`) the model is '
                    'offered tools to read files, list and search the working directory, apply an edit and '
                    'run a command. Every edit and command asks first; reads ask too until `/agent reads` '
                    'allows them in this chat (again: ask again). Each call is shown and kept in the chat; '
                    '`/undo` restores what its edits changed; Esc stops it.'),
    Command("diff", "", "attach `git diff` (the changes since the last commit) to your next message", "Coding",
            details='Staged and unstaged changes (`git diff HEAD`). Outside a git repository it says so.'),
    Command("save", "N PATH", "write code block N of the last reply to PATH (diff and confirm first)", "Coding",
            details='Code blocks are numbered on screen ([1], [2] ...). A file that exists is shown '
                    'as a diff and overwritten only if you say yes; a path outside the working '
                    'directory asks first.'),
    Command("copy", "[N]", "copy the last reply, or its code block N", "Coding",
            details='Copies through the terminal (OSC 52, works over SSH) and writes the text to '
                    'clipboard.txt in the data dir. N is the number shown on the code block.'),
    Command("capacity", "N|F|P%", "experts cached per layer", "Engine",
            tuple((f"{p}%", f"Capacity: {p}%") for p in (25, 50, 75, 100)),
            details='A count (`/capacity 8`), a fraction (`/capacity 0.5`) or a percentage '
                    "(`/capacity 50%`) of each layer's experts. Without an argument: the current "
                    'capacity. Live, no reload.'),
    Command("policy", "|".join(POLICIES), "the cache's eviction policy", "Engine",
            tuple((name, f"Policy: {name}") for name in POLICIES),
            details='Which expert is evicted when the cache is full: lru (least recently used), lfu (least '
                    'frequently used), decay and lrfu (use counts decaying with a half-life of 128 and 16 '
                    'steps), markov (lrfu plus how often an expert followed the latest step\'s experts; the '
                    'default). Without an argument: the current policy.'),
    Command("reset", "", "zero the cache statistics", "Engine"),
    Command("theme", "NAME", "switch theme (remembered)", "App",
            details='Themes: moe-dark, moe-light, moe-colorblind. The choice is saved in config.toml.'),
    Command("new", "", "start an empty chat", "Chats"),
    Command("chats", "", "list stored chats", "Chats",
            details='A list to pick from: arrows move, Enter opens the chat, Esc closes.'),
    Command("switch", "ID", "open a chat", "Chats",
            details='Opens chat ID (the number `/chats` shows). Without an argument: the chat open now.'),
    Command("rename", "TITLE", "rename this chat", "Chats",
            details="Without an argument: this chat's title."),
    Command("delete", "", "delete this chat", "Chats",
            details='Asks first. The next chat opens (a new one if none is left).'),
    Command("search", "TEXT", "search chats", "Chats",
            details='A list of the messages that contain TEXT, with the matching words: Enter opens '
                    'the chat at that message.'),
    Command("export", "md|json PATH", "export this chat", "Chats",
            details='`md` writes Markdown, `json` every message with its status. An existing file is '
                    'not overwritten without asking.'),
    Command("system", "[TEXT|--clear]", "show, set or remove this chat's system prompt", "Chats",
            details='Without an argument: the current system prompt. `--clear` removes it (asks first).'),
    Command("temp", "[X]", "show or set this chat's temperature (0 to 2)", "Chats",
            details='0 is greedy (always the likeliest token); higher is more varied. Without an '
                    'argument: the current value.'),
    Command("clear", "", "delete this chat's messages", "Chats",
            details='Asks first. The chat stays, empty.'),
    Command("restore", "", "bring back the reply Ctrl+R set aside (swap it with the current one)", "Chats"),
    Command("earlier", "", "show more of a long chat (it shows its newest messages)", "Chats"),
    Command("help", "[NAME]", "keys and commands; /help NAME explains one", "App",
            details='`/help` lists every command; `/help NAME` explains one. F1 shows the keys of the focused pane.'),
)
BY_NAME = {c.name: c for c in COMMANDS}

KEYS = ("Enter send · Shift+Enter / Ctrl+J newline · Up/Down earlier messages · Esc cancel · "
        "Ctrl+R regenerate · Ctrl+E edit last · Ctrl+N new chat · Ctrl+P palette · PageUp/PageDown scroll · "
        "F1 keys of the focused pane · F2 cache panel · Tab heatmap")


def help_text() -> str:
    """/help as Markdown: the keys, then one line per command."""
    lines = [f"**Keys**: {KEYS}", "", "**Commands** (`/help NAME` explains one; `/` in the prompt completes them)", ""]
    lines += [f"- `{c.usage_line}` {c.help}" for c in COMMANDS]
    return "\n".join(lines) + "\n"


def command_help(name: str) -> str | None:
    """/help NAME as Markdown, or None for an unknown command."""
    command = BY_NAME.get(name.strip().lstrip("/"))
    if command is None:
        return None
    text = f"`{command.usage_line}`: {command.help}."
    return text + (f"\n\n{command.details}" if command.details else "") + "\n"


def palette_entries() -> list[tuple[str, str, str, bool]]:
    """(title, help, command line, prefill) for every palette entry. The title says what it does, the help is
    the command it runs. A command that needs an argument is put into the prompt to finish (prefill; its
    title ends in "…"); presets and argument-less commands run at once."""
    entries = []
    for c in COMMANDS:
        about = c.help[0].upper() + c.help[1:]
        for argument, title in c.presets:
            entries.append((title, f"/{c.name} {argument}", f"/{c.name} {argument}", False))
        if c.needs_argument:
            entries.append((f"{about}…", c.usage_line, f"/{c.name} ", True))
        elif not c.presets:
            entries.append((about, f"/{c.name}", f"/{c.name}", False))
    return entries


def parse_capacity(value: str) -> int | float:
    """'12' -> 12 experts; '0.5' or '50%' -> that fraction of the experts."""
    value = value.strip()
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value) if "." in value else int(value)
    except ValueError:
        raise ValueError(f"capacity must be a count (12), fraction (0.5) or percent (50%), not {value!r}") from None
    if number <= 0:
        raise ValueError(f"capacity must be positive, not {value!r}")
    if isinstance(number, float) and number > 1:
        raise ValueError(f"capacity {value!r} is over 100% of the experts (a fraction is at most 1; a count has "
                         "no decimal point)")
    return number
