"""What one layout pass of the app's screen costs as a chat gets long. Prints JSON.

    python scripts/chat_layout.py [--messages 0 20 100 400] [--passes 15]

A layout pass happens on every mount and every time a streaming reply grows, on the UI thread, so
keys typed meanwhile wait for it. The app keeps only the newest MESSAGE_WINDOW messages of a chat
mounted; this opens chats of each length (stored user/assistant pairs with a code block) in the app
(headless, demo model) with that window and with every message mounted (the old behaviour), and
times full layout passes of the screen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import moe_tui.app.main as app_main
from moe_tui.app.main import MoeApp
from moe_tui.app.settings import Settings
from moe_tui.app.store import ChatStore
from moe_tui.app.widgets.chat import MessageView
from moe_tui.app.worker import EngineSpec
from moe_tui.inference.demo_paths import DEMO_MODEL

REPLY = ("Here is one way:\n\n```python\ndef add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n```\n\n"
         "It works for numbers and for sequences, e.g. `add([1], [2])`.\n")


async def layout_ms(messages: int, window: int, passes: int) -> dict:
    data = Path(tempfile.mkdtemp(prefix="moe-layout-"))
    os.environ["MOE_CONFIG"] = str(data / "config.toml")
    store = ChatStore(data / "chats.sqlite3")
    chat = store.create_chat()
    for i in range(messages):
        store.add_message(chat.id, "user" if i % 2 == 0 else "assistant",
                          "Write a function that adds two values." if i % 2 == 0 else REPLY)
    store.close()
    app_main.MESSAGE_WINDOW = window
    app = MoeApp(EngineSpec(model=str(DEMO_MODEL)), Settings(data_dir=str(data)))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(0.5)
        times = []
        for _ in range(passes):
            started = time.perf_counter()
            app.screen._refresh_layout()
            times.append(1000 * (time.perf_counter() - started))
        return {"mounted_messages": len(app.query(MessageView)), "widgets": len(list(app.screen.walk_children())),
                "layout_ms_median": round(statistics.median(times), 1), "layout_ms_max": round(max(times), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, nargs="+", default=[0, 20, 100, 400])
    parser.add_argument("--passes", type=int, default=15)
    args = parser.parse_args()
    window = app_main.MESSAGE_WINDOW
    report = {"message_window": window, "chats": []}
    for n in args.messages:
        report["chats"].append({"messages": n,
                                "windowed": asyncio.run(layout_ms(n, window, args.passes)),
                                "all_mounted": asyncio.run(layout_ms(n, 10**9, args.passes))})
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
