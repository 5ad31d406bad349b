"""The command palette's entries for the app: every engine and chat action, and the app's own themes."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

from .commands import palette_entries


class MoeCommands(Provider):
    """Command palette entries for every engine and chat action (listed as soon as the palette opens)."""

    def _commands(self) -> list[tuple[str, str, object]]:
        app = self.app
        cmds = [(title, about, partial(app.prefill if prefill else app.run_command, line))
                for title, about, line, prefill in palette_entries()]
        for name in app.theme_gradients:
            cmds.append((f"Theme: {name}", f"/theme {name}", partial(app.run_command, f"/theme {name}")))
        return cmds

    async def discover(self) -> Hits:
        for name, about, callback in self._commands():
            yield DiscoveryHit(name, callback, help=about)

    async def search(self, query: str) -> Hits:
        """Entries whose title or command match: "rename" and "/rename" both find "Rename this chat…"."""
        matcher = self.matcher(query)
        for name, about, callback in self._commands():
            by_title, by_command = matcher.match(name), matcher.match(about)
            if max(by_title, by_command) > 0:
                title = matcher.highlight(name) if by_title >= by_command else name
                yield Hit(max(by_title, by_command), title, callback, help=about)
