"""Segment and selection helpers over canonical spec dicts (below everything but errors).

Pure functions on plain dicts and lists, shared by validation (spec), the token table, the
compiler, positions and the run package, so none of them has to reach up into `spec`.
"""
from __future__ import annotations

from .errors import did_you_mean, require

MODALITIES = ("text", "image", "video", "audio", "special")
GRID_DIMS = {"image": 2, "video": 3}
OVERLAY_OPS = ("and", "or", "and_not")


def segment_size(seg: dict) -> int | None:
    """Tokens in a segment, or None for a text segment still waiting for its tokenizer."""
    if "grid" in seg:
        n = 1
        for g in seg["grid"]:
            n *= g
        return n
    return seg.get("length")


def expand_int_list(value) -> list[int] | None:
    """A `layers`/`heads` value (list, or {"start", "stop", "step"}) as a list; None stays None."""
    if value is None:
        return None
    if isinstance(value, dict):
        return list(range(value["start"], value["stop"], value["step"]))
    return list(value)


def resolve_selector(selector, segments: list[dict], path: str) -> list[int]:
    """Segment ordinals named by a selector; errors name the path and suggest the nearest name."""
    names = [s["name"] for s in segments]
    items = [selector] if isinstance(selector, str) else selector
    chosen: list[int] = []
    for item in items:
        if item == "*":
            hits = list(range(len(segments)))
        elif item.startswith("modality:"):
            mod = item.split(":", 1)[1]
            require(mod in MODALITIES, path, f"unknown modality '{mod}'{did_you_mean(mod, MODALITIES)}")
            hits = [i for i, s in enumerate(segments) if s["modality"] == mod]
            require(bool(hits), path, f"no segment has modality '{mod}'")
        elif item.startswith("role:"):
            role = item.split(":", 1)[1]
            hits = [i for i, s in enumerate(segments) if role in s.get("role", [])]
            require(bool(hits), path, f"no segment has role '{role}'")
        else:
            require(item in names, path, f"no segment named '{item}'{did_you_mean(item, names)}")
            hits = [names.index(item)]
        chosen.extend(h for h in hits if h not in chosen)
    return sorted(chosen)


def all_steps(mask: dict):
    """(JSON path, step) for the base, every rule and every overlay, in spec order."""
    yield "mask.base", mask["base"]
    for key in ("rules", "overlays"):
        for i, step in enumerate(mask[key]):
            yield f"mask.{key}[{i}]", step


def layer_sets(mask: dict) -> list[list[int]]:
    """The layer lists of the steps restricted to some layers, in spec order."""
    return [expand_int_list(step["layers"]) for _, step in all_steps(mask) if "layers" in step]


def layer_key(mask: dict, layer: int) -> tuple:
    """Layers with equal keys compile to the same program (steps switch on layer membership only)."""
    return tuple(layer in s for s in layer_sets(mask))
