"""Segment and selection helpers over canonical spec dicts (below everything but errors).

Pure functions on plain dicts and lists, shared by validation (spec), the token table, the
compiler, positions and the run package, so none of them has to reach up into `spec`.
"""
from __future__ import annotations

from .errors import SpecError, did_you_mean, is_int, require

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


def resized_segments(segments: list[dict], sizes, positions: dict, max_tokens: int) -> list[dict]:
    """`segments` with new sizes {"name": length | [h, w] | [t, h, w] | {"frames": [...]}} (a list
    for a 1-D segment is its frame lengths).

    The one definition of a resize: `Spec.with_sizes` uses it and the FlexAttention export copies
    its source, which cannot run the validator. So it refuses (SpecError naming `sizes.<name>` and
    the fix) every size the validator would refuse and every resize the spec cannot follow:
    per-token attrs, explicit position ids, shared positions of unequal sizes, too many tokens."""
    if not (sizes is None or isinstance(sizes, dict)):
        raise SpecError("sizes", 'give an object {"name": length | [h, w] | [t, h, w] | {"frames": [...]}}, '
                        f"got {_shown(sizes)}")
    names = [s["name"] for s in segments]
    out = [dict(s) for s in segments]
    for name, size in (sizes or {}).items():
        if name not in names:
            raise SpecError(f"sizes.{name}", f"no segment named '{name}'{did_you_mean(name, names)}")
        i = names.index(name)
        require("attrs" not in out[i], f"sizes.{name}",
                "this segment has per-token attrs; edit them together with its size")
        out[i] = _resized(out[i], size, f"sizes.{name}")
    _check_resized(out, sizes or {}, positions, max_tokens)
    return out


def _shown(value) -> str:
    """A short repr of a user value for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _resized(seg: dict, size, path: str) -> dict:
    """One segment at a new size: a grid for image / video, else a length or frame lengths
    (messages are built only on failure: a size may be a long frames list)."""
    out = {k: v for k, v in seg.items() if k not in ("length", "grid", "frames")}
    modality = seg["modality"]
    if modality in GRID_DIMS:
        dims = GRID_DIMS[modality]
        if not (isinstance(size, (list, tuple)) and len(size) == dims and all(is_int(g) and g > 0 for g in size)):
            raise SpecError(path, f"{modality} segments take a grid {'[h, w]' if dims == 2 else '[t, h, w]'} "
                            f"of integers > 0, got {_shown(size)}")
        out["grid"] = list(size)
        return out
    frames = size.get("frames") if isinstance(size, dict) else size if isinstance(size, (list, tuple)) else None
    if frames is None:
        if not (is_int(size) and size > 0):
            raise SpecError(path, f'{modality} segments take a length > 0, frame lengths [...] or {{"frames": [...]}}, '
                            f"got {_shown(size)}")
        out["length"] = size
        return out
    if isinstance(size, dict) and set(size) != {"frames"}:
        raise SpecError(path, f'give {{"frames": [...]}} and nothing else, got {_shown(size)}')
    if not (isinstance(frames, (list, tuple)) and len(frames) > 0 and all(is_int(f) and f > 0 for f in frames)):
        raise SpecError(path, f"frames must be a non-empty list of token counts > 0, got {_shown(frames)}")
    out["length"], out["frames"] = sum(frames), list(frames)
    return out


def _check_resized(segments: list[dict], sizes: dict, positions: dict, max_tokens: int) -> None:
    """What a resized layout must still satisfy: the token limit and the positions' sizes."""
    counts = {s["name"]: segment_size(s) for s in segments}
    total = sum(n or 0 for n in counts.values())
    require(total <= max_tokens, "sizes", f"these sizes make {total} tokens, over the limit of {max_tokens}; "
            "give smaller sizes")
    ids = positions.get("ids") if positions.get("scheme") == "explicit" else None
    if ids is not None and None not in counts.values():
        have = len(ids[0]) if isinstance(ids[0], list) else len(ids)
        require(have == total, "sizes", f"these sizes make {total} tokens but positions.ids holds {have} "
                f"explicit ids, which cannot follow a resize; keep {have} tokens or give new ids")
    for copy, source in positions.get("share", {}).items():
        require(counts[copy] == counts[source], f"sizes.{copy if copy in sizes else source}",
                f"'{copy}' would have {counts[copy]} tokens but '{source}' {counts[source]}; shared "
                "positions (positions.share) need equal sizes: resize both")


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
