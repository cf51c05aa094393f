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
a block-causal video clip and a Multiverse sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from . import expr
from .bounds import Interval, Tri
from .errors import SpecError
from .expr import E, param
from .lower import _signature, lower
from .lower_blocks import any_all, block_indices, decide, padding_never_full, tile_edges, tile_grid, to_block_mask


class _Columns:
    """Size parameter `slot` of each token's document: rows[..., slot] (rows: params[doc])."""

    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, slot):
        return self.rows[..., slot]


@dataclass(frozen=True)
class Packed:
    """D documents, one after another in a row of `length` tokens."""

    low: "Designs"       # the designs' expression and parameter slots
    params: torch.Tensor  # [D + 1, K]: a row per document, then one for the padding
    offsets: torch.Tensor  # [D + 1]: where each document starts, then the packed length
    doc: torch.Tensor     # [length]: the document of every token (D past the end: padding)

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    @cached_property
    def mask_mod(self):
        steps, slots = expr.tape(self.low.root), self.low.slots
        params, offsets, doc, docs = self.params, self.offsets, self.doc, self.documents

        wide = params.dtype == torch.int64

        def mask_mod(b, h, q_idx, kv_idx):
            if wide:  # FlexAttention's indices are int32: widen before any arithmetic
                q_idx, kv_idx = q_idx.to(torch.int64), kv_idx.to(torch.int64)
            dq, dk = doc[q_idx], doc[kv_idx]
            off = offsets[dq]
            inner = expr.run_tape(steps, {"q": q_idx - off, "kv": kv_idx - off, "h": h}, _Columns(params[dq]),
                                  slots)
            return (dq == dk) & (dq < docs) & inner
        mask_mod.lowered = True
        return mask_mod

    def on(self, device) -> "Packed":
        return Packed(self.low, self.params.to(device), self.offsets.to(device), self.doc.to(device))

    def dense(self, head: int = 0) -> torch.Tensor:
        idx = torch.arange(len(self.doc), device=self.doc.device)
        return self.mask_mod(torch.tensor(0), torch.tensor(head), idx[:, None], idx[None, :])

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
    # each tile's document sizes: parameter `slot` of tile (i, j) is params[d[i, j], slot]
    res = Tri.of(expr.evaluate_tiles(packed.low.root, env, _Columns(packed.params[d]), packed.low.slots, {}))
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
    ("design g", ...) and P[("design",)] of a document picks its design's expression (no
    per-token tables: packing refuses designs that read them)."""

    root: E
    keys: tuple
    dtype: torch.dtype

    @property
    def slots(self) -> dict:
        return {k: i for i, k in enumerate(self.keys)}

    @cached_property
    def uses_head(self) -> bool:
        return expr.reads_head(self.root)


def _renamed(root: E, g: int) -> E:
    """The expression with its size parameters moved to design g's own names."""
    return expr._rebuild(root, lambda n: param(f"design {g}", *n.args) if n.op == "p" else n,
                         lambda n, args: expr.op(n.op, *args))


def _documents(batches: list, order: list) -> tuple:
    """(Designs, P rows [D, K]) of lowered batches (one per design; batch g's layout r is the
    document at order's (g, r) place)."""
    keys = [("design",)] + [(f"design {g}", *k) for g, b in enumerate(batches) for k in b.keys]
    root = _renamed(batches[-1].root, len(batches) - 1)
    for g in range(len(batches) - 2, -1, -1):
        root = expr.op("where", param("design") == g, _renamed(batches[g].root, g), root)
    wide = any(b.params.dtype == torch.int64 for b in batches)
    dtype = torch.int64 if wide else torch.int32
    slots = {k: i for i, k in enumerate(keys)}
    # other designs' sizes read 1: their expressions are evaluated too (then not picked), and must
    # not divide by zero
    rows = torch.ones(len(order), len(keys), dtype=dtype)
    for d, (g, r) in enumerate(order):
        rows[d, 0] = g
        for k, v in zip(batches[g].keys, batches[g].params[r].tolist()):
            rows[d, slots[(f"design {g}", *k)]] = v
    return Designs(root, tuple(keys), dtype), rows


def _packed(designs: Designs, rows: torch.Tensor, sizes: list, length: int | None) -> Packed:
    total = sum(sizes)
    length = length or total
    if length < total:
        raise SpecError("length", f"{total:,} packed tokens do not fit in {length:,}")
    params = torch.cat([rows, rows[-1:]])  # padding reads the last document's sizes (then masked)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=designs.dtype)
    doc = torch.repeat_interleave(torch.arange(len(sizes) + 1, dtype=designs.dtype),
                                  torch.tensor(sizes + [length - total]))
    return Packed(designs, params, offsets, doc)


def _no_lookups(batch) -> None:
    if batch.tables:
        raise SpecError("layouts", "packing reads per-token tables: not supported for this design")


def pack(low, layouts: list, length: int | None = None) -> Packed:
    """Pack layouts (size dicts or Specs) of `low`'s design into one row (padded to `length`)."""
    specs = [x if hasattr(x, "table") else low.spec.with_sizes(x) for x in layouts]
    if not specs:
        raise SpecError("layouts", "give at least one layout to pack")
    for sp in specs:
        if _signature(sp) != _signature(low.spec):
            raise SpecError("layouts", "every packed layout must have this design's segments and rules; "
                            "pack different designs with pack_designs")
    batch = low.batch(specs)  # one expression that fits every layout (int width, divisions)
    _no_lookups(batch)
    designs, rows = _documents([batch], [(0, r) for r in range(len(specs))])
    return _packed(designs, rows, [sp.table.n for sp in specs], length)


def pack_designs(specs: list, length: int | None = None, layer: int = 0) -> Packed:
    """Pack documents of any designs (sized Specs, in row order) into one row, padded to `length`;
    layouts of one design share its expression."""
    if not specs:
        raise SpecError("layouts", "give at least one layout to pack")
    groups: dict = {}
    order = []
    for sp in specs:
        members = groups.setdefault(_signature(sp), [])
        order.append((list(groups).index(_signature(sp)), len(members)))
        members.append(sp)
    batches = [lower(members[0], layer).batch(members) for members in groups.values()]
    for b in batches:
        _no_lookups(b)
    designs, rows = _documents(batches, order)
    return _packed(designs, rows, [sp.table.n for sp in specs], length)
