"""Token views as expressions, for the spec compiler (lower.py): inside a known segment every
token attribute is closed-form in the token index (`SegTok`), or, for layouts of many segments,
every attribute and segment selection is a per-token table lookup (`TableTok`); and the values
of the size parameters those expressions read (`param_value`), per layout.
"""
from __future__ import annotations

import hashlib

import torch

from . import expr
from .expr import E, param, var
from .tokens import grid_coordinates


# ---------------------------------------------------------------- symbolic token views
def _shape(seg: dict) -> str:
    """How a segment's attributes are computed: grid3 / grid2 closed-form, frames by lookup, line."""
    if "grid" in seg:
        return "grid3" if len(seg["grid"]) == 3 else "grid2"
    return "frames" if "frames" in seg else "line"


LOOKUP = object()  # an attribute without a closed form: read from the token table
GRID_DIVIDED = frozenset({"t", "frame", "row", "col", "cell", "ring"})  # grid attributes whose closed
# form divides by a grid size (form "grid tables" reads them from per-token tables instead)


class SegTok:
    """A token of segment `seg` seen from side `side` ("q" or "kv"): attributes as expressions.
    consts: per-segment modality and branch ids (numbered by the token table)."""

    def __init__(self, spec, side: str, seg: int, user_attrs: frozenset, consts: dict, grid_tables: bool = False):
        self._spec, self._side, self._seg, self._user, self._consts = spec, side, seg, user_attrs, consts
        self._grid_tables = grid_tables

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._consts:
            return expr.const(self._consts[name][self._seg])
        seg = self._spec.segments[self._seg]
        grid_lookup = self._grid_tables and name in GRID_DIVIDED and "grid" in seg
        value = LOOKUP if grid_lookup else _attribute(seg, self._seg, self._side, name, self._user)
        return expr.table(name, self._side) if value is LOOKUP else value

    def _in_segments(self, sel) -> bool:
        return bool(sel[self._seg])

    def _chunk_ordinal(self, size: int) -> E:
        """Chunks numbered across segments in order (same order as (segment, local // size))."""
        first = param("chunk0", self._seg, size) if self._seg else 0
        return first + self.local // size


def _attribute(seg: dict, s: int, side: str, name: str, user: frozenset):  # noqa: C901 - one table
    """The attribute `name` of a token of segment s (index variable `side`), or LOOKUP."""
    idx = var(side)
    local = idx - param("start", s) if s else idx  # the first segment starts at 0
    kind = _shape(seg)
    f0 = param("f0", s) if s else expr.const(0)
    fixed = {"index": idx, "segment": s, "local": local, "length": param("len", s)}
    if name in fixed:
        return expr.const(fixed[name])
    if name in user:
        return LOOKUP if name in seg.get("attrs", {}) else expr.const(-1)
    if kind == "grid3" or kind == "grid2":
        hw, h, w = param("hw", s), param("h", s), param("w", s)
        # the token table's own formulas (tokens.grid_coordinates); t * hw <= local and row * w <= cell,
        # so the products are bounded (no 64-bit arithmetic)
        c = grid_coordinates(local, h, w, hw, kind == "grid3", expr.bounded_mul, expr.minimum)
        t = expr.const(c["t"])
        table = {**c, "t": t, "height": h, "width": w, "frames": param("frames", s), "frame": t + f0}
    elif kind == "frames":
        table = {"t": LOOKUP, "frame": LOOKUP, "cell": local, "row": expr.const(0), "col": local,
                 "ring": expr.const(-1), "height": expr.const(1), "width": param("len", s),
                 "frames": param("frames", s)}
    else:
        table = {"t": local, "cell": local, "row": expr.const(0), "col": local, "ring": expr.const(-1),
                 "height": expr.const(1), "width": param("len", s), "frames": param("len", s),
                 "frame": local + f0}
    if name not in table:
        raise AttributeError(name)
    return table[name]


class TableTok:
    """A token seen from side `side` with every attribute a per-token table lookup: the lowering of
    layouts too many segments long for a closed form per segment pair (its size grows with the
    rules, not the segments). A segment selection is a per-token 0/1 table named by its content."""

    def __init__(self, side: str):
        self._side = side

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return expr.table(name, self._side)

    def _in_segments(self, sel) -> E:
        return expr.table(selection_name(sel), self._side) == 1

    def _chunk_ordinal(self, size: int) -> E:
        """Chunks numbered across segments in order (as SegTok's), from one table."""
        return expr.table(f"chunk:{size}", self._side)


_SELECTIONS: dict = {}  # selection table name -> bool [segments] (content-addressed)


def selection_name(sel: torch.Tensor) -> str:
    """A segment selection's table name: its content, so other sizes of a design share names."""
    bits = "".join("1" if b else "0" for b in sel.tolist())
    name = f"in:{hashlib.sha1(bits.encode()).hexdigest()[:16]}"
    _SELECTIONS[name] = sel.clone()
    return name


def table_column(table, name: str) -> torch.Tensor:
    """The per-token values of lookup `name` for a token table: an attribute, a segment selection
    (in:...) or chunks numbered across segments (chunk:SIZE)."""
    if name.startswith("in:"):
        return _SELECTIONS[name].to(torch.int64)[table.attrs["segment"]]
    if name.startswith("chunk:"):
        size = int(name.split(":", 1)[1])
        per = -(-torch.tensor(table.sizes, dtype=torch.int64) // size)
        first = torch.cumsum(per, 0) - per
        return first[table.attrs["segment"]] + table.attrs["local"] // size
    return table.attrs[name]


# ---------------------------------------------------------------- sizes -> parameter values
def param_value(table, key: tuple) -> int:
    """The value of one size parameter for a token table (what the captured tensor holds)."""
    name, s = key[0], key[1]
    starts = list(table.starts) + [table.n]
    if name == "start":
        return starts[s]
    if name == "len":
        return table.sizes[s]
    grid = table.grids[s]
    if name in ("h", "w", "hw", "frames") and grid is not None:
        t, h, w = ([1] + list(grid)) if len(grid) == 2 else grid
        return {"h": h, "w": w, "hw": h * w, "frames": t}[name]
    if name == "frames":
        return int(table.attrs["t"][starts[s + 1] - 1]) + 1
    if name == "f0":
        return int(table.attrs["frame"][starts[s]]) - int(table.attrs["t"][starts[s]])
    if name == "chunk0":
        size = key[2]
        return sum(-(-n // size) for n in table.sizes[:s])
    raise KeyError(key)
