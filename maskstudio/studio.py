"""Everything the web app does, as plain functions (app.py only lays out widgets and wires events).

A session's state is a plain dict (what `gr.State` holds, one per browser tab / client session):

    {"spec": canonical spec dict (the last *valid* design),
     "history": [older canonical dicts]   (undo stack, newest last),
     "snapshot": canonical dict or None    (design B for comparisons),
     "run_id": key of the last model run in this process's run cache, or None}

Edits never raise: `apply_json_edit` / `apply_table_edit` / `import_file` return
`(state, error)` where `error` is "" or the one-line SpecError text, and on error the state
(hence the pictures) is the previous good one.

Tables <-> spec: the segments, rules and overlays tables are lists of string rows (what a
gr.Dataframe edits). Sizes are written `12`, `24x24`, `8x16x16` or `4+4+4` (frames); roles and
selectors as `a, b`; pattern parameters as `size=4, causal=false` (or a JSON object); layers and
heads as `0, 1, 2` or `start:stop[:step]`. A table row that is unchanged keeps its exact previous
JSON (so per-token attrs, one-name selector lists and the like survive a table edit).

Pictures are PNG files, content-addressed and cached: a view is redrawn only when the part of the
spec it depends on changes (positions and RoPE distance ignore the mask, so a rule edit redraws
the mask, flow and reach views only).
"""
from __future__ import annotations

import copy
import hashlib
import html
import json
import math
import os
import re
import tempfile
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import numpy as np

from .spec import GRID_DIMS, Spec, SpecError, segment_size

SEGMENT_COLUMNS = ["name", "modality", "size", "branch", "roles", "text"]
RULE_COLUMNS = ["kind", "q", "k", "pattern", "params", "layers", "heads"]
OVERLAY_COLUMNS = ["op", "q", "k", "pattern", "params", "layers", "heads"]
VIEWS = ("mask", "positions", "distance", "flow", "reach")
DRAW_ORDER = ("mask", "reach", "distance", "flow", "positions")  # slowest first, for the workers
EXPORT_FORMATS = {"json": ".json", "flex": "_flex.py", "npy": "_mask.npy", "positions": "_positions.npy",
                  "png": "_pictures.zip"}
HISTORY = 30
DPI = 80
DEFAULT_PRESET = "multiverse"
BLANK = {"maskstudio": 1, "name": "untitled",
         "segments": [{"name": "prompt", "modality": "text", "length": 12},
                      {"name": "answer", "modality": "text", "length": 8, "role": ["generate"]}],
         "mask": {"base": {"pattern": "causal"}}, "positions": {"scheme": "sequential"}}
_WORKDIR = tempfile.mkdtemp(prefix="maskstudio-app-")


# ================================================================= state
def new_state(spec: Any = None) -> dict:
    """A fresh session: the given spec (Spec, dict, JSON), else the default preset, else BLANK."""
    if spec is None:
        try:
            from .presets import load_preset
            spec = load_preset(DEFAULT_PRESET)
        except Exception:  # noqa: BLE001 - a missing preset folder still gives a working app
            spec = BLANK
    spec = spec if isinstance(spec, Spec) else Spec.load(spec)
    return {"spec": spec.to_dict(), "history": [], "snapshot": None, "run_id": None}


def current(state: dict) -> Spec:
    return Spec.load(state["spec"])


def _push(state: dict, spec: Spec) -> dict:
    """A new state whose design is `spec`; the old design goes on the undo stack."""
    new = dict(state)
    data = spec.to_dict()
    if data == state["spec"]:
        return new
    new["history"] = (list(state.get("history", [])) + [state["spec"]])[-HISTORY:]
    new["spec"] = data
    return new


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _try(state: dict, make: Callable[[], Spec]) -> tuple[dict, str]:
    try:
        return _push(state, make()), ""
    except SpecError as err:
        return state, _one_line(err)
    except (ValueError, TypeError, KeyError) as err:  # a malformed cell: still one line, never a crash
        return state, _one_line(err)


def load_preset_into_state(state: dict, name: str, sizes: dict | None = None) -> tuple[dict, str]:
    from .presets import load_preset

    return _try(state, lambda: load_preset(name, sizes))


def load_blank(state: dict) -> tuple[dict, str]:
    return _try(state, lambda: Spec.load(BLANK))


def apply_json_edit(state: dict, text: str) -> tuple[dict, str]:
    if not isinstance(text, str) or not text.strip():
        return state, "the JSON editor is empty; paste a spec or pick a preset"
    return _try(state, lambda: Spec.load(text))


def import_file(state: dict, path) -> tuple[dict, str]:
    """Upload: a JSON spec file (path, or a gradio file object with .name)."""
    if path is None:
        return state, "no file uploaded"
    path = getattr(path, "name", path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as err:
        return state, f"cannot read the upload: {_one_line(err)}"
    return apply_json_edit(state, text)


def undo(state: dict) -> tuple[dict, str]:
    history = list(state.get("history", []))
    if not history:
        return state, "nothing to undo"
    new = dict(state)
    new["spec"] = history.pop()
    new["history"] = history
    return new, ""


def set_snapshot(state: dict) -> dict:
    new = dict(state)
    new["snapshot"] = copy.deepcopy(state["spec"])
    return new


# ================================================================= presets
def preset_choices() -> list[tuple[str, str]]:
    """Dropdown (label, value) pairs, grouped: "video · tc_llava"."""
    from .presets import list_presets

    return [(f"{p['group']} · {p['name']}", p["name"]) for p in list_presets()]


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text.strip())
    return (m.group(1) if m else text.strip())[:220]


def _md(text: str) -> str:
    """Plain text for Markdown: tags like <Path> shown, not swallowed as HTML; no table breaks."""
    return html.escape(text, quote=False).replace("|", "/")


def preset_card(name: str) -> str:
    """Markdown: the preset's group, one-line 'what it does' and citation."""
    from .presets import list_presets

    for p in list_presets():
        if p["name"] == name:
            return (f"**{p['name']}** · *{p['group']}*  \n{_md(_first_sentence(p['description']))}  \n"
                    f"<small>{_md(p['citation'])}</small>")
    return ""


def gallery_markdown() -> str:
    """Every preset, grouped, with what it does and its citation."""
    from .presets import list_presets

    lines, group = [], None
    for p in list_presets():
        if p["group"] != group:
            group = p["group"]
            lines += ["", f"#### {group}", "", "| preset | what it does | citation |", "|---|---|---|"]
        lines.append(f"| `{p['name']}` | {_md(_first_sentence(p['description']))} | {_md(p['citation'])} |")
    return "\n".join(lines).strip()


# ================================================================= tables <-> spec
def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _rows(table) -> list[list[str]]:
    """Rows of a Dataframe value (list of lists, pandas DataFrame or {"data": ...}); blank rows dropped."""
    if table is None:
        return []
    if isinstance(table, dict):
        table = table.get("data", [])
    if hasattr(table, "values") and hasattr(table, "columns"):
        table = table.values.tolist()
    out = []
    for row in table:
        cells = [_cell(v) for v in row]
        if any(cells):
            out.append(cells)
    return out


def format_size(seg: dict) -> str:
    if "grid" in seg:
        return "x".join(str(g) for g in seg["grid"])
    if "frames" in seg:
        return "+".join(str(f) for f in seg["frames"])
    return str(seg["length"]) if "length" in seg else ""


def parse_size(text: str, path: str) -> dict:
    """'12' -> length, '24x24' / '8x16x16' -> grid, '4+4+4' -> frames, '' -> unsized (text only)."""
    text = text.strip().lower().replace("×", "x").replace(" ", "")
    if not text:
        return {}
    try:
        if "x" in text:
            return {"grid": [int(p) for p in text.split("x")]}
        if "+" in text:
            return {"frames": [int(p) for p in text.split("+")]}
        return {"length": int(text)}
    except ValueError:
        raise SpecError(path, f"size '{text}' is not like 12, 24x24, 8x16x16 or 4+4+4 (frames)") from None


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if len(text) >= 2 and text[0] == text[-1] == "'":
            return text[1:-1]
        return text


_BARE = re.compile(r"^[A-Za-z_][\w:.\-]*$")


def format_params(params: dict) -> str:
    out = []
    for k, v in params.items():
        if isinstance(v, str) and _BARE.match(v) and v.lower() not in ("true", "false", "none", "null"):
            out.append(f"{k}={v}")
        else:
            out.append(f"{k}={json.dumps(v)}")
    return ", ".join(out)


def parse_params(text: str, path: str) -> dict:
    """'size=4, causal=false, by=frame' or a JSON object -> dict."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(path, f"parameters are not valid JSON ({err.msg}); write size=4, causal=false") from None
        if not isinstance(data, dict):
            raise SpecError(path, "parameters must be an object")
        return data
    out = {}
    for part in _split_top(text):
        if "=" not in part:
            raise SpecError(path, f"'{part}' is not name=value; write e.g. size=4, causal=false")
        key, val = part.split("=", 1)
        out[key.strip()] = _value(val.strip())
    return out


def format_ints(value) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return f"{value['start']}:{value['stop']}" + (f":{value['step']}" if value.get("step", 1) != 1 else "")
    return ", ".join(str(x) for x in value)


def parse_ints(text: str, path: str):
    """'0, 1, 2' -> [0, 1, 2]; '0:12:2' -> {"start": 0, "stop": 12, "step": 2}; '' -> None."""
    text = text.strip()
    if not text:
        return None
    try:
        if text.startswith(("[", "{")):
            return json.loads(text)
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            start, stop = parts[0] or 0, parts[1]
            step = parts[2] if len(parts) > 2 and parts[2] is not None else 1
            return {"start": start, "stop": stop, "step": step}
        return [int(p) for p in text.replace(" ", ",").split(",") if p.strip()]
    except (ValueError, json.JSONDecodeError, IndexError):
        raise SpecError(path, f"'{text}' is not like 0, 1, 2 or start:stop[:step]") from None


def format_selector(sel) -> str:
    return sel if isinstance(sel, str) else ", ".join(sel)


def parse_selector(text: str):
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items:
        return "*"
    return items[0] if len(items) == 1 else items


def format_text(text) -> str:
    if text is None:
        return ""
    return text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)


def parse_text(text: str):
    if text.startswith("["):
        try:
            data = json.loads(text)
            if isinstance(data, list) and all(isinstance(t, str) for t in data):
                return data
        except json.JSONDecodeError:
            pass
    return text


def _step_params(step: dict, structural) -> dict:
    return {k: v for k, v in step.items() if k not in structural}


def spec_to_tables(spec) -> dict:
    """{"segments": rows, "rules": rows, "overlays": rows, "scheme": str, "position_params": str}."""
    data = spec.to_dict() if isinstance(spec, Spec) else spec
    segs = [[s["name"], s["modality"], format_size(s), s.get("branch", ""), ", ".join(s.get("role", [])),
             format_text(s.get("text"))] for s in data["segments"]]
    mask = data["mask"]
    base = mask["base"]
    rules = [["base", "*", "*", base["pattern"], format_params(_step_params(base, ("pattern",))), "", ""]]
    structural = ("pattern", "op", "q", "k", "layers", "heads")
    for r in mask.get("rules", []):
        rules.append(["rule", format_selector(r["q"]), format_selector(r["k"]), r["pattern"],
                      format_params(_step_params(r, structural)), format_ints(r.get("layers")),
                      format_ints(r.get("heads"))])
    overlays = [[o.get("op", "or"), format_selector(o["q"]), format_selector(o["k"]), o["pattern"],
                 format_params(_step_params(o, structural)), format_ints(o.get("layers")),
                 format_ints(o.get("heads"))] for o in mask.get("overlays", [])]
    pos = data["positions"]
    return {"segments": segs, "rules": rules, "overlays": overlays, "scheme": pos["scheme"],
            "position_params": format_params({k: v for k, v in pos.items() if k != "scheme"})}


def _pad(row: list[str], n: int) -> list[str]:
    return (list(row) + [""] * n)[:n]


def tables_to_spec_dict(old: dict, segments_rows, rules_rows, overlays_rows, positions) -> dict:
    """Build a raw spec dict from edited tables (validated later by Spec.load). Top-level metadata,
    mask.cross and checks come from `old`; unchanged rows keep their exact old JSON."""
    before = spec_to_tables(old)
    data = {k: copy.deepcopy(v) for k, v in old.items() if k not in ("segments", "mask", "positions")}

    segs = []
    old_segs = {s["name"]: s for s in old["segments"]}
    old_seg_rows = {tuple(r): old_segs[r[0]] for r in before["segments"]}
    for i, row in enumerate(_rows(segments_rows)):
        row = _pad(row, len(SEGMENT_COLUMNS))
        if tuple(row) in old_seg_rows:
            segs.append(copy.deepcopy(old_seg_rows[tuple(row)]))
            continue
        name, modality, size, branch, roles, text = row
        path = f"segments[{i}]"
        seg: dict = {"name": name, "modality": modality or "text"}
        seg.update(parse_size(size, f"{path}.size"))
        if branch:
            seg["branch"] = branch
        if roles:
            seg["role"] = [r.strip() for r in roles.split(",") if r.strip()]
        if text:
            seg["text"] = parse_text(text)
        prev = old_segs.get(name)
        if prev and "attrs" in prev:
            seg["attrs"] = copy.deepcopy(prev["attrs"])
        segs.append(seg)
    data["segments"] = segs

    mask: dict = {}
    old_rules = {tuple(r): s for r, s in zip(before["rules"][1:], old["mask"].get("rules", []))}
    rules = []
    for i, row in enumerate(_rows(rules_rows)):
        row = _pad(row, len(RULE_COLUMNS))
        kind = (row[0] or "rule").lower()
        if kind == "base":
            if "base" in mask:
                raise SpecError("mask.base", "the rules table has two 'base' rows; keep one")
            mask["base"] = {"pattern": row[3], **parse_params(row[4], "mask.base")}
            continue
        if kind != "rule":
            raise SpecError(f"mask.rules[{len(rules)}]", f"kind '{row[0]}' should be 'base' or 'rule'")
        if tuple(row) in old_rules:
            rules.append(copy.deepcopy(old_rules[tuple(row)]))
            continue
        rules.append(_table_step(row[1:], f"mask.rules[{len(rules)}]"))
    mask.setdefault("base", {"pattern": "causal"})
    mask["rules"] = rules
    old_ov = {tuple(r): s for r, s in zip(before["overlays"], old["mask"].get("overlays", []))}
    overlays = []
    for i, row in enumerate(_rows(overlays_rows)):
        row = _pad(row, len(OVERLAY_COLUMNS))
        if tuple(row) in old_ov:
            overlays.append(copy.deepcopy(old_ov[tuple(row)]))
            continue
        step = _table_step(row[1:], f"mask.overlays[{i}]")
        step["op"] = row[0] or "or"
        overlays.append(step)
    mask["overlays"] = overlays
    if "cross" in old["mask"]:
        mask["cross"] = copy.deepcopy(old["mask"]["cross"])
    data["mask"] = mask
    data["positions"] = _positions_value(positions, old)
    return data


def _table_step(cells: list[str], path: str) -> dict:
    q, k, pattern, params, layers, heads = cells
    step: dict = {"q": parse_selector(q), "k": parse_selector(k), "pattern": pattern}
    step.update(parse_params(params, path))
    for key, text in (("layers", layers), ("heads", heads)):
        val = parse_ints(text, f"{path}.{key}")
        if val is not None:
            step[key] = val
    return step


def _positions_value(positions, old: dict) -> dict:
    """positions: a dict, a scheme name, or (scheme, "param=value, ...")."""
    if positions is None:
        return copy.deepcopy(old["positions"])
    if isinstance(positions, dict):
        return positions
    if isinstance(positions, str):
        positions = (positions, "")
    scheme, params = positions
    scheme = (scheme or "sequential").strip()
    out = {"scheme": scheme}
    out.update(parse_params(params or "", "positions"))
    return out


def apply_table_edit(state: dict, segments_rows, rules_rows, overlays_rows, positions=None) -> tuple[dict, str]:
    return _try(state, lambda: Spec.load(tables_to_spec_dict(state["spec"], segments_rows, rules_rows,
                                                             overlays_rows, positions)))


# ================================================================= pictures
_CACHE: "OrderedDict[str, Any]" = OrderedDict()
_CACHE_MAX = 600
_LOCK = threading.Lock()
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="maskstudio-render")


def _cached(key: str, make: Callable[[], Any]):
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    value = make()
    with _LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return value


def _digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def figure_png(fig, path: str | None = None, dpi: int = DPI) -> str:
    """Draw a matplotlib Figure to a PNG file (fast zlib level) and free it; returns the path."""
    from PIL import Image

    fig.set_dpi(dpi)
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    path = path or os.path.join(_WORKDIR, f"{uuid.uuid4().hex}.png")
    Image.fromarray(arr).save(path, "PNG", compress_level=1)
    return path


def tokenizer_at_hand():
    """The tokenizer of a text model this process has already loaded (never loads one)."""
    from . import runner

    for lm in list(runner._MODELS.values()):
        if lm.tokenizer is not None and not getattr(lm, "family", None):
            return lm.tokenizer
    return None


def picture_spec(spec: Spec) -> tuple[Spec, str]:
    """A sized spec for pictures: text-only segments are sized by the loaded model's tokenizer when
    one is at hand (exactly what a run will do), else estimated from their word count."""
    missing = spec.unsized_segments()
    if not missing:
        return spec, ""
    data = spec.to_dict()
    tok = tokenizer_at_hand()
    if tok is not None:
        from .runner import RunError, size_by_tokenizer

        try:
            for seg in data["segments"]:
                if segment_size(seg) is None:
                    size_by_tokenizer(seg, tok, [], spec)
            return Spec.load(data), f"sizes of {', '.join(missing)} come from the loaded model's tokenizer"
        except (RunError, SpecError):
            data = spec.to_dict()
    for seg in data["segments"]:
        if segment_size(seg) is None:
            text = seg["text"] if isinstance(seg["text"], str) else " ".join(seg["text"])
            seg["length"] = max(1, round(len(text.split()) * 1.3))
    return Spec.load(data), (f"sizes of {', '.join(missing)} are estimated from their text for the "
                             f"pictures; a run sizes them with the model's tokenizer")


def view_options(spec: Spec, options: dict | None = None) -> dict:
    """Fill and clamp the picture options: layer, head, reach_layers, reach_token, query, flow_level."""
    from .flow import default_layers

    o = dict(options or {})
    o["layer"] = max(0, int(o.get("layer") or 0))
    o["head"] = max(0, int(o.get("head") or 0))
    o["reach_layers"] = max(1, min(64, int(o.get("reach_layers") or default_layers(spec))))
    o["reach_token"] = parse_token(spec, o.get("reach_token"))
    names = [s["name"] for s in spec.segments]
    o["query"] = o.get("query") if o.get("query") in names else None
    o["flow_level"] = o.get("flow_level") if o.get("flow_level") in ("segment", "frame", "token") else "segment"
    if o["flow_level"] == "token" and spec.n > 256:
        o["flow_level"] = "segment"
    tok = tokenizer_at_hand() if spec.n <= 64 and any("text" in seg for seg in spec.segments) else None
    o["token_labels"] = _token_labels(spec, tok) if tok is not None else None
    return o


def _token_labels(spec: Spec, tok) -> list[str] | None:
    """The real tokens as mask labels (small layouts with text, once a model is loaded)."""
    from .viz import _default_labels

    return _default_labels(spec, tok)


def parse_token(spec: Spec, text) -> int:
    """'12' -> token 12; 'answer' -> the last token of segment answer; 'answer[3]' -> its 4th token;
    '' / None -> the last token. Out-of-range indices are clamped."""
    t = spec.table
    n = t.n
    if text is None or (isinstance(text, str) and not text.strip()):
        return n - 1
    if isinstance(text, (int, float)):
        return int(min(max(int(text), 0), n - 1))
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        i = int(text)
        return min(max(i if i >= 0 else n + i, 0), n - 1)
    m = re.fullmatch(r"(.+?)(?:\[(-?\d+)\])?", text)
    name, local = m.group(1).strip(), m.group(2)
    if name not in t.names:
        from .spec import did_you_mean
        raise SpecError("reach.token", f"no segment named '{name}'{did_you_mean(name, t.names)}")
    s = t.names.index(name)
    size = t.sizes[s]
    j = size - 1 if local is None else int(local)
    j = j if j >= 0 else size + j
    return t.starts[s] + min(max(j, 0), size - 1)


def _view_key(spec: Spec, view: str, o: dict) -> str:
    data = spec.to_dict()
    layout = {"segments": data["segments"], "positions": data["positions"]}
    for k in ("name",):
        layout[k] = data.get(k)
    if view == "positions":
        return _digest(view, layout)
    if view == "distance":
        return _digest(view, layout, o["query"])
    if view == "mask":
        return _digest(view, data, o["layer"], o["head"], o.get("token_labels"))
    if view == "flow":
        return _digest(view, data, o["layer"], o["head"], o["flow_level"])
    return _digest(view, data, o["head"], o["reach_layers"], o["reach_token"])


def _draw(spec: Spec, view: str, o: dict, path: str) -> str:
    """Draw one view to `path` (runs in a render worker process or a thread)."""
    from . import viz

    kw: dict = {}
    if view == "mask":
        kw = dict(layer=o["layer"], head=o["head"], token_labels=o.get("token_labels"))
    elif view == "distance":
        kw = dict(query=o["query"])
    elif view == "flow":
        kw = dict(layer=o["layer"], head=o["head"], level=o["flow_level"])
        if o["flow_level"] == "segment":
            kw["analysis"] = analysis_for(spec, o["layer"], o["head"])
    elif view == "reach":
        kw = dict(head=o["head"], layers=o["reach_layers"], token=o["reach_token"])
    return figure_png(viz.render(spec, view, **kw), path)


def _draw_job(data: dict, view: str, o: dict, path: str) -> str:
    return _draw(Spec(data), view, o, path)


def _warm_job() -> int:
    """Imports, fonts and the first Agg draw, so the first real picture is not slow."""
    _draw(Spec.load(BLANK), "mask", view_options(Spec.load(BLANK)), os.path.join(_WORKDIR, "warm.png"))
    return os.getpid()


_PROCS = None
_PROCS_LOCK = threading.Lock()


def _watch_parent(parent: int) -> None:
    """Render worker initializer: exit when the app process is gone (even after SIGKILL), so no
    worker outlives the app."""
    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)
    threading.Thread(target=watch, daemon=True, name="maskstudio-parent-watch").start()


def render_processes() -> int:
    """Worker processes for pictures (matplotlib holds the GIL, so threads do not draw in
    parallel). 0 (the library default) draws in threads of this process; app.py asks for
    min(2, cores). Processes are spawned, so the main script needs `if __name__ == "__main__"`."""
    return int(os.environ.get("MASKSTUDIO_RENDER_PROCESSES", "0"))


def _process_pool():
    global _PROCS
    if render_processes() <= 0:
        return None
    with _PROCS_LOCK:
        if _PROCS is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            _PROCS = ProcessPoolExecutor(max_workers=render_processes(), mp_context=mp.get_context("spawn"),
                                         initializer=_watch_parent, initargs=(os.getpid(),))
            import atexit

            atexit.register(_PROCS.shutdown, wait=False, cancel_futures=True)
        return _PROCS


def warm_up() -> list[int]:
    """Start the render workers and draw once in each (call at app start)."""
    pool = _process_pool()
    if pool is None:
        _warm_job()
        return [os.getpid()]
    return [f.result() for f in [pool.submit(_warm_job) for _ in range(render_processes())]]


def _png_key(spec: Spec, view: str, o: dict) -> tuple[str, str]:
    key = _view_key(spec, view, o)
    return "png:" + key, os.path.join(_WORKDIR, f"{view}-{key}.png")


def _lookup(key: str, path: str) -> str | None:
    with _LOCK:
        if key in _CACHE and os.path.exists(_CACHE[key]):
            _CACHE.move_to_end(key)
            return _CACHE[key]
    return None


def _store(key: str, path: str) -> str:
    with _LOCK:
        _CACHE[key] = path
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return path


def analysis_for(spec: Spec, layer: int = 0, head: int = 0):
    from .analysis import analyze
    from .flow import ANALYSIS_DENSE_LIMIT

    return _cached("an:" + _digest(spec.to_dict(), layer, head),
                   lambda: analyze(spec, layer=layer, head=head, dense_limit=ANALYSIS_DENSE_LIMIT))


def check_text(spec: Spec, layer: int = 0, head: int = 0) -> str:
    """The checks report: density, empty rows, leaks, KV-cache compatibility, block sparsity, FLOPs."""
    spec, note = picture_spec(spec)
    text = f"{spec.name}\n\n{analysis_for(spec, layer, head).summary()}"
    return text + (f"\n\nnote: {note}" if note else "")


def density_rows(spec: Spec, layer: int = 0, head: int = 0) -> dict:
    """The segment density table (rows = query segment, columns = key segment) for a Dataframe."""
    spec, _ = picture_spec(spec)
    a = analysis_for(spec, layer, head)
    rows = [[name] + [round(v, 3) for v in row] for name, row in zip(a.names, a.segment_density.tolist())]
    return {"headers": ["q \\ k"] + list(a.names), "data": rows}


def render_views(spec: Spec, options: dict | None = None, views=VIEWS, parallel: bool = True) -> dict:
    """Every picture of a design plus the checks: {"mask": png path, ..., "checks": text,
    "density": {"headers", "data"}, "note": text, "options": the clamped options}.
    Views not drawn before are drawn in parallel (render worker processes, else threads) while
    this thread computes the checks."""
    spec, note = picture_spec(spec)
    o = view_options(spec, options)
    out: dict = {"note": note, "options": o}
    todo = {}
    for v in sorted(views, key=lambda v: DRAW_ORDER.index(v) if v in DRAW_ORDER else 99):
        key, path = _png_key(spec, v, o)
        hit = _lookup(key, path)
        if hit:
            out[v] = hit
        else:
            todo[v] = (key, path)
    pool = _process_pool() if parallel and todo else None
    if parallel and todo:
        data = spec.to_dict()
        futures = {v: (pool.submit(_draw_job, data, v, o, path) if pool is not None
                       else _POOL.submit(_draw, spec, v, o, path)) for v, (key, path) in todo.items()}
    out["checks"] = check_text(spec, o["layer"], o["head"])
    out["density"] = density_rows(spec, o["layer"], o["head"])
    for v, (key, path) in todo.items():
        try:
            drawn = futures[v].result() if parallel else _draw(spec, v, o, path)
        except BrokenProcessPool:  # a worker died (killed, out of memory): draw here, start afresh
            _reset_pool()
            drawn = _draw(spec, v, o, path)
        out[v] = _store(key, drawn)
    return out


def _reset_pool() -> None:
    global _PROCS
    with _PROCS_LOCK:
        if _PROCS is not None:
            _PROCS.shutdown(wait=False, cancel_futures=True)
        _PROCS = None


def controls(spec: Spec) -> dict:
    """What the pickers should offer for this design: whether the mask varies by layer/head, the
    layer/head ranges, the segment names (distance query, knockout, reach token)."""
    from .flow import default_layers
    from .spec import expand_int_list, _all_steps

    heads = [h for _, s in _all_steps(spec.mask) if "heads" in s for h in expand_int_list(s["heads"])]
    return {"varies_by_layer": spec.varies_by_layer, "varies_by_head": spec.varies_by_head,
            "layers": default_layers(spec), "heads": max(heads, default=0) + 2,
            "segments": [s["name"] for s in spec.segments]}


# ================================================================= export
def export_file(spec: Spec, fmt: str, layer: int = 0, head: int = 0) -> str:
    """Write one export to a fresh file named after the spec; returns its path.
    fmt: json | flex | npy | positions | png (a zip of every picture)."""
    from .export import export_bytes

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format '{fmt}'; use one of {', '.join(EXPORT_FORMATS)}")
    stem = re.sub(r"[^\w.-]+", "_", spec.name) or "spec"
    folder = os.path.join(_WORKDIR, "export", uuid.uuid4().hex[:12])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, stem + EXPORT_FORMATS[fmt])
    if fmt == "png":
        pics = render_views(spec, {"layer": layer, "head": head}, parallel=False)
        with zipfile.ZipFile(path, "w") as zf:
            for view in VIEWS:
                zf.write(pics[view], f"{stem}_{view}.png")
        return path
    if fmt in ("npy", "positions", "flex"):
        spec.require_sized()
    with open(path, "wb") as fh:
        fh.write(export_bytes(spec, fmt, layer=layer, head=head))
    return path


# ================================================================= model runs
_RUNS: "OrderedDict[str, Any]" = OrderedDict()
_RUNS_MAX = 16


def _keep_run(result) -> str:
    key = uuid.uuid4().hex
    with _LOCK:
        _RUNS[key] = result
        while len(_RUNS) > _RUNS_MAX:
            _RUNS.popitem(last=False)
    return key


def get_run(state: dict):
    key = state.get("run_id") if state else None
    with _LOCK:
        return _RUNS.get(key) if key else None


def model_name(model_id) -> str | None:
    model_id = (model_id or "").strip()
    return None if model_id.lower() in ("", "default", "embedded", "smollm2") else model_id


def _progress_adapter(progress):
    if progress is None:
        return None

    def say(fraction, message):
        try:
            progress(fraction, desc=message)
        except TypeError:
            progress(fraction, message)
    return say


def _backend() -> str | None:
    """Eager under ZeroGPU (no torch.compile there); else the runner's choice."""
    import importlib.util

    return "eager" if importlib.util.find_spec("spaces") is not None else None


def assign_images(spec: Spec, files) -> tuple[dict, list[str]]:
    """Uploaded files -> {image/video segment name: path or [paths]}, plus one line per segment.

    A file whose name starts with a segment's name (`img.png`, `clip_03.jpg`, `clip-3.png`) goes to
    that segment; the rest go in upload order: one to each image segment still without one, then
    shared evenly (in order) by the video segments still without frames."""
    paths = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "name", str(f)))
             for f in (files or [])]
    visual = [s for s in spec.segments if s["modality"] in GRID_DIMS]
    got: dict[str, list[str]] = {s["name"]: [] for s in visual}
    rest = []
    for path in paths:
        base = os.path.basename(path)
        stem = os.path.splitext(base)[0]
        hit = max((n for n in got if stem == n or re.match(re.escape(n) + r"[_\-. ]", base)), key=len, default=None)
        (got[hit] if hit else rest).append(path)
    for s in visual:
        if s["modality"] == "image" and not got[s["name"]] and rest:
            got[s["name"]].append(rest.pop(0))
    videos = [s["name"] for s in visual if s["modality"] == "video" and not got[s["name"]]]
    for i, name in enumerate(videos):
        share = len(rest) // (len(videos) - i) if len(videos) - i else 0
        got[name], rest = rest[:share], rest[share:]
    lines = [f"{name}: {', '.join(os.path.basename(p) for p in ps) if ps else 'no upload (test pattern)'}"
             for name, ps in got.items()]
    if rest:
        lines.append(f"unused uploads: {', '.join(os.path.basename(p) for p in rest)}")
    images = {name: (ps[0] if len(ps) == 1 and next(s for s in visual if s['name'] == name)['modality'] == 'image'
                     else ps) for name, ps in got.items() if ps}
    return images, lines


def run_model(state: dict, model_id: str = "", max_new_tokens: int = 0, progress=None,
              texts: dict | None = None, images=None) -> tuple[dict, dict]:
    """Run the current design on a model. Returns (state with run_id, outputs) where outputs has
    "error" ("" when fine), "summary", "tokens" (rows), "top_k" (rows), "continuation",
    "nll" (text) and pictures "attention", "mass", "curves", "rollout" (PNG paths or None).
    `images`: uploaded files for image/video segments (see `assign_images`), for VLM runs."""
    from .runner import RunError, run

    spec = current(state)
    if texts:
        data = spec.to_dict()
        for seg in data["segments"]:
            if seg["name"] in texts and texts[seg["name"]] is not None:
                seg["text"] = texts[seg["name"]]
                if seg["modality"] not in GRID_DIMS:
                    seg.pop("length", None)
                    seg.pop("frames", None)
        spec = Spec.load(data)
    say = _progress_adapter(progress)
    try:
        kw = {"backend": _backend()} if _backend() else {}
        if images:
            kw["images"], placed = assign_images(spec, images)
        result = run(spec, model=model_name(model_id), max_new_tokens=int(max_new_tokens or 0),
                     attentions=True, progress=say, **kw)
        if images:
            result.notes.extend(f"upload -> {line}" for line in placed)
    except (RunError, SpecError, ValueError, OSError) as err:
        return state, {"error": _one_line(err)}
    new = dict(state)
    new["run_id"] = _keep_run(result)
    out = run_outputs(result)
    return new, out


def run_outputs(result, layer=None, head="mean") -> dict:
    tokens = [[name, len(toks), "".join(toks)] for name, toks in result.tokens.items()]
    top = [[json.dumps(t, ensure_ascii=False), round(p, 4)] for t, p in result.top_k]
    nll = "\n".join(f"{name}: {t['mean']:.4f} nats/token over {t['tokens']} tokens (perplexity "
                    f"{math.exp(t['mean']):.2f})" for name, t in result.target_nll.items()) \
        or "no segment has role 'target'"
    out = {"error": "", "summary": result.summary(), "tokens": tokens, "top_k": top,
           "continuation": result.text, "nll": nll, "notes": "\n".join(result.notes),
           "layers": int(result.attentions.shape[0]) if result.attentions is not None else 0,
           "heads": int(result.attentions.shape[1]) if result.attentions is not None else 0}
    out["attention"] = attention_picture(result, layer, head)
    out["mass"] = mass_picture(result)
    out["curves"] = mass_curves_picture(result)
    out["rollout"] = rollout_picture(result)
    return out


def _new_fig(size):
    from .viz import new_figure

    return new_figure(size)


def _seg_ticks(ax, layout, n, axis="both"):
    t = layout.table
    mids = [s + z / 2 for s, z in zip(t.starts, t.sizes)]
    for start in t.starts[1:]:
        if axis in ("both", "x"):
            ax.axvline(start - 0.5, color="#9aa5b8", lw=0.6)
        if axis in ("both", "y"):
            ax.axhline(start - 0.5, color="#9aa5b8", lw=0.6)
    if axis in ("both", "x"):
        ax.set_xticks([m - 0.5 for m in mids])
        ax.set_xticklabels(t.names, rotation=60, fontsize=7, ha="right")
    if axis in ("both", "y"):
        ax.set_yticks([m - 0.5 for m in mids])
        ax.set_yticklabels(t.names, fontsize=7)


def attention_picture(result, layer=None, head="mean") -> str | None:
    """Attention probabilities of one layer (default: the last) for one head or the head mean."""
    if result.attentions is None:
        return None
    att = result.attentions
    L, H = att.shape[0], att.shape[1]
    layer = L - 1 if layer is None or layer == "" else min(max(int(layer), 0), L - 1)
    if head in (None, "", "mean"):
        m, which = att[layer].float().mean(0), "mean over heads"
    else:
        h = min(max(int(head), 0), H - 1)
        m, which = att[layer, h].float(), f"head {h}"
    fig = _new_fig((7.5, 6.5))
    ax = fig.add_subplot(111)
    img = ax.imshow(m.numpy() ** 0.5, cmap="magma", interpolation="nearest", vmin=0, vmax=1)
    _seg_ticks(ax, result.layout, m.shape[0])
    ax.set_xlabel("key token", fontsize=8)
    ax.set_ylabel("query token", fontsize=8)
    ax.set_title(f"{result.model}: attention, layer {layer}, {which} (sqrt scale)", fontsize=9)
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return figure_png(fig)


def mass_picture(result, layer=None) -> str | None:
    """Segment-mass heatmap (rows = query segment, cols = key segment) at one layer (default last)."""
    if result.segment_mass is None:
        return None
    mass = result.segment_mass
    layer = mass.shape[0] - 1 if layer is None else layer
    return _heat(mass[layer].numpy(), result.segment_names,
                 f"attention mass per segment pair, layer {layer} (rows: query, cols: key)", "viridis", 0, 1)


def _heat(m, names, title, cmap, vmin, vmax) -> str:
    fig = _new_fig((6.5, 5.5))
    ax = fig.add_subplot(111)
    img = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(m[i, j]) < 0.6 * max(abs(vmin), abs(vmax)) else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return figure_png(fig)


def mass_curves_picture(result) -> str | None:
    """Per-layer curves: for the last segment's queries, the mass on each key segment by layer."""
    if result.segment_mass is None:
        return None
    from .viz import segment_colors

    mass = result.segment_mass
    names = result.segment_names
    q = len(names) - 1
    fig = _new_fig((8, 4.2))
    ax = fig.add_subplot(111)
    colors = segment_colors(result.layout)
    for k, name in enumerate(names):
        ax.plot(range(mass.shape[0]), mass[:, q, k].numpy(), marker=".", color=colors[k], label=name)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("attention mass", fontsize=8)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=min(4, len(names)))
    ax.set_title(f"where '{names[q]}' reads from, layer by layer", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def rollout_picture(result) -> str | None:
    if result.rollout is None:
        return None
    fig = _new_fig((7.5, 6.5))
    ax = fig.add_subplot(111)
    m = result.rollout.numpy()
    rest = m[:, 1:] if m.shape[1] > 1 else m  # the first token is usually an attention sink
    vmax = float(np.quantile(rest, 0.99)) if rest.size else 1.0
    img = ax.imshow(m, cmap="magma", interpolation="nearest", vmin=0, vmax=max(vmax, 1e-6))
    _seg_ticks(ax, result.layout, result.rollout.shape[0])
    ax.set_title("attention rollout through all layers (colour clipped at the 99th percentile "
                 "of non-first tokens)", fontsize=9)
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return figure_png(fig)


def attention_for_state(state: dict, layer=None, head="mean") -> str | None:
    result = get_run(state)
    return attention_picture(result, layer, head) if result is not None else None


def overlay_pictures(result, layer=None, head="mean", query="", segment="") -> tuple[str | None, str | None, str]:
    """VLM runs: (attention of one query token over the image/video, heat overlay PNG; per-layer share
    of attention to visual tokens PNG; error line). Text runs: (None, None, "")."""
    from . import vlm

    if result is None or result.attentions is None or not getattr(result, "visuals", None):
        return None, None, ""
    L, H = result.attentions.shape[:2]
    try:
        q = parse_token(result.layout, query)
        lay = L - 1 if layer in (None, "") else min(max(int(layer), 0), L - 1)
        hd = None if head in (None, "", "mean") else min(max(int(head), 0), H - 1)
        overlay = figure_png(vlm.image_overlay(result, (segment or "").strip() or None, q, lay, hd))
        _, share = vlm.visual_share(result, q)
        return overlay, figure_png(share), ""
    except (SpecError, ValueError) as err:
        return None, None, _one_line(err)


def overlay_for_state(state: dict, layer=None, head="mean", query="", segment="") -> tuple[str | None, str | None, str]:
    return overlay_pictures(get_run(state), layer, head, query, segment)


def knockout_sweep(state: dict, q: str, k: str, window: int = 3, model_id: str = "",
                   progress=None) -> dict:
    """Block q -> k in a sliding window of layers; {"error", "summary", "curve" (PNG)}."""
    from .runner import RunError, knockout, load_model

    try:
        lm = load_model(model_name(model_id), progress=_progress_adapter(progress))
        kw = {"backend": _backend()} if _backend() else {}
        ko = knockout(current(state), q or "*", k, window=int(window or 3), model=lm, **kw)
    except (RunError, SpecError, ValueError, OSError) as err:
        return {"error": _one_line(err), "summary": "", "curve": None}
    fig = _new_fig((8, 4))
    ax = fig.add_subplot(111)
    mids = [(a + b) / 2 for a, b in ko.windows]
    ax.plot(mids, ko.probs, marker="o", color="#c8424a", label="edge blocked")
    ax.axhline(ko.base_prob, color="#1f2a44", ls="--", label="intact")
    ax.set_xlabel(f"layer window centre (window {ko.window})", fontsize=8)
    ax.set_ylabel(f"p({ko.token!r})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"knockout {ko.q} -> {ko.k}", fontsize=9)
    fig.tight_layout()
    return {"error": "", "summary": ko.summary(), "curve": figure_png(fig)}


# ================================================================= compare
def spec_b(state: dict, choice: str) -> Spec:
    """Design B: "snapshot" (the kept snapshot) or a preset name."""
    if not choice or choice == "snapshot":
        if not state.get("snapshot"):
            raise SpecError("compare", "no snapshot kept yet; press 'Keep snapshot as B' or pick a preset")
        return Spec.load(state["snapshot"])
    from .presets import load_preset

    return load_preset(choice)


def compare_static(state: dict, choice: str = "snapshot") -> dict:
    """No model: both check reports and a picture of where the masks differ (same token count)."""
    try:
        a, b = current(state), spec_b(state, choice)
        a, _ = picture_spec(a)
        b, _ = picture_spec(b)
    except SpecError as err:
        return {"error": _one_line(err), "summary": "", "diff": None}
    ta, tb = analysis_for(a).summary().splitlines(), analysis_for(b).summary().splitlines()
    width = max(len(x) for x in ta) + 2
    lines = [f"{'A: ' + a.name:<{width}}| B: {b.name}", "-" * (width + 20)]
    for i in range(max(len(ta), len(tb))):
        la = ta[i] if i < len(ta) else ""
        lb = tb[i] if i < len(tb) else ""
        lines.append(f"{la:<{width}}| {lb}")
    diff = None
    if a.n == b.n and a.n <= 4096:
        ma, mb = a.dense_mask(), b.dense_mask()
        rgb = np.full((a.n, a.n, 3), 255, np.uint8)
        rgb[(ma & mb).numpy()] = (31, 42, 68)
        rgb[(ma & ~mb).numpy()] = (59, 111, 182)
        rgb[(~ma & mb).numpy()] = (200, 66, 74)
        fig = _new_fig((7, 6.5))
        ax = fig.add_subplot(111)
        ax.imshow(rgb, interpolation="nearest")
        _seg_ticks(ax, a, a.n)
        changed = int((ma ^ mb).sum())
        ax.set_title(f"A vs B: dark = both, blue = only A, red = only B  ({changed} pairs differ)", fontsize=9)
        fig.tight_layout()
        diff = figure_png(fig)
    else:
        lines.append(f"\n(no mask difference picture: A has {a.n} tokens, B has {b.n})")
    return {"error": "", "summary": "\n".join(lines), "diff": diff}


def compare_runs(state: dict, choice: str = "snapshot", model_id: str = "", max_new_tokens: int = 0,
                 progress=None) -> dict:
    """A vs B on a model: outputs, KL per position, segment-mass difference."""
    from .runner import RunError, compare, load_model

    try:
        b = spec_b(state, choice)
        lm = load_model(model_name(model_id), progress=_progress_adapter(progress))
        kw = {"backend": _backend()} if _backend() else {}
        cmp = compare(current(state), b, model=lm, max_new_tokens=int(max_new_tokens or 0), **kw)
    except (RunError, SpecError, ValueError, OSError) as err:
        return {"error": _one_line(err), "summary": "", "kl": None, "mass_diff": None}
    fig = _new_fig((9, 3.8))
    ax = fig.add_subplot(111)
    ax.bar(range(len(cmp.kl)), cmp.kl.numpy(), color="#c8424a", width=1.0)
    _seg_ticks(ax, cmp.a.layout, len(cmp.kl), axis="x")
    ax.set_ylabel("KL(A || B)", fontsize=8)
    ax.set_title("next-token KL divergence per position", fontsize=9)
    fig.tight_layout()
    kl = figure_png(fig)
    md = None
    if cmp.mass_diff is not None:
        m = cmp.mass_diff[-1].numpy()
        lim = max(float(np.abs(m).max()), 1e-6)
        md = _heat(m, cmp.a.segment_names, "segment mass B - A, last layer", "RdBu_r", -lim, lim)
    return {"error": "", "summary": cmp.summary(), "kl": kl, "mass_diff": md}


# ================================================================= timing helper
def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0
