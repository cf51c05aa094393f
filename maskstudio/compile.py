"""The rule program's own evaluations: dense masks, block states (analysis, pictures) and a
reference `mask_mod` (tests compare the lowered expression with it); FlexAttention's BlockMask
and mask_mod come from the lowered expression (lower.py).

All of them run the one compiled `Program` (program.py); dense masks and block states walk it
through the tiled evaluator (tiled.py), so only undecided tiles are evaluated token by token.
The program-level names are re-exported here for callers that know them as `compile.*`.
"""
from __future__ import annotations

import torch

from . import knobs
from .program import (Program, Step, TileTok, Tok, classify_tiles, compile_program, evaluate,  # noqa: F401
                      evaluate_block, make_cuts, tile_bounds)
from .tiled import TiledMask


# ---------------------------------------------------------------- backends
def mask_mod(spec, layer: int = 0, device=None):
    """FlexAttention mask_mod(b, h, q_idx, kv_idx) for one layer (heads are honoured via h)."""
    program = compile_program(spec, layer).to(device)
    attrs = {k: v.to(device) for k, v in spec.table.attrs.items()} if device else spec.table.attrs

    def allow(b, h, q_idx, kv_idx):
        return evaluate(program, Tok(attrs, q_idx), Tok(attrs, kv_idx), h)

    allow.__doc__ = f"mask_mod of spec '{spec.name}' at layer {layer}"
    return allow


def dense_mask(spec, layer: int = 0, head: int = 0) -> torch.Tensor:
    """bool [N, N], True = may attend: the whole grid at once for small N, else through the tiled
    evaluator (decided tiles filled wholesale, only undecided tiles evaluated token by token)."""
    n = spec.table.n
    if n <= knobs.DENSE_DIRECT_MAX:
        idx = torch.arange(n)
        return evaluate_block(compile_program(spec, layer), spec.table.attrs, idx, idx, head).contiguous()
    return TiledMask(spec, layer, head, tile=knobs.TILE).dense()


def block_states(spec, block_size: int = 128, layer: int = 0, head: int = 0, chunk_tiles: int = 256,
                 device=None):
    """Exact per-block state on the block grid: (full, partial) bool [Tq, Tk].

    Interval bounds decide most blocks; undecided ones are evaluated in batches (on `device`)."""
    tiles = TiledMask(spec, layer, head, tile=block_size)
    program, attrs, n = tiles.program, tiles.attrs, tiles.n
    must, may = tiles.must, tiles.unknown | tiles.must
    if device is not None and str(device) != "cpu":
        attrs = {k: v.to(device) for k, v in attrs.items()}
        program.to(device)
        must, may = must.to(device), may.to(device)
    if n % block_size:  # blocks that reach into the padding are never full
        must[-1, :] = False
        must[:, -1] = False
    full, partial = must.clone(), torch.zeros_like(must)
    unknown = torch.nonzero(may & ~must)
    offs = torch.arange(block_size, device=must.device)
    if must.device.type == "cuda":
        chunk_tiles = max(chunk_tiles, 4096)
    for c in range(0, len(unknown), chunk_tiles):
        ij = unknown[c:c + chunk_tiles]
        q_idx = ij[:, 0:1] * block_size + offs  # [U, B]
        k_idx = ij[:, 1:2] * block_size + offs
        q_ok, k_ok = q_idx < n, k_idx < n
        vals = evaluate(program, Tok(attrs, q_idx.clamp(max=n - 1)[:, :, None]),
                        Tok(attrs, k_idx.clamp(max=n - 1)[:, None, :]), head)
        vals = torch.broadcast_to(torch.as_tensor(vals), (len(ij), block_size, block_size))
        valid = q_ok[:, :, None] & k_ok[:, None, :]
        vals = vals & valid  # like create_block_mask: padding past N counts as masked
        anyv, allv = vals.flatten(1).any(1), vals.flatten(1).all(1)
        full[ij[:, 0], ij[:, 1]] = allv
        partial[ij[:, 0], ij[:, 1]] = anyv & ~allv
    return full, partial


def kv_blocks(blocks: torch.Tensor):
    """bool [..., Tq, Tk] -> (num [..., Tq] int32, indices [..., Tq, Tk] int32), ascending."""
    num = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, order
