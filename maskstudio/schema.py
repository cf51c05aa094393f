"""JSON Schema (draft 2020-12) of spec v1, generated from the pattern and scheme registries.

The shipped file maskstudio/schema.json is this function's output (a test keeps them equal):
editors and other tools can validate specs without Mask Studio. Mask Studio itself validates
with spec.normalize, which also checks cross-references (selectors, sizes, attribute names).
"""
from __future__ import annotations

import json
import pathlib

from . import patterns, positions
from .segments import MODALITIES, OVERLAY_OPS
from .spec import PROVENANCE_KEYS, PROVENANCE_SOURCES, SCHEMA_VERSION

SCHEMA_PATH = pathlib.Path(__file__).with_name("schema.json")

_KIND = {
    "int": {"type": "integer"},
    "posint": {"type": "integer", "minimum": 1},
    "bool": {"type": "boolean"},
    "attr": {"type": "string"},
    "group": {"type": "string"},
    "int_or_attr": {"type": ["integer", "string"]},
    "pair": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
}
_INTS = {"oneOf": [
    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    {"type": "object", "properties": {"start": {"type": "integer"}, "stop": {"type": "integer"},
                                      "step": {"type": "integer"}}, "required": ["stop"],
     "additionalProperties": False}]}
_SELECTOR = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
             "description": 'segment name, list of names, "*", "modality:image" or "role:target"'}


def _step(kind: str) -> dict:
    """One schema branch per pattern, so parameters are checked per pattern."""
    branches = []
    for pat in patterns.PATTERNS.values():
        props = {"pattern": {"const": pat.name}}
        props.update({name: _KIND[p.kind] for name, p in pat.params.items()})
        if kind != "base":
            props.update({"q": {"$ref": "#/$defs/selector"}, "k": {"$ref": "#/$defs/selector"},
                          "layers": {"$ref": "#/$defs/ints"}, "heads": {"$ref": "#/$defs/ints"}})
        if kind == "overlay":
            props["op"] = {"enum": list(OVERLAY_OPS)}
        required = ["pattern"] + [n for n, p in pat.params.items() if p.default is patterns.REQUIRED]
        branches.append({"type": "object", "properties": props, "required": required,
                         "additionalProperties": False, "description": pat.doc})
    return {"oneOf": branches}


def build_schema() -> dict:
    ints = {"type": "array", "items": {"type": "integer"}}
    segment = {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "modality": {"enum": list(MODALITIES)},
            "length": {"type": "integer", "minimum": 1},
            "grid": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 3},
            "frames": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
            "branch": {"type": "string", "minLength": 1},
            "role": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "text": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "attrs": {"type": "object", "additionalProperties": ints},
        }}
    scheme_props = {"scheme": {"enum": list(positions.SCHEMES)},
                    "share": {"type": "object", "additionalProperties": {"type": "string"}}}
    for params in positions.SCHEMES.values():
        for name in params:
            scheme_props.setdefault(name, {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Mask Studio spec v1",
        "type": "object", "required": ["segments"], "additionalProperties": False,
        "$defs": {"selector": _SELECTOR, "ints": _INTS},
        "properties": {
            "maskstudio": {"const": SCHEMA_VERSION},
            "name": {"type": "string"}, "description": {"type": "string"},
            "citation": {"type": "string"}, "url": {"type": "string"}, "group": {"type": "string"},
            "provenance": {"type": "object", "required": ["source"], "additionalProperties": False,
                           "properties": {"source": {"enum": list(PROVENANCE_SOURCES)},
                                          **{k: {"type": "string", "minLength": 1} for k in PROVENANCE_KEYS[1:]}}},
            "segments": {"type": "array", "items": segment, "minItems": 1},
            "mask": {"type": "object", "additionalProperties": False, "properties": {
                "base": _step("base"),
                "rules": {"type": "array", "items": _step("rule")},
                "overlays": {"type": "array", "items": _step("overlay")},
                "cross": {"type": "object", "properties": {"q": _SELECTOR, "k": _SELECTOR},
                          "additionalProperties": False}}},
            "positions": {"type": "object", "properties": scheme_props, "additionalProperties": False},
            "checks": {"type": "object", "properties": {"allow_target_leaks": {"type": "boolean"}},
                       "additionalProperties": False},
        }}


def write_schema() -> None:
    SCHEMA_PATH.write_text(json.dumps(build_schema(), indent=2) + "\n")


if __name__ == "__main__":
    write_schema()
