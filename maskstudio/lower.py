"""The spec compiler: one layer of a spec's mask -> closed-form arithmetic on q_idx and kv_idx.

The pattern functions run once over symbolic token views (`SegTok`): inside a known segment every
token attribute is closed-form in the index (segment start, grid H and W, frame offset), so the
program of each (query segment, key segment) pair becomes an `expr.E` (rule regions are constants
per pair). Neighbouring pairs with the same expression share one range test, and a chain of
comparisons with the segment starts picks the row. Nothing depends on the sizes' values (no pair
is folded because it happens to be all-allowed at one size), and sizes live in ONE captured int
tensor, so:

  * the FlexAttention mask_mod does no per-token lookups (only `frames` lists and per-token
    `attrs`, which have no closed form, stay lookups);
  * a new length or new segment sizes of the same structure reuse the compiled kernel.

When does a new kernel get compiled? When `structure_key` changes: other segments / rules /
layer, the int32 -> int64 switch (products of two sizes past int32), divisions switching between
the float quotient and exact `//` (dividends past 2**21), padding on or off, a new batch size; and,
under a static-shape compile, a new sequence length.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from . import expr, knobs
from .bounds import Interval
from .errors import SpecError
from .expr import E, param, var
from .symbolic import SegTok, TableTok, _shape, param_value, table_column  # noqa: F401 (param_value: export)
from .program import Program, compile_program, evaluate as run_program

INT32_MAX = (1 << 31) - 1
DENSE_CHUNK = 1 << 22  # (q, k) pairs per step of Lowered.dense
SPECIALIZE_MIN = 1 << 14  # (q, k) pairs from which Lowered.evaluate specialises the expression first


# ---------------------------------------------------------------- lowering
def _in_range(x: E, lo: int, hi: int, n_segments: int) -> E:
    """x in segments [lo, hi] (inclusive), as comparisons with the starts (the ends are implied)."""
    out = expr.const(True)
    if lo > 0:
        out = out & (x >= param("start", lo))
    if hi < n_segments - 1:
        out = out & (x < param("start", hi + 1))
    return out


def _runs(items: list[E]) -> list[tuple[int, int, E]]:
    """(first, last, item) of each run of equal neighbours."""
    runs: list[tuple[int, int, E]] = []
    for i, item in enumerate(items):
        if runs and runs[-1][2] is item:
            runs[-1] = (runs[-1][0], i, item)
        else:
            runs.append((i, i, item))
    return runs


def _select(x: E, items: list[E], n_segments: int) -> E:
    """items[segment of x]: the expression of most runs is the default, every other run costs one
    select per score, where(x in its segments, item, ...); the range tests read x alone (one per
    row or column of a tile, not per score), so a row of three segments whose outer two agree is
    one select, not an or of three ands."""
    runs = _runs(items)
    counts: dict[int, int] = {}
    for _, _, item in runs:
        counts[id(item)] = counts.get(id(item), 0) + 1
    default = max(runs, key=lambda r: counts[id(r[2])])[2]  # ties: the first
    out = default
    for first, last, item in reversed(runs):
        if item is not default:
            out = E.symbolic_where(_in_range(x, first, last, n_segments), item, out)
    return out


def _global(program) -> E | None:
    """The program over plain indices, when it reads nothing but `index` and has no segment
    selections (causal, windows, sinks ...): no segment dispatch at all."""
    steps = [program.base] + program.rules + program.overlays
    if any(st.q_sel is not None or st.k_sel is not None for st in steps):
        return None

    class IndexOnly:
        def __init__(self, side):
            self.index = var(side)

    try:
        return run_program(program, IndexOnly("q"), IndexOnly("kv"), var("h"))
    except AttributeError:
        return None


def _touched(steps, n_seg: int) -> list[list[bool]]:
    """[a][b]: whether any of `steps` (segment-restricted rules / overlays) applies to the segment
    pair (a, b); one outer product per step (a per-pair, per-step test cost 30 s at 256 segments)."""
    every = torch.ones(n_seg, dtype=torch.bool)
    hit = torch.zeros(n_seg, n_seg, dtype=torch.bool)
    for st in steps:
        q = every if st.q_sel is None else st.q_sel.bool().cpu()
        k = every if st.k_sel is None else st.k_sel.bool().cpu()
        hit |= q[:, None] & k[None, :]
    return hit.tolist()


def lower_expression(spec, layer: int = 0, grid_tables: bool = False) -> E:
    """The mask of one layer as one expression over q, kv, h and size parameters (grid_tables: grid
    coordinates read from per-token tables instead of divided out of the index)."""
    program = compile_program(spec, layer)
    glob = _global(program)
    if glob is not None:
        return glob
    segs = spec.segments
    n_seg = len(segs)
    user = frozenset(k for s in segs for k in s.get("attrs", {}))
    consts = {"modality": spec.table.attrs["modality"][spec.table.starts].tolist(),
              "branch": spec.table.attrs["branch"][spec.table.starts].tolist()}
    # pairs that no segment-restricted step touches run the unrestricted steps only: when those
    # read nothing but `index`, one shared expression serves them all (many segments stay cheap)
    selected = [st for st in program.rules + program.overlays if st.q_sel is not None or st.k_sel is not None]
    chosen = {id(st) for st in selected}
    free = Program(program.base, [st for st in program.rules if id(st) not in chosen],
                   [st for st in program.overlays if id(st) not in chosen])
    default = _global(free) if selected else None
    touched = _touched(selected, n_seg) if default is not None else None
    rows = []
    for a in range(n_seg):
        q = SegTok(spec, "q", a, user, consts, grid_tables)
        pairs = []
        for b in range(n_seg):
            if default is not None and not touched[a][b]:
                pairs.append(default)
                continue
            pairs.append(expr.const(run_program(program, q, SegTok(spec, "kv", b, user, consts, grid_tables), var("h"))))
        rows.append(_select(var("kv"), pairs, n_seg))
    return _select(var("q"), rows, n_seg)


def table_expression(spec, layer: int = 0) -> E:
    """The mask of one layer over table lookups (TableTok): one expression whatever the number of
    segments, each attribute and segment selection one lookup per side."""
    program = compile_program(spec, layer)
    glob = _global(program)
    return glob if glob is not None else expr.const(run_program(program, TableTok("q"), TableTok("kv"), var("h")))


def _needs_int64(root: E, n: int) -> bool:
    """int32 arithmetic could overflow: a product of two sizes, a constant near the int32 range
    (a window of 2**31 - 1 added to an index), or a huge layout. FlexAttention hands int32 indices."""
    for nd in expr.nodes(root):
        if nd.op == "mul" and not any(isinstance(c, E) and c.is_const for c in nd.args):
            return True
        if nd.is_const and not isinstance(nd.value, bool) and abs(nd.value) > INT32_MAX // 4:
            return True
    return n > INT32_MAX // 4


@dataclass(frozen=True)
class Lowered:
    """A lowered layer: the expression, its size parameters and their values per layout.

    `params` is [K] for one layout or [B, K] for a batch (the mask_mod indexes it with b)."""

    spec: object
    layer: int
    root: E
    keys: tuple
    params: torch.Tensor
    lengths: tuple
    padded: bool = False
    tables: tuple = ()
    baked: tuple = ()  # ((param key, value), ...) compiled in as constants (with_constant_grids)
    form: str = "closed"  # closed: closed form per segment pair; tables: attributes read from tables

    # -- what compiles
    @property
    def structure_key(self) -> tuple:
        """Equal keys compile to the same kernel (sizes are not part of it)."""
        return (id(self.root), self.keys, self.params.dtype, self.params.dim(),
                self.params.shape[0] if self.params.dim() == 2 else None, self.padded, self.baked,
                tuple((k, v.dtype) for k, v in self.tables))

    @property
    def batched(self) -> bool:
        return self.params.dim() == 2

    @property
    def slots(self) -> dict:
        return {k: i for i, k in enumerate(self.keys)}

    @property
    def n(self) -> int:
        return max(self.lengths)

    @cached_property
    def guarded(self) -> E:
        """The expression with padding masked: keys and queries at or past the layout's end."""
        if not (self.padded or self.batched):
            return self.root
        end = param("start", len(self.spec.segments))
        return self.root & (var("kv") < end) & (var("q") < end)

    def uses_lookups(self) -> list[str]:
        return sorted({a for a, _ in expr.leaves(self.guarded, "tab")})

    @cached_property
    def steps(self) -> tuple:
        """The guarded expression as a flat tape (expr.tape)."""
        return expr.tape(self.guarded)

    @property
    def too_big(self) -> bool:
        """Past knobs.LOWER_MAX_NODES the data-driven mask (two lookups per score) is cheaper."""
        return len(self.steps) > knobs.LOWER_MAX_NODES

    @cached_property
    def uses_head(self) -> bool:
        return expr.reads_head(self.guarded)

    @property
    def dense_kernel(self) -> str | None:
        """"causal" when the layer's mask is exactly plain causal (kv <= q), "full" when every pair
        may attend, else None: attention on unpadded rows then runs the model's SDPA (flash) kernel,
        the fastest kernel for exactly that mask, instead of FlexAttention on the same expression."""
        if self.batched:
            return None
        if self.root is (var("kv") <= var("q")):
            return "causal"
        return "full" if self.root.is_const and self.root.value is True else None

    @cached_property
    def text(self) -> str:
        """The guarded expression as Python source (the mask_mod's docstring)."""
        return expr.source(self.guarded)

    @cached_property
    def mask_mod(self):
        """FlexAttention mask_mod(b, h, q_idx, kv_idx): closed-form, sizes in a captured tensor."""
        return make_mask_mod(self.steps, self.params, self.slots, dict(self.tables), self.batched, self.text,
                             f"mask_{mask_slug(self.spec.name)}_L{self.layer}")

    @cached_property
    def fixed_mask_mod(self):
        """The mask_mod with this layout's sizes as Python constants, as hand-written FlexAttention
        code holds them: no read of P per score, divisions by constants (a multiply and a shift).
        A kernel per layout (compiles_sizes_in decides which layouts get one)."""
        if self.batched:
            raise ValueError("layouts: a batch reads its sizes at run time; compile sizes in one layout at a time")
        return make_mask_mod(self.steps, self.params.tolist(), self.slots, dict(self.tables), False, self.text,
                             f"mask_{mask_slug(self.spec.name)}_L{self.layer}", self.params.dtype == torch.int64)

    # -- other sizes
    def on(self, device) -> "Lowered":
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" is the current device, as in torch
            device = torch.device("cuda", torch.cuda.current_device())
        if self.params.device == device:
            return self
        return self._resized(params=self.params.to(device), tables=tuple((k, v.to(device)) for k, v in self.tables))

    def _resized(self, **changes) -> "Lowered":
        """replace(self, **changes) keeping what does not depend on sizes (the guarded expression, its
        tape and text): a build per step of a training loop must not re-walk the expression."""
        out = replace(self, **changes)
        if out.root is self.root and out.padded == self.padded and out.batched == self.batched:
            for name in _SIZE_FREE:
                if name in self.__dict__:
                    out.__dict__[name] = self.__dict__[name]
        return out

    def with_window(self, window: int) -> "Lowered":
        """Also q - kv < window (a model's own sliding window, so its blocks are skipped too)."""
        return replace(self, root=self.root & ((var("q") - var("kv")) < window))

    def with_constant_grids(self) -> "Lowered":
        """Grid sides (H, W, H*W, frames) compiled in as constants: a division by a constant is a
        multiply and a shift, by a size in P a long division per score; worth it for designs whose
        partial blocks are mostly inside grids (CCA rings). A new grid size then compiles a new
        kernel (text lengths still do not)."""
        grid_keys = [k for k in self.keys if k[0] in ("h", "w", "hw", "frames") and
                     self.spec.segments[k[1]].get("grid") is not None]
        values = {k: param_value(self.spec.table, k) for k in grid_keys}
        root = expr.substitute(self.root, values)
        out = _build(self.spec, self.layer, root, self.padded, [self.spec], self.form)
        return replace(out, baked=tuple(sorted(values.items())))

    def padded_to(self, on: bool = True, length: int | None = None) -> "Lowered":
        """Mask keys (and queries) past the layout's end, for a kernel run at a bucketed length;
        per-token tables are extended to `length` (the kernel reads them at padded indices too)."""
        tables = self.tables
        if length is not None:
            tables = tuple((k, torch.cat([v, v[-1:].expand(length - len(v))]) if length > len(v) else v)
                           for k, v in tables)
        return replace(self, padded=on, tables=tables)

    def for_sizes(self, sizes: dict) -> "Lowered":
        """The same structure at other segment sizes ({"video": [4, 16, 16], "prompt": 30});
        re-lowered (a new kernel) only if the sizes change the structure."""
        return self.for_spec(self.spec.with_sizes(sizes))

    def for_spec(self, other) -> "Lowered":
        """`other` (same segments and rules, other sizes) on this expression when it fits."""
        if _signature(other) != _signature(self.spec):
            raise SpecError("sizes", "a lowered mask takes new sizes of the same segments and rules only; "
                            "lower the other design with maskstudio.lower.lower(spec)")
        baked_differ = any(param_value(other.table, k) != v for k, v in self.baked)
        if baked_differ or not _fits(self, [other]):  # other grid constants, or past int32: a new kernel
            fresh = lower(other, self.layer, padded=self.padded, form=self.form)
            return fresh.with_constant_grids() if self.baked else fresh
        return _with_layouts(self, [other], batched=False)

    def batch(self, layouts: list) -> "Lowered":
        """B layouts of this structure (size dicts or Specs) as one batched mask (params [B, K])."""
        specs = [x if hasattr(x, "table") else self.spec.with_sizes(x) for x in layouts]
        for sp in specs:
            if _signature(sp) != _signature(self.spec):
                raise ValueError("layouts: every layout of a batch must have this design's segments and rules")
        return _with_layouts(self.fitted(specs), specs, batched=True)

    def fitted(self, specs: list) -> "Lowered":
        """This lowering, or the same expression rebuilt for an integer width and divisions that
        fit every one of these layouts (same segments and rules)."""
        _require_baked(self, specs)
        if _fits(self, specs):
            return self
        return replace(_build(specs[0], self.layer, self.root, self.padded, specs, self.form), baked=self.baked)

    def values(self, specs: list) -> torch.Tensor:
        """[B, K] size parameters of these layouts (rows of P), in this lowering's dtype."""
        return torch.stack([_values(self.keys, sp, self.params.dtype) for sp in specs])

    # -- evaluations
    def evaluate(self, q_idx: torch.Tensor, k_idx: torch.Tensor, head: int = 0, b: int = 0) -> torch.Tensor:
        """bool [len(q_idx), len(k_idx)]: the expression over these query and key indices. A large
        grid first runs the expression specialised to the indices' ranges (expr.specialize: the
        selects and rules the bounds decide there folded away), then the rest per pair."""
        shape = (len(q_idx), len(k_idx))
        h = torch.tensor(head)
        if shape[0] * shape[1] < SPECIALIZE_MIN or not shape[0] or not shape[1]:
            out = self.mask_mod(torch.tensor(b), h, q_idx[:, None], k_idx[None, :])
            return torch.broadcast_to(torch.as_tensor(out), shape)
        row = self.params[b] if self.batched else self.params
        env = {"q": Interval(q_idx.min(), q_idx.max()), "kv": Interval(k_idx.min(), k_idx.max()), "h": h}
        ranges = {}
        for name, col in self.tables:
            for side, idx in (("q", q_idx), ("kv", k_idx)):
                vals = col[idx]
                ranges[(name, side)] = Interval(vals.min(), vals.max())
        steps = expr.tape(expr.specialize(self.guarded, env, row, self.slots, ranges))
        if row.dtype == torch.int64:
            q_idx, k_idx = q_idx.to(torch.int64), k_idx.to(torch.int64)
        out = expr.run_tape(steps, {"q": q_idx[:, None], "kv": k_idx[None, :], "h": h}, row, self.slots,
                            dict(self.tables))
        return torch.broadcast_to(out, shape)

    def tile_states(self, q_cuts, k_cuts, head: int = 0) -> tuple:
        """(must, may) bool [Tq, Tk] over tiles [cuts[i], cuts[i+1]) from interval bounds alone:
        tiles surely all-allowed / possibly any-allowed (one layout)."""
        from .lower_blocks import classify_ranges
        return classify_ranges(self, torch.as_tensor(q_cuts), torch.as_tensor(k_cuts), head)

    def dense(self, head: int = 0, b: int = 0, n: int | None = None, q_start: int = 0) -> torch.Tensor:
        """bool [n - q_start, n]: rows q_start.. by broadcasting the mask_mod over index grids, in
        chunks of rows (the runner's eager rows and KV-cache steps)."""
        n = n or self.lengths[b]
        idx = torch.arange(n, device=self.params.device)
        step = max(1, DENSE_CHUNK // max(n, 1))
        rows = [self.evaluate(idx[r:r + step], idx, head, b) for r in range(q_start, n, step)]
        return torch.cat(rows) if rows else torch.zeros(0, n, dtype=torch.bool)

    def block_mask(self, block_size: int = 128, device=None, num_heads: int | None = None,
                   length: int | None = None, compiled: bool | None = None, graph: bool | None = None,
                   sizes_in_kernel: bool | None = False):
        """torch BlockMask built on `device` from tile bounds; tokens are touched in partial tiles only
        (compiled: fuse the token stage with torch.compile; graph: replay the whole build as a CUDA
        graph captured once per structure and length; both default on CUDA). sizes_in_kernel: its
        mask_mod holds the sizes as constants (None: compiles_sizes_in decides)."""
        from .lower_blocks import build_block_mask
        return build_block_mask(self, block_size, device, num_heads, length, compiled, graph,
                                self.sizes_in(sizes_in_kernel))

    def sizes_in(self, choice: bool | None) -> bool:
        """Does this layout's kernel hold its sizes as constants: `choice`, or when None whatever
        compiles_sizes_in decides (Spec.mask_mod, Spec.block_mask)."""
        return compiles_sizes_in(self) if choice is None else choice


def mask_slug(name: str) -> str:
    """A spec name as a Python identifier part (compile logs and profiles name the design)."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()[:40] or "spec"


def make_mask_mod(steps: tuple, params, slots: dict, tables: dict, batched: bool, text: str = "",
                  name: str = "mask", wide: bool | None = None):
    """The mask_mod closure (one code object for every lowering: the compiled kernel depends on
    the expression and the tensors' shapes and dtypes only), named `name` (mask_<spec>_L<layer>).
    params: the size tensor, or a list of Python ints (sizes compiled in; `wide` then says int64)."""

    wide = params.dtype == torch.int64 if wide is None else wide

    def mask_mod(b, h, q_idx, kv_idx):
        row = params[b] if batched else params
        if wide:  # FlexAttention's indices are int32: widen before any arithmetic
            q_idx, kv_idx = q_idx.to(torch.int64), kv_idx.to(torch.int64)
        return expr.run_tape(steps, {"q": q_idx, "kv": kv_idx, "h": h}, row, slots, tables)

    mask_mod.__doc__ = f"lowered mask_mod: {text[:200]}"
    mask_mod.__name__ = mask_mod.__qualname__ = name
    mask_mod.lowered = True  # the runner compiles these with static shapes
    mask_mod.sizes_in_kernel = not isinstance(params, torch.Tensor)
    return mask_mod


_COMPILED_IN: dict = {}  # (design, layer, padded) -> layouts whose kernels hold their sizes as constants


def claims_a_kernel(seen: dict, design, layout, limit: int) -> bool:
    """Whether `layout` gets a kernel with its sizes compiled in: the first `limit` distinct layouts of
    a design do (and again when they come back); later ones share the kernel that reads sizes at run
    time, so a loop over ever new layouts compiles at most limit + 1 kernels per design."""
    layouts = seen.setdefault(design, set())
    if layout not in layouts and len(layouts) < limit:
        layouts.add(layout)
    return layout in layouts


def compiles_sizes_in(low: Lowered) -> bool:
    """claims_a_kernel for one lowered layout (a batch always reads its sizes at run time); the
    designs remembered per process are bounded as the lowerings are (LOWERED_KEPT)."""
    if low.batched:
        return False
    design = (_signature(low.spec), low.layer, low.padded)
    if design not in _COMPILED_IN and len(_COMPILED_IN) >= LOWERED_KEPT:
        _COMPILED_IN.pop(next(iter(_COMPILED_IN)))
    return claims_a_kernel(_COMPILED_IN, design, tuple(low.params.tolist()), knobs.SIZES_IN_KERNEL)  # P holds n


def _signature(spec) -> tuple:
    """What must match for two layouts to share a lowering: everything but sizes."""
    segs = [(s["name"], s["modality"], _shape(s), len(s.get("grid", ())), s.get("branch"),
             tuple(sorted(s.get("attrs", {})))) for s in spec.segments]
    return tuple(segs), repr(spec.mask)


def _require_baked(low: Lowered, specs: list) -> None:
    """Layouts sharing a kernel with constant grid sides must have those sides."""
    for sp in specs:
        if any(param_value(sp.table, k) != v for k, v in low.baked):
            raise ValueError("layouts: this mask has its grid sides compiled in (with_constant_grids); "
                            "every layout must keep them, or lower without constant grids")


def _fits(low: Lowered, specs: list) -> bool:
    """Do these layouts fit this lowering: its integer width, and its float-quotient divisions?"""
    if low.params.dtype == torch.int32 and any(_needs_int64(low.root, sp.table.n) for sp in specs):
        return False
    fast = [nd for nd in expr.nodes(low.root) if nd.op == "fdiv"]
    return not fast or all(_division_bounds(low.root, low.keys, specs).get(nd, 0) < expr.FAST_DIVIDEND
                           for nd in fast)


class _ColumnBounds:
    """params[slot] as an Interval: the smallest and largest value over layouts."""

    def __init__(self, values: torch.Tensor):
        self.lo, self.hi = values.amin(0), values.amax(0)

    def __getitem__(self, slot):
        return Interval(self.lo[slot], self.hi[slot])


def _division_bounds(root: E, keys: tuple, specs: list) -> dict:
    """Largest |dividend| of each division by a size, over every token pair of these layouts."""
    values = torch.stack([_values(keys, sp, torch.int64) for sp in specs])
    n = max(sp.table.n for sp in specs)
    index = Interval(torch.tensor(0), torch.tensor(n - 1))
    tables = {}
    for attr, side in expr.leaves(root, "tab"):
        cols = [table_column(sp.table, attr) for sp in specs]
        tables[(attr, side)] = Interval(min(int(c.min()) for c in cols), max(int(c.max()) for c in cols))
    env = {"q": index, "kv": index, "h": Interval(torch.tensor(0), torch.tensor(1 << 16))}
    return expr.division_bounds(root, env, _ColumnBounds(values), {k: i for i, k in enumerate(keys)}, tables)


def _fast_divisions(root: E, keys: tuple, specs: list, wide: bool) -> E:
    """Divisions by a size whose dividends stay small in every layout run through a float32
    quotient (expr.floordiv_by_size); 64-bit kernels keep exact division."""
    if wide or not any(nd.op in ("floordiv", "fdiv") for nd in expr.nodes(root)):
        return expr.with_fast_divisions(root, set())
    bounds = _division_bounds(root, keys, specs)
    return expr.with_fast_divisions(root, {nd for nd, b in bounds.items() if b < expr.FAST_DIVIDEND})


def _values(keys, spec, dtype) -> torch.Tensor:
    return torch.tensor([param_value(spec.table, k) for k in keys], dtype=dtype)


def _tables(root: E, specs: list) -> tuple:
    """Lookup tables (per-token attributes without a closed form), padded to the longest layout."""
    names = sorted({a for a, _ in expr.leaves(root, "tab")})
    if not names:
        return ()
    if any(sp.to_dict() != specs[0].to_dict() for sp in specs[1:]):
        raise ValueError(f"layouts: attributes {names} are per-token lookups; a batch needs equal layouts")
    return tuple((a, table_column(specs[0].table, a)) for a in names)


_SIZE_FREE = ("guarded", "steps", "uses_head", "text")  # cached properties that sizes do not change


def _with_layouts(base: Lowered, specs: list, batched: bool) -> Lowered:
    vals = base.values(specs)
    return base._resized(params=vals if batched else vals[0], lengths=tuple(sp.table.n for sp in specs),
                         tables=_tables(base.root, specs), spec=base.spec if batched else specs[0])


def _build(spec, layer, root, padded, specs, form: str = "closed") -> Lowered:
    keys = tuple(dict.fromkeys(expr.leaves(root, "p")))
    keys = keys + (("start", len(spec.segments)),) if ("start", len(spec.segments)) not in keys else keys
    dtype = torch.int64 if any(_needs_int64(root, sp.table.n) for sp in specs) else torch.int32
    root = _fast_divisions(root, keys, specs, dtype == torch.int64)
    return Lowered(spec, layer, root, keys, _values(keys, spec, dtype), (spec.table.n,), padded,
                   _tables(root, [spec]), form=form)


FORMS = ("closed", "grid tables", "tables")


def lower(spec, layer: int = 0, padded: bool = False, form: str = "closed") -> Lowered:
    """Lower one layer of a sized spec (per-head rules stay in the expression, switched on h):
    form "closed" (closed form per segment pair, lookup-free), "grid tables" (closed form, but grid
    coordinates read from per-token tables: no division by a size per score) or "tables"
    (attributes and segment selections read from per-token tables; for layouts of many segments)."""
    spec.require_sized()
    if form not in FORMS:
        raise ValueError(f"form: {form!r} is not one of {', '.join(FORMS)}")
    root = table_expression(spec, layer) if form == "tables" else \
        lower_expression(spec, layer, grid_tables=form == "grid tables")
    return _build(spec, layer, root, padded, [spec], form)


def _lower_best(spec, layer: int) -> Lowered:
    """Closed form while it stays small (knobs.LOWER_MAX_SEGMENTS segments, LOWER_MAX_NODES tape
    steps: past them its per-score work outgrows a few lookups), else the table form."""
    if len(spec.segments) <= knobs.LOWER_MAX_SEGMENTS:
        low = lower(spec, layer)
        if not low.too_big:
            return low
    return lower(spec, layer, form="tables")


LOWERED_KEPT = 64  # designs (segments and rules, layer) whose lowering is kept per process
_LOWERED: dict = {}


def lowered(spec, layer: int = 0) -> Lowered:
    """The layer's one expression (closed form, or the table form for many segments), walking the
    rules once per design: the expression depends on segments and rules only, so other sizes of a
    design (a generation step's grown layout, a training row's examples) reuse it with their own
    size values."""
    key = (_signature(spec), layer)
    low = _LOWERED.get(key)
    if low is None:
        if len(_LOWERED) >= LOWERED_KEPT:
            _LOWERED.pop(next(iter(_LOWERED)))
        low = _LOWERED[key] = _lower_best(spec, layer)
    return low if low.spec is spec else low.for_spec(spec)
