"""Spec v1: the declarative, versioned JSON that describes a layout, a mask and positions.

Loading validates everything and normalizes it into one canonical dict, so that
`Spec.load(spec.to_json()).to_json() == spec.to_json()`. Errors name the JSON path and
the fix. Nothing here executes user data: a spec only names patterns and numbers.
"""
from __future__ import annotations

import copy
import json
import os
import re
from functools import cached_property
from typing import Any

from . import knobs, patterns, positions, tiled
from .errors import MAX_INT, SpecError, check_keys as _check_keys, did_you_mean, is_int as _is_int, require as _require
from .segments import (GRID_DIMS, MODALITIES, OVERLAY_OPS, all_steps, layer_key, layer_sets,
                       resized_segments, resolve_selector, segment_size)
from .tokens import build_table


SCHEMA_VERSION = 1
DEFAULT_MAX_TOKENS = knobs.MAX_TOKENS

TOP_KEYS = ("maskstudio", "name", "group", "description", "citation", "url", "provenance", "segments", "mask",
            "positions", "checks")
SEGMENT_KEYS = ("name", "modality", "length", "grid", "frames", "branch", "role", "text",
                "attrs")
MASK_KEYS = ("base", "rules", "overlays", "cross")
CHECK_KEYS = ("allow_target_leaks",)
PROVENANCE_SOURCES = ("code", "paper", "inferred")
PROVENANCE_KEYS = ("source", "repo", "commit", "file", "function", "note")
SELECTION_KEYS = ("q", "k", "layers", "heads")
_ATTR_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate (JSON "\\ud800"): not text, cannot be written as UTF-8


# ---------------------------------------------------------------- segments
def _normalize_segment(seg: Any, path: str) -> dict:
    _require(isinstance(seg, dict), path, "a segment must be an object like "
             '{"name": "q", "modality": "text", "length": 8}')
    _check_keys(seg, SEGMENT_KEYS, path)
    name = seg.get("name")
    _require(isinstance(name, str) and name.strip() != "", f"{path}.name",
             "every segment needs a non-empty string name")
    _require(not name.startswith(("modality:", "role:")) and name != "*", f"{path}.name",
             "names may not be '*' or start with 'modality:'/'role:' (those are selectors)")
    modality = seg.get("modality", "text")
    _require(isinstance(modality, str) and modality in MODALITIES, f"{path}.modality",
             f"unknown modality '{modality}'{did_you_mean(modality, MODALITIES)}; "
             f"use one of {', '.join(MODALITIES)}")
    out: dict = {"name": name, "modality": modality}
    if modality in GRID_DIMS:
        dims = GRID_DIMS[modality]
        grid = seg.get("grid")
        shape = "[h, w]" if dims == 2 else "[t, h, w]"
        _require(grid is not None, f"{path}.grid", f"{modality} segment '{name}' needs a grid {shape}")
        _require(isinstance(grid, list) and len(grid) == dims and all(_is_int(g) for g in grid),
                 f"{path}.grid", f"expected {dims} integers {shape}, got {json.dumps(grid)}")
        _require(all(g > 0 for g in grid), f"{path}.grid", f"sizes must be > 0, got {grid}")
        _require("length" not in seg and "frames" not in seg, f"{path}.length",
                 f"{modality} segments are sized by grid only")
        out["grid"] = list(grid)
    else:
        _require("grid" not in seg, f"{path}.grid",
                 f"{modality} segments are 1-D: use length (and frames), not grid")
        frames = seg.get("frames")
        if frames is not None:
            _require(isinstance(frames, list) and frames and all(_is_int(f) and f > 0 for f in frames),
                     f"{path}.frames", "frames must be a non-empty list of token counts > 0")
        length = seg.get("length")
        if length is not None:
            _require(_is_int(length), f"{path}.length", f"length must be an integer, got {json.dumps(length)}")
            _require(length > 0, f"{path}.length", f"length must be > 0, got {length}")
            if frames is not None:
                _require(sum(frames) == length, f"{path}.frames",
                         f"frames sum to {sum(frames)} but length is {length}")
        elif frames is not None:
            length = sum(frames)
        else:
            _require("text" in seg, f"{path}.length",
                     f"segment '{name}' needs a length (or text, sized by a tokenizer at run time)")
        if length is not None:
            out["length"] = length
        if frames is not None:
            out["frames"] = list(frames)
    if "branch" in seg:
        _require(isinstance(seg["branch"], str) and seg["branch"] != "", f"{path}.branch",
                 "branch must be a non-empty string label")
        out["branch"] = seg["branch"]
    if "role" in seg:
        role = seg["role"]
        role = [role] if isinstance(role, str) else role
        _require(isinstance(role, list) and all(isinstance(r, str) and r for r in role),
                 f"{path}.role", "role must be a string or a list of strings, e.g. [\"target\"]")
        out["role"] = list(dict.fromkeys(role))
    if "text" in seg:
        text = seg["text"]
        ok = isinstance(text, str) or (isinstance(text, list) and text and all(isinstance(t, str) for t in text))
        _require(ok, f"{path}.text", "text must be a string, or a list of strings (one per frame)")
        out["text"] = text
    if "attrs" in seg:
        attrs = seg["attrs"]
        _require(isinstance(attrs, dict), f"{path}.attrs", "attrs maps an attribute name to a list of ints")
        out["attrs"] = {}
        for key, values in attrs.items():
            _require(_ATTR_NAME.match(key) is not None and key != "chunk", f"{path}.attrs.{key}",
                     "attribute names are letters, digits and _, start with a letter, and are not 'chunk'")
            _require(isinstance(values, list) and all(_is_int(v) for v in values),
                     f"{path}.attrs.{key}", "expected a list of integers, one per token")
            out["attrs"][key] = list(values)
    return out


# ---------------------------------------------------------------- selections
def _normalize_int_list(value, path: str, what: str):
    """`layers`/`heads`: a list of ints, or {"start", "stop", "step"} for a range."""
    limit = knobs.MAX_LAYERS if what == "layers" else knobs.MAX_HEADS
    if isinstance(value, dict):
        _check_keys(value, ("start", "stop", "step"), path)
        start, stop, step = value.get("start", 0), value.get("stop"), value.get("step", 1)
        _require(all(_is_int(x) and x >= 0 for x in (start, stop, step)) and step > 0,
                 path, f'a {what} range needs non-negative ints, e.g. {{"start": 0, "stop": 12, "step": 2}}')
        _require(stop <= limit, f"{path}.stop", f"{what} stop {stop} is over the limit of {limit}")
        _require(start < stop, path, f"the range {start}..{stop} selects no {what}; give stop > start")
        return {"start": start, "stop": stop, "step": step}
    _require(isinstance(value, list) and value and all(_is_int(x) and x >= 0 for x in value),
             path, f"{what} must be a non-empty list of non-negative ints, e.g. [0, 1]")
    _require(max(value) < limit, path, f"{what} index {max(value)} is over the limit of {limit - 1}")
    return sorted(set(value))


def _normalize_selector(value, path: str):
    if isinstance(value, str):
        return value
    _require(isinstance(value, list) and value and all(isinstance(v, str) for v in value), path,
             'a selector is a segment name, a list of names, "*", "modality:image" or "role:target"')
    return list(value)


def _normalize_step(step: Any, path: str, kind: str, segments: list[dict]) -> dict:
    _require(isinstance(step, dict), path, f'a {kind} is an object like {{"pattern": "causal"}}')
    pname = step.get("pattern")
    _require(pname is not None, f"{path}.pattern", f"missing; one of {', '.join(patterns.PATTERNS)}")
    _require(isinstance(pname, str), f"{path}.pattern", f"must be a pattern name (a string), "
             f"got {json.dumps(pname)[:40]}; one of {', '.join(patterns.PATTERNS)}")
    _require(pname in patterns.PATTERNS, f"{path}.pattern",
             f"unknown pattern '{pname}'{did_you_mean(pname, patterns.PATTERNS)}")
    pat = patterns.PATTERNS[pname]
    structural = ("pattern",) if kind == "base" else ("pattern", "op") + SELECTION_KEYS
    _check_keys(step, structural, path, extra=tuple(pat.params))
    out: dict = {"pattern": pname}
    if kind == "overlay":
        op = step.get("op", "or")
        _require(isinstance(op, str) and op in OVERLAY_OPS, f"{path}.op", f"unknown op '{op}'{did_you_mean(op, OVERLAY_OPS)}; "
                 f"use one of {', '.join(OVERLAY_OPS)}")
        out["op"] = op
    if kind != "base":
        for side in ("q", "k"):
            sel = _normalize_selector(step.get(side, "*"), f"{path}.{side}")
            resolve_selector(sel, segments, f"{path}.{side}")
            out[side] = sel
    out.update(patterns.normalize_params(pat, step, path))
    if kind != "base":
        for key, what in (("layers", "layers"), ("heads", "heads")):
            if key in step:
                out[key] = _normalize_int_list(step[key], f"{path}.{key}", what)
    return out


# ---------------------------------------------------------------- the spec
def _check_nesting_and_numbers(data: Any) -> None:
    """Refuse JSON nested deeper than knobs.MAX_NESTING, integers past int32 and strings with lone
    surrogates anywhere, naming the path, before anything else looks at the data (no recursion:
    the walk keeps its own stack)."""
    stack = [(data, "", 0)]
    while stack:
        obj, path, depth = stack.pop()
        _require(depth <= knobs.MAX_NESTING, path, f"nested more than {knobs.MAX_NESTING} levels deep")
        if isinstance(obj, dict):
            _require(not any(isinstance(k, str) and _SURROGATE.search(k) for k in obj), path or "(top level)",
                     "a key holds a lone surrogate (e.g. \\ud800), which is not text; remove it")
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in obj.items())
        elif isinstance(obj, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj))
        elif isinstance(obj, int) and not isinstance(obj, bool):
            _require(-MAX_INT <= obj <= MAX_INT, path, f"integer {str(obj)[:24]}{'...' if len(str(obj)) > 24 else ''} "
                     f"is out of range; integers in a spec lie within +-{MAX_INT}")
        elif isinstance(obj, float):
            _require(obj == obj and abs(obj) != float("inf"), path, "NaN and Infinity are not JSON numbers")
        elif isinstance(obj, str):
            _require(not _SURROGATE.search(obj), path, "holds a lone surrogate (e.g. \\ud800), which is not text "
                     "(it cannot be drawn or written as UTF-8); remove it")


def _normalize_provenance(prov: Any) -> dict:
    """Where a design comes from: {"source": "code" | "paper" | "inferred", "repo", "commit",
    "file", "function", "note"} (strings); code provenance names its repository."""
    _require(isinstance(prov, dict), "provenance",
             'must be an object like {"source": "code", "repo": "owner/name", "commit": "abc1234", '
             '"file": "path.py", "function": "build_mask"}')
    _check_keys(prov, PROVENANCE_KEYS, "provenance")
    for key, value in prov.items():
        _require(isinstance(value, str) and value != "", f"provenance.{key}", "must be a non-empty string")
    _require(prov.get("source") in PROVENANCE_SOURCES, "provenance.source",
             f"must be one of {', '.join(PROVENANCE_SOURCES)}")
    _require(prov["source"] != "code" or "repo" in prov, "provenance.repo",
             "code provenance names the repository (owner/name)")
    return {key: prov[key] for key in PROVENANCE_KEYS if key in prov}


def normalize(data: Any, max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    """Validate a raw spec dict and return its canonical form (fixed key order, defaults filled)."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 0 < max_tokens <= knobs.TOKENS_CEILING:
        raise ValueError(f"max_tokens {max_tokens!r:.30} is outside 1..{knobs.TOKENS_CEILING:,} (knobs.TOKENS_CEILING: "
                         "a layout's token table costs about 128 bytes a token)")
    _require(isinstance(data, dict), "", "a spec is a JSON object with 'segments', 'mask', 'positions'")
    _check_keys(data, TOP_KEYS, "")
    _check_nesting_and_numbers(data)
    version = data.get("maskstudio", SCHEMA_VERSION)
    _require(_is_int(version) and version == SCHEMA_VERSION, "maskstudio",
             f"unsupported spec version {version!r}; this Mask Studio reads version {SCHEMA_VERSION}")
    out: dict = {"maskstudio": SCHEMA_VERSION}
    for key in ("name", "group", "description", "citation", "url"):
        if key in data:
            _require(isinstance(data[key], str), key, "must be a string")
            out[key] = data[key]
    if "provenance" in data:
        out["provenance"] = _normalize_provenance(data["provenance"])
    segs = data.get("segments")
    _require(isinstance(segs, list) and len(segs) > 0, "segments",
             'needs a non-empty list, e.g. [{"name": "text", "modality": "text", "length": 16}]')
    _require(len(segs) <= knobs.MAX_SEGMENTS, "segments",
             f"{len(segs)} segments, over the limit of {knobs.MAX_SEGMENTS}; merge segments or use frames")
    segments = [_normalize_segment(s, f"segments[{i}]") for i, s in enumerate(segs)]
    seen: dict[str, int] = {}
    for i, s in enumerate(segments):
        _require(s["name"] not in seen, f"segments[{i}].name",
                 f"duplicate segment name '{s['name']}' (also segments[{seen.get(s['name'])}]); names must be unique")
        seen[s["name"]] = i
    for i, s in enumerate(segments):
        n = segment_size(s)
        for key, values in s.get("attrs", {}).items():
            _require(key not in patterns.BUILTIN_ATTRS, f"segments[{i}].attrs.{key}",
                     f"'{key}' is a built-in attribute; pick another name")
            if n is not None:
                _require(len(values) == n, f"segments[{i}].attrs.{key}",
                         f"has {len(values)} values but the segment has {n} tokens")
    total = sum(segment_size(s) or 0 for s in segments)
    _require(total <= max_tokens, "segments",
             f"layout has {total} tokens, over the limit of {max_tokens}; shrink the sizes "
             f"or raise max_tokens")
    out["segments"] = segments

    mask = data.get("mask", {})
    _require(isinstance(mask, dict), "mask", "must be an object with base, rules, overlays")
    _check_keys(mask, MASK_KEYS, "mask")
    base = mask.get("base", {"pattern": "causal"})
    steps = sum(len(mask[k]) for k in ("rules", "overlays") if isinstance(mask.get(k), list))
    _require(steps <= knobs.MAX_STEPS, "mask", f"{steps} rules and overlays, over the limit of {knobs.MAX_STEPS} "
             "(MASKSTUDIO_MAX_STEPS; every step is work at every token): merge rules, or use one pattern with a selector")
    norm_mask: dict = {"base": _normalize_step(base, "mask.base", "base", segments)}
    for key, kind in (("rules", "rule"), ("overlays", "overlay")):
        items = mask.get(key, [])
        _require(isinstance(items, list), f"mask.{key}", "must be a list")
        norm_mask[key] = [_normalize_step(r, f"mask.{key}[{i}]", kind, segments)
                          for i, r in enumerate(items)]
    if "cross" in mask:
        cross = mask["cross"]
        _require(isinstance(cross, dict), "mask.cross", 'must be {"q": selector, "k": selector}')
        _check_keys(cross, ("q", "k"), "mask.cross")
        norm_cross = {}
        for side in ("q", "k"):
            sel = _normalize_selector(cross.get(side, "*"), f"mask.cross.{side}")
            resolve_selector(sel, segments, f"mask.cross.{side}")
            norm_cross[side] = sel
        norm_mask["cross"] = norm_cross
    out["mask"] = norm_mask

    attr_names = set(patterns.BUILTIN_ATTRS) | {k for s in segments for k in s.get("attrs", {})}
    for path, step in all_steps(norm_mask):
        patterns.check_attr_params(patterns.PATTERNS[step["pattern"]], step, path, attr_names)

    out["positions"] = positions.normalize(data.get("positions", {"scheme": "sequential"}),
                                           segments, attr_names)
    if "checks" in data:
        checks = data["checks"]
        _require(isinstance(checks, dict), "checks", "must be an object")
        _check_keys(checks, CHECK_KEYS, "checks")
        for key, value in checks.items():
            _require(isinstance(value, bool), f"checks.{key}", "must be true or false")
        out["checks"] = dict(checks)
    return out


def dumps(obj, indent: str = "") -> str:
    """Canonical JSON: 2-space indent, but lists of scalars and small flat objects on one line."""
    flat = lambda v: not isinstance(v, (list, dict))  # noqa: E731
    if isinstance(obj, list) and all(flat(v) for v in obj):
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, dict) and len(obj) <= 8 and all(flat(v) or (isinstance(v, list) and all(flat(x) for x in v))
                                                       for v in obj.values()):
        text = json.dumps(obj, ensure_ascii=False)
        if len(text) + len(indent) <= 100:
            return text
    inner = indent + "  "
    if isinstance(obj, list):
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in obj) + "\n" + indent + "]"
    if isinstance(obj, dict):
        items = [inner + json.dumps(k, ensure_ascii=False) + ": " + dumps(v, inner) for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}" if items else "{}"
    return json.dumps(obj, ensure_ascii=False)


def _no_duplicate_keys(pairs: list) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise SpecError(key, "appears twice in one JSON object; keep one (JSON would silently take the last)")
        out[key] = value
    return out


def parse_json(text: str) -> Any:
    """JSON text -> data; errors (bad JSON, duplicate keys, too deep, too large) are one-line SpecErrors."""
    if not isinstance(text, str):
        raise SpecError("", f"expected JSON text, got {type(text).__name__}")
    if len(text) > knobs.MAX_SPEC_BYTES:
        raise SpecError("", f"spec text is {len(text):,} characters, over the limit of {knobs.MAX_SPEC_BYTES:,}")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise SpecError("", f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise SpecError("", f"JSON nested too deeply (more than {knobs.MAX_NESTING} levels are refused)") from None
    except SpecError:
        raise
    except ValueError:  # an integer of thousands of digits (Python's own conversion limit)
        raise SpecError("", "a number with thousands of digits; integers in a spec lie within "
                            f"+-{MAX_INT}") from None


def read_spec_file(path) -> str:
    """A spec file's text: a regular file of at most knobs.MAX_SPEC_BYTES (so /dev/zero or a FIFO
    is refused instead of read forever). For the CLI and Python; the app never reads paths."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SpecError("", f"no such spec file: {path}" if not os.path.exists(path)
                        else f"not a regular file: {path}; give a .json spec file")
    size = os.path.getsize(path)
    if size > knobs.MAX_SPEC_BYTES:
        raise SpecError("", f"{path} is {size:,} bytes, over the limit of {knobs.MAX_SPEC_BYTES:,} for a spec")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError:
        raise SpecError("", f"{path} is not UTF-8 text; a spec is a JSON file") from None
    except OSError as err:
        raise SpecError("", f"cannot read {path}: {err.strerror}") from None


def _read(source) -> Any:
    if isinstance(source, dict):
        try:
            return copy.deepcopy(source)
        except RecursionError:
            raise SpecError("", f"spec nested too deeply (more than {knobs.MAX_NESTING} levels are refused)") from None
    if isinstance(source, (str, os.PathLike)):
        text = source if isinstance(source, str) else os.fspath(source)
        if isinstance(source, os.PathLike) or text.lstrip()[:1] not in ("{", "["):
            path = text
            text = read_spec_file(path)
            try:
                return _in_file(path, parse_json(text))
            except SpecError as err:  # name the file: the message alone does not say which one
                raise SpecError(err.path, f"in {path}: {err.message}" if err.path else f"{path}: {err.message}") from None
        return parse_json(text)
    raise SpecError("", f"cannot read a spec from {type(source).__name__}; give a path, JSON text or dict")


def _in_file(path: str, data: Any) -> Any:
    """data read from the file `path`, checked as far as nesting and numbers go, so those refusals
    name the file too (the rest of validation names JSON paths inside it)."""
    if isinstance(data, dict):
        _check_nesting_and_numbers(data)
    return data


class Spec:
    """A validated spec. Every backend (dense, mask_mod, BlockMask, analysis, export) derives from it."""

    def __init__(self, data: dict):
        self._data = data  # canonical, produced by normalize(); treat as immutable

    @classmethod
    def load(cls, source, max_tokens: int = DEFAULT_MAX_TOKENS) -> "Spec":
        return cls(normalize(_read(source), max_tokens=max_tokens))

    @classmethod
    def from_json(cls, text: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> "Spec":
        """A spec from JSON text only: never a path (what the app's editor and uploads use)."""
        return cls(normalize(parse_json(text), max_tokens=max_tokens))

    @classmethod
    def from_valid(cls, data: dict) -> "Spec":
        """Wrap a dict that is already canonical (it came from `Spec.to_dict`) without validating
        it again: for state that only ever holds validated specs."""
        return cls(data)

    def with_tokens_appended(self, segment: int | None, text: str, count: int, name: str = "generated",
                             role: str = "generated") -> "Spec":
        """This spec with `count` new tokens (`text`) joined to segment `segment` (a list text grows
        its last frame), or, for None, in a new trailing text segment. Not re-validated: growing a
        sized text segment keeps every rule, selector and scheme valid (generation calls this per token)."""
        data = dict(self._data)
        segments = list(data["segments"])
        if segment is None:
            names = {s["name"] for s in segments}
            while name in names:
                name += "_"
            segments.append({"name": name, "modality": "text", "length": count, "role": [role], "text": text})
        else:
            seg = dict(segments[segment])
            if isinstance(seg.get("text"), list):
                seg["text"] = seg["text"][:-1] + [seg["text"][-1] + text]
                seg["frames"] = seg["frames"][:-1] + [seg["frames"][-1] + count]
                seg["length"] = sum(seg["frames"])
            else:
                seg["text"] = seg.get("text", "") + text
                seg["length"] = seg["length"] + count
            segments[segment] = seg
        data["segments"] = segments
        return Spec(data)

    # -- data
    def to_dict(self) -> dict:
        return copy.deepcopy(self._data)

    def to_json(self) -> str:
        return dumps(self._data) + "\n"

    def __eq__(self, other) -> bool:
        return isinstance(other, Spec) and self._data == other._data

    def __repr__(self) -> str:
        return f"Spec({self.name!r}, {len(self.segments)} segments)"

    @property
    def name(self) -> str:
        return self._data.get("name", "untitled")

    @property
    def segments(self) -> list[dict]:
        return self._data["segments"]

    @property
    def mask(self) -> dict:
        return self._data["mask"]

    @property
    def positions(self) -> dict:
        return self._data["positions"]

    @property
    def checks(self) -> dict:
        return self._data.get("checks", {})

    def unsized_segments(self) -> list[str]:
        return [s["name"] for s in self.segments if segment_size(s) is None]

    def require_sized(self) -> None:
        missing = self.unsized_segments()
        if missing:
            i = [s["name"] for s in self.segments].index(missing[0])
            raise SpecError(f"segments[{i}].length",
                            f"segment(s) {', '.join(missing)} have text but no length; give a length "
                            f"or run with a model, whose tokenizer sizes them")

    @property
    def n(self) -> int:
        self.require_sized()
        return sum(segment_size(s) for s in self.segments)

    def selected(self, selector, path: str = "") -> list[int]:
        return resolve_selector(selector, self.segments, path)

    def with_sizes(self, sizes: dict) -> "Spec":
        """Rescale segments: {"name": 12 | [h, w] | [t, h, w] | {"frames": [..]}} (a list for a 1-D
        segment is its frame lengths). One definition, `segments.resized_segments`, which the
        FlexAttention export copies: per-token `attrs`, `explicit` position ids at another token
        count and shared positions of unequal sizes are refused with a SpecError naming `sizes.<name>`."""
        data = self.to_dict()
        data["segments"] = resized_segments(data["segments"], sizes, data["positions"], DEFAULT_MAX_TOKENS)
        return Spec.load(data)

    # -- derived views (lazy; each lives in its own module)
    @cached_property
    def table(self):
        self.require_sized()
        return build_table(self.segments)

    def token_table(self):
        return self.table

    @cached_property
    def varies_by_layer(self) -> bool:
        return any("layers" in step for _, step in all_steps(self.mask))

    @cached_property
    def varies_by_head(self) -> bool:
        return any("heads" in step for _, step in all_steps(self.mask))

    def layer_sets(self) -> list[list[int]]:
        return layer_sets(self.mask)

    def layer_key(self, layer: int) -> tuple:
        """Layers with equal keys share one mask (kept per layer: attention asks once per layer and
        forward, a packed row once per document)."""
        keys = self.__dict__.setdefault("_layer_keys", {})
        if layer not in keys:
            keys[layer] = layer_key(self.mask, layer)
        return keys[layer]

    def lowered(self, layer: int = 0):
        """The layer lowered to closed-form arithmetic (lower.py): sizes in a captured tensor
        (the expression is kept per design, so other sizes only change the size values)."""
        from .lower import lowered
        return lowered(self, layer)

    def mask_mod(self, layer: int = 0, device=None, sizes_in_kernel: bool | None = None):
        """FlexAttention mask_mod(b, h, q_idx, kv_idx) from the layer's lowered expression (closed
        form; the table form for layouts of many segments). sizes_in_kernel: sizes as constants in
        the kernel, as hand-written code has them (None: for the first knobs.SIZES_IN_KERNEL
        layouts of a design, then one kernel reading sizes at run time serves the rest)."""
        low = self.lowered(layer).on(device or "cpu")
        return low.fixed_mask_mod if low.sizes_in(sizes_in_kernel) else low.mask_mod

    def dense_mask(self, layer: int = 0, head: int = 0):
        return tiled.dense_mask(self, layer=layer, head=head)

    def block_mask(self, block_size: int = 128, device="cpu", layer: int = 0, num_heads: int | None = None,
                   sizes_in_kernel: bool | None = None):
        """BlockMask built on `device` from tile bounds (lower_blocks.py); heads: num_heads when the
        layer's rules switch on heads, else 1; sizes_in_kernel: as mask_mod."""
        if self.varies_by_head and num_heads is None:
            raise ValueError("this spec has per-head rules: pass num_heads=<the model's query heads>")
        return self.lowered(layer).block_mask(block_size, device, num_heads=num_heads, sizes_in_kernel=sizes_in_kernel)

    def position_ids(self):
        return positions.position_ids(self)

    def cross_slices(self):
        """(query token indices, key token indices) of the cross-attention view, or None."""
        cross = self.mask.get("cross")
        if cross is None:
            return None
        import torch

        t = self.table
        def idx(sel):
            segs = self.selected(sel)
            return torch.cat([torch.arange(t.starts[i], t.starts[i] + t.sizes[i]) for i in segs])
        return idx(cross["q"]), idx(cross["k"])
