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


def classify(low, block: int, length: int, head: int, device):
    """(must, may) bool [B, T, T] from tile bounds alone."""
    t = -(-length // block)
    lo = torch.arange(t, device=device) * block
    hi = torch.clamp(lo + block - 1, max=length - 1)
    env = {"q": Interval(lo[:, None], hi[:, None]), "kv": Interval(lo[None, :], hi[None, :]),
           "h": torch.tensor(head, device=device)}
    params = _per_layout(low.params, low.batched)
    res = expr.evaluate_tiles(low.guarded, env, params, low.slots, _tile_tables(low, t, block, device))
    shape = (low.params.shape[0] if low.batched else 1, t, t)
    must = torch.broadcast_to(res.must, shape).clone()
    may = torch.broadcast_to(res.may, shape) | must
    if length % block:  # blocks that reach into the padding are never full
        must[:, -1, :] = False
        must[:, :, -1] = False
    return must, may


def _tile_tokens(steps, slots, batched, block, params, tables, bij, length, h):
    """(any, all) allowed per listed tile [U], evaluating its block x block tokens."""
    offs = torch.arange(block, device=bij.device)
    q_idx = (bij[:, 1:2] * block + offs)[:, :, None]
    k_idx = (bij[:, 2:3] * block + offs)[:, None, :]
    valid = (q_idx < length) & (k_idx < length)
    env = {"q": torch.minimum(q_idx, length - 1), "kv": torch.minimum(k_idx, length - 1), "h": h}
    vals = expr.run_tape(steps, env, _per_layout(params, batched, bij[:, 0]), slots, tables) & valid
    flat = vals.flatten(1)
    return flat.any(1), flat.all(1)


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
    full, partial = must.clone(), torch.zeros_like(must)
    unknown = torch.nonzero(may & ~must)
    count = len(unknown)
    if count == 0:
        return full, partial
    tables = {name: col.to(device) for name, col in low.tables}
    stage = _token_stage(low, block, compiled)
    h = torch.tensor(head, device=device)
    n = torch.tensor(length, device=device)
    step = max(1, CHUNK_ELEMENTS // (block * block))
    for c in range(0, count, step):
        bij = unknown[c:c + step]
        m = len(bij)
        if compiled:  # pad the list to a power of two (repeats of its last tile, results dropped)
            bucket = 1 << max(m - 1, 0).bit_length()
            bij = torch.cat([bij, bij[-1:].expand(bucket - m, 3)]) if bucket > m else bij
        anyv, allv = stage(low.params, tables, bij, n, h)
        anyv, allv, bij = anyv[:m], allv[:m], bij[:m]
        full[bij[:, 0], bij[:, 1], bij[:, 2]] = allv
        partial[bij[:, 0], bij[:, 1], bij[:, 2]] = anyv & ~allv
    return full, partial


def build_block_mask(low, block_size: int = 128, device=None, num_heads: int | None = None,
                     length: int | None = None, compiled: bool | None = None):
    """torch BlockMask [B, H, T, T] of a lowered layer (H = 1 unless the rules switch on heads)."""
    from torch.nn.attention.flex_attention import BlockMask

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
    kv_num, kv_idx = kv_blocks(partial)
    full_num, full_idx = kv_blocks(full)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                  mask_mod=low.mask_mod, seq_lengths=(length, length), compute_q_blocks=False)
    # the backward's q-direction indices straight from the block states (torch derives them
    # through a vmap over the kv indices: most of a small build's time)
    bm.q_num_blocks, bm.q_indices = kv_blocks(partial.transpose(-1, -2))
    bm.full_q_num_blocks, bm.full_q_indices = kv_blocks(full.transpose(-1, -2))
    return bm
