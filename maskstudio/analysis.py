"""Facts about a compiled mask: density, per-segment-pair density, empty rows, causality,
KV-cache compatibility, target leaks, block sparsity and FLOPs. No plotting here.

Small layouts are analysed on the dense mask. Past knobs.ANALYSIS_DENSE_MAX tokens the same facts
are accumulated through the tiled evaluator (tiles cut every knobs.BLOCK tokens and at segment
boundaries), so a
128k-token layout never allocates N^2 memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import knobs
from .lower import lowered
from .tiled import TiledMask, block_states



@dataclass
class Analysis:
    n: int
    layer: int
    head: int
    names: list[str]
    allowed: int
    segment_counts: torch.Tensor          # [S, S] allowed (query seg, key seg) pairs
    segment_sizes: list[int]
    empty_rows: list[int]                 # token indices with no allowed key (first 50)
    n_empty_rows: int
    n_unattended_keys: int
    causal: bool
    symmetric: bool
    kv_cache_compatible: bool
    leaks: list[str]
    blocks_full: int
    blocks_partial: int
    blocks_total: int
    blocks_causal: int
    varies_by_layer: bool = False
    varies_by_head: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def density(self) -> float:
        return self.allowed / float(self.n * self.n)

    @property
    def segment_density(self) -> torch.Tensor:
        sizes = torch.tensor(self.segment_sizes, dtype=torch.float64)
        return self.segment_counts.double() / (sizes[:, None] * sizes[None, :])

    @property
    def block_sparsity(self) -> float:
        """Fraction of 128x128 blocks FlexAttention can skip."""
        return 1 - (self.blocks_full + self.blocks_partial) / self.blocks_total

    @property
    def flops_vs_full(self) -> float:
        return (self.blocks_full + self.blocks_partial) / self.blocks_total

    @property
    def flops_vs_causal(self) -> float:
        return (self.blocks_full + self.blocks_partial) / self.blocks_causal

    @property
    def ok(self) -> bool:
        return not any(level == "error" for level, _ in self.problems)

    def label(self, i: int) -> str:
        seg = int(np.searchsorted(np.cumsum(self.segment_sizes), i, side="right"))
        return f"{self.names[seg]}[{i - sum(self.segment_sizes[:seg])}]"

    def to_dict(self) -> dict:
        return {"n": self.n, "layer": self.layer, "head": self.head, "density": self.density,
                "allowed": self.allowed, "segments": self.names,
                "segment_density": self.segment_density.tolist(),
                "empty_rows": self.n_empty_rows, "unattended_keys": self.n_unattended_keys,
                "causal": self.causal, "symmetric": self.symmetric,
                "kv_cache_compatible": self.kv_cache_compatible, "leaks": self.leaks,
                "block_sparsity": self.block_sparsity, "flops_vs_full": self.flops_vs_full,
                "flops_vs_causal": self.flops_vs_causal, "varies_by_layer": self.varies_by_layer,
                "varies_by_head": self.varies_by_head,
                "problems": [{"level": lv, "message": m} for lv, m in self.problems], "ok": self.ok}

    def summary(self) -> str:
        """The `check` report: a plain-text block (also shown in the UI)."""
        yes = {True: "yes", False: "no"}
        lines = [f"tokens            {self.n}",
                 f"density           {self.density:.4f}  ({self.allowed} of {self.n * self.n} pairs)",
                 f"causal            {yes[self.causal]}",
                 f"symmetric         {yes[self.symmetric]}",
                 f"KV-cache safe     {yes[self.kv_cache_compatible]}",
                 f"block sparsity    {self.block_sparsity:.3f} at {knobs.BLOCK} "
                 f"({self.blocks_full} full, {self.blocks_partial} partial of {self.blocks_total})",
                 f"FLOPs vs full     {self.flops_vs_full:.3f}",
                 f"FLOPs vs causal   {self.flops_vs_causal:.3f}"]
        if self.varies_by_layer or self.varies_by_head:
            lines.append(f"analysed at       layer {self.layer}, head {self.head} (the mask varies by "
                         f"{' and '.join(w for w, f in (('layer', self.varies_by_layer), ('head', self.varies_by_head)) if f)})")
        lines.append("")
        if len(self.names) > knobs.SEGMENT_TABLE_MAX:  # S^2 numbers: 7 MB of text at 1,024 segments
            lines.append(f"segment density: {len(self.names):,} segments, listed up to {knobs.SEGMENT_TABLE_MAX} "
                         f"(SEGMENT_TABLE_MAX); to_dict()['segment_density'] has every pair")
        else:
            lines.append("segment density (rows = queries, cols = keys)")
            width = max(6, *(len(n) for n in self.names))
            lines.append(" " * width + " " + " ".join(f"{n[:6]:>6}" for n in self.names))
            for name, row in zip(self.names, self.segment_density.tolist()):
                lines.append(f"{name:>{width}} " + " ".join(f"{v:6.2f}" for v in row))
        lines.append("")
        if self.problems:
            lines += [f"{level.upper():7} {msg}" for level, msg in self.problems]
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def _generation_start(spec) -> int:
    """First token of the region new tokens join: segments with role `generate`, else the last."""
    t = spec.table
    gen = [i for i, s in enumerate(spec.segments) if "generate" in s.get("role", [])]
    return t.starts[gen[0]] if gen else t.starts[-1]


class _Acc:
    """Accumulates facts over (query range, key range) pieces of the mask."""

    def __init__(self, spec, gen_start: int):
        t = spec.table
        self.seg = t["segment"]
        self.nseg = len(t.names)
        self.counts = torch.zeros(self.nseg, self.nseg, dtype=torch.long)
        self.row_any = torch.zeros(t.n, dtype=torch.bool)
        self.col_any = torch.zeros(t.n, dtype=torch.bool)
        self.causal = True
        self.kv_ok = True
        self.gen_start = gen_start

    def add_full_tiles(self, must: torch.Tensor, cuts) -> None:
        """Every tile in `must` is fully allowed; tiles never straddle a segment boundary."""
        cuts = torch.as_tensor(cuts)
        starts, ends = cuts[:-1], cuts[1:]
        sizes = ends - starts
        tile_seg = self.seg[starts]
        weights = (sizes[:, None] * sizes[None, :])[must]
        qi, ki = torch.nonzero(must, as_tuple=True)
        pair = tile_seg[qi] * self.nseg + tile_seg[ki]
        self.counts += torch.bincount(pair, weights=weights.double(), minlength=self.nseg ** 2).long().view(self.nseg, self.nseg)
        self.row_any |= torch.repeat_interleave(must.any(1), sizes)
        self.col_any |= torch.repeat_interleave(must.any(0), sizes)
        last_key = ends[ki] - 1
        future = last_key > starts[qi]
        if future.any():
            self.causal = False
            if (future & (last_key >= self.gen_start)).any():
                self.kv_ok = False

    def add_dense(self, q_idx, k_idx, block):
        if not block.any():
            return
        qseg, kseg = self.seg[q_idx], self.seg[k_idx]
        # counted over the segments this piece spans, not all S x S (a tile row of a 1,024-segment
        # layout spans a few: 1,024 bincounts of S^2 bins were 14 s of its analysis)
        q0, k0 = int(qseg.min()), int(kseg.min())
        qw, kw = int(qseg.max()) - q0 + 1, int(kseg.max()) - k0 + 1
        pair = ((qseg - q0)[:, None] * kw + (kseg - k0)[None, :])[block]
        self.counts[q0:q0 + qw, k0:k0 + kw] += torch.bincount(pair, minlength=qw * kw).view(qw, kw)
        self.row_any[q_idx[block.any(1)]] = True
        self.col_any[k_idx[block.any(0)]] = True
        future = block & (k_idx[None, :] > q_idx[:, None])
        if future.any():
            self.causal = False
            if (future & (k_idx[None, :] >= self.gen_start)).any():
                self.kv_ok = False


def _accumulate(spec, layer, head, acc: _Acc, dense_limit: int):
    """Feed the accumulator; returns whether the mask is symmetric."""
    t = spec.table
    n = t.n
    if n <= dense_limit:
        m = spec.dense_mask(layer=layer, head=head)
        idx = torch.arange(n)
        acc.add_dense(idx, idx, m)
        return bool((m == m.T).all())
    tiles = TiledMask(spec, layer, head, tile=knobs.BLOCK, extra_cuts=t.starts)
    acc.add_full_tiles(tiles.must, tiles.cuts)
    for i in tiles.undecided_rows():
        k_idx, block = tiles.undecided_row(i)
        acc.add_dense(tiles.tile_range(i), k_idx, block)
    tiles.forget()
    return _symmetric(tiles)


def _symmetric(tiles: TiledMask) -> bool:
    """Whether the mask equals its transpose: decided tile pairs compared wholesale, the rest by tokens."""
    must, may = tiles.must, tiles.must | tiles.unknown
    decided = must | ~may
    both = decided & decided.T
    if not bool((must == must.T)[both].all()):
        return False
    upper = torch.arange(len(must))[:, None] <= torch.arange(len(must))[None, :]
    for i, j in torch.nonzero(~both & upper).tolist():
        a = tiles.evaluate(tiles.tile_range(i), tiles.tile_range(j))
        b = tiles.evaluate(tiles.tile_range(j), tiles.tile_range(i))
        if not bool((a == b.T).all()):
            return False
    return True


def kv_cache_compatible(spec, layer: int = 0, head: int = 0) -> bool:
    """No query attends a LATER key in the generation region (what the KV cache needs), decided
    from tiles: only tile pairs with keys in that region above the diagonal are looked at."""
    start = _generation_start(spec)
    tiles = TiledMask(spec, layer, head, tile=knobs.BLOCK, extra_cuts=[start])
    cuts = torch.from_numpy(tiles.cuts)
    q_first, k_last = cuts[:-1][:, None], (cuts[1:] - 1)[None, :]
    region = (cuts[:-1] >= start)[None, :] & (k_last > q_first)   # some key after some query
    if bool((tiles.must & region).any()):
        return False
    for i, j in torch.nonzero(tiles.unknown & region).tolist():
        q_idx, k_idx = tiles.tile_range(i), tiles.tile_range(j)
        if bool((tiles.evaluate(q_idx, k_idx) & (k_idx[None, :] > q_idx[:, None])).any()):
            return False
    return True


def _target_leaks(spec, layer, head) -> list[str]:
    """A query predicting target token j must not see target j or any later target token."""
    t = spec.table
    targets = [i for i, s in enumerate(spec.segments) if "target" in s.get("role", [])]
    if not targets:
        return []
    tgt = torch.cat([torch.arange(t.starts[i], t.starts[i] + t.sizes[i]) for i in targets])
    low = lowered(spec, layer)
    leaks = []
    rows = tgt[tgt > 0] - 1
    for c in range(0, len(rows), 1024):
        q = rows[c:c + 1024]
        block = low.evaluate(q, tgt, head) & (tgt[None, :] > q[:, None])
        if block.any():
            r, k = torch.nonzero(block)[0].tolist()
            leaks.append(f"token {int(q[r])} (predicting target token {int(q[r]) + 1}) sees target token "
                         f"{int(tgt[k])}: the answer leaks into its own prediction")
            break
    return leaks


def analyze(spec, layer: int = 0, head: int = 0, dense_limit: int | None = None) -> Analysis:
    """Every fact `check` reports, exact, in O(N) memory past `dense_limit` tokens."""
    t = spec.table
    acc = _Acc(spec, _generation_start(spec))
    symmetric = _accumulate(spec, layer, head, acc, knobs.ANALYSIS_DENSE_MAX if dense_limit is None else dense_limit)
    full, partial = block_states(spec, knobs.BLOCK, layer, head)
    tq = full.shape[0]
    causal_blocks = tq * (tq + 1) // 2
    empty = torch.nonzero(~acc.row_any).flatten()
    a = Analysis(
        n=t.n, layer=layer, head=head, names=list(t.names), allowed=int(acc.counts.sum()),
        segment_counts=acc.counts, segment_sizes=list(t.sizes), empty_rows=empty[:50].tolist(),
        n_empty_rows=len(empty), n_unattended_keys=int((~acc.col_any).sum()), causal=acc.causal,
        symmetric=symmetric, kv_cache_compatible=acc.kv_ok,
        leaks=[] if spec.checks.get("allow_target_leaks") else _target_leaks(spec, layer, head),
        blocks_full=int(full.sum()), blocks_partial=int(partial.sum()), blocks_total=full.numel(),
        blocks_causal=causal_blocks, varies_by_layer=spec.varies_by_layer, varies_by_head=spec.varies_by_head)
    if a.n_empty_rows:
        shown = ", ".join(a.label(i) for i in a.empty_rows[:5])
        a.problems.append(("error", f"{a.n_empty_rows} query row(s) attend no key (softmax gives NaN): {shown}"
                                    f"{' ...' if a.n_empty_rows > 5 else ''}; allow at least self"))
    for leak in a.leaks:
        a.problems.append(("error", leak))
    if a.n_unattended_keys:
        a.problems.append(("info", f"{a.n_unattended_keys} key token(s) are never attended"))
    if not a.kv_cache_compatible:
        a.problems.append(("info", "not KV-cache compatible: an earlier token attends a later token of the "
                                   "generation region, so generation must recompute the prefix"))
    return a
