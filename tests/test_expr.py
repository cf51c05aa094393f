"""The expression language's two tables (expr.py): each operation row agrees with itself across
its forms (build-time fold, tensors, tile intervals, Python source, magnitude bound), each
identity row fires on its example and keeps the value, and a tape with every op traces whole."""
import pytest
import torch

from maskstudio import expr
from maskstudio.bounds import Interval, Tri
from maskstudio.expr import E, const, op, param, var

q, kv, h = var("q"), var("kv"), var("h")
P, W = param("start", 0), param("hw", 0)
SLOTS = {("start", 0): 0, ("hw", 0): 1}

# ---------------------------------------------------------------- operation rows
# operand kinds per op: "int" any integer, "size" a divisor >= 1, "bool"; a new op needs a row here
OPERANDS = {
    "lt": ("int", "int"), "le": ("int", "int"), "gt": ("int", "int"), "ge": ("int", "int"),
    "eq": ("int", "int"), "ne": ("int", "int"),
    "not": ("bool",), "neg": ("int",), "abs": ("int",),
    "add": ("int", "int"), "sub": ("int", "int"), "mul": ("int", "int"), "bmul": ("int", "int"),
    "floordiv": ("int", "size"), "fdiv": ("int", "size"), "mod": ("int", "size"),
    "min": ("int", "int"), "max": ("int", "int"), "and": ("bool", "bool"), "or": ("bool", "bool"),
    "where": ("bool", "bool", "bool"),  # tiles (bounds.where) take masks as branches
}
TILES, POINTS = 24, 16


def test_every_op_row_has_a_test_row():
    assert set(OPERANDS) == set(expr.OPS)
    assert set(expr.OPS) == {o.name for group in (expr.COMPARISONS, expr.UNARY, expr.BINARY, expr.TERNARY)
                             for o in group}


def tile_operand(kind: str, g: torch.Generator):
    """(a tile bound per tile, values at POINTS places inside each tile's bound)."""
    if kind == "bool":
        must = torch.rand(TILES, 1, generator=g) < 0.3
        may = must | (torch.rand(TILES, 1, generator=g) < 0.5)
        free = torch.rand(TILES, POINTS, generator=g) < 0.5
        return Tri(must, may), must | (may & free)
    if kind == "size":  # a size is one value per tile (a parameter)
        d = torch.randint(1, 9, (TILES, 1), generator=g)
        return Interval(d, d), d.expand(TILES, POINTS)
    lo = torch.randint(-60, 60, (TILES, 1), generator=g)
    hi = lo + torch.randint(0, 30, (TILES, 1), generator=g)
    return Interval(lo, hi), lo + (torch.rand(TILES, POINTS, generator=g) * (hi - lo + 1)).long().clamp(max=hi - lo)


@pytest.mark.parametrize("name", sorted(OPERANDS))
def test_op_row(name):
    row, kinds = expr.OPS[name], OPERANDS[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    bounds, values = zip(*(tile_operand(k, g) for k in kinds))
    assert row.arity == len(kinds)
    out = row.tensor(*values)
    yields_bool = row.is_bool or name == "where"  # where: a bool as its branches are
    assert (out.dtype == torch.bool) == yields_bool
    # fold: the same value on Python numbers
    for i, j in ((0, 0), (3, 5), (TILES - 1, POINTS - 1), (7, 2)):
        assert row.fold(*(v[i, j].item() for v in values)) == out[i, j].item()
    # source: the printed form computes the same
    names = {f"a{i}": v for i, v in enumerate(values)}
    printed = eval(row.source.format(*names), {"torch": torch, "_div": expr.floordiv_by_size, **names})
    assert torch.equal(printed, out)
    # interval: the tile result bounds every value inside the tile
    tile = row.interval(*bounds)
    if yields_bool:
        tri = Tri.of(tile)
        assert bool((out | ~tri.must).all()) and bool((~out | tri.may).all())
    else:
        iv = Interval.of(tile)
        assert bool(((iv.lo <= out) & (out <= iv.hi)).all())
    # magnitude: a bound on |value| from bounds on |operands|
    widest = [str(int(v.long().abs().max())) for v in values]
    assert eval(row.magnitude.format(*widest)) >= int(out.long().abs().max())
    # negation: what `not` turns a comparison into is its complement
    if row.negation is not None:
        assert torch.equal(expr.OPS[row.negation].tensor(*values), ~out)


def test_op_folds_constants_checks_arity_and_interns():
    assert op("add", 2, 3) is const(5) and op("where", True, 4, 5) is const(4)
    assert const(True) is not const(1) and E("c", 1) is const(1)
    assert (q + kv) is (q + kv) and (q + kv) is not (kv + q)
    assert (q < kv).is_bool and not (q + kv).is_bool and op("where", q < kv, q < 1, kv < 1).is_bool
    with pytest.raises(TypeError, match="takes 2 operands"):
        op("add", q)
    with pytest.raises(TypeError, match="no truth value"):
        bool(q < 3)


def test_source_and_magnitude_read_the_rows():
    e = op("where", q < P, abs(-(q - kv)), expr.minimum(kv // W, kv % 3))
    assert expr.source(e) == ("torch.where((q < P[('start', 0)]), (-(q - kv)).abs(), "
                              "torch.minimum((kv // P[('hw', 0)]), (kv % 3)))")
    assert expr.magnitude_source(e, {"q": "n", "kv": "n"}, lambda k: f"P[{SLOTS[k]}]") == "max((n + n), max(n, 3))"
    assert expr.magnitude_source(e & (expr.table("frame", "q") > 0), {}, str) is None


# ---------------------------------------------------------------- identity rows
# rewrite -> examples: (op, operands, what it is rewritten to); a new identity needs a row here
EXAMPLES = {
    "where(True, x, y) -> x": [("where", (True, q, kv), lambda: q)],
    "where(False, x, y) -> y": [("where", (False, q, kv), lambda: kv)],
    "where(c, x, x) -> x": [("where", (q < kv, P, P), lambda: P)],
    "where(c, True, y) -> c | y": [("where", (q < kv, True, h == 0), lambda: (q < kv) | (h == 0))],
    "where(c, False, y) -> ~c & y": [("where", (q < kv, False, h == 0), lambda: (q >= kv) & (h == 0))],
    "where(c, x, True) -> ~c | x": [("where", (q < kv, h == 0, True), lambda: (q >= kv) | (h == 0))],
    "where(c, x, False) -> c & x": [("where", (q < kv, h == 0, False), lambda: (q < kv) & (h == 0))],
    "x & False -> False": [("and", (q < kv, False), lambda: const(False)),
                           ("and", (False, q < kv), lambda: const(False))],
    "x & True -> x": [("and", (q < kv, True), lambda: q < kv), ("and", (True, q < kv), lambda: q < kv)],
    "x | True -> True": [("or", (q < kv, True), lambda: const(True)), ("or", (True, q < kv), lambda: const(True))],
    "x | False -> x": [("or", (q < kv, False), lambda: q < kv), ("or", (False, q < kv), lambda: q < kv)],
    "x & x -> x": [("and", (q < kv, q < kv), lambda: q < kv)],
    "x | x -> x": [("or", (h == 1, h == 1), lambda: h == 1)],
    "~~x -> x": [("not", (op("not", (q < kv) & (h == 0)),), lambda: (q < kv) & (h == 0))],
    "~(a < b) -> a >= b  (each comparison to its negation)": [
        ("not", (op(c, q, kv),), lambda c=c: E(expr.OPS[c].negation, q, kv)) for c in sorted(expr.COMPARE)],
    "x <= x -> True  (>=, ==)": [("le", (P, P), lambda: const(True)), ("ge", (q, q), lambda: const(True)),
                                 ("eq", (q + 1, q + 1), lambda: const(True))],
    "x < x -> False  (>, !=)": [("lt", (P, P), lambda: const(False)), ("gt", (q, q), lambda: const(False)),
                                ("ne", (kv // W, kv // W), lambda: const(False))],
    "(a + c) < (b + c) -> a < b  (any comparison; - as +)": [
        ("lt", (q + P, kv + P), lambda: q < kv), ("ge", (q - P, kv - P), lambda: q >= kv),
        ("eq", (q + h, kv + h), lambda: q == kv)],
    "(c + a) < (c + b) -> a < b  (any comparison)": [
        ("le", (P + q, P + kv), lambda: q <= kv), ("ne", (h + q, h + kv), lambda: q != kv)],
    "(a - b) >= 0 -> b <= a": [("ge", (q - kv, 0), lambda: kv <= q)],
    "(a - b) > 0 -> b < a": [("gt", (q - kv, 0), lambda: kv < q)],
    "(a - b) <= 0 -> a <= b": [("le", (q - kv, 0), lambda: q <= kv)],
    "(a - b) < 0 -> a < b": [("lt", (q - kv, 0), lambda: q < kv)],
    "q >= 0 -> True  (kv, h; any constant <= 0)": [
        ("ge", (q, 0), lambda: const(True)), ("ge", (kv, -3), lambda: const(True)), ("ge", (h, 0), lambda: const(True))],
    "q < 0 -> False  (kv, h; any constant <= 0)": [
        ("lt", (q, 0), lambda: const(False)), ("lt", (h, -1), lambda: const(False))],
    "x + 0 -> x": [("add", (q - kv, 0), lambda: q - kv)],
    "x - 0 -> x": [("sub", (P, 0), lambda: P)],
    "0 + x -> x": [("add", (0, kv), lambda: kv)],
    "x * 0 -> 0  (0 * x)": [("mul", (q, 0), lambda: const(0)), ("mul", (0, q), lambda: const(0))],
    "x * 1 -> x  (1 * x)": [("mul", (P, 1), lambda: P), ("mul", (1, P), lambda: P)],
    "x // 1 -> x": [("floordiv", (q + kv, 1), lambda: q + kv)],
}
RULES = {r.rewrite: r for r in expr.IDENTITIES}


def test_every_identity_row_has_an_example():
    assert set(EXAMPLES) == set(RULES)
    assert len(RULES) == len(expr.IDENTITIES)  # rewrite texts are unique


def values(node: E, seed: int) -> torch.Tensor:
    """The node's values on random q [64, 1], kv [1, 64], h and sizes (run_tape for a mask, the tape
    walk for an integer), constants as tensors so a raw `where(True, ...)` runs too."""
    g = torch.Generator().manual_seed(seed)
    env = {"q": torch.randint(0, 100, (64, 1), generator=g), "kv": torch.randint(0, 100, (1, 64), generator=g),
           "h": torch.randint(0, 8, (), generator=g)}
    params = torch.randint(1, 30, (len(SLOTS),), generator=g)
    steps = tuple(("c", (torch.tensor(a[0]),)) if o == "c" else (o, a) for o, a in expr.tape(node))
    out = expr.run_tape(steps, env, params, SLOTS) if node.is_bool else \
        expr._run(steps, env, params, SLOTS, None, expr._tensor_apply)
    return torch.broadcast_to(out, (64, 64))


@pytest.mark.parametrize("rewrite", list(EXAMPLES))
def test_identity_row(rewrite):
    rule = RULES[rewrite]
    for name, operands, rewritten in EXAMPLES[rewrite]:
        args = [const(a) for a in operands]
        expected, raw = rewritten(), E(name, *args)  # raw: the node as written, nothing rewritten
        assert name in rule.ops and expected is not raw
        first = next(r for r in expr._RULES[name] if r.fn(name, *args) is not None)
        assert first is rule, f"{raw!r} is rewritten by {first.rewrite!r} first"
        assert rule.fn(name, *args) is expected and op(name, *args) is expected
        for seed in range(3):
            assert torch.equal(values(expected, seed), values(raw, seed)), (raw, expected)


# ---------------------------------------------------------------- the tape walk under torch.compile
def every_op() -> E:
    a, b = abs(-(q - kv)), expr.bounded_mul(q // W, W)
    mask = ~((a <= 5) | (b == expr.minimum(q, kv * 2))) & (op("max", q, kv) > 40 + P) & (kv % W != 1)
    e = op("where", h == 0, mask, (q >= kv) & (kv // 3 < q))
    return expr.with_fast_divisions(e, {n for n in expr.nodes(e) if expr.divides_by_size(n)})


def test_every_op_traces_whole_under_torch_compile():
    """run_tape on tensors and evaluate_tiles on intervals, fullgraph: a graph break fails."""
    import torch._dynamo

    root = every_op()
    assert {n.op for n in expr.nodes(root)} >= set(expr.OPS)
    steps, params = expr.tape(root), torch.tensor([7, 4])
    idx = torch.arange(96)

    def dense(qi, ki, hi, p):
        return expr.run_tape(steps, {"q": qi, "kv": ki, "h": hi}, p, SLOTS)

    def tiles(lo, hi, head, p):
        env = {"q": Interval(lo[:, None], hi[:, None]), "kv": Interval(lo[None], hi[None]), "h": Interval(head, head)}
        t = expr.evaluate_tiles(root, env, [Interval(p[0], p[0]), Interval(p[1], p[1])], SLOTS)
        return t.must, t.may

    torch._dynamo.reset()
    lo = torch.arange(0, 96, 8)
    for head in (0, 1):
        ht = torch.tensor(head)
        full = dense(idx[:, None], idx[None], ht, params)
        assert torch.equal(torch.compile(dense, backend="eager", fullgraph=True)(idx[:, None], idx[None], ht, params),
                           full)
        must, may = torch.compile(tiles, backend="eager", fullgraph=True)(lo, lo + 7, ht, params)
        ref = tiles(lo, lo + 7, ht, params)
        assert torch.equal(must, ref[0]) and torch.equal(may, ref[1])
        blocks = full.reshape(12, 8, 12, 8)  # the tiles bound the dense mask
        assert bool((blocks.all(3).all(1) | ~must).all()) and bool((~blocks.any(3).any(1) | may).all())


def test_specialize_folds_what_the_region_decides():
    """expr.specialize over a region: a where whose condition the bounds decide becomes its branch,
    a bool decided everywhere a constant; the result equals the original at every pair there."""
    from maskstudio.bounds import Interval
    from maskstudio.expr import specialize, var

    q, kv = var("q"), var("kv")
    root = E.symbolic_where(q >= 10, kv <= q, (kv < 3) | (q - kv > 100))
    inside = specialize(root, {"q": Interval(12, 20), "kv": Interval(0, 30)}, None, {})
    assert inside is (kv <= q)                          # the select is gone
    below = specialize(root, {"q": Interval(0, 9), "kv": Interval(0, 2)}, None, {})
    assert below.is_const and below.value is True       # kv < 3 holds at every pair there
    for region, (q_lo, q_hi), (k_lo, k_hi) in (("inside", (12, 20), (0, 30)), ("below", (0, 9), (0, 2))):
        special = inside if region == "inside" else below
        qi, ki = torch.arange(q_lo, q_hi + 1)[:, None], torch.arange(k_lo, k_hi + 1)[None, :]
        env = {"q": qi, "kv": ki, "h": torch.tensor(0)}
        want = expr.run_tape(expr.tape(root), env, None, {})
        assert torch.equal(expr.run_tape(expr.tape(special), env, None, {}).expand_as(want), want)
