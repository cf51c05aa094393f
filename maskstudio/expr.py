"""A tiny integer/boolean expression language: what a spec's mask lowers to (lower.py).

`E` nodes are built by ordinary Python operators, so the pattern functions of patterns.py run on
them unchanged. Nodes are interned (structurally equal nodes are the same object) and folded as
they are built: constants, `x & True`, `where(c, a, False)`, `q_idx >= 0` ... An expression then
runs three ways: on tensors (a FlexAttention mask_mod or broadcast index grids), on tile intervals
(bounds.py, for BlockMask building), and printed as Python source (export).

Leaves: the variables q / kv (token indices), h (head), named size parameters `P[...]` (one small
captured tensor: a new size of the same structure changes its values, never the expression) and,
only for per-token data that has no closed form, lookups into attribute tables.
"""
from __future__ import annotations

import operator
import weakref

import torch

from .bounds import Interval, Tri, where as tri_where

_FOLD = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "bmul": operator.mul,
    "floordiv": operator.floordiv, "fdiv": operator.floordiv,
    "mod": operator.mod, "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
    "eq": operator.eq, "ne": operator.ne, "and": lambda a, b: bool(a) and bool(b),
    "or": lambda a, b: bool(a) or bool(b), "min": min, "max": max,
    "not": lambda a: not a, "neg": operator.neg, "abs": abs,
}
_FLIP = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}
_COMPARE = set(_FLIP)
_BOOL_OPS = _COMPARE | {"and", "or", "not"}
_NONNEG = ("q", "kv", "h")
_INTERN: "weakref.WeakValueDictionary[tuple, E]" = weakref.WeakValueDictionary()


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
        return self.op in _BOOL_OPS or (self.op == "c" and isinstance(self.value, bool)) or (
            self.op == "where" and self.args[1].is_bool)

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


def _nonneg(x: E) -> bool:
    return x.op == "var" and x.value in _NONNEG


def op(name: str, *args) -> E:
    """Build a node, folding what is known at build time."""
    a = [const(x) for x in args]
    if all(x.is_const for x in a) and name != "where":
        return const(_FOLD[name](*(x.value for x in a)))
    folded = _simplify(name, a)
    return folded if folded is not None else E(name, *a)


def _simplify(name, a):  # noqa: C901 - one table of identities
    if name == "where":
        c, x, y = a
        if c.is_const:
            return x if c.value else y
        if x is y:
            return x
        if x.is_const and isinstance(x.value, bool):
            return op("or", c, y) if x.value else op("and", op("not", c), y)
        if y.is_const and isinstance(y.value, bool):
            return op("or", op("not", c), x) if y.value else op("and", c, x)
        return None
    if name in ("and", "or"):
        x, y = a
        absorb, keep = (False, True) if name == "and" else (True, False)
        for u, v in ((x, y), (y, x)):
            if u.is_const:
                return const(absorb) if bool(u.value) == absorb else v
        return x if x is y else None
    if name == "not":
        x = a[0]
        if x.op == "not":
            return x.args[0]
        if x.op in _FLIP:
            return E(_FLIP[x.op], *x.args)
        return None
    x, y = a[0], a[-1]
    if name in _COMPARE:
        if x is y:
            return const(name in ("le", "ge", "eq"))
        if x.op == y.op and x.op in ("add", "sub") and x.args[1] is y.args[1]:
            return op(name, x.args[0], y.args[0])  # (a + c) < (b + c)  ->  a < b
        if x.op == y.op == "add" and x.args[0] is y.args[0]:
            return op(name, x.args[1], y.args[1])
        if x.op == "sub" and y.is_const and y.value == 0 and name in ("ge", "gt", "le", "lt"):
            a, b = x.args  # (a - b) >= 0  ->  b <= a: the causal test a window already shares
            return op({"ge": "le", "gt": "lt"}[name], b, a) if name in ("ge", "gt") else op(name, a, b)
        if _nonneg(x) and y.is_const and y.value <= 0 and name in ("ge", "lt"):
            return const(name == "ge")  # token indices and heads are >= 0
        return None
    if name in ("add", "sub") and y.is_const and y.value == 0:
        return x
    if name == "add" and x.is_const and x.value == 0:
        return y
    if name == "mul" and (x.is_const or y.is_const):
        c, other = (x, y) if x.is_const else (y, x)
        return const(0) if c.value == 0 else (other if c.value == 1 else None)
    if name == "floordiv" and y.is_const and y.value == 1:
        return x
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
        if n.op in ("c", "var", "p", "tab"):
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
    GPUs have no integer divider: dividing by a value known only at run time (a size in P) is a long
    software sequence per score, this is a few instructions (a Python constant is already a
    multiply and shift)."""
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
_TENSOR = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "bmul": operator.mul, "floordiv": operator.floordiv,
    "mod": operator.mod, "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
    "eq": operator.eq, "ne": operator.ne, "and": operator.and_, "or": operator.or_,
    "not": operator.invert, "neg": operator.neg, "abs": abs,
}


def _tensor_min(a, b, fn):
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    if isinstance(b, torch.Tensor):
        return fn(a, b)
    return a.clamp(max=b) if fn is torch.minimum else a.clamp(min=b)  # no scalar copied to the device


def tape(root: E) -> tuple:
    """The expression as a flat tape: (op, args) per node, children referred to by position.
    Evaluating a tape needs no object identities, so torch.compile traces it without a break."""
    order = nodes(root)
    pos = {id(n): i for i, n in enumerate(order)}
    return tuple((n.op, tuple(pos[id(c)] if isinstance(c, E) else c for c in n.args)
                  if n.op not in ("c", "var", "p", "tab") else n.args) for n in order)


def _run(steps: tuple, env: dict, params, slots: dict, lookup, apply, every: bool = False):
    """Walk a tape: leaves from env / params / lookup, inner nodes through apply(op, values).
    Returns the root's value, or every step's value (every=True)."""
    val: list = []
    for o, args in steps:
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
        val.append(v)
    return val if every else val[-1]


def _tensor_op(o, args):
    if o == "fdiv":
        return floordiv_by_size(*args) if isinstance(args[1], torch.Tensor) else args[0] // args[1]
    if o == "where":
        return torch.where(*args)
    if o in ("min", "max"):
        return _tensor_min(args[0], args[1], torch.minimum if o == "min" else torch.maximum)
    return _TENSOR[o](*args)


def run_tape(steps: tuple, env: dict, params, slots: dict, tables: dict | None = None, at: dict | None = None):
    """Run a tape on tensors. env: q / kv / h values; params: the captured size tensor
    (indexed by `slots[key]`); tables: attribute tensors for lookup leaves, read at env's q / kv
    or at `at`'s (a packed row: places inside a document in env, places in the row in `at`)."""
    where = at or env
    out = _run(steps, env, params, slots, lambda a: tables[a[0]][where[a[1]]], _tensor_op)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:  # a constant mask
        q = env["q"]
        out = (q >= 0) if bool(out) else (q < 0)
    return out


def evaluate(root: E, env: dict, params, slots: dict, tables: dict | None = None):
    """Run the expression on tensors (see run_tape)."""
    return run_tape(tape(root), env, params, slots, tables)


def _interval_op(o, args):
    x = args[0]
    if o in ("and", "or", "not") or o in _COMPARE:
        if o in _COMPARE:
            return getattr(Interval.of(x), f"__{o}__")(args[1])
        if o == "not":
            return Tri.of(x).negate()
        return (Tri.of(x) & args[1]) if o == "and" else (Tri.of(x) | args[1])
    if o in ("floordiv", "fdiv", "mod"):  # divisors are sizes (> 0) or constants
        iv, d = Interval.of(x), args[1]
        if isinstance(d, Interval):
            d = d.lo
        if o != "mod":
            return Interval(iv.lo // d, iv.hi // d)
        same = (iv.lo // d) == (iv.hi // d)
        return Interval(torch.where(same, iv.lo % d, 0), torch.where(same, iv.hi % d, d - 1))
    if o in ("min", "max"):
        a, b = Interval.of(x), Interval.of(args[1])
        fn = torch.minimum if o == "min" else torch.maximum
        return Interval(fn(*torch.broadcast_tensors(a.lo, b.lo)), fn(*torch.broadcast_tensors(a.hi, b.hi)))
    if o == "abs":
        return abs(Interval.of(x))
    if o == "neg":
        return -Interval.of(x)
    # the method, not operator.add(...): torch.compile traces methods of plain Python objects
    return getattr(Interval.of(x), _DUNDER[o])(args[1])


_DUNDER = {"add": "__add__", "sub": "__sub__", "mul": "__mul__", "bmul": "__mul__"}


def _interval_apply(o, args):
    return tri_where(Tri.of(args[0]), *args[1:]) if o == "where" else _interval_op(o, args)


def evaluate_tiles(root: E, env: dict, params, slots: dict, tables: dict | None = None) -> Tri:
    """Run the expression on tiles: env holds `Interval`s for q / kv (per tile min and max),
    tables hold (lo, hi) per tile and side. Returns Tri(must, may) per tile pair."""
    return Tri.of(_run(tape(root), env, params, slots, lambda a: tables[a], _interval_apply))


# ---------------------------------------------------------------- source
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "bmul": "*", "floordiv": "//", "mod": "%", "lt": "<", "le": "<=",
           "gt": ">", "ge": ">=", "eq": "==", "ne": "!=", "and": "&", "or": "|"}


_MAGNITUDE = {"add": "({0} + {1})", "sub": "({0} + {1})", "mul": "({0} * {1})", "bmul": "({0} * {1})",
              "floordiv": "{0}", "fdiv": "{0}", "neg": "{0}", "abs": "{0}", "mod": "{1}",
              "min": "max({0}, {1})", "max": "max({0}, {1})", "where": "max({1}, {2})"}


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
        elif o in _MAGNITUDE:
            s = _MAGNITUDE[o].format(*(text[id(c)] for c in a))
        else:  # a comparison or a boolean
            s = "1"
        text[id(n)] = s
    return text[id(root)]


def source(root: E, names: dict | None = None, param_ref=None, table_ref=None) -> str:
    """The expression as one Python expression (fully parenthesised; for messages and tests)."""
    lines, expr = source_lines(root, names or {}, param_ref, table_ref, share=False)
    return expr


def source_lines(root: E, names: dict, param_ref=None, table_ref=None, share: bool = True):
    """(assignments, final expression) as Python source: subexpressions used more than once get a
    local name (`t3 = ...`) so the printed mask_mod reads like a hand-written one."""
    param_ref = param_ref or (lambda key: f"P[{key!r}]")
    table_ref = table_ref or (lambda attr, side: f"{attr}[{side}]")
    order = nodes(root)
    uses: dict[int, int] = {}
    for n in order:
        for c in n.args:
            if isinstance(c, E):
                uses[id(c)] = uses.get(id(c), 0) + 1
    text: dict[int, str] = {}
    lines = []
    for n in order:
        o, a = n.op, n.args
        if o == "c":
            s = repr(a[0])
        elif o == "var":
            s = names.get(a[0], a[0])
        elif o == "p":
            s = param_ref(a)
        elif o == "tab":
            s = table_ref(a[0], names.get(a[1], a[1]))
        else:
            t = [text[id(c)] for c in a]
            if o in _SYMBOL:
                s = f"({t[0]} {_SYMBOL[o]} {t[1]})"
            elif o == "not":
                s = f"~{t[0]}"
            elif o == "neg":
                s = f"(-{t[0]})"
            elif o == "abs":
                s = f"{t[0]}.abs()"
            elif o in ("min", "max"):
                s = f"torch.{o}imum({t[0]}, {t[1]})"
            elif o == "fdiv":
                s = f"_div({t[0]}, {t[1]})"
            else:
                s = f"torch.where({t[0]}, {t[1]}, {t[2]})"
            if share and uses.get(id(n), 0) > 1 and n is not root:
                name = f"t{len(lines)}"
                lines.append(f"{name} = {s}")
                s = name
        text[id(n)] = s
    return lines, text[id(root)]
