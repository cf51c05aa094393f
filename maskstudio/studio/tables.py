"""The table codec: a spec <-> the segments, rules and overlays tables the app edits.

Tables are lists of string rows (what a gr.Dataframe edits). Sizes are written `12`, `24x24`,
`8x16x16` or `4+4+4` (frames); roles and selectors as `a, b`; pattern parameters as
`size=4, causal=false` (or a JSON object); layers and heads as `0, 1, 2` or `start:stop[:step]`.
A table row that is unchanged keeps its exact previous JSON (so per-token attrs, one-name selector
lists and the like survive a table edit). Parse errors are SpecErrors naming the cell's JSON path;
apply_table_edit turns them into the one-line error of an edit, like every other edit (state.attempt).
Token references (`12`, `answer`, `answer[3]`) are parsed here too (resolve_token: a clamped index is said).
"""
from __future__ import annotations

import copy
import json
import math
import re

from ..errors import SpecError, did_you_mean
from ..patterns import PATTERNS
from ..segments import MODALITIES, OVERLAY_OPS
from ..spec import Spec
from .state import attempt, renamed_if_edited

TABLES_HELP = (f"<small>**Segments**: modality {' / '.join(MODALITIES)}; size `12`, `24x24`, `8x16x16` or `4+4+4` "
               f"(frames); roles `a, b`. **Rules**: one `base` row, then rules (last match wins). **Overlays**: op "
               f"{' / '.join(OVERLAY_OPS)}. Click a cell and type to replace it (double-click to edit inside it); Enter "
               f"applies, Escape cancels.</small>",
               f"<small>patterns: {', '.join(PATTERNS)}. Parameters as `size=4, causal=false`; layers/heads as "
               f"`0, 1` or `0:12:2`.</small>")

TEXT_EDITOR_HELP = "the segment's text, multi-line (click a segment's row to edit it here; click outside to apply)"
SEGMENT_COLUMNS = ["name", "modality", "size", "branch", "roles", "text"]
TEXT_COLUMN = SEGMENT_COLUMNS.index("text")
RULE_COLUMNS = ["kind", "q", "k", "pattern", "params", "layers", "heads"]
OVERLAY_COLUMNS = ["op", "q", "k", "pattern", "params", "layers", "heads"]
STRUCTURAL = ("pattern", "op", "q", "k", "layers", "heads")  # rule keys that have their own column
_BARE = re.compile(r"^[A-Za-z_][\w:.\-]*$")


# ---------------------------------------------------------------- cells
def _cell(v, strip: bool = True) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip() if strip else str(v)


def rows_of(table, raw_columns=()) -> list[list[str]]:
    """Rows of a Dataframe value (list of lists, pandas DataFrame or {"data": ...}); blank rows dropped.
    Cells are stripped except in `raw_columns` (segment texts keep their leading spaces: " Paris" and
    "Paris" are different tokens)."""
    if table is None:
        return []
    if isinstance(table, dict):
        table = table.get("data", [])
    if hasattr(table, "values") and hasattr(table, "columns"):
        table = table.values.tolist()
    out = []
    for row in table:
        cells = [_cell(v, j not in raw_columns) for j, v in enumerate(row)]
        if any(c.strip() for c in cells):
            out.append(cells)
    return out


def _pad(row: list[str], n: int) -> list[str]:
    return (list(row) + [""] * n)[:n]


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


def resolve_token(spec: Spec, text, field: str = "token") -> tuple[int, str]:
    """(index, note) of a token reference: '12' -> token 12; 'answer' -> the last token of segment
    answer; 'answer[3]' -> its 4th token; '' / None -> the last token. An index past the design or
    past its segment (a segment that shrank since it was typed) gives the nearest token and a note
    saying so, so a token never moves silently. An unknown segment is a SpecError at `field` (the
    control's own name: 'reach token', 'focus token')."""
    t = spec.table
    n = t.n
    if text is None or (isinstance(text, str) and not text.strip()):
        return n - 1, ""
    if isinstance(text, (int, float)):
        text = str(int(text))
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        i = int(text)
        got = min(max(i if i >= 0 else n + i, 0), n - 1)
        moved = got != (i if i >= 0 else n + i)
        return got, (f"{field}: token {i} is outside this design's {n:,} tokens; showing token {got} "
                     f"({t.label(got)})" if moved else "")
    m = re.fullmatch(r"(.+?)(?:\[(-?\d+)\])?", text)
    name, local = m.group(1).strip(), m.group(2)
    if name not in t.names:
        raise SpecError(field, f"no segment named '{name}' in this design{did_you_mean(name, t.names)}")
    s = t.names.index(name)
    size = t.sizes[s]
    j = size - 1 if local is None else int(local)
    j = j if j >= 0 else size + j
    got = min(max(j, 0), size - 1)
    note = "" if got == j else (f"{field}: {name} has {size:,} tokens ({name}[0] to {name}[{size - 1}]), so "
                                f"{text} is not one; showing {name}[{got}]")
    return t.starts[s] + got, note


def parse_token(spec: Spec, text, field: str = "token") -> int:
    """The index of `resolve_token` (callers that show no note: out-of-range indices clamped)."""
    return resolve_token(spec, text, field)[0]


# ---------------------------------------------------------------- spec -> tables
def _step_params(step: dict, structural) -> dict:
    return {k: v for k, v in step.items() if k not in structural}


def _step_row(first: str, step: dict) -> list[str]:
    return [first, format_selector(step["q"]), format_selector(step["k"]), step["pattern"],
            format_params(_step_params(step, STRUCTURAL)), format_ints(step.get("layers")),
            format_ints(step.get("heads"))]


def spec_to_tables(spec) -> dict:
    """{"segments": rows, "rules": rows, "overlays": rows, "scheme": str, "position_params": str}.
    `spec`: a Spec or its canonical dict."""
    data = spec.to_dict() if isinstance(spec, Spec) else spec
    segs = [[s["name"], s["modality"], format_size(s), s.get("branch", ""), ", ".join(s.get("role", [])),
             format_text(s.get("text"))] for s in data["segments"]]
    mask = data["mask"]
    base = mask["base"]
    rules = [["base", "*", "*", base["pattern"], format_params(_step_params(base, ("pattern",))), "", ""]]
    rules += [_step_row("rule", r) for r in mask.get("rules", [])]
    overlays = [_step_row(o.get("op", "or"), o) for o in mask.get("overlays", [])]
    pos = data["positions"]
    return {"segments": segs, "rules": rules, "overlays": overlays, "scheme": pos["scheme"],
            "position_params": format_params({k: v for k, v in pos.items() if k != "scheme"})}


# ---------------------------------------------------------------- tables -> spec
def _segments_from_rows(old: dict, before: dict, segments_rows) -> list[dict]:
    segs = []
    old_segs = {s["name"]: s for s in old["segments"]}
    old_seg_rows = {tuple(r): old_segs[r[0]] for r in before["segments"]}
    for i, row in enumerate(rows_of(segments_rows, raw_columns=(TEXT_COLUMN,))):
        row = _pad(row, len(SEGMENT_COLUMNS))
        if tuple(row) in old_seg_rows:
            segs.append(copy.deepcopy(old_seg_rows[tuple(row)]))
            continue
        name, modality, size, branch, roles, text = row
        seg: dict = {"name": name, "modality": modality or "text"}
        seg.update(parse_size(size, f"segments[{i}].size"))
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
    return segs


def _table_step(cells: list[str], path: str, parsed: dict | None = None) -> dict:
    q, k, pattern, params, layers, heads = cells
    step: dict = {"q": parse_selector(q), "k": parse_selector(k), "pattern": pattern}
    step.update(parse_params(params, path) if parsed is None else parsed)
    for key, text in (("layers", layers), ("heads", heads)):
        val = parse_ints(text, f"{path}.{key}")
        if val is not None:
            step[key] = val
    return step


def _params_for(row: list[str], old_rows: list[list[str]], i: int, path: str) -> dict:
    """The params cell of row i; when only the pattern changed (the params cell is the old row's),
    the old pattern's parameters that the new pattern does not take are dropped."""
    from ..patterns import PATTERNS

    params = parse_params(row[4], path)
    old_row = old_rows[i] if i < len(old_rows) else None
    if old_row and row[3] != old_row[3] and row[4] == old_row[4] and row[3] in PATTERNS:
        params = {k: v for k, v in params.items() if k in PATTERNS[row[3]].params}
    return params


def _rules_from_rows(old: dict, before: dict, rules_rows, mask: dict) -> list[dict]:
    """The rules table: one 'base' row (into mask["base"]) and 'rule' rows."""
    old_rules = {tuple(r): s for r, s in zip(before["rules"][1:], old["mask"].get("rules", []))}
    rules = []
    for i, row in enumerate(rows_of(rules_rows)):
        row = _pad(row, len(RULE_COLUMNS))
        kind = (row[0] or "rule").lower()
        if kind == "base":
            if "base" in mask:
                raise SpecError("mask.base", "the rules table has two 'base' rows; keep one")
            mask["base"] = {"pattern": row[3], **_params_for(row, before["rules"], i, "mask.base")}
            continue
        if kind != "rule":
            raise SpecError(f"mask.rules[{len(rules)}]", f"kind '{row[0]}' should be 'base' or 'rule'")
        if tuple(row) in old_rules:
            rules.append(copy.deepcopy(old_rules[tuple(row)]))
            continue
        path = f"mask.rules[{len(rules)}]"
        rules.append(_table_step(row[1:], path, _params_for(row, before["rules"], i, path)))
    return rules


def _overlays_from_rows(old: dict, before: dict, overlays_rows) -> list[dict]:
    old_ov = {tuple(r): s for r, s in zip(before["overlays"], old["mask"].get("overlays", []))}
    overlays = []
    for i, row in enumerate(rows_of(overlays_rows)):
        row = _pad(row, len(OVERLAY_COLUMNS))
        if tuple(row) in old_ov:
            overlays.append(copy.deepcopy(old_ov[tuple(row)]))
            continue
        path = f"mask.overlays[{i}]"
        step = _table_step(row[1:], path, _params_for(row, before["overlays"], i, path))
        step["op"] = row[0] or "or"
        overlays.append(step)
    return overlays


def _positions_value(positions, old: dict) -> dict:
    """positions: a dict, a scheme name, or (scheme, "param=value, ...")."""
    if positions is None:
        return copy.deepcopy(old["positions"])
    if isinstance(positions, dict):
        return positions
    if isinstance(positions, str):
        positions = (positions, "")
    scheme, params = positions
    out = {"scheme": (scheme or "sequential").strip()}
    out.update(parse_params(params or "", "positions"))
    return out


def tables_to_spec_dict(old, segments_rows, rules_rows, overlays_rows, positions) -> dict:
    """Build a raw spec dict from edited tables (validated later by Spec.load). Top-level metadata,
    mask.cross and checks come from `old` (a Spec or its canonical dict); unchanged rows keep their
    exact old JSON."""
    old = old.to_dict() if isinstance(old, Spec) else old
    before = spec_to_tables(old)
    data = {k: copy.deepcopy(v) for k, v in old.items() if k not in ("segments", "mask", "positions")}
    data["segments"] = _segments_from_rows(old, before, segments_rows)
    mask: dict = {}
    rules = _rules_from_rows(old, before, rules_rows, mask)
    mask.setdefault("base", {"pattern": "causal"})
    mask["rules"] = rules
    mask["overlays"] = _overlays_from_rows(old, before, overlays_rows)
    if "cross" in old["mask"]:
        mask["cross"] = copy.deepcopy(old["mask"]["cross"])
    data["mask"] = mask
    data["positions"] = _positions_value(positions, old)
    return data


def apply_table_edit(state: dict, segments_rows, rules_rows, overlays_rows, positions=None) -> tuple[dict, str]:
    """The edited tables as the session's new design, or (state, error) unchanged on a bad cell.
    positions: a dict, a scheme name, or (scheme, "param=value, ...")."""
    return attempt(state, lambda: Spec.load(tables_to_spec_dict(state["spec"], segments_rows, rules_rows,
                                                                overlays_rows, positions)))


def _table_rows(kind: str, rows) -> list[int]:
    """1-based table row numbers of a table's JSON list items (the rules table: rule rows only)."""
    rows = rows_of(rows)
    if kind == "rules":
        return [i + 1 for i, r in enumerate(rows) if (r[0] or "rule").lower() != "base"]
    return [i + 1 for i in range(len(rows))]


def where_in_tables(error: str, segments_rows, rules_rows, overlays_rows) -> str:
    """An error's JSON path said as the table row the user sees: 'rules table, row 2 (mask.rules[0].k): ...'."""
    m = re.match(r"^(segments|mask\.rules|mask\.overlays)\[(\d+)\]", error)
    if m:
        kind = m.group(1).split(".")[-1]
        rows = _table_rows(kind, {"segments": segments_rows, "rules": rules_rows, "overlays": overlays_rows}[kind])
        i = int(m.group(2))
        if i < len(rows):
            return f"{kind} table, row {rows[i]} ({error.split(': ', 1)[0]}): {error.split(': ', 1)[-1]}"
    if error.startswith("mask.base"):
        base = [i + 1 for i, r in enumerate(rows_of(rules_rows)) if (r[0] or "").lower() == "base"]
        row = f"row {base[0]}" if base else "the base row"
        return f"rules table, {row} ({error.split(': ', 1)[0]}): {error.split(': ', 1)[-1]}"
    return error


def apply_tables(state: dict, segments_rows, rules_rows, overlays_rows, scheme, position_params) -> tuple[dict, str]:
    """The tables tab as the app sends it: three tables, the scheme and its parameters. Errors name
    the table row the user sees next to the JSON path."""
    old = state["spec"]
    new, error = apply_table_edit(state, segments_rows, rules_rows, overlays_rows, (scheme, position_params))
    if error:
        return new, where_in_tables(error, segments_rows, rules_rows, overlays_rows)
    new["spec"] = renamed_if_edited(old, new["spec"])
    return new, ""


def segment_text(state: dict, name) -> str:
    """The text cell of segment `name` as the multi-line editor shows it ('' for none or no such segment)."""
    rows = spec_to_tables(state["spec"])["segments"]
    return next((r[TEXT_COLUMN] for r in rows if r[0] == name), "")


def segment_pick(state: dict, row) -> tuple[str, str]:
    """A clicked segments-table row (its values) -> (segment name, its text) for the multi-line editor."""
    name = str(row[0]) if isinstance(row, (list, tuple)) and row else ""
    return name, segment_text(state, name)


def set_segment_text(state: dict, name, text) -> tuple[dict, str]:
    """The multi-line text editor: segment `name`'s text cell replaced by `text` (kept as typed,
    newlines and leading spaces too), applied like any table edit."""
    if not (name or "").strip():
        return state, "" if not (text or "").strip() else "text editor: click a segment's row first (its name goes there)"
    t = spec_to_tables(state["spec"])
    rows = [list(r) for r in t["segments"]]
    hit = [r for r in rows if r[0] == name.strip()]
    if not hit:
        return state, f"text editor: no segment named '{name}' in this design; pick one from the list"
    hit[0][TEXT_COLUMN] = "" if text is None else str(text)
    return apply_tables(state, rows, t["rules"], t["overlays"], t["scheme"], t["position_params"])


def tables_need_refresh(old: Spec, new: Spec) -> bool:
    """Whether a table edit changed rows beyond what the user typed (a pattern change dropped the
    old pattern's parameters), so the app sends the rules and overlays tables back."""
    def patterns(spec):
        m = spec.mask
        return [m["base"]] + list(m.get("rules", [])) + list(m.get("overlays", []))
    a, b = patterns(old), patterns(new)
    return len(a) == len(b) and any(x["pattern"] != y["pattern"] for x, y in zip(a, b))
