"""Rule composition: the one statement of base -> rules -> overlays semantics.

A compiled `Program` is the spec's base pattern, its rules and its overlays for one layer.
`evaluate(program, q, k, h)` runs it over token views; lower.py runs it over symbolic views
(symbolic.SegTok / TableTok) to build the layer's one expression, which every backend evaluates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import patterns
from .bounds import where
from .segments import expand_int_list


@dataclass
class Step:
    fn: object
    params: dict
    op: str | None = None            # overlays: and | or | and_not ; rules: None
    q_sel: torch.Tensor | None = None  # bool [S] of selected query segments, None = all
    k_sel: torch.Tensor | None = None
    heads: tuple | None = None

    def region(self, q, k, h):
        r = True
        if self.q_sel is not None:
            r = q._in_segments(self.q_sel)
        if self.k_sel is not None:
            r = r & k._in_segments(self.k_sel) if r is not True else k._in_segments(self.k_sel)
        if self.heads is not None:
            head_ok = False
            for x in self.heads:
                head_ok = (h == x) if head_ok is False else (head_ok | (h == x))
            r = head_ok if r is True else r & head_ok
        return r

    def allow(self, q, k):
        return self.fn(q, k, **self.params)


@dataclass
class Program:
    base: Step
    rules: list[Step]
    overlays: list[Step]

    def to(self, device) -> "Program":
        """The same program with its segment selections on `device` (in place; returns self)."""
        if device is None:
            return self
        for step in [self.base] + self.rules + self.overlays:
            step.q_sel = step.q_sel.to(device) if step.q_sel is not None else None
            step.k_sel = step.k_sel.to(device) if step.k_sel is not None else None
        return self


def _selection(spec, selector, path):
    chosen = spec.selected(selector, path)
    if len(chosen) == len(spec.segments):
        return None
    sel = torch.zeros(len(spec.segments), dtype=torch.bool)
    sel[chosen] = True
    return sel


def _step(spec, raw: dict, path: str, layer: int) -> Step | None:
    layers = expand_int_list(raw.get("layers"))
    if layers is not None and layer not in layers:
        return None
    pat = patterns.PATTERNS[raw["pattern"]]
    params = {name: raw[name] for name in pat.params if name in raw}
    heads = tuple(expand_int_list(raw["heads"])) if "heads" in raw else None
    return Step(pat.fn, params, raw.get("op"),
                _selection(spec, raw.get("q", "*"), f"{path}.q"),
                _selection(spec, raw.get("k", "*"), f"{path}.k"), heads)


def compile_program(spec, layer: int = 0) -> Program:
    """The spec's steps that apply at `layer`, in spec order."""
    mask = spec.mask
    steps = {key: [s for i, r in enumerate(mask[key]) if (s := _step(spec, r, f"mask.{key}[{i}]", layer))]
             for key in ("rules", "overlays")}
    base = mask["base"]
    pat = patterns.PATTERNS[base["pattern"]]
    return Program(Step(pat.fn, {n: base[n] for n in pat.params if n in base}), steps["rules"], steps["overlays"])


def evaluate(program: Program, q, k, h=0):
    """allow(q, k) for head h: base, then rules (last match wins), then overlays in order."""
    allow = program.base.allow(q, k)
    for step in program.rules:
        region = step.region(q, k, h)
        if region is not False:  # False: a head-restricted step that is off for this head
            allow = where(region, step.allow(q, k), allow)
    for step in program.overlays:
        region = step.region(q, k, h)
        if region is False:
            continue
        val = step.allow(q, k)
        hit = val if region is True else region & val
        if step.op == "or":
            allow = allow | hit
        elif step.op == "and":
            allow = allow & (val if region is True else (~region | val))
        else:  # and_not
            allow = allow & ~hit
    return allow
