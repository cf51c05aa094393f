"""Interval arithmetic so the SAME pattern functions can be evaluated on whole tiles.

A tile is a (query range, key range) rectangle. Each attribute becomes an `Interval`
[lo, hi] per tile; comparisons give a `Tri` (must, may): must = true for every pair in
the tile, may = true for some pair. Tiles that are surely full or surely empty are
decided without touching their tokens; only "maybe" tiles are evaluated token by token.
That is what lets a 128k-token layout be analysed and block-masked without N^2 work,
while staying exact.
"""
from __future__ import annotations

import torch


def _t(x):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


class Tri:
    """Three-valued truth per tile: must (all pairs true) and may (some pair true)."""

    __slots__ = ("must", "may")

    def __init__(self, must, may):
        self.must, self.may = _t(must), _t(may)

    @staticmethod
    def of(x) -> "Tri":
        return x if isinstance(x, Tri) else Tri(x, x)

    def __and__(self, other):
        o = Tri.of(other)
        return Tri(self.must & o.must, self.may & o.may)

    __rand__ = __and__

    def __or__(self, other):
        o = Tri.of(other)
        return Tri(self.must | o.must, self.may | o.may)

    __ror__ = __or__

    def negate(self) -> "Tri":
        """not: must and may swap (a method, as torch.compile cannot trace `~` on a Python object)."""
        return Tri(~self.may, ~self.must)

    __invert__ = negate


def where(cond, a, b):
    """torch.where that also works on Tri (tile-level) and symbolic (expr.E) values."""
    for x in (cond, a, b):
        symbolic = getattr(type(x), "symbolic_where", None)
        if symbolic is not None:
            return symbolic(cond, a, b)
    if isinstance(cond, Tri) or isinstance(a, Tri) or isinstance(b, Tri):
        c, x, y = Tri.of(cond), Tri.of(a), Tri.of(b)
        must = (c.must & x.must) | (~c.may & y.must) | (x.must & y.must)
        may = (c.may & x.may) | (~c.must & y.may)
        return Tri(must, may)
    if isinstance(cond, bool):
        return a if cond else b
    return torch.where(cond, a, b)


class Interval:
    """Closed integer interval [lo, hi] per tile (broadcasting tensors)."""

    __slots__ = ("lo", "hi")

    def __init__(self, lo, hi):
        self.lo, self.hi = _t(lo), _t(hi)

    @staticmethod
    def of(x) -> "Interval":
        return x if isinstance(x, Interval) else Interval(x, x)

    def _exact(self):
        return self.lo == self.hi

    def __add__(self, other):
        o = Interval.of(other)
        return Interval(self.lo + o.lo, self.hi + o.hi)

    __radd__ = __add__

    def __sub__(self, other):
        o = Interval.of(other)
        return Interval(self.lo - o.hi, self.hi - o.lo)

    def __rsub__(self, other):
        return Interval.of(other) - self

    def __neg__(self):
        return Interval(-self.hi, -self.lo)

    def __mul__(self, other):
        o = Interval.of(other)
        products = torch.stack(torch.broadcast_tensors(self.lo * o.lo, self.lo * o.hi,
                                                       self.hi * o.lo, self.hi * o.hi))
        return Interval(products.min(0).values, products.max(0).values)

    __rmul__ = __mul__

    def __floordiv__(self, c: int):
        if isinstance(c, Interval) or c <= 0:
            raise TypeError("tile bounds support // by a positive constant only")
        return Interval(self.lo // c, self.hi // c)

    def __mod__(self, m: int):
        if isinstance(m, Interval) or m <= 0:
            raise TypeError("tile bounds support % by a positive constant only")
        same_period = (self.lo // m) == (self.hi // m)
        return Interval(torch.where(same_period, self.lo % m, 0), torch.where(same_period, self.hi % m, m - 1))

    def __abs__(self):
        lo = torch.where(self.lo >= 0, self.lo, torch.where(self.hi <= 0, -self.hi, 0))
        hi = torch.maximum(self.hi.abs(), self.lo.abs())
        return Interval(lo, hi)

    def __lt__(self, other):
        o = Interval.of(other)
        return Tri(self.hi < o.lo, self.lo < o.hi)

    def __le__(self, other):
        o = Interval.of(other)
        return Tri(self.hi <= o.lo, self.lo <= o.hi)

    def __gt__(self, other):
        return Interval.of(other) < self

    def __ge__(self, other):
        return Interval.of(other) <= self

    def __eq__(self, other):  # type: ignore[override]
        o = Interval.of(other)
        must = self._exact() & o._exact() & (self.lo == o.lo)
        may = (self.lo <= o.hi) & (o.lo <= self.hi)
        return Tri(must, may)

    def __ne__(self, other):  # type: ignore[override]
        return (self == other).negate()  # a method, not `~`: torch.compile traces it without a graph break

    __hash__ = None  # type: ignore[assignment]
