"""Rule composition -> one evaluator (a `Program`) that every backend runs.

A compiled `Program` is the spec's base pattern, its rules and its overlays for one layer.
`evaluate(program, q, k, h)` runs it over token views; what the views hold decides the
backend:
  - FlexAttention mask_mod: 0-d index tensors (vmapped by torch),
  - dense masks: broadcast index grids, only where tiles are undecided,
  - tiles: attribute intervals (bounds.py), deciding whole blocks at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import patterns
from .bounds import Interval, Tri, where
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


# ---------------------------------------------------------------- token views
class Tok:
    """Token view over index tensors: `tok.frame` -> the frame ids of those tokens. Every public
    name is a token attribute; the view's own names start with `_`, which attribute names never do."""

    def __init__(self, attrs: dict, idx):
        self._attrs, self._idx = attrs, idx

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._attrs[name][self._idx]

    def _in_segments(self, sel):
        return sel[self._attrs["segment"][self._idx]]


class TileTok:
    """Token view over tiles: every attribute is an Interval [min, max] over the tile's tokens."""

    def __init__(self, lo: dict, hi: dict, shape):
        self._lo, self._hi, self._shape = lo, hi, shape

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return Interval(self._lo[name].view(self._shape), self._hi[name].view(self._shape))

    def _in_segments(self, sel):
        counts = torch.cat([torch.zeros(1, dtype=torch.long), sel.long().cumsum(0)])
        lo, hi = self._lo["segment"].view(self._shape), self._hi["segment"].view(self._shape)
        hits = counts[hi + 1] - counts[lo]
        return Tri(hits == hi - lo + 1, hits > 0)


def tile_bounds(attrs: dict, cuts: np.ndarray):
    """Per-tile min and max of every attribute; tiles are [cuts[i], cuts[i+1])."""
    lo, hi = {}, {}
    starts = cuts[:-1]
    for name, col in attrs.items():
        arr = col.cpu().numpy()
        lo[name] = torch.from_numpy(np.minimum.reduceat(arr, starts))
        hi[name] = torch.from_numpy(np.maximum.reduceat(arr, starts))
    return lo, hi


def make_cuts(n: int, step: int, extra=()) -> np.ndarray:
    """Tile boundaries: multiples of `step`, plus `extra` (e.g. segment starts), plus n."""
    return np.unique(np.concatenate([np.arange(0, n, step), np.asarray(list(extra), dtype=np.int64),
                                     [n]])).astype(np.int64)


def classify_tiles(program: Program, attrs: dict, q_cuts, k_cuts, h=0):
    """(must, may) bool [Tq, Tk]: tiles surely all-allowed / possibly any-allowed."""
    qlo, qhi = tile_bounds(attrs, q_cuts)
    klo, khi = tile_bounds(attrs, k_cuts)
    tq, tk = len(q_cuts) - 1, len(k_cuts) - 1
    res = Tri.of(evaluate(program, TileTok(qlo, qhi, (tq, 1)), TileTok(klo, khi, (1, tk)), h))
    must = torch.broadcast_to(res.must, (tq, tk)).clone()
    may = torch.broadcast_to(res.may, (tq, tk)).clone()
    return must, may | must


def evaluate_block(program: Program, attrs: dict, q_idx: torch.Tensor, k_idx: torch.Tensor, h=0):
    """Dense allow for the given query and key index vectors -> bool [len(q), len(k)]."""
    out = evaluate(program, Tok(attrs, q_idx[:, None]), Tok(attrs, k_idx[None, :]), h)
    return torch.broadcast_to(torch.as_tensor(out), (len(q_idx), len(k_idx)))
