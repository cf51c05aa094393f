"""BlockMask from a lowered expression, on the device: tile bounds first, tokens in partial tiles only.

The lowered expression runs once over tile intervals for every (batch, query tile, key tile) at
once (vectorised; sizes broadcast per layout), which decides full and empty blocks; only the
undecided tiles are evaluated token by token, in chunks. Blocks past a layout's end count as
masked, as in `create_block_mask`, so the kv and full indices equal torch's.
"""
from __future__ import annotations

import torch

from . import expr
from .bounds import Interval
from .compile import kv_blocks

CHUNK_ELEMENTS = 1 << 24  # tokens evaluated per step in partial tiles


def _per_layout(params: torch.Tensor, batched: bool, rows=None):
    """Size parameters shaped to broadcast: [K] (one layout) or [K, B, 1, 1]."""
    if not batched:
        return params
    p = params if rows is None else params[rows]
    return p.T.reshape(p.shape[1], p.shape[0], 1, 1)


def _tile_tables(low, t: int, block: int, device) -> dict:
    """Per-tile (min, max) of each lookup table, as Intervals for the query and key side."""
    out = {}
    for name, col in low.tables:
        col = col.to(device)
        pad = t * block - len(col)
        padded = torch.cat([col, col[-1:].expand(pad)]) if pad > 0 else col[:t * block]
        tiles = padded.view(t, block)
        lo, hi = tiles.amin(1), tiles.amax(1)
        out[(name, "q")] = Interval(lo[:, None], hi[:, None])
        out[(name, "kv")] = Interval(lo[None, :], hi[None, :])
    return out


def tile_edges(length: int, block: int, device):
    """First and last token of every tile of a `length`-token row."""
    lo = torch.arange(-(-length // block), device=device) * block
    return lo, torch.clamp(lo + block - 1, max=length - 1)


def padding_never_full(must, length: int, block: int):
    """Blocks that reach into the padding are never full (as in create_block_mask)."""
    if length % block:
        must[..., -1, :] = False
        must[..., :, -1] = False
    return must


def classify(low, block: int, length: int, head: int, device):
    """(must, may) bool [B, T, T] from tile bounds alone."""
    lo, hi = tile_edges(length, block, device)
    t = len(lo)
    env = {"q": Interval(lo[:, None], hi[:, None]), "kv": Interval(lo[None, :], hi[None, :]),
           "h": torch.tensor(head, device=device)}
    params = _per_layout(low.params, low.batched)
    res = expr.evaluate_tiles(low.guarded, env, params, low.slots, _tile_tables(low, t, block, device))
    shape = (low.params.shape[0] if low.batched else 1, t, t)
    must = torch.broadcast_to(res.must, shape).clone()
    may = torch.broadcast_to(res.may, shape) | must
    return padding_never_full(must, length, block), may


def tile_grid(q_tiles, k_tiles, block: int, length):
    """Token index grids of listed tiles: q [U, B, 1], kv [U, 1, B] (clamped to the layout) and
    which of those pairs lie inside it (padding past `length` counts as masked)."""
    offs = torch.arange(block, device=q_tiles.device)
    q_idx = (q_tiles[:, None] * block + offs)[:, :, None]
    k_idx = (k_tiles[:, None] * block + offs)[:, None, :]
    valid = (q_idx < length) & (k_idx < length)
    return q_idx.clamp(max=length - 1), k_idx.clamp(max=length - 1), valid


def any_all(vals):
    """(any, all) allowed per tile of a [U, B, B] grid."""
    flat = vals.flatten(1)
    return flat.any(1), flat.all(1)


def decide(must, may, block: int, tokens):
    """Exact (full, partial) from tile bounds: tiles they leave undecided are evaluated by
    tokens(index rows [U, dims]) -> (any, all), in chunks of CHUNK_ELEMENTS tokens."""
    full, partial = must.clone(), torch.zeros_like(must)
    unknown = torch.nonzero(may & ~must)
    step = max(1, CHUNK_ELEMENTS // (block * block))
    for c in range(0, len(unknown), step):
        rows = unknown[c:c + step]
        anyv, allv = tokens(rows)
        at = tuple(rows.T)
        full[at] = allv
        partial[at] = anyv & ~allv
    return full, partial


def to_block_mask(full, partial, block_size: int, mask_mod, length: int):
    """BlockMask from block states [B, H, T, T]; the backward's q-direction indices come straight
    from the states (torch derives them through a vmap over the kv indices: most of a small build)."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx = kv_blocks(partial)
    full_num, full_idx = kv_blocks(full)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                  mask_mod=mask_mod, seq_lengths=(length, length), compute_q_blocks=False)
    bm.q_num_blocks, bm.q_indices = kv_blocks(partial.transpose(-1, -2))
    bm.full_q_num_blocks, bm.full_q_indices = kv_blocks(full.transpose(-1, -2))
    return bm


def _tile_tokens(steps, slots, batched, block, params, tables, bij, length, h):
    """(any, all) allowed per listed tile [U] (rows: batch, q tile, kv tile)."""
    q_idx, k_idx, valid = tile_grid(bij[:, 1], bij[:, 2], block, length)
    env = {"q": q_idx, "kv": k_idx, "h": h}
    return any_all(expr.run_tape(steps, env, _per_layout(params, batched, bij[:, 0]), slots, tables) & valid)


_COMPILED: dict = {}


def _token_stage(low, block: int, compiled: bool):
    """The token stage for this structure: plain, or compiled once per structure, block size and
    bucket of tile counts (the tile list is padded to a power of two, so few shapes appear)."""
    if not compiled:
        return lambda *args: _tile_tokens(low.steps, low.slots, low.batched, block, *args)
    key = (low.steps, tuple(sorted(low.slots.items())), low.batched, block)
    fn = _COMPILED.get(key)
    if fn is None:
        steps, slots, batched = low.steps, low.slots, low.batched
        fn = torch.compile(lambda *args: _tile_tokens(steps, slots, batched, block, *args), dynamic=False)
        _COMPILED[key] = fn
    return fn


def block_states(low, block: int, length: int, head: int, device, compiled: bool = False):
    """Exact (full, partial) bool [B, T, T] for one head."""
    must, may = classify(low, block, length, head, device)
    tables = {name: col.to(device) for name, col in low.tables}
    stage = _token_stage(low, block, compiled)
    h = torch.tensor(head, device=device)
    n = torch.tensor(length, device=device)

    def tokens(bij):
        m = len(bij)
        if compiled:  # pad the list to a power of two (repeats of its last tile, results dropped)
            bucket = 1 << max(m - 1, 0).bit_length()
            bij = torch.cat([bij, bij[-1:].expand(bucket - m, 3)]) if bucket > m else bij
        anyv, allv = stage(low.params, tables, bij, n, h)
        return anyv[:m], allv[:m]
    return decide(must, may, block, tokens)


def build_block_mask(low, block_size: int = 128, device=None, num_heads: int | None = None,
                     length: int | None = None, compiled: bool | None = None):
    """torch BlockMask [B, H, T, T] of a lowered layer (H = 1 unless the rules switch on heads)."""
    device = torch.device(device or low.params.device)
    length = length or low.n
    if length < low.n:
        raise ValueError(f"length {length} is shorter than the layout ({low.n} tokens)")
    if length > low.n and not (low.padded or low.batched):
        low = low.padded_to(True)
    low = low.on(device)
    heads = 1
    if compiled is None:
        compiled = device.type == "cuda"
    if low.uses_head:
        if num_heads is None:
            raise ValueError("this spec has per-head rules: pass num_heads=<the model's query heads>")
        heads = num_heads
    states = [block_states(low, block_size, length, h, device, compiled) for h in range(heads)]
    full = torch.stack([f for f, _ in states], 1)
    partial = torch.stack([p for _, p in states], 1)
    return to_block_mask(full, partial, block_size, low.mask_mod, length)
