"""The app's one command table: slash commands, the command palette's entries and /help all come from it."""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def needs_argument(self) -> bool:
        return bool(self.usage) and not self.usage.startswith("[")


COMMANDS: tuple[Command, ...] = (
    Command("add", "PATH", "attach a file to your next message (or @path in a message)", "Coding"),
    Command("files", "", "list the files attached to your next message", "Coding"),
    Command("save", "N PATH", "write code block N of the last reply to PATH (diff and confirm first)", "Coding"),
    Command("copy", "[N]", "copy the last reply, or its code block N", "Coding"),
    Command("capacity", "N|F|P%", "experts cached per layer", "Engine",
            tuple((f"{p}%", f"Capacity: {p}%") for p in (25, 50, 75, 100))),
    Command("mode", "exact|fast", "exact: outputs equal stock; fast: misses dropped for the token", "Engine",
            (("exact", "Mode: exact"), ("fast", "Mode: fast"))),
    Command("policy", "lru|lfu|decay", "the cache's eviction policy", "Engine",
            (("lru", "Policy: lru"), ("lfu", "Policy: lfu"), ("decay", "Policy: decay"))),
    Command("reset", "", "zero the cache statistics", "Engine"),
    Command("theme", "NAME", "switch theme (remembered)", "App"),
    Command("new", "", "start an empty chat", "Chats"),
    Command("chats", "", "list stored chats", "Chats"),
    Command("switch", "ID", "open a chat", "Chats"),
    Command("rename", "TITLE", "rename this chat", "Chats"),
    Command("delete", "", "delete this chat", "Chats"),
    Command("search", "TEXT", "search chats", "Chats"),
    Command("export", "md|json PATH", "export this chat", "Chats"),
    Command("system", "[TEXT|--clear]", "show, set or remove this chat's system prompt", "Chats"),
    Command("temp", "[X]", "show or set this chat's temperature (0 to 2)", "Chats"),
    Command("clear", "", "delete this chat's messages", "Chats"),
    Command("restore", "", "bring back the reply Ctrl+R set aside (swap it with the current one)", "Chats"),
    Command("earlier", "", "show more of a long chat (it shows its newest messages)", "Chats"),
    Command("help", "", "keys and commands", "App"),
)
BY_NAME = {c.name: c for c in COMMANDS}

KEYS = ("Enter send · Shift+Enter / Ctrl+J newline · Esc cancel · Ctrl+R regenerate (/restore undoes) · "
        "Ctrl+E edit last · "
        "Ctrl+N new chat · Ctrl+P command palette · PageUp/PageDown scroll the chat · F2 toggle cache panel · "
        "Tab focus heatmap (arrows, +/-, [ ], h)")


def help_text() -> str:
    """/help as Markdown, grouped as the table is."""
    lines = [f"**Keys**: {KEYS}", ""]
    for group in dict.fromkeys(c.group for c in COMMANDS):
        entries = [f"`/{c.name}{' ' + c.usage if c.usage else ''}` {c.help}" for c in COMMANDS if c.group == group]
        lines += [f"**{group}**: " + " · ".join(entries), ""]
    return "\n".join(lines).rstrip() + "\n"


def palette_entries() -> list[tuple[str, str, str, bool]]:
    """(title, help, command line, prefill) for every palette entry: a command that needs an argument is put
    into the prompt to finish (prefill); presets and argument-less commands run at once."""
    entries = []
    for c in COMMANDS:
        for argument, title in c.presets:
            entries.append((title, c.help, f"/{c.name} {argument}", False))
        if c.needs_argument:
            entries.append((f"/{c.name} {c.usage}", c.help, f"/{c.name} ", True))
        elif not c.presets:
            entries.append((c.help[0].upper() + c.help[1:], f"/{c.name}", f"/{c.name}", False))
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
    return number
