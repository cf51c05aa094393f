"""Hostile inputs for specs: a mutation engine over valid specs and the surfaces every input
must pass without a traceback (a SpecError / RunError / ValueError with one line is the only
allowed failure). Used by tests/test_hostile.py."""
from __future__ import annotations

import copy
import json
import random

import torch

from maskstudio import Spec, SpecError
from maskstudio.analysis import analyze
from maskstudio.export import export_bytes

HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 7, 10 ** 30, -(10 ** 30), 2 ** 63, 1.5, float("inf"), "", " ", "*",
    "x\n\x1b[31mEVIL", "modality:zzz", "role:", "role:target", "modality:video", "$x^$", "\\N{", "\x00",
    "a" * 5000, [], {}, ["causal"], [[]], [1, 2], [-1], {"a": ["b"]}, {"start": 0, "stop": 10 ** 9},
    {"start": 5, "stop": 5}, {"scheme": []}, "causal", "frame", "chunk", "index", "in_segments", "idx", "_x",
]


def nested(depth: int):
    out: list = []
    for _ in range(depth):
        out = [out]
    return out


def _paths(obj, path=()):
    yield path
    if len(path) > 12:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, path + (i,))


def _parent(obj, path):
    for p in path[:-1]:
        obj = obj[p]
    return obj


def mutate(data: dict, rng: random.Random) -> dict:
    """One to three random edits: replace a node by a hostile value, delete a key, add a key,
    duplicate a list item, or nest deeply."""
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(data) if p]
        path = rng.choice(paths)
        parent, key = _parent(data, path), path[-1]
        op = rng.random()
        if op < 0.6:
            parent[key] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
        elif op < 0.7 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.8 and isinstance(parent, dict):
            parent[rng.choice(["heads", "layers", "by", "size", "q", "k", "op", "attrs", "share", "text",
                               "frames", "grid", "branch", "role", "zzz"])] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
        elif op < 0.9 and isinstance(parent, list):
            parent.insert(key, parent[key])
        else:
            parent[key] = nested(rng.choice([5, 40, 200]))
    return data


def exercise(source) -> str:
    """Load `source` and run the cheap surfaces on it. Returns "ok" or "refused: <one line>";
    anything else escapes (that is the bug the tests look for)."""
    try:
        spec = Spec.load(source)
    except SpecError as err:
        text = str(err)
        assert "\n" not in text and "\x1b" not in text, f"error is not one safe line: {text!r}"
        return f"refused: {text}"
    if spec.unsized_segments() or spec.n > 512:
        return "ok"
    analyze(spec)
    spec.position_ids()
    for layer in {0, *[x for s in spec.layer_sets() for x in s][:2]}:
        spec.dense_mask(layer=layer)
    compile(export_bytes(spec, "flex").decode(), "export.py", "exec")
    json.loads(spec.to_json())
    return "ok"


def small_presets() -> list[dict]:
    from maskstudio.presets import list_presets

    out = []
    for p in list_presets():
        data = json.loads(open(p["file"], encoding="utf-8").read())
        try:
            if Spec.load(data).n <= 512:
                out.append(data)
        except SpecError:
            continue
    return out


if __name__ == "__main__":
    import collections
    import sys
    import traceback

    rng = random.Random(0)
    bases = small_presets()
    escapes = collections.Counter()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for i in range(n):
        case = mutate(rng.choice(bases), rng)
        try:
            exercise(case)
        except Exception as err:  # noqa: BLE001 - counting what escapes is the point
            tb = traceback.extract_tb(err.__traceback__)[-1]
            key = f"{type(err).__name__} at {tb.filename.rsplit('/', 1)[-1]}:{tb.lineno} {str(err)[:80]!r}"
            if not escapes[key]:
                print(key, json.dumps(case)[:300])
            escapes[key] += 1
    print(sum(escapes.values()), "escapes of", n)


# ---------------------------------------------------------------- the hostile corpus (tests/data)
BASE = {"maskstudio": 1, "name": "base", "description": "d",
        "segments": [{"name": "sys", "modality": "text", "length": 4, "text": "hi"},
                     {"name": "vid", "modality": "video", "grid": [2, 2, 2]},
                     {"name": "p1", "modality": "text", "length": 3, "branch": "a", "attrs": {"tag": [1, 0, 1]}},
                     {"name": "p2", "modality": "text", "length": 3, "branch": "b"},
                     {"name": "ans", "modality": "text", "length": 2, "role": ["target"]}],
        "mask": {"base": {"pattern": "causal"},
                 "rules": [{"q": "vid", "k": "vid", "pattern": "block_causal", "by": "frame"},
                           {"q": ["p1", "p2"], "k": "*", "pattern": "branch_isolated", "heads": [1]}],
                 "overlays": [{"op": "or", "q": "*", "k": "sys", "pattern": "first", "size": 2,
                               "layers": {"start": 0, "stop": 4, "step": 2}}]},
        "positions": {"scheme": "branches", "share": {"p2": "p1"}}}

FIELDS = [("name",), ("maskstudio",), ("segments",), ("segments", 0), ("segments", 0, "name"),
          ("segments", 0, "modality"), ("segments", 0, "length"), ("segments", 0, "text"),
          ("segments", 1, "grid"), ("segments", 1, "grid", 0), ("segments", 2, "branch"),
          ("segments", 2, "attrs"), ("segments", 2, "attrs", "tag"), ("segments", 4, "role"),
          ("mask",), ("mask", "base"), ("mask", "base", "pattern"), ("mask", "rules"),
          ("mask", "rules", 0, "q"), ("mask", "rules", 0, "k"), ("mask", "rules", 0, "by"),
          ("mask", "rules", 1, "heads"), ("mask", "overlays", 0, "op"), ("mask", "overlays", 0, "size"),
          ("mask", "overlays", 0, "layers"), ("mask", "overlays", 0, "layers", "stop"),
          ("positions",), ("positions", "scheme"), ("positions", "share"), ("positions", "share", "p2")]

WHOLE_TEXTS = ["", "{", "[]", "null", "1", '"spec"', "\ufeff{}", "{\x00}", "[" * 1000 + "]" * 1000,
               '{"a":' * 5000 + "1" + "}" * 5000, '{"segments": [], "segments": []}', "/dev/zero",
               "/etc/passwd", "../../../../etc/shadow", "~/.ssh/id_rsa", "\n/etc/hosts", "{" + " " * 100 + "}"]


def corpus() -> list[dict]:
    """Every field of BASE set to every hostile value, plus whole-text oddities: [{why, text}]."""
    out = []
    for path in FIELDS:
        for value in HOSTILE_VALUES:
            data = copy.deepcopy(BASE)
            parent = data
            for p in path[:-1]:
                parent = parent[p]
            parent[path[-1]] = value
            text = json.dumps(data, allow_nan=True)
            out.append({"why": f"{'.'.join(map(str, path))} = {json.dumps(value, allow_nan=True)[:40]}",
                        "text": text})
    for i, text in enumerate(WHOLE_TEXTS):
        out.append({"why": f"whole text #{i}", "text": text})
    for key in ("in_segments", "idx", "index", "chunk", "_x", "a b", "x" * 100):
        data = copy.deepcopy(BASE)
        data["segments"][2]["attrs"] = {key: [1, 0, 1]}
        data["mask"]["rules"][0]["by"] = key
        out.append({"why": f"user attribute named {key!r}", "text": json.dumps(data)})
    return out
