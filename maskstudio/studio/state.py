"""A session's state and its undo history, and the preset gallery texts.

The state is a plain dict (what `gr.State` holds, one per browser tab / client session):

    {"spec": Spec (the last *valid* design),
     "history": [older Specs]   (undo stack, newest last, at most knobs.HISTORY designs and
                                 knobs.HISTORY_BYTES of memory; "history_bytes" holds each one's size),
     "future": [Specs]          (redo stack, bounded alike; a new edit empties it),
     "unapplied": True          (only while the editors hold an invalid edit: Undo drops it first),
     "restored": Spec           (the design restored from the browser's storage, until the next change),
     "snapshot": Spec or None    (design B for comparisons),
     "run_id": key of the last model run in this process's run cache, or None}

It holds validated Spec objects, so a design is validated exactly once, when it is made (an edit,
a preset, an upload); everything after reads the Spec (and its cached token table) as it is.

Edits never raise: `apply_json_edit` / `import_file` / `undo` / ... (and tables.apply_table_edit) return
`(state, error)` where `error` is "" or the one-line error text, and on error the state (hence the
pictures) is the previous good one.
"""
from __future__ import annotations

import html
import re
from typing import Any, Callable

from ..errors import SpecError
from .. import knobs
from ..spec import Spec
from .budget import deep_bytes, size_text

DEFAULT_PRESET = "multiverse"
BLANK = {"maskstudio": 1, "name": "untitled",
         "segments": [{"name": "prompt", "modality": "text", "length": 12},
                      {"name": "answer", "modality": "text", "length": 8, "role": ["generate"]}],
         "mask": {"base": {"pattern": "causal"}}, "positions": {"scheme": "sequential"}}


TRANSIENT = ("unapplied", "restored")  # what the editors and the card show now: gone with the next change


# ---------------------------------------------------------------- the state
def new_state(spec: Any = None) -> dict:
    """A fresh session: the given spec (Spec, dict, JSON), else the default preset, else BLANK."""
    if spec is None:
        from ..presets import load_preset

        try:
            spec = load_preset(DEFAULT_PRESET)
        except (SpecError, OSError):  # a missing or broken preset folder still gives a working app
            spec = BLANK
    spec = spec if isinstance(spec, Spec) else Spec.load(spec)
    return {"spec": spec, "history": [], "snapshot": None, "run_id": None}


def current(state: dict) -> Spec:
    """The session's design (validated when it was made; never re-validated here)."""
    return state["spec"]


def snapshot(state: dict) -> Spec | None:
    return state.get("snapshot")


def one_line(err: BaseException) -> str:
    """An error as the one line the UI shows (lone surrogates escaped: they cannot travel as JSON)."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__).encode("utf-8", "backslashreplace").decode("utf-8")


def _push(state: dict, spec: Spec) -> dict:
    """A new state whose design is `spec`; the old design goes on the undo stack, the redo stack
    is dropped (a new edit starts a new branch) and no invalid edit is pending any more."""
    new = {k: v for k, v in state.items() if k not in TRANSIENT}
    if spec == state["spec"]:
        return new
    new["history"], new["history_bytes"], trimmed = _stacked(state, "history", state["spec"])
    new["history_trimmed"] = state.get("history_trimmed", False) or trimmed
    new["spec"], new["future"], new["future_bytes"] = spec, [], []
    return new


def _stacked(state: dict, stack: str, spec: Spec) -> tuple[list, list[int], bool]:
    """`state[stack]` ("history" or "future") with `spec` on top, bounded by count and bytes; and
    whether older steps were let go. The stacks keep the validated data only: a fresh Spec without
    its cached token table, so a session's memory is its designs' data."""
    kept = Spec.from_valid(spec.to_dict())
    longer = list(state.get(stack, [])) + [kept]
    out, sizes = bounded_history(longer, history_sizes(state, stack) + [deep_bytes(kept)])
    return out, sizes, len(out) < min(len(longer), knobs.HISTORY)


def history_sizes(state: dict, stack: str = "history") -> list[int]:
    """Bytes held by each undo (or redo: stack="future") step (measured when it was pushed; measured
    now for an older state)."""
    history, sizes = state.get(stack, []), state.get(f"{stack}_bytes")
    return list(sizes) if sizes is not None and len(sizes) == len(history) else [deep_bytes(h) for h in history]


def bounded_history(history: list, sizes: list[int]) -> tuple[list, list[int]]:
    """The newest steps within knobs.HISTORY designs and knobs.HISTORY_BYTES (a design larger than
    the whole budget is not kept)."""
    keep, total = 0, 0
    for size in reversed(sizes[-knobs.HISTORY:]):
        if total + size > knobs.HISTORY_BYTES:
            break
        keep, total = keep + 1, total + size
    return history[len(history) - keep:], sizes[len(sizes) - keep:]


def attempt(state: dict, make: Callable[[], Spec]) -> tuple[dict, str]:
    """Make a new design (validating it once) and push it. On error the design is unchanged and
    the state notes an invalid edit is pending (the editors show text that is not the design), so
    Undo drops that edit first, not the valid one before it."""
    try:
        return _push(state, make()), ""
    except (SpecError, ValueError, TypeError, KeyError) as err:  # a malformed cell: still one line, never a crash
        return {**state, "unapplied": True}, one_line(err)


# ---------------------------------------------------------------- edits
def load_preset_into_state(state: dict, name: str, sizes: dict | None = None) -> tuple[dict, str]:
    from ..presets import load_preset

    if not isinstance(name, str) or name not in preset_names():
        return state, f"no preset named '{name}'; pick one from the gallery"
    return attempt(state, lambda: load_preset(name, sizes))


def load_blank(state: dict) -> tuple[dict, str]:
    return attempt(state, lambda: Spec.load(BLANK))


def apply_json_edit(state: dict, text: str) -> tuple[dict, str]:
    if not isinstance(text, str) or not text.strip():
        return state, "the JSON editor is empty; paste a spec or pick a preset"
    return attempt(state, lambda: renamed_if_edited(state["spec"], Spec.from_json(text)))  # JSON text only, never a path


def import_file(state: dict, path) -> tuple[dict, str]:
    """Upload: a JSON spec file (path, or a gradio file object with .name)."""
    if path is None:
        return state, "no file uploaded"
    path = getattr(path, "name", path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(knobs.MAX_SPEC_BYTES + 1)  # the upload gradio stored, never a typed path
    except (OSError, UnicodeDecodeError) as err:
        return state, f"cannot read the upload: {one_line(err)}"
    if len(text) > knobs.MAX_SPEC_BYTES:
        return state, f"the upload is over {knobs.MAX_SPEC_BYTES >> 20} MiB; a spec is a small JSON file"
    return apply_json_edit(state, text)


def load_task_template(state: dict, task: str) -> tuple[dict, str]:
    """An evaluation task's causal template as the design (its segments are the task's parts)."""
    from ..evaluate import task_template

    return attempt(state, lambda: task_template(task))


def undo(state: dict) -> tuple[dict, str]:
    """Drop a pending invalid edit (the editors show the design again), else go back one design
    (the current one goes on the redo stack)."""
    new = {k: v for k, v in state.items() if k not in TRANSIENT}
    if state.get("unapplied"):
        return new, ""
    history, sizes = list(state.get("history", [])), history_sizes(state)
    if not history and state.get("history_trimmed"):
        return new, (f"nothing more to undo: older designs were let go to keep undo within "
                     f"{size_text(knobs.HISTORY_BYTES)} per session")
    if not history:
        return new, "nothing to undo"
    new["future"], new["future_bytes"], _ = _stacked(state, "future", state["spec"])
    new["spec"] = history.pop()
    new["history"], new["history_bytes"] = history, sizes[:-1]
    return new, ""


def redo(state: dict) -> tuple[dict, str]:
    """Forward one design again after an undo (until a new edit starts another branch)."""
    new = {k: v for k, v in state.items() if k not in TRANSIENT}
    future, sizes = list(state.get("future", [])), history_sizes(state, "future")
    if not future:
        return new, "nothing to redo"
    new["history"], new["history_bytes"], trimmed = _stacked(state, "history", state["spec"])
    new["history_trimmed"] = state.get("history_trimmed", False) or trimmed
    new["spec"] = future.pop()
    new["future"], new["future_bytes"] = future, sizes[:-1]
    return new, ""


def set_snapshot(state: dict) -> dict:
    """Keep the current design as B for comparisons (Specs are immutable: no copy needed)."""
    new = dict(state)
    new["snapshot"] = state["spec"]
    return new


# ---------------------------------------------------------------- the preset gallery
def preset_choices() -> list[tuple[str, str]]:
    """Dropdown (label, value) pairs, grouped: "video · tc_llava"."""
    from ..presets import list_presets

    return [(f"{p['group']} · {p['name']}", p["name"]) for p in list_presets()]


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text.strip())
    return (m.group(1) if m else text.strip())[:220]


def markdown_text(text: str) -> str:
    """User text (names, errors, notes) as literal Markdown that loads nothing: HTML escaped (no tag,
    no <autolink>), and the two joints every link or image needs broken, `](` of an inline one and
    `]:` of a reference definition, by a character reference (`]&#40;`: the page shows `](`, in
    Markdown and inside HTML such as <small> alike, where a backslash would show), so
    `![x](http://...)` in a shared spec shows as text. The rest stays as written (a JSON path like
    mask.rules[0].k reads the same in the API)."""
    return (html.escape(str(text), quote=False).replace("](", "]&#40;").replace("]:", "]&#58;").replace("|", "/")
            .replace("://", "&#58;//").replace("www.", "www&#46;"))  # and no autolink: a URL stays text, unclickable


_EMPHASIS = str.maketrans({c: "\\" + c for c in "\\*_`~"})


def card_text(text: str) -> str:
    """`markdown_text` with Markdown's emphasis and code characters backslash-escaped too, for the
    cards (read in the page only, never by an API client): `StartRecentKVCache.__call__` shows as
    written, not as a bold "call"."""
    return markdown_text(str(text).translate(_EMPHASIS))


_md = card_text


def preset_card(name: str) -> str:
    """Markdown: the preset's group, what it does (the whole description), where it comes from
    (authors' code, paper or inferred) and its citation."""
    from ..presets import list_presets

    for p in list_presets():
        if p["name"] == name:
            return (f"**{p['name']}** · *{p['group']}*  \n{_md(p['description'])}  \n"
                    f"<small>From: {_md(p['origin'])}<br>{_md(p['citation'])}</small>")
    return ""


def preset_names() -> list[str]:
    from ..presets import list_presets

    return [p["name"] for p in list_presets()]


def preset_of(spec: Spec) -> str | None:
    """The preset this design is, unchanged (for the gallery dropdown), else None."""
    from ..presets import load_preset

    if spec.name not in preset_names():
        return None
    try:
        return spec.name if load_preset(spec.name).to_dict() == spec.to_dict() else None
    except (SpecError, OSError):
        return None


def edited_name(name: str) -> str:
    """The name of an edited preset ('prefix_lm' -> 'prefix_lm-edited') or task template
    ('kv_retrieval (causal)' -> 'kv_retrieval (edited)'), so titles, legends, tables, Compare,
    exports and the card do not present an edited design as the published one."""
    from ..evaluate import TASKS

    task = name[:-len(" (causal)")] if name.endswith(" (causal)") else None
    if task in TASKS:
        return f"{task} (edited)"
    return f"{name}-edited" if name in preset_names() else name


def renamed_if_edited(old: Spec, new: Spec) -> Spec:
    """`new` under its edited name when an edit changed the design but kept a published name (a
    preset's or a task template's); any other design as it is (a name the user typed is theirs)."""
    if new is old or new.name != old.name or new == old or edited_name(new.name) == new.name:
        return new
    data = new.to_dict()
    data["name"] = edited_name(new.name)
    return Spec.from_valid(data)


def design_card(spec: Spec) -> str:
    """The preset card of the design (its preset's, marked when edited), or a line for own designs."""
    name = spec.name
    base = name[:-len("-edited")] if name.endswith("-edited") else name
    card = preset_card(base)
    if card and base != name:
        return f"*Edited from the preset below.*  \n{card}"
    if card:
        return card
    text = spec.to_dict().get("description", "")
    desc = f"  \n{_md(text)}" if text else ""
    return f"**{_md(name)}** · *own design*{desc}"


def gallery_markdown() -> str:
    """Every preset, grouped, with what it does and its citation."""
    from ..presets import list_presets

    lines, group = [], None
    for p in list_presets():
        if p["group"] != group:
            group = p["group"]
            lines += ["", f"#### {group}", "", "| preset | what it does | citation |", "|---|---|---|"]
        lines.append(f"| `{p['name']}` | {_md(_first_sentence(p['description']))} | {_md(p['citation'])} |")
    return "\n".join(lines).strip()


GALLERY_COLUMNS = ["preset", "group", "what it does", "from"]


def gallery_rows() -> list[list[str]]:
    """One compact row per preset for the gallery table (a row click loads it)."""
    from ..presets import list_presets

    return [[p["name"], p["group"], _first_sentence(p["description"])[:140], p["origin"][:60]] for p in list_presets()]


def gallery_pick(row_value) -> str | None:
    """The preset named by a clicked gallery row (the row's values, whatever the table's sorting)."""
    name = str(row_value[0]).strip() if isinstance(row_value, (list, tuple)) and row_value else ""
    return name if name in preset_names() else None
