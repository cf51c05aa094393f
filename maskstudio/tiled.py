"""The tiled evaluator: one layer and head of a spec's mask, cut into tiles.

Interval bounds (bounds.py) decide most tiles wholesale: `must` tiles are all-allowed, tiles
outside `may` all-masked. Only the undecided rest (diagonals, segment boundaries, windows) is
evaluated token by token, on demand. Dense masks, block states, analysis, flow and the run package's
attention context all walk masks through this one class, so the walk is written once.
"""
from __future__ import annotations

import torch

from . import knobs
from .program import Program, classify_tiles, compile_program, evaluate_block, make_cuts

_ROW_CACHE_BYTES = 256 << 20  # undecided rows kept for repeated walks (reachability propagates many times)


class TiledMask:
    """bool mask [N, N] of (layer, head), held as tiles cut every `tile` tokens and at `extra_cuts`."""

    def __init__(self, spec, layer: int = 0, head: int = 0, tile: int | None = None, extra_cuts=(),
                 program: Program | None = None):
        t = spec.table
        self.attrs, self.n, self.head = t.attrs, t.n, head
        self.program = program if program is not None else compile_program(spec, layer)
        self.cuts = make_cuts(self.n, tile or knobs.TILE, extra_cuts)
        self._rows: dict[int, tuple] = {}
        self._row_bytes = 0
        self._classified = False

    def _classify(self) -> None:
        """Decide the tiles (on first use: small layouts asked for dense rows never need it)."""
        if not self._classified:
            self._must, may = classify_tiles(self.program, self.attrs, self.cuts, self.cuts, self.head)
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
        return evaluate_block(self.program, self.attrs, q_idx, k_idx, self.head)

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
