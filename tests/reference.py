"""The tests' own oracle: the rule program (program.evaluate, the one statement of base -> rules ->
overlays) run over plain per-token attribute lookups, cell by cell, with no lowering, no tiles and
no interval bounds. Production evaluates every mask through the lowered expression (tiled.py,
lower.py); tests compare that engine with this independent reading of the same rules."""
from __future__ import annotations

import torch

from maskstudio.program import compile_program, evaluate


class Tok:
    """Token view over index tensors: `tok.frame` -> the frame ids of those tokens."""

    def __init__(self, attrs: dict, idx):
        self._attrs, self._idx = attrs, idx

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._attrs[name][self._idx]

    def _in_segments(self, sel):
        return sel[self._attrs["segment"][self._idx]]


def mask_mod(spec, layer: int = 0, device=None):
    """FlexAttention-shaped mask_mod(b, h, q_idx, kv_idx) reading the token table."""
    program = compile_program(spec, layer).to(device)
    attrs = {k: v.to(device) for k, v in spec.table.attrs.items()} if device else spec.table.attrs

    def allow(b, h, q_idx, kv_idx):
        return evaluate(program, Tok(attrs, q_idx), Tok(attrs, kv_idx), h)
    return allow


def dense(spec, layer: int = 0, head: int = 0) -> torch.Tensor:
    """bool [N, N] of (layer, head), every cell evaluated."""
    idx = torch.arange(spec.table.n)
    out = evaluate(compile_program(spec, layer), Tok(spec.table.attrs, idx[:, None]),
                   Tok(spec.table.attrs, idx[None, :]), head)
    return torch.broadcast_to(torch.as_tensor(out), (len(idx), len(idx))).contiguous()
