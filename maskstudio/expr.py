"""A tiny integer/boolean expression language: what a spec's mask lowers to (lower.py).

`E` nodes are built by ordinary Python operators, so the pattern functions of patterns.py run on
them unchanged. Nodes are interned (structurally equal nodes are the same object) and folded as
they are built: constants, `x & True`, `where(c, a, False)`, `q_idx >= 0` ... An expression then
runs three ways: on tensors (a FlexAttention mask_mod or broadcast index grids), on tile intervals
(bounds.py, for BlockMask building), and printed as Python source (export).

Leaves: the variables q / kv (token indices), h (head), named size parameters `P[...]` (one small
captured tensor: a new size of the same structure changes its values, never the expression) and,
only for per-token data that has no closed form, lookups into attribute tables.

The language is two tables, in the manner of tinygrad's ops and rewrite rules: `OPS`, one row per
operation holding everything known about it, and `IDENTITIES`, one row per rewrite applied as a
node is built. Adding an op is one row, adding a rewrite one row; each row has its test (test_expr.py).
"""
from __future__ import annotations

import operator
import weakref
from collections import Counter
from typing import Callable, NamedTuple

import torch

from .bounds import Interval, Tri, where as tri_where

LEAVES = ("c", "var", "p", "tab")  # constant, variable (q / kv / h), size parameter, table lookup
_NONNEG = ("q", "kv", "h")
_INTERN: "weakref.WeakValueDictionary[tuple, E]" = weakref.WeakValueDictionary()


# ---------------------------------------------------------------- operations
class Op(NamedTuple):
    """One operation. fold: on Python values at build time; tensor: on torch tensors (a mask_mod,
    index grids); interval: on tile Intervals / Tri; source: Python source, "{0}" standing for the
    first operand's; magnitude: source of a bound on |value| from bounds on the operands' (an
    exported file checks its divisions with it); negation: a comparison's op under `not`."""
    name: str
    arity: int
    fold: Callable
    tensor: Callable
    interval: Callable
    source: str
    magnitude: str
    is_bool: bool
    negation: str | None = None


# Intervals and Tri through their methods, not operator.add(...): torch.compile traces methods of
# plain Python objects.
def _on_interval(method):
    return lambda a, *rest: method(Interval.of(a), *rest)


def _on_tri(method):
    return lambda a, *rest: method(Tri.of(a), *rest)


def _interval_ne(a, b):  # Interval.__ne__ is `~(a == b)`, and torch.compile cannot trace `~` on a Tri
    return Interval.of(a).__eq__(b).negate()


def _interval_div(a, d):  # divisors are sizes (> 0) or constants
    iv, d = Interval.of(a), (d.lo if isinstance(d, Interval) else d)
    return Interval(iv.lo // d, iv.hi // d)


def _interval_mod(a, d):
    iv, d = Interval.of(a), (d.lo if isinstance(d, Interval) else d)
    same = (iv.lo // d) == (iv.hi // d)
    return Interval(torch.where(same, iv.lo % d, 0), torch.where(same, iv.hi % d, d - 1))


def _interval_extreme(fn):
    def apply(x, y):
        a, b = Interval.of(x), Interval.of(y)
        return Interval(fn(*torch.broadcast_tensors(a.lo, b.lo)), fn(*torch.broadcast_tensors(a.hi, b.hi)))
    return apply


def _tensor_min(a, b, fn):
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    if isinstance(b, torch.Tensor):
        return fn(a, b)
    if not isinstance(a, torch.Tensor):  # two sizes compiled in as Python ints (an exported file's)
        return min(a, b) if fn is torch.minimum else max(a, b)
    return a.clamp(max=b) if fn is torch.minimum else a.clamp(min=b)  # no scalar copied to the device


def _tensor_fdiv(a, d):
    return floordiv_by_size(a, d) if isinstance(d, torch.Tensor) else a // d


def _both(a, b):
    return bool(a) and bool(b)


def _either(a, b):
    return bool(a) or bool(b)


# comparisons: two integers -> a bool (on tiles a Tri: must / may); `not` turns one into its negation
COMPARISONS = (
    Op("lt", 2, operator.lt, operator.lt, _on_interval(Interval.__lt__), "({0} < {1})", "1", True, "ge"),
    Op("le", 2, operator.le, operator.le, _on_interval(Interval.__le__), "({0} <= {1})", "1", True, "gt"),
    Op("gt", 2, operator.gt, operator.gt, _on_interval(Interval.__gt__), "({0} > {1})", "1", True, "le"),
    Op("ge", 2, operator.ge, operator.ge, _on_interval(Interval.__ge__), "({0} >= {1})", "1", True, "lt"),
    Op("eq", 2, operator.eq, operator.eq, _on_interval(Interval.__eq__), "({0} == {1})", "1", True, "ne"),
    Op("ne", 2, operator.ne, operator.ne, _interval_ne, "({0} != {1})", "1", True, "eq"),
)
UNARY = (
    Op("not", 1, operator.not_, operator.invert, _on_tri(Tri.negate), "~{0}", "1", True),
    Op("neg", 1, operator.neg, operator.neg, _on_interval(Interval.__neg__), "(-{0})", "{0}", False),
    Op("abs", 1, abs, abs, _on_interval(Interval.__abs__), "{0}.abs()", "{0}", False),
)
# binary; divisors (floordiv, fdiv, mod) are sizes >= 1 or constants, so |a // d| <= |a|, |a % d| < d
BINARY = (
    Op("add", 2, operator.add, operator.add, _on_interval(Interval.__add__), "({0} + {1})", "({0} + {1})", False),
    Op("sub", 2, operator.sub, operator.sub, _on_interval(Interval.__sub__), "({0} - {1})", "({0} + {1})", False),
    Op("mul", 2, operator.mul, operator.mul, _on_interval(Interval.__mul__), "({0} * {1})", "({0} * {1})", False),
    # a product known to stay within the layout (bounded_mul): never needs 64-bit integers
    Op("bmul", 2, operator.mul, operator.mul, _on_interval(Interval.__mul__), "({0} * {1})", "({0} * {1})", False),
    Op("floordiv", 2, operator.floordiv, operator.floordiv, _interval_div, "({0} // {1})", "{0}", False),
    # floordiv by a size through a float32 quotient (floordiv_by_size; see with_fast_divisions)
    Op("fdiv", 2, operator.floordiv, _tensor_fdiv, _interval_div, "_div({0}, {1})", "{0}", False),
    Op("mod", 2, operator.mod, operator.mod, _interval_mod, "({0} % {1})", "{1}", False),
    Op("min", 2, min, lambda a, b: _tensor_min(a, b, torch.minimum), _interval_extreme(torch.minimum),
       "torch.minimum({0}, {1})", "max({0}, {1})", False),
    Op("max", 2, max, lambda a, b: _tensor_min(a, b, torch.maximum), _interval_extreme(torch.maximum),
       "torch.maximum({0}, {1})", "max({0}, {1})", False),
    Op("and", 2, _both, operator.and_, _on_tri(Tri.__and__), "({0} & {1})", "1", True),
    Op("or", 2, _either, operator.or_, _on_tri(Tri.__or__), "({0} | {1})", "1", True),
)
# where(c, x, y) is a bool where its branches are (E.is_bool)
TERNARY = (
    Op("where", 3, lambda c, x, y: x if c else y, torch.where, lambda c, x, y: tri_where(Tri.of(c), x, y),
       "torch.where({0}, {1}, {2})", "max({1}, {2})", False),
)
OPS = {o.name: o for o in COMPARISONS + UNARY + BINARY + TERNARY}
COMPARE = frozenset(o.name for o in COMPARISONS)
# plain dicts of plain functions: what a tape walk looks up (torch.compile traces it without a break)
_TENSOR = {o.name: o.tensor for o in OPS.values()}
_FOLD = {o.name: o.fold for o in OPS.values()}
_INTERVAL = {o.name: o.interval for o in OPS.values()}


class E:
    """One interned expression node: op and args (child nodes, or the leaf's payload)."""

    __slots__ = ("op", "args", "__weakref__")

    def __new__(cls, op: str, *args):
        key = (op,) + tuple(("n", id(a)) if isinstance(a, E) else ("v", type(a).__name__, a) for a in args)
        node = _INTERN.get(key)
        if node is None:
            node = object.__new__(cls)
            node.op, node.args = op, args
            _INTERN[key] = node
        return node

    # -- what a node is
    @property
    def is_const(self) -> bool:
        return self.op == "c"

    @property
    def value(self):
        return self.args[0]

    @property
    def is_bool(self) -> bool:
        if self.op == "c":
            return isinstance(self.value, bool)
        return self.args[1].is_bool if self.op == "where" else self.op in OPS and OPS[self.op].is_bool

    def __bool__(self):
        raise TypeError("a symbolic mask expression has no truth value (a pattern used Python `if`/`and`)")

    __hash__ = object.__hash__

    # -- operators (patterns use these)
    def __add__(self, o): return op("add", self, o)
    def __radd__(self, o): return op("add", o, self)
    def __sub__(self, o): return op("sub", self, o)
    def __rsub__(self, o): return op("sub", o, self)
    def __mul__(self, o): return op("mul", self, o)
    def __rmul__(self, o): return op("mul", o, self)
    def __floordiv__(self, o): return op("floordiv", self, o)
    def __mod__(self, o): return op("mod", self, o)
    def __lt__(self, o): return op("lt", self, o)
    def __le__(self, o): return op("le", self, o)
    def __gt__(self, o): return op("gt", self, o)
    def __ge__(self, o): return op("ge", self, o)
    def __eq__(self, o): return op("eq", self, o)  # type: ignore[override]
    def __ne__(self, o): return op("ne", self, o)  # type: ignore[override]
    def __and__(self, o): return op("and", self, o)
    def __rand__(self, o): return op("and", o, self)
    def __or__(self, o): return op("or", self, o)
    def __ror__(self, o): return op("or", o, self)
    def __invert__(self): return op("not", self)
    def __neg__(self): return op("neg", self)
    def __abs__(self): return op("abs", self)

    @staticmethod
    def symbolic_where(cond, a, b):
        """where(cond, a, b) (bounds.where calls this for symbolic values)."""
        return op("where", cond, a, b)

    def __repr__(self):
        return source(self)


def const(v) -> E:
    return v if isinstance(v, E) else E("c", bool(v) if isinstance(v, bool) else int(v))


def var(name: str) -> E:
    return E("var", name)


def param(*key) -> E:
    """A size parameter, e.g. param("start", 2): the start of segment 2 in the captured tensor."""
    return E("p", *key)


def table(attr: str, side: str) -> E:
    """attrs[attr][side]: a per-token lookup (only for data without a closed form)."""
    return E("tab", attr, side)


def minimum(a, b) -> E:
    return op("min", a, b)


def bounded_mul(a, b) -> E:
    """a * b where the product is known to stay within the layout (e.g. row * W <= cell): it never
    calls for 64-bit integers, unlike a product of two free sizes."""
    return op("bmul", a, b)


def op(name: str, *args) -> E:
    """Build a node, folding what is known at build time: constants, then the first identity that
    applies."""
    row = OPS[name]
    if len(args) != row.arity:
        raise TypeError(f"{name} takes {row.arity} operands, got {len(args)}")
    a = [const(x) for x in args]
    if all(x.is_const for x in a):
        return const(row.fold(*(x.value for x in a)))
    folded = _simplify(name, a)
    return folded if folded is not None else E(name, *a)


# ---------------------------------------------------------------- identities
class Rule(NamedTuple):
    """One algebraic identity: the rewrite (as text, also the test's id), the ops it applies to and
    fn(op name, *operands) -> the rewritten node, or None where it does not match. Operands are never
    all constants (those fold first)."""
    rewrite: str
    ops: tuple
    fn: Callable


def _is(x: E, v) -> bool:
    """x is the constant v (as Python compares: False == 0, True == 1)."""
    return x.op == "c" and x.value == v


def _flag(x: E, v: bool) -> bool:
    """x is the bool constant v (not an integer)."""
    return x.op == "c" and isinstance(x.value, bool) and x.value is v


def _truthy(x: E, v: bool) -> bool:
    """x is a constant whose truth value is v (an integer counts: 0 is false)."""
    return x.op == "c" and bool(x.value) is v


def _minus_0(x: E, y: E) -> bool:
    """x, y are (a - b), 0."""
    return x.op == "sub" and _is(y, 0)


def _nonneg(x: E) -> bool:
    return x.op == "var" and x.value in _NONNEG


def _negation(x: E):
    """The op of `not x` for a comparison x, else None."""
    row = OPS.get(x.op)
    return row.negation if row is not None else None


_ANY = tuple(sorted(COMPARE))
IDENTITIES = (
    Rule("where(True, x, y) -> x", ("where",), lambda o, c, x, y: x if _truthy(c, True) else None),
    Rule("where(False, x, y) -> y", ("where",), lambda o, c, x, y: y if _truthy(c, False) else None),
    Rule("where(c, x, x) -> x", ("where",), lambda o, c, x, y: x if x is y else None),
    Rule("where(c, True, y) -> c | y", ("where",), lambda o, c, x, y: op("or", c, y) if _flag(x, True) else None),
    Rule("where(c, False, y) -> ~c & y", ("where",),
         lambda o, c, x, y: op("and", op("not", c), y) if _flag(x, False) else None),
    Rule("where(c, x, True) -> ~c | x", ("where",),
         lambda o, c, x, y: op("or", op("not", c), x) if _flag(y, True) else None),
    Rule("where(c, x, False) -> c & x", ("where",), lambda o, c, x, y: op("and", c, x) if _flag(y, False) else None),
    # a constant operand of & / | is truthy or not, on either side
    Rule("x & False -> False", ("and",),
         lambda o, x, y: const(False) if _truthy(x, False) or _truthy(y, False) else None),
    Rule("x & True -> x", ("and",), lambda o, x, y: y if _truthy(x, True) else x if _truthy(y, True) else None),
    Rule("x | True -> True", ("or",), lambda o, x, y: const(True) if _truthy(x, True) or _truthy(y, True) else None),
    Rule("x | False -> x", ("or",), lambda o, x, y: y if _truthy(x, False) else x if _truthy(y, False) else None),
    Rule("x & x -> x", ("and",), lambda o, x, y: x if x is y else None),
    Rule("x | x -> x", ("or",), lambda o, x, y: x if x is y else None),
    Rule("~~x -> x", ("not",), lambda o, x: x.args[0] if x.op == "not" else None),
    # built as is, not folded again
    Rule("~(a < b) -> a >= b  (each comparison to its negation)", ("not",),
         lambda o, x: E(_negation(x), *x.args) if _negation(x) else None),
    Rule("x <= x -> True  (>=, ==)", ("le", "ge", "eq"), lambda o, x, y: const(True) if x is y else None),
    Rule("x < x -> False  (>, !=)", ("lt", "gt", "ne"), lambda o, x, y: const(False) if x is y else None),
    Rule("(a + c) < (b + c) -> a < b  (any comparison; - as +)", _ANY,
         lambda o, x, y: op(o, x.args[0], y.args[0])
         if x.op == y.op and x.op in ("add", "sub") and x.args[1] is y.args[1] else None),
    Rule("(c + a) < (c + b) -> a < b  (any comparison)", _ANY,
         lambda o, x, y: op(o, x.args[1], y.args[1]) if x.op == y.op == "add" and x.args[0] is y.args[0] else None),
    # the causal test a window already shares: kv <= q
    Rule("(a - b) >= 0 -> b <= a", ("ge",), lambda o, x, y: op("le", *x.args[::-1]) if _minus_0(x, y) else None),
    Rule("(a - b) > 0 -> b < a", ("gt",), lambda o, x, y: op("lt", *x.args[::-1]) if _minus_0(x, y) else None),
    Rule("(a - b) <= 0 -> a <= b", ("le",), lambda o, x, y: op("le", *x.args) if _minus_0(x, y) else None),
    Rule("(a - b) < 0 -> a < b", ("lt",), lambda o, x, y: op("lt", *x.args) if _minus_0(x, y) else None),
    # token indices and heads are never negative
    Rule("q >= 0 -> True  (kv, h; any constant <= 0)", ("ge",),
         lambda o, x, y: const(True) if _nonneg(x) and y.is_const and y.value <= 0 else None),
    Rule("q < 0 -> False  (kv, h; any constant <= 0)", ("lt",),
         lambda o, x, y: const(False) if _nonneg(x) and y.is_const and y.value <= 0 else None),
    Rule("x + 0 -> x", ("add",), lambda o, x, y: x if _is(y, 0) else None),
    Rule("x - 0 -> x", ("sub",), lambda o, x, y: x if _is(y, 0) else None),
    Rule("0 + x -> x", ("add",), lambda o, x, y: y if _is(x, 0) else None),
    Rule("x * 0 -> 0  (0 * x)", ("mul",), lambda o, x, y: const(0) if _is(x, 0) or _is(y, 0) else None),
    Rule("x * 1 -> x  (1 * x)", ("mul",), lambda o, x, y: y if _is(x, 1) else x if _is(y, 1) else None),
    Rule("x // 1 -> x", ("floordiv",), lambda o, x, y: x if _is(y, 1) else None),
)
_RULES = {name: tuple(r for r in IDENTITIES if name in r.ops) for name in OPS}


def _simplify(name: str, a: list):
    """The first identity (in IDENTITIES' order) that rewrites op `name` on operands a, or None."""
    for rule in _RULES[name]:
        out = rule.fn(name, *a)
        if out is not None:
            return out
    return None


def nodes(root: E) -> list[E]:
    """Every node once, children before parents."""
    seen, order, stack = set(), [], [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in node.args if isinstance(c, E))
    return order


def _rebuild(root: E, leaf, inner) -> E:
    """Bottom-up copy: leaf(n) for leaves, inner(n, new args) for the rest (folded again)."""
    out: dict[int, E] = {}
    for n in nodes(root):
        if n.op in LEAVES:
            out[id(n)] = leaf(n)
        else:
            out[id(n)] = inner(n, [out[id(c)] if isinstance(c, E) else c for c in n.args])
    return out[id(root)]


def substitute(root: E, values: dict) -> E:
    """The expression with some size parameters replaced by constants (folded again)."""
    return _rebuild(root, lambda n: const(values[n.args]) if n.op == "p" and n.args in values else n,
                    lambda n, args: op(n.op, *args))


# ---------------------------------------------------------------- divisions by sizes
FAST_DIVIDEND = 1 << 21  # |dividend| below this: a float32 quotient is off by at most one


def floordiv_by_size(a, d):
    """a // d for a size d >= 1 and |a| < FAST_DIVIDEND: a float32 quotient, then one correction.
    GPUs have no integer divider: by a size read at run time (in P) `//` is a long software sequence
    per score, this a few instructions (by a Python constant it is already a multiply and shift)."""
    q = torch.floor(a.to(torch.float32) / d.to(torch.float32)).to(a.dtype)
    r = a - q * d
    return q - (r < 0).to(a.dtype) + (r >= d).to(a.dtype)


def division_bounds(root: E, env: dict, params, slots: dict, tables=None) -> dict:
    """{floordiv node dividing by a size parameter: largest |dividend|} over interval inputs
    (env: Intervals for q / kv / h; params[slot] and tables[attr] give Intervals)."""
    order, steps = nodes(root), tape(root)
    val = _run(steps, env, params, slots, lambda a: tables[a], _interval_apply, every=True)
    found: dict = {}
    for i, (o, args) in enumerate(steps):
        if o in ("floordiv", "fdiv") and steps[args[1]][0] == "p":
            iv = Interval.of(val[args[0]])
            found[order[i]] = int(torch.maximum(iv.lo.abs().max(), iv.hi.abs().max()))
    return found


def divides_by_size(node: E) -> bool:
    """A division whose divisor is a size parameter (what may run as a float quotient)."""
    return node.op in ("floordiv", "fdiv") and node.args[1].op == "p"


def reads_head(root: E) -> bool:
    """Does the expression switch on the head index (per-head rules)?"""
    return ("h",) in leaves(root, "var")


def with_fast_divisions(root: E, safe: set) -> E:
    """floordiv nodes in `safe` (divisions by a size whose dividends stay below FAST_DIVIDEND)
    become `fdiv`: the same value, computed through a float32 quotient on tensors. Others that are
    fdiv but no longer safe turn back into exact divisions."""
    def inner(n, args):
        if n.op in ("floordiv", "fdiv"):
            return E("fdiv" if n in safe else "floordiv", *args) if not all(a.is_const for a in args) \
                else op("floordiv", *args)
        return op(n.op, *args)
    return _rebuild(root, lambda n: n, inner)


def leaves(root: E, kind: str) -> list[tuple]:
    """Payloads of the leaves of one kind ("p", "tab", "var"), in first-use order."""
    return [n.args for n in nodes(root) if n.op == kind]


# ---------------------------------------------------------------- evaluation
def tape(root: E) -> tuple:
    """The expression as a flat tape: (op, args) per node, children referred to by position.
    Evaluating a tape needs no object identities, so torch.compile traces it without a break."""
    order = nodes(root)
    pos = {id(n): i for i, n in enumerate(order)}
    return tuple((n.op, tuple(pos[id(c)] if isinstance(c, E) else c for c in n.args)
                  if n.op not in LEAVES else n.args) for n in order)


def _run(steps: tuple, env: dict, params, slots: dict, lookup, apply, every: bool = False):
    """Walk a tape: leaves from env / params / lookup, inner nodes through apply(op, values).
    Returns the root's value, or every step's value (every=True). A value is let go after its last
    reader, so memory holds the live values, not the whole tape (1,179 steps on [128, 4096] rows: 7 GB)."""
    last = {} if every else {a: i for i, (o, args) in enumerate(steps) if o not in LEAVES for a in args}
    val: list = []
    for i, (o, args) in enumerate(steps):
        if o == "c":
            v = args[0]
        elif o == "var":
            v = env[args[0]]
        elif o == "p":
            v = params[slots[args]]
        elif o == "tab":
            v = lookup(args)
        else:
            v = apply(o, [val[a] for a in args])
            for a in args:
                if last.get(a) == i:
                    val[a] = None
        val.append(v)
    return val if every else val[-1]


def _tensor_apply(o, args):
    """On tensors; a step on Python constants only (sizes compiled into a kernel) folds in Python."""
    if not isinstance(args[0], torch.Tensor) and (o == "where" or not any(isinstance(a, torch.Tensor) for a in args)):
        return _FOLD[o](*args)
    return _TENSOR[o](*args)


def _interval_apply(o, args):
    return _INTERVAL[o](*args)


def run_tape(steps: tuple, env: dict, params, slots: dict, tables: dict | None = None, at: dict | None = None):
    """Run a tape on tensors. env: q / kv / h values; params: the captured size tensor, or Python
    ints (indexed by `slots[key]`); tables: attribute tensors for lookup leaves, read at env's q / kv
    or at `at`'s (a packed row: places inside a document in env, places in the row in `at`)."""
    where = at or env
    out = _run(steps, env, params, slots, lambda a: tables[a[0]][where[a[1]]], _tensor_apply)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:  # a constant mask
        q = env["q"]
        out = (q >= 0) if bool(out) else (q < 0)
    return out


def evaluate(root: E, env: dict, params, slots: dict, tables: dict | None = None):
    """Run the expression on tensors (see run_tape)."""
    return run_tape(tape(root), env, params, slots, tables)


def evaluate_tiles(root: E, env: dict, params, slots: dict, tables: dict | None = None) -> Tri:
    """Run the expression on tiles: env holds `Interval`s for q / kv (per tile min and max),
    tables hold (lo, hi) per tile and side. Returns Tri(must, may) per tile pair."""
    return Tri.of(_run(tape(root), env, params, slots, lambda a: tables[a], _interval_apply))


def _decided(v):
    """True / False when an interval value holds (fails) at every pair, else None."""
    if isinstance(v, bool):
        return v
    if isinstance(v, Tri):
        if bool(torch.as_tensor(v.must).all()):
            return True
        if not bool(torch.as_tensor(v.may).any()):
            return False
    return None


def specialize(root: E, env: dict, params, slots: dict, tables: dict | None = None) -> E:
    """The expression over a region (env: Intervals for q / kv, tables: their lookups' ranges)
    with what the bounds decide there folded away: a bool node that holds or fails at every pair
    becomes a constant, a where whose condition is decided becomes its branch. A query tile inside
    one segment then runs that segment's row of the closed form, not a select over all of them."""
    order = nodes(root)
    val = _run(tape(root), env, params, slots, lambda a: tables[a], _interval_apply, every=True)
    known = {id(n): _decided(v) for n, v in zip(order, val) if n.op not in LEAVES and n.is_bool}

    def inner(n, args):
        if known.get(id(n)) is not None:
            return const(known[id(n)])
        if n.op == "where" and args[0].is_const:
            return args[1] if args[0].value else args[2]
        return op(n.op, *args)
    return _rebuild(root, lambda n: n, inner)


# ---------------------------------------------------------------- source
def magnitude_source(root: E, names: dict, param_ref) -> str | None:
    """Python source of an upper bound on |root| (names: a variable's bound, e.g. {"q": "n"};
    divisors are sizes >= 1, so |a // d| <= |a| and 0 <= a % d < d), or None when it reads a
    per-token table. The exported file checks its divisions with it at run time."""
    text: dict[int, str] = {}
    for n in nodes(root):
        o, a = n.op, n.args
        if o == "tab":
            return None
        if o == "c":
            s = str(abs(int(a[0])))
        elif o == "var":
            s = names[a[0]]
        elif o == "p":
            s = f"abs({param_ref(a)})"
        else:
            s = OPS[o].magnitude.format(*(text[id(c)] for c in a))
        text[id(n)] = s
    return text[id(root)]


def source(root: E, names: dict | None = None, param_ref=None, table_ref=None) -> str:
    """The expression as one Python expression (fully parenthesised; for messages and tests)."""
    lines, expr = source_lines(root, names or {}, param_ref, table_ref, share=False)
    return expr


SOURCE_DEPTH = 32  # nested operations per printed line (Python refuses ~200 nested parentheses)


def source_lines(root: E, names: dict, param_ref=None, table_ref=None, share: bool = True, templates=None):
    """(assignments, final expression) as Python source: subexpressions used more than once get a
    local name (`t3 = ...`) so the printed mask_mod reads like a hand-written one, and so does every
    SOURCE_DEPTH-th level of a deep chain (hundreds of overlays), so the file always compiles.
    templates: {op: source} in place of OPS' own (the export's size-constant-safe helpers)."""
    param_ref = param_ref or (lambda key: f"P[{key!r}]")
    table_ref = table_ref or (lambda attr, side: f"{attr}[{side}]")
    order = nodes(root)
    uses = Counter(id(c) for n in order for c in n.args if isinstance(c, E))
    text: dict[int, str] = {}
    depth: dict[int, int] = {}  # nesting of the text so far: named past SOURCE_DEPTH (Python's parser limit)
    lines = []
    for n in order:
        o, a = n.op, n.args
        depth[id(n)] = 1 + max((depth[id(c)] for c in a if isinstance(c, E)), default=0)
        if o == "c":
            s = repr(a[0])
        elif o == "var":
            s = names.get(a[0], a[0])
        elif o == "p":
            s = param_ref(a)
        elif o == "tab":
            s = table_ref(a[0], names.get(a[1], a[1]))
        else:
            s = (templates or {}).get(o, OPS[o].source).format(*(text[id(c)] for c in a))
            if share and (uses.get(id(n), 0) > 1 or depth[id(n)] >= SOURCE_DEPTH) and n is not root:
                name = f"t{len(lines)}"
                lines.append(f"{name} = {s}")
                s, depth[id(n)] = name, 0
        text[id(n)] = s
    return lines, text[id(root)]
