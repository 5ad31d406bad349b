"""The only places the app and its tests touch Textual internals; tests/test_textual_compat.py checks each
against the installed Textual, so a release that moves one fails there, by name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from textual.app import App
from textual.geometry import Size
from textual.screen import Screen


class OnePassResize:
    """Mix into a widget whose size is set only by layout passes (before the Widget class). A pass that
    changes such a widget's virtual size sets Textual's `virtual_size` reactive, which asks for a second
    full pass; that pass finds nothing to move, since the first already placed every child and updated
    the scrollbars, yet a key typed while a reply grows waits for both (docs/performance.md)."""

    def _size_updated(self, size: Size, virtual_size: Size, container_size: Size, layout: bool = True) -> bool:
        return super()._size_updated(size, virtual_size, container_size, layout=False)  # type: ignore[misc]


@contextmanager
def layout_passes(screen: Screen) -> Iterator[list[int]]:
    """Counts the screen's full layout passes while the block runs (for tests of layout cost)."""
    passes: list[int] = []
    refresh_layout = screen._refresh_layout

    def counted(*args, **kwargs):
        passes.append(1)
        return refresh_layout(*args, **kwargs)

    screen._refresh_layout = counted  # type: ignore[method-assign]
    try:
        yield passes
    finally:
        screen._refresh_layout = refresh_layout  # type: ignore[method-assign]


def notification_texts(app: App) -> list[str]:
    """The texts of the toasts the app is showing now."""
    return [text for text, _ in notifications(app)]


def notifications(app: App) -> list[tuple[str, str]]:
    """(text, severity) of each toast the app is showing now."""
    return [(notification.message, notification.severity) for notification in app._notifications]


def add_line_filter(app: App, line_filter) -> None:
    """Run every row the app draws through `line_filter` (a textual.filter.LineFilter), as NO_COLOR does."""
    app._filters.append(line_filter)
