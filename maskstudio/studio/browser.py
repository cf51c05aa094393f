"""What runs in the visitor's browser and what it keeps there.

* `PAGE_HEAD`: the page script (page.js) app.py puts in <head>: a key typed on a selected table
  cell replaces its text (Gradio's Dataframe dropped the first key and appended the rest), and
  Escape puts the text the cell's editor opened with back.
* The design across a reload: after every edit app.py stores `stored_design(state)` (the design's
  canonical JSON, text only) in a `gr.BrowserState`; on page load `restore_design` makes it the
  design again (validated like an upload; never a path, never code), with the fresh default on
  the undo stack so Undo starts fresh, and `state_card` says so above the preset card.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..spec import Spec
from .state import attempt, design_card

PAGE_HEAD = f"<script>\n{(Path(__file__).with_name('page.js')).read_text(encoding='utf-8')}\n</script>"
STORAGE_KEY = "maskstudio-design"  # the browser's localStorage key (Gradio encrypts the value)
SECRET = os.environ.get("MASKSTUDIO_STORAGE_SECRET")  # None: Gradio's random key, so a restarted server forgets
STORE_MAX_CHARS = 1 << 20  # a design kept in the browser: localStorage holds ~5 M characters per site, encrypted larger
RESTORED = ("*Restored the design this browser kept from your last visit. **Undo** starts fresh from the default "
            "design; **New from scratch** starts blank.*")


def stored_design(state: dict) -> str:
    """What the browser keeps: the design's canonical JSON ('' for one past STORE_MAX_CHARS: a reload
    then starts from the default design rather than failing to store)."""
    text = state["spec"].to_json()
    return text if len(text) <= STORE_MAX_CHARS else ""


def restore_design(state: dict, stored) -> tuple[dict, str]:
    """The design the browser kept, as this session's design (an edit: the fresh default goes on
    the undo stack). Nothing kept, or the same design: the state as it is. A kept value that is
    not a valid spec (an older version, a hand-edited storage) is dropped without a word: the
    visitor did not ask for it, the default design stays."""
    if not isinstance(stored, str) or not stored.strip() or len(stored) > STORE_MAX_CHARS:
        return state, ""
    new, error = attempt(state, lambda: Spec.from_json(stored))  # JSON text only: never a path on the server
    if error:
        return {k: v for k, v in state.items() if k != "unapplied"}, ""
    if new["spec"] is not state["spec"]:
        new["restored"] = new["spec"]
    return new, ""


def state_card(state: dict) -> str:
    """The design card, under a line saying the design was restored from this browser (until the
    next edit)."""
    card = design_card(state["spec"])
    return f"{RESTORED}  \n{card}" if state.get("restored") is state["spec"] else card
