"""Information flow through a mask: who feeds whom, and after how many layers.

All of it walks the layer's one lowered expression (tiled.py); nothing here re-states a mask.

  flow_graph(spec, level)        networkx.DiGraph, edge k -> q when q may read k, `density` =
                                 allowed pairs / all pairs of that (q, k) block
  pair_counts(spec, groups)      allowed (query group, key group) pairs for any contiguous token
                                 grouping (frames, 128-token blocks), O(N) memory at any N
  reachability(spec, layers)     bool [N, N]: token j's input can reach query q's output after the
                                 layers, the residual stream counted (small N only)
  segment_reachability(...)      bool [L, S, S], exact at any N
  layers_until_reach(...)        "after how many layers can every token of A see segment B"

Reachability and layer order. Layer l maps states h_l to h_{l+1}; query q at layer l reads the keys
k with M_l[q, k] plus its own residual stream, so one layer is the relation A_l = M_l OR I. A query
after L layers has read, through layer L-1, keys whose layer-(L-1) state had read, through layer
L-2, ... hence (boolean products)

    R_L = A_{L-1} . A_{L-2} . ... . A_0          (the newest layer on the LEFT)

and R_L[q, j] is True when input token j can influence the output of token q. Rules with `layers`
are honoured layer by layer; layers that compile to the same program share one mask.

Segment level. Composing the per-layer *segment* relation ("some query of A sees some key of B",
segment_counts > 0) over-approximates: with partial blocks the token that reached B need not be the
one that A's queries read. We never compose at segment level. Instead we propagate token sets:
with V_B[:, 0] = "token is in B", V after L layers = A_{L-1} ... A_0 V_B marks exactly the tokens
that can see B. One propagation is a boolean [N, N] x [N, S] product, done tile by tile past
knobs.PICTURE_DENSE_MAX tokens (decided tiles from interval bounds, only undecided tiles evaluated), so it is
exact and O(N * S) memory for a 128k-token layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch

from . import knobs
from .analysis import analyze
from .tiled import TiledMask



# ---------------------------------------------------------------- per-layer masks
def _layer_list(layers) -> list[int]:
    """`layers`: an int L (layers 0..L-1, first applied first) or an explicit list in applied order."""
    if isinstance(layers, (int, np.integer)):
        if layers < 0:
            raise ValueError("layers must be >= 0")
        return list(range(int(layers)))
    return [int(x) for x in layers]


def default_layers(spec, minimum: int = 4) -> int:
    """Enough layers to show a per-layer spec's whole pattern (max listed layer + 2, at least 4)."""
    top = max((max(s) for s in spec.layer_sets() if s), default=-1)
    return max(minimum, top + 2)


class _Layer:
    """One layer's relation A = M OR I, applied to token sets: A @ V (and A^T @ V)."""

    def __init__(self, spec, layer: int, head: int, mask: torch.Tensor | None = None,
                 dense_limit: int = knobs.PICTURE_DENSE_MAX):
        self.n = spec.table.n
        if mask is not None or self.n <= dense_limit:
            m = spec.dense_mask(layer, head) if mask is None else mask
            self.dense = (m | torch.eye(self.n, dtype=torch.bool)).float()
            self.tiles = None
        else:
            self.dense = None
            self.tiles = TiledMask(spec, layer, head, tile=knobs.BLOCK)

    def apply(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """bool [N, C] -> bool [N, C]: out[q] = OR_k A[q, k] v[k]  (transpose: out[k] = OR_q A[q, k] v[q])."""
        if self.dense is not None:
            a = self.dense.T if transpose else self.dense
            return (a @ v.float()) > 0
        tl = self.tiles
        cuts = torch.from_numpy(tl.cuts)
        owner = torch.repeat_interleave(torch.arange(len(cuts) - 1), cuts.diff())
        # any-per-tile of v, then whole tiles at once: tile_hits = must @ tile_any
        tile_any = torch.zeros(len(cuts) - 1, v.shape[1]).index_add_(0, owner, v.float()) > 0
        must = tl.must.T if transpose else tl.must
        out = ((must.float() @ tile_any.float()) > 0)[owner] | v
        for i in tl.undecided_rows():
            k_idx, block = tl.undecided_row(i)
            q_rng = tl.tile_range(i)
            if transpose:   # queries of tile i -> the keys they read
                hits = (block.T.float() @ v[q_rng].float()) > 0
                out[k_idx] |= hits
            else:           # keys -> queries of tile i
                hits = (block.float() @ v[k_idx].float()) > 0
                out[q_rng] |= hits
        return out


class LayerMasks:
    """A spec's per-layer masks for one head, built on first use and shared between layers that
    compile to the same program (and between pictures: pass one LayerMasks to several views)."""

    def __init__(self, spec, head: int = 0, dense_limit: int = knobs.PICTURE_DENSE_MAX):
        self.spec, self.head, self.dense_limit = spec, head, dense_limit
        self._layers: dict[tuple, _Layer] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    def mask(self, layer: int = 0) -> torch.Tensor:
        """Dense bool [N, N] mask of `layer` (small N only), cached."""
        key = self.spec.layer_key(layer)
        if key not in self._masks:
            self._masks[key] = self.spec.dense_mask(layer, self.head)
        return self._masks[key]

    def __getitem__(self, layer: int) -> _Layer:
        key = self.spec.layer_key(layer)
        if key not in self._layers:
            small = self.spec.table.n <= self.dense_limit
            self._layers[key] = _Layer(self.spec, layer, self.head, self.mask(layer) if small else None,
                                       self.dense_limit)
        return self._layers[key]


# ---------------------------------------------------------------- reachability
def reachability(spec, layers, head: int = 0) -> torch.Tensor:
    """bool [N, N]: R[q, j] = input token j can influence token q's output after `layers`.

    R = (M_{L-1} OR I) ... (M_0 OR I) as boolean matrix products, newest layer on the left.
    `layers` is a count L (layers 0..L-1) or a list of layer ids in the order they are applied."""
    n = spec.table.n
    if n > knobs.REACH_MATRIX_MAX:
        raise ValueError(f"reachability() builds an N x N matrix; this layout has {n} tokens "
                         f"(limit {knobs.REACH_MATRIX_MAX}). Use segment_reachability(), exact at any N.")
    model = LayerMasks(spec, head)
    r = torch.eye(n, dtype=torch.bool)
    for layer in _layer_list(layers):
        r = model[layer].apply(r)  # A_layer @ R
    return r


def receptive_field(spec, token: int, layers, head: int = 0, model: "LayerMasks | None" = None) -> torch.Tensor:
    """bool [L, N]: row l-1 = the input tokens token `token` can read after the first l layers.

    Row l-1 is e_token^T A_{l-1} ... A_0, walked from the newest layer down (exact at any N)."""
    order = _layer_list(layers)
    n = spec.table.n
    model = model or LayerMasks(spec, head)
    rows = []
    for upto in range(1, len(order) + 1):
        v = torch.zeros(n, 1, dtype=torch.bool)
        v[token] = True
        for layer in reversed(order[:upto]):
            v = model[layer].apply(v, transpose=True)
        rows.append(v[:, 0])
    return torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.bool)


def sees_segments(spec, layers, head: int = 0, model: "LayerMasks | None" = None) -> torch.Tensor:
    """bool [L, N, S]: [l-1, q, B] = token q can read some token of segment B after l layers (exact)."""
    t = spec.table
    model = model or LayerMasks(spec, head)
    v = torch.nn.functional.one_hot(t["segment"], len(t.names)).bool()
    out = []
    for layer in _layer_list(layers):
        v = model[layer].apply(v)
        out.append(v)
    return torch.stack(out) if out else torch.zeros(0, t.n, len(t.names), dtype=torch.bool)


def segment_reachability(spec, layers, head: int = 0, every: bool = True,
                         model: "LayerMasks | None" = None) -> torch.Tensor:
    """bool [L, S, S]: [l-1, A, B] = after l layers every token (every=False: some token) of
    segment A can read some token of segment B. Exact at any N (see the module docstring)."""
    t = spec.table
    seen = sees_segments(spec, layers, head, model)
    sizes = torch.as_tensor(t.sizes)
    # tokens of A that see B, summed per segment at once (segments are contiguous runs)
    hits = torch.zeros(len(seen), len(sizes), seen.shape[2], dtype=torch.int32)
    hits.index_add_(1, t["segment"], seen.to(torch.int32))
    return hits == sizes[None, :, None] if every else hits > 0


@dataclass
class ReachTable:
    names: list[str]
    layers: list[int]           # the layer ids applied, in order
    steps: list[list[int | None]]  # [A][B] = fewest layers after which every token of A sees B; None = never

    def to_dict(self) -> dict:
        return {"names": self.names, "layers": self.layers, "steps": self.steps}

    def text(self) -> str:
        """Plain-text table: rows = reading segment A, cols = source segment B (up to
        knobs.SEGMENT_TABLE_MAX segments; past it one line: S^2 cells of text are megabytes)."""
        if len(self.names) > knobs.SEGMENT_TABLE_MAX:
            return (f"layers until every token of A sees B: {len(self.names):,} segments, listed up to "
                    f"{knobs.SEGMENT_TABLE_MAX} (SEGMENT_TABLE_MAX); to_dict()['steps'] has every pair")
        width = max(6, *(len(n) for n in self.names))
        cols = [n[:7] for n in self.names]
        head = f"layers until every token of A sees B (within {len(self.layers)} layers; '-' = never)"
        corner = "A \\ B"
        lines = [head, f"{corner:>{width}} " + " ".join(f"{c:>7}" for c in cols)]
        for name, row in zip(self.names, self.steps):
            lines.append(f"{name:>{width}} " + " ".join(f"{'-' if v is None else v:>7}" for v in row))
        return "\n".join(lines)


def layers_until_reach(spec, layers=None, head: int = 0, model: "LayerMasks | None" = None) -> ReachTable:
    """For every segment pair (A, B): the fewest layers after which every token of A can read
    some token of B (residual stream counted). The diagonal is 0: a segment sees itself through
    the residual stream before any layer."""
    order = _layer_list(default_layers(spec) if layers is None else layers)
    reach = segment_reachability(spec, order, head, every=True, model=model)
    s = reach.shape[1]
    never = ~reach.any(0) if len(reach) else torch.ones(s, s, dtype=torch.bool)
    first = reach.int().argmax(0) + 1 if len(reach) else torch.zeros(s, s, dtype=torch.long)  # [A, B]: 1-based
    never.fill_diagonal_(False)
    first.fill_diagonal_(0)
    steps = [[None if n else v for v, n in zip(row, nrow)] for row, nrow in zip(first.tolist(), never.tolist())]
    return ReachTable(list(spec.table.names), order, steps)


# ---------------------------------------------------------------- counts and the flow graph
def pair_counts(spec, groups: torch.Tensor, layer: int = 0, head: int = 0,
                dense_limit: int = knobs.PICTURE_DENSE_MAX) -> torch.Tensor:
    """LongTensor [G, G]: allowed (query group, key group) pairs. `groups` [N] holds group ids
    0..G-1 that are constant on contiguous runs (frames, blocks, segments). O(N + G^2) memory
    past `dense_limit`: tiles are cut at run starts, decided tiles counted by their area."""
    t = spec.table
    n = t.n
    groups = groups.long()
    g = int(groups.max()) + 1
    if n <= dense_limit:
        m = spec.dense_mask(layer, head).double()
        onehot = torch.nn.functional.one_hot(groups, g).double()
        return (onehot.T @ m @ onehot).round().long()
    starts = (torch.nonzero(groups.diff() != 0).flatten() + 1).tolist()
    tl = TiledMask(spec, layer, head, tile=knobs.BLOCK, extra_cuts=starts)
    cuts = torch.from_numpy(tl.cuts)
    sizes = cuts.diff()
    tile_group = groups[cuts[:-1]]
    counts = torch.zeros(g, g, dtype=torch.long)
    i, j = torch.nonzero(tl.must, as_tuple=True)
    counts.index_put_((tile_group[i], tile_group[j]), sizes[i] * sizes[j], accumulate=True)
    for i in tl.undecided_rows():
        k_idx, block = tl.undecided_row(i)
        counts[tile_group[i]].index_add_(0, groups[k_idx], block.sum(0))
    tl.forget()
    return counts


def frame_groups(spec) -> tuple[torch.Tensor, list[dict]]:
    """Frame-level grouping: one group per frame of a video (or a 1-D segment with `frames`),
    one per other segment. Returns (group id per token, node attribute dicts)."""
    t = spec.table
    gid = torch.empty(t.n, dtype=torch.long)
    nodes: list[dict] = []
    for s, seg in enumerate(spec.segments):
        sl = t.segment_slice(s)
        framed = seg["modality"] == "video" or "frames" in seg
        frames = int(t["frames"][sl][0]) if framed else 1
        local_t = t["t"][sl] if framed else torch.zeros(t.sizes[s], dtype=torch.long)
        gid[sl] = len(nodes) + local_t
        for f in range(frames):
            nodes.append({"name": f"{seg['name']}/f{f}" if framed else seg["name"],
                          "segment": seg["name"], "modality": seg["modality"],
                          "tokens": int((local_t == f).sum()), "frame": f if framed else None})
    return gid, nodes


def _graph(nodes: list[dict], counts: torch.Tensor, starts: list[int]) -> nx.DiGraph:
    g = nx.DiGraph()
    for order, (node, start) in enumerate(zip(nodes, starts)):
        attrs = {k: v for k, v in node.items() if k != "name" and v is not None}
        g.add_node(node["name"], order=order, start=start, **attrs)
    qi, ki = torch.nonzero(counts > 0, as_tuple=True)  # only the edges there are, not every pair
    for q, k, allowed in zip(qi.tolist(), ki.tolist(), counts[qi, ki].tolist()):
        pairs = nodes[q]["tokens"] * nodes[k]["tokens"]
        g.add_edge(nodes[k]["name"], nodes[q]["name"], density=allowed / pairs, allowed=allowed,
                   pairs=pairs, partial=allowed < pairs)
    return g


def flow_graph(spec, level: str = "segment", layer: int = 0, head: int = 0, analysis=None) -> nx.DiGraph:
    """Who feeds whom. Nodes in sequence order (attributes: modality, tokens, order, start);
    edge k -> q when some query of q may attend some key of k, with `density` = allowed / all
    pairs of that block (self-loops for within-segment attention), `allowed`, `pairs`, `partial`.

    level: "segment" (from analysis.analyze's segment_counts, any N), "frame" (video frames and
    framed 1-D segments split out, any N), "token" (N <= 256)."""
    t = spec.table
    if level == "segment":
        if analysis is None:
            analysis = analyze(spec, layer=layer, head=head, dense_limit=knobs.ANALYSIS_DENSE_MAX)
        nodes = [{"name": s["name"], "modality": s["modality"], "tokens": n, "segment": s["name"]}
                 for s, n in zip(spec.segments, t.sizes)]
        g = _graph(nodes, analysis.segment_counts, list(t.starts))
    elif level == "frame":
        gid, nodes = frame_groups(spec)
        first = torch.zeros(len(nodes), dtype=torch.long).scatter_reduce_(
            0, gid, torch.arange(t.n), reduce="amin", include_self=False)
        g = _graph(nodes, pair_counts(spec, gid, layer, head), first.tolist())
    elif level == "token":
        if t.n > knobs.TOKEN_GRAPH_MAX:
            raise ValueError(f"token-level flow graphs are for small layouts (<= {knobs.TOKEN_GRAPH_MAX} "
                             f"tokens); this one has {t.n}. Use level='segment' or 'frame'.")
        seg = t["segment"].tolist()
        nodes = [{"name": i, "segment": t.names[seg[i]], "modality": t.modalities[seg[i]], "tokens": 1,
                  "local": int(t["local"][i])} for i in range(t.n)]
        g = _graph(nodes, spec.dense_mask(layer, head).long(), list(range(t.n)))
    else:
        raise ValueError(f"unknown level {level!r}; use 'segment', 'frame' or 'token'")
    g.graph.update(level=level, layer=layer, head=head, spec=spec.name, n=t.n)
    return g


def block_fraction(spec, block_size: int = 128, layer: int = 0, head: int = 0) -> torch.Tensor:
    """float [T, T]: fraction of allowed pairs in each block_size x block_size block (the last
    row/column of blocks is partial when N is not a multiple). O(N + T^2) memory at any N."""
    n = spec.table.n
    groups = torch.arange(n) // block_size
    counts = pair_counts(spec, groups, layer, head)
    sizes = torch.bincount(groups).double()
    return counts.double() / (sizes[:, None] * sizes[None, :])
