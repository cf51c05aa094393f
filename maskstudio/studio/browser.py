"""What runs in the visitor's browser and what it keeps there.

* `PAGE_HEAD`: the page script (page.js) app.py puts in <head>: a key typed on a selected table
  cell replaces its text (Gradio's Dataframe dropped the first key and appended the rest), and
  Escape puts the text the cell's editor opened with back.
* The design across a reload: after every edit app.py stores `stored_design(state)` (the design's
  canonical JSON, text only) in a `gr.BrowserState`; on page load `restore_design` makes it the
  design again (validated like an upload; never a path, never code), with the fresh default on
  the undo stack so Undo starts fresh, and `state_card` says so above the preset card.
* Edits the page sends twice: Gradio's page dispatches a dropdown pick by mouse and every table
  edit twice (the same inputs, ~20 ms apart). The copy redrew everything a second time and, when it
  finished after the visitor's next edit elsewhere, put the design's JSON over the text they were
  typing and cleared that edit's error. `edit_once` makes the copy wait for the first and change
  nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
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


REPEAT_S = 1.0  # the same edit again within this after the first ended (or while it runs): the page's copy of one action
_EDITS: OrderedDict = OrderedDict()  # session -> _Edit, its last edit with inputs
_EDITS_LOCK = threading.Lock()
_EDITS_MAX = 4096  # sessions remembered (a session's last edit: ~200 bytes)


@dataclass
class _Edit:
    """A session's last edit: its digest, set when it is done, and when that was."""
    key: str
    done: threading.Event = field(default_factory=threading.Event)
    ended: float = 0.0

    def repeated_by(self, key: str, now: float) -> bool:
        return key == self.key and (not self.done.is_set() or now - self.ended < REPEAT_S)


@contextmanager
def edit_once(session: str | None, name: str, inputs: tuple):
    """Yields True when this edit repeats the session's last one (same edit, same inputs, while that
    one runs or under REPEAT_S after it ended: the copy queues behind the first, so a slow first edit
    must not turn its copy into an edit of its own): it has waited for that one to finish and should
    change no output, so it cannot land after, and undo, a newer edit. Edits without inputs (Undo,
    Redo, New) are never repeats: pressing them twice means twice."""
    if session is None or not inputs:
        yield False
        return
    key = hashlib.sha1(json.dumps([name, inputs], sort_keys=True, default=str).encode()).hexdigest()
    with _EDITS_LOCK:
        last = _EDITS.get(session)
        repeat = last is not None and last.repeated_by(key, time.monotonic())
        if not repeat:
            last = _EDITS[session] = _Edit(key)
            _EDITS.move_to_end(session)
            while len(_EDITS) > _EDITS_MAX:
                _EDITS.popitem(last=False)
    if repeat:
        last.done.wait(60)  # the first edit's outputs land first
        yield True
        return
    try:
        yield False
    finally:
        last.ended = time.monotonic()
        last.done.set()
