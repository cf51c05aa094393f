"""The tile walk: one layer and head of a spec's mask, cut into tiles, on the lowered expression.

Every mask evaluation runs the layer's one lowered expression (lower.lowered: the same expression
FlexAttention, the eager runner, generation steps and the export run). Its interval bounds decide
most tiles wholesale: `must` tiles are all-allowed, tiles outside `may` all-masked. Only the
undecided rest (diagonals, segment boundaries, windows) is evaluated token by token, on demand.
Dense masks, block states, analysis, flow and reachability all walk masks through this one class.
"""
from __future__ import annotations

import numpy as np
import torch

from . import knobs
from .lower import lowered
from .lower_blocks import block_states as lowered_block_states, token_stage

_ROW_CACHE_BYTES = 256 << 20  # undecided rows kept for repeated walks (reachability propagates many times)


def make_cuts(n: int, step: int, extra=()) -> np.ndarray:
    """Tile boundaries: multiples of `step`, plus `extra` (e.g. segment starts), plus n."""
    return np.unique(np.concatenate([np.arange(0, n, step), np.asarray(list(extra), dtype=np.int64),
                                     [n]])).astype(np.int64)


class TiledMask:
    """bool mask [N, N] of (layer, head), held as tiles cut every `tile` tokens and at `extra_cuts`."""

    def __init__(self, spec, layer: int = 0, head: int = 0, tile: int | None = None, extra_cuts=()):
        self.n, self.head = spec.table.n, head
        self.low = lowered(spec, layer)
        self.cuts = make_cuts(self.n, tile or knobs.TILE, extra_cuts)
        self._rows: dict[int, tuple] = {}
        self._row_bytes = 0
        self._classified = False

    def _classify(self) -> None:
        """Decide the tiles (on first use: small layouts asked for dense rows never need it)."""
        if not self._classified:
            cuts = torch.from_numpy(self.cuts)
            self._must, may = self.low.tile_states(cuts, cuts, self.head)
            self._unknown = may & ~self._must
            self._classified = True

    @property
    def must(self) -> torch.Tensor:
        """bool [Tq, Tk]: tiles whose every pair is allowed."""
        self._classify()
        return self._must

    @property
    def unknown(self) -> torch.Tensor:
        """bool [Tq, Tk]: tiles bounds could not decide (evaluated token by token)."""
        self._classify()
        return self._unknown

    @property
    def sizes(self) -> torch.Tensor:
        return torch.from_numpy(self.cuts).diff()

    def tile_range(self, i: int) -> torch.Tensor:
        return torch.arange(int(self.cuts[i]), int(self.cuts[i + 1]))

    def evaluate(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """Token-level allow for the given query and key indices -> bool [len(q), len(k)]."""
        return self.low.evaluate(q_idx, k_idx, self.head)

    def undecided_rows(self) -> list[int]:
        """Query tiles that have at least one undecided tile."""
        return torch.nonzero(self.unknown.any(1)).flatten().tolist()

    def undecided_row(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key indices, bool block [tile, keys]) over query tile i's undecided tiles (kept while small)."""
        if i in self._rows:
            return self._rows[i]
        k_idx = torch.cat([self.tile_range(j) for j in torch.nonzero(self.unknown[i]).flatten().tolist()])
        block = self.evaluate(self.tile_range(i), k_idx)
        if self._row_bytes + block.numel() < _ROW_CACHE_BYTES:
            self._rows[i] = (k_idx, block)
            self._row_bytes += block.numel()
        return k_idx, block

    def forget(self) -> None:
        """Drop the kept undecided rows."""
        self._rows.clear()
        self._row_bytes = 0

    def _decided(self, q_start: int) -> torch.Tensor:
        """bool [N - q_start, N] with the `must` tiles set (a fresh tensor, safe to write into)."""
        sizes = self.sizes
        edge = int(sizes[0])
        if bool((sizes[:-1] == edge).all()):  # equal tiles: expand a view of the rows asked for, one copy
            first = q_start // edge
            rows = self.must[first:]
            tq, tk = rows.shape
            grid = rows[:, None, :, None].expand(tq, edge, tk, edge).reshape(tq * edge, tk * edge)
            offset = q_start - first * edge
            return grid[offset:offset + self.n - q_start, :self.n].contiguous()
        owner = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        return self.must[owner[q_start:]][:, owner]

    def dense(self, q_start: int = 0) -> torch.Tensor:
        """bool [N - q_start, N]: decided tiles filled wholesale, undecided ones evaluated
        (below knobs.DENSE_DIRECT_MAX tokens the rows are evaluated in one go instead)."""
        if self.n <= knobs.DENSE_DIRECT_MAX:
            return self.evaluate(torch.arange(q_start, self.n), torch.arange(self.n)).contiguous()
        out = self._decided(q_start)
        for i in self.undecided_rows():
            lo, hi = max(int(self.cuts[i]), q_start), int(self.cuts[i + 1])
            if hi <= q_start:
                continue
            js = torch.nonzero(self.unknown[i]).flatten().tolist()
            k_idx = torch.cat([self.tile_range(j) for j in js])
            out[lo - q_start:hi - q_start, k_idx] = self.evaluate(torch.arange(lo, hi), k_idx)
        return out


def dense_mask(spec, layer: int = 0, head: int = 0) -> torch.Tensor:
    """bool [N, N], True = may attend: the whole grid at once for small N, else decided tiles filled
    wholesale and only undecided tiles evaluated token by token."""
    return TiledMask(spec, layer, head, tile=knobs.TILE).dense()


def block_states(spec, block_size: int = 128, layer: int = 0, head: int = 0, device=None):
    """Exact per-block state on the block grid: (full, partial) bool [Tq, Tk], by the same tile
    bounds, probe and token stage that build the BlockMask (blocks past N count as masked)."""
    low = lowered(spec, layer).on(device or "cpu")
    h = [torch.full((), head, dtype=torch.int64, device=low.params.device)]
    full, partial, _ = lowered_block_states(low, low.params, dict(low.tables), block_size, low.n, h,
                                            token_stage(low, block_size, False))
    return full[0, 0], partial[0, 0]
