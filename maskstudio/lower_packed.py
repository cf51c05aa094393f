"""Several layouts packed into ONE row: the lowered "document mask".

What FlexAttention users write by hand for variable-length samples (attention-gym's
`generate_doc_mask_mod`), for any design: token i belongs to document doc[i]; a pair may attend
iff both are in the same document and the document's design allows it at the tokens' places inside
that document, with that document's sizes (one row of P per document). One lookup per side
(doc[i]), the rest closed-form; the kernel is shared by every packing of the same designs with the
same number of documents at the same padded length.

`pack(low, layouts)` packs layouts of one lowered design; `pack_designs(specs)` packs documents of
different designs: each design's expression reads its own sizes (its parameters renamed apart) and
a per-document parameter `design` picks the expression, so a row may hold, say, a prefix-LM prompt,
a block-causal video clip and a Multiverse sample. `DocumentRow` is such a row as a layout: what a
packed training row is (its masks per layer, built once and kept).

Places are the document's own: `first` (sinks), `chunked` by index, frames all count from the
document's start, so a design means the same inside a packed row as alone. Per-token attributes
(user `attrs`, `frames` lists, BICO's masked tokens) are tables laid along the row and read at the
token's place in the row. Kernels: the number of documents is rounded up to a power of two
(`capacity`; the spare documents are empty), so rows of 5, 6, 7 or 8 documents share a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from . import expr
from .bounds import Interval, Tri
from .errors import SpecError
from .expr import E, param
from .lower import _signature, lowered, mask_slug
from .lower_blocks import (any_all, block_indices, decide, padding_never_full, tile_edges, tile_grid, tile_tables,
                           to_block_mask)

DENSE_CHUNK = 1 << 22   # (q, k) pairs evaluated per step of Packed.dense
DESIGNS_KEPT = 64       # packed expressions kept (a training loop's rows reuse one per set of designs)


class _Columns:
    """Size parameter `slot` of each token's document: rows[..., slot] (rows: params[doc])."""

    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, slot):
        return self.rows[..., slot]


@dataclass(frozen=True)
class Packed:
    """Documents one after another in a row of `length` tokens (then padding), with room for
    `capacity` documents (len(offsets) - 1; the ones past the last real document are empty)."""

    low: "Designs"       # the designs' expression and parameter slots
    params: torch.Tensor  # [C + 1, K]: a row per document slot, then one for the padding
    offsets: torch.Tensor  # [C + 1]: where each document starts, then the packed length
    doc: torch.Tensor     # [length]: the document of every token (C past the end: padding)
    tables: tuple = ()    # ((attribute, [length] values along the row), ...): per-token lookups

    @property
    def documents(self) -> int:
        """Document slots (the capacity): padding tokens belong to slot `documents`."""
        return len(self.offsets) - 1

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    @cached_property
    def mask_mod(self):
        steps, slots = self.low.steps, self.low.slots
        params, offsets, doc, docs = self.params, self.offsets, self.doc, self.documents
        tables = dict(self.tables)
        wide = params.dtype == torch.int64

        def mask_mod(b, h, q_idx, kv_idx):
            if wide:  # FlexAttention's indices are int32: widen before any arithmetic
                q_idx, kv_idx = q_idx.to(torch.int64), kv_idx.to(torch.int64)
            dq, dk = doc[q_idx], doc[kv_idx]
            off = offsets[dq]
            inner = expr.run_tape(steps, {"q": q_idx - off, "kv": kv_idx - off, "h": h}, _Columns(params[dq]),
                                  slots, tables, at={"q": q_idx, "kv": kv_idx})
            return (dq == dk) & (dq < docs) & inner
        mask_mod.lowered = True
        mask_mod.__name__ = mask_mod.__qualname__ = f"mask_packed_{mask_slug(self.low.name)}"
        return mask_mod

    def on(self, device) -> "Packed":
        return Packed(self.low, self.params.to(device), self.offsets.to(device), self.doc.to(device),
                      tuple((k, v.to(device)) for k, v in self.tables))

    def dense(self, head: int = 0, q_start: int = 0) -> torch.Tensor:
        """bool [length - q_start, length]: rows q_start.. of the mask (in chunks of rows)."""
        length = len(self.doc)
        idx = torch.arange(length, device=self.doc.device)
        h, b = torch.tensor(head), torch.tensor(0)
        step = max(1, DENSE_CHUNK // max(length, 1))
        rows = [self.mask_mod(b, h, idx[r:r + step, None], idx[None, :]).expand(len(idx[r:r + step]), length)
                for r in range(q_start, length, step)]
        return torch.cat(rows) if rows else torch.zeros(0, length, dtype=torch.bool)

    def block_mask(self, block_size: int = 128, device=None, num_heads: int | None = None):
        """BlockMask [1, H, T, T]: tiles inside one document decided from that document's sizes
        by tile bounds, tiles across documents empty, the rest evaluated token by token."""
        packed = self.on(device or self.params.device)
        heads = num_heads if packed.low.uses_head else 1
        if packed.low.uses_head and num_heads is None:
            raise ValueError("this spec has per-head rules: pass num_heads=<the model's query heads>")
        length = len(packed.doc)
        states = [_states(packed, block_size, length, h) for h in range(heads)]
        full = torch.stack([f for f, _ in states])[None]
        partial = torch.stack([p for _, p in states])[None]
        return to_block_mask(block_indices(full, partial), block_size, packed.mask_mod, length)


def _states(packed: Packed, block: int, length: int, head: int):
    """(full, partial) bool [T, T] of one head."""
    device = packed.doc.device
    lo, hi = tile_edges(length, block, device)
    t = len(lo)
    d_lo, d_hi = packed.doc[lo], packed.doc[hi]
    one_doc = d_lo == d_hi  # tiles inside one document (or inside the padding)
    same = one_doc[:, None] & one_doc[None, :] & (d_lo[:, None] == d_lo[None, :]) & (d_lo[:, None] < packed.documents)
    apart = (d_hi[:, None] < d_lo[None, :]) | (d_lo[:, None] > d_hi[None, :])  # no common document
    d = torch.where(same, d_lo[:, None].expand(t, t), 0)
    off = packed.offsets[d]
    h = torch.tensor(head, device=device)
    env = {"q": Interval(lo[:, None] - off, hi[:, None] - off), "kv": Interval(lo[None, :] - off, hi[None, :] - off),
           "h": h}
    # each tile's document sizes: parameter `slot` of tile (i, j) is params[d[i, j], slot]; tables
    # are read along the row, so their per-tile bounds are the row's
    res = Tri.of(expr.evaluate_tiles(packed.low.root, env, _Columns(packed.params[d]), packed.low.slots,
                                     tile_tables(dict(packed.tables), t, block)))
    must = padding_never_full(torch.broadcast_to(res.must, (t, t)) & same, length, block)
    may = (torch.broadcast_to(res.may, (t, t)) | ~same) & ~apart

    def tokens(ij, side):
        q_idx, k_idx, valid = tile_grid(ij[:, 0], ij[:, 1], block, length, side)
        return any_all(packed.mask_mod(0, h, q_idx, k_idx) & valid)
    full, partial, _ = decide(must, may, block, tokens)
    return full, partial


@dataclass(frozen=True)
class Designs:
    """One or more lowered designs as one expression: parameters of design g are named
    ("design g", ...) and P[("design",)] of a document picks its design's expression; `tables`
    names the per-token attributes any of them reads."""

    root: E
    keys: tuple
    dtype: torch.dtype
    tables: tuple = ()
    name: str = "design"

    @cached_property
    def slots(self) -> dict:
        return {k: i for i, k in enumerate(self.keys)}

    @cached_property
    def steps(self) -> tuple:
        """The expression as a tape, walked once per Designs (kept across rows: see _designs)."""
        return expr.tape(self.root)

    @cached_property
    def uses_head(self) -> bool:
        return expr.reads_head(self.root)


def _renamed(root: E, g: int) -> E:
    """The expression with its size parameters moved to design g's own names."""
    return expr._rebuild(root, lambda n: param(f"design {g}", *n.args) if n.op == "p" else n,
                         lambda n, args: expr.op(n.op, *args))


_DESIGNS: dict = {}   # (ids of the fitted roots, dtype, window) -> (Designs, the roots kept alive)


def _designs(fitted: list, window: int | None, name: str) -> Designs:
    """The one expression of these fitted lowerings (one per design, in row order of first use);
    the same designs give the same Designs object, so its tape, and a kernel compiled for it, are
    reused from row to row."""
    dtype = torch.int64 if any(f.params.dtype == torch.int64 for f in fitted) else torch.int32
    key = (tuple((id(f.root), f.keys) for f in fitted), dtype, window, name)
    if key in _DESIGNS:
        return _DESIGNS[key][0]
    keys = [("design",)] + [(f"design {g}", *k) for g, f in enumerate(fitted) for k in f.keys]
    root = _renamed(fitted[-1].root, len(fitted) - 1)
    for g in range(len(fitted) - 2, -1, -1):
        root = expr.op("where", param("design") == g, _renamed(fitted[g].root, g), root)
    if window:  # a model's own sliding window (q and kv are places in one document: their distance)
        root = root & ((expr.var("q") - expr.var("kv")) < window)
    tables = tuple(sorted({a for f in fitted for a, _ in expr.leaves(f.root, "tab")}))
    if len(_DESIGNS) >= DESIGNS_KEPT:
        _DESIGNS.pop(next(iter(_DESIGNS)))
    designs = Designs(root, tuple(keys), dtype, tables, name)
    _DESIGNS[key] = (designs, tuple(f.root for f in fitted))
    return designs


def _rows(designs: Designs, fitted: list, order: list, specs: list) -> torch.Tensor:
    """P rows [D, K]: document d (design g) holds g and its design's sizes; other designs' sizes
    read 1 (their expressions are evaluated too, then not picked, and must not divide by zero)."""
    slots = designs.slots
    rows = torch.ones(len(order), len(designs.keys), dtype=designs.dtype)
    for d, g in enumerate(order):
        rows[d, 0] = g
        values = fitted[g].values([specs[d]])[0].tolist()
        for k, v in zip(fitted[g].keys, values):
            rows[d, slots[(f"design {g}", *k)]] = v
    return rows


def _row_tables(names: tuple, specs: list, length: int) -> tuple:
    """Each per-token attribute laid along the row (0 where a document or the padding lacks it)."""
    out = []
    for name in names:
        col = torch.zeros(length, dtype=torch.int64)
        at = 0
        for sp in specs:
            if name in sp.table.attrs:
                col[at:at + sp.table.n] = sp.table.attrs[name]
            at += sp.table.n
        out.append((name, col))
    return tuple(out)


def capacity_for(documents: int) -> int:
    """Document slots of a row of `documents`: the next power of two (few kernels)."""
    return 1 << max(documents - 1, 0).bit_length()


def _packed(designs: Designs, rows: torch.Tensor, specs: list, length: int | None, capacity: int | None) -> Packed:
    sizes = [sp.table.n for sp in specs]
    total = sum(sizes)
    length = length or total
    if length < total:
        raise ValueError(f"length: {total:,} packed tokens do not fit in {length:,}")
    cap = capacity or len(sizes)
    if cap < len(sizes):
        raise ValueError(f"capacity: {len(sizes)} documents do not fit in {cap} document slots")
    spare = cap - len(sizes) + 1  # empty documents, then the padding: they read the last document's sizes
    params = torch.cat([rows, rows[-1:].expand(spare, -1)])
    ends = torch.tensor(sizes).cumsum(0).tolist()
    offsets = torch.tensor([0, *ends] + [total] * (cap - len(sizes)), dtype=designs.dtype)
    doc = torch.cat([torch.repeat_interleave(torch.arange(len(sizes), dtype=designs.dtype), torch.tensor(sizes)),
                     torch.full((length - total,), cap, dtype=designs.dtype)])
    return Packed(designs, params, offsets, doc, _row_tables(designs.tables, specs, length))


def _no_cross(spec) -> None:
    if "cross" in spec.mask:
        raise SpecError("mask.cross", "a design with a cross-attention view cannot be packed; train it unpacked")


def pack(low, layouts: list, length: int | None = None, capacity: int | None = None) -> Packed:
    """Pack layouts (size dicts or Specs) of `low`'s design into one row (padded to `length`)."""
    specs = [x if hasattr(x, "table") else low.spec.with_sizes(x) for x in layouts]
    if not specs:
        raise ValueError("layouts: give at least one layout to pack")
    for sp in specs:
        if _signature(sp) != _signature(low.spec):
            raise ValueError("layouts: every packed layout must have this design's segments and rules; "
                            "pack different designs with pack_designs")
        _no_cross(sp)
    fitted = [low.fitted(specs)]  # one expression that fits every layout (int width, divisions)
    designs = _designs(fitted, None, low.spec.name)
    return _packed(designs, _rows(designs, fitted, [0] * len(specs), specs), specs, length, capacity)


def pack_designs(specs: list, length: int | None = None, layer: int = 0, capacity: int | None = None,
                 window: int | None = None) -> Packed:
    """Pack documents of any designs (sized Specs, in row order) into one row, padded to `length`
    with room for `capacity` documents; layouts of one design share its expression. window: a
    model's own sliding window, folded in."""
    if not specs:
        raise ValueError("layouts: give at least one layout to pack")
    groups: dict = {}
    order = []
    for sp in specs:
        _no_cross(sp)
        members = groups.setdefault(_signature(sp), [])
        order.append(list(groups).index(_signature(sp)))
        members.append(sp)
    fitted = [lowered(members[0], layer).fitted(members) for members in groups.values()]
    name = "_".join(dict.fromkeys(sp.name for sp in specs))
    designs = _designs(fitted, window, name)
    return _packed(designs, _rows(designs, fitted, order, specs), specs, length, capacity)


@dataclass(frozen=True, eq=False)
class DocumentRow:
    """A packed row as a layout: documents (sized Specs, in order), each attending only inside
    itself under its own design and sizes. What training and packed evaluation hand to the
    attention function in place of a Spec; per layer one Packed, built on first use and kept."""

    specs: tuple

    @property
    def n(self) -> int:
        return sum(sp.table.n for sp in self.specs)

    @cached_property
    def varies_by_head(self) -> bool:
        return any(sp.varies_by_head for sp in self.specs)

    def layer_key(self, layer: int) -> tuple:
        """Layers with equal keys share one mask."""
        return tuple(sp.layer_key(layer) for sp in self.specs)

    def packed(self, layer: int = 0, length: int | None = None, window: int | None = None) -> Packed:
        """The row's mask at one layer, padded to `length`, with document slots rounded up."""
        return pack_designs(list(self.specs), length, layer, capacity_for(len(self.specs)), window)
