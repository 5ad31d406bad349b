"""What a new user finds without reading the README: the palette, /help, F1, completion, history, pickers."""

from __future__ import annotations

from textual.command import Command, CommandList

from tests.helpers import palette_offers, palette_open, wait_until


def palette_titles(app) -> list[str]:
    results = app.screen.query_one(CommandList)
    return [option.hit.text for option in results._options if isinstance(option, Command)]


async def test_the_palette_lists_the_apps_commands_on_open_and_offers_only_its_own_themes(fake_app, tmp_path):
    app = fake_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.last_snapshot is not None)
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: palette_open(app))
        await wait_until(pilot, lambda: {"Start an empty chat", "/rename TITLE", "Capacity: 50%"}
                         <= set(palette_titles(app)))  # before anything is typed
        await pilot.press(*"theme")
        await wait_until(pilot, lambda: {"Theme: moe-dark", "Theme: moe-light", "Theme: moe-colorblind"}
                         <= set(palette_titles(app)))
        await pilot.pause(0.3)  # every provider has answered
        ours = {"/theme NAME", "Theme: moe-dark", "Theme: moe-light", "Theme: moe-colorblind"}
        assert {t for t in palette_titles(app) if "theme" in t.lower()} <= ours
        assert "Theme" not in palette_titles(app)  # Textual's picker of its 20 built-in themes
        await pilot.press(*"-light")
        await wait_until(pilot, lambda: palette_offers(app, "Theme: moe-light"))
        await pilot.press("enter")
        config = tmp_path / "config.toml"
        await wait_until(pilot, lambda: app.theme == "moe-light" and config.exists()
                         and 'theme = "moe-light"' in config.read_text())
