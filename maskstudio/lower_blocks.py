"""BlockMask from a lowered expression, on the device: tile bounds first, tokens in partial tiles only.

The lowered expression runs once over tile intervals for every (batch, head, query tile, key tile)
at once (vectorised; sizes broadcast per layout), which decides full and empty blocks. A tile the
bounds leave undecided is probed on a 16 x 16 grid of sampled pairs: if the samples disagree it is
partial, proven without its other tokens; only tiles whose samples agree are evaluated token by
token. Blocks past a layout's end count as masked, as in `create_block_mask`, so the kv and full
indices equal torch's.

Every step has static shapes given capacities for undecided and probed-but-undecided tiles (no host
sync), so on CUDA the whole build of one structure at one length is captured once as a CUDA graph:
a build at new sizes copies them in and replays it (a few microseconds of launches instead of
hundreds of ops). One read of the two counts after the replay says whether the capacities held;
if not, the graph is captured again with capacity for them.
"""
from __future__ import annotations

import functools
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import expr, knobs
from .bounds import Interval

CHUNK_ELEMENTS = 1 << 24  # tokens evaluated per step in partial tiles
GRAPH_CACHE = 16           # captured builds kept (least recently used dropped)


def _per_layout(params: torch.Tensor, batched: bool, rows=None):
    """Size parameters shaped to broadcast: [K] (one layout) or [K, B, 1, 1]."""
    if not batched:
        return params
    p = params if rows is None else params[rows]
    return p.T.reshape(p.shape[1], p.shape[0], 1, 1)


def tile_tables(tables: dict, t: int, block: int) -> dict:
    """Per-tile (min, max) of each lookup table, as Intervals for the query and key side."""
    out = {}
    for name, col in tables.items():
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


def classify(low, params, tables: dict, block: int, length: int, h: torch.Tensor, edges=None):
    """(must, may) bool [B, T, T] of one head (h: a 0-d tensor) from tile bounds alone. edges:
    tile_edges made beforehand (a compiled build takes them as data: inductor's CUDA backend fails
    on comparisons of the index arithmetic an arange in the graph would give)."""
    lo, hi = edges if edges is not None else tile_edges(length, block, params.device)
    t = len(lo)
    env = {"q": Interval(lo[:, None], hi[:, None]), "kv": Interval(lo[None, :], hi[None, :]), "h": h}
    res = expr.evaluate_tiles(low.guarded, env, _per_layout(params, low.batched), low.slots,
                              tile_tables(tables, t, block))
    shape = (params.shape[0] if low.batched else 1, t, t)
    # `|` broadcasts a constant result (a CPU scalar) onto the device without a copy
    must = torch.zeros(shape, dtype=torch.bool, device=params.device) | res.must
    return padding_never_full(must, length, block), must | res.may


def _reduce_tiles(col: torch.Tensor, cuts: torch.Tensor) -> tuple:
    """Per-tile (min, max) of a per-token column over tiles [cuts[i], cuts[i+1])."""
    starts = cuts[:-1].to(col.device)
    if len(starts) and bool((cuts.diff() == cuts[1] - cuts[0]).all()):  # equal tiles: one view
        t, size = len(starts), int(cuts[1] - cuts[0])
        tiles = col[:t * size].view(t, size)
        return tiles.amin(1), tiles.amax(1)
    owner = torch.repeat_interleave(torch.arange(len(starts), device=col.device), cuts.diff().to(col.device))
    lo = torch.full((len(starts),), torch.iinfo(col.dtype).max, dtype=col.dtype, device=col.device)
    hi = torch.full((len(starts),), torch.iinfo(col.dtype).min, dtype=col.dtype, device=col.device)
    return lo.scatter_reduce(0, owner, col, "amin"), hi.scatter_reduce(0, owner, col, "amax")


def _segment_runs(low, q_cuts: torch.Tensor) -> list[tuple[int, int]]:
    """[first, last) query tiles of each run of tiles that start and end in the same segments: a
    closed form specialised to one run drops its select over the query's segment."""
    t = len(q_cuts) - 1
    if low.form != "closed" or low.batched or t == 0:
        return [(0, t)]
    starts = torch.tensor(low.spec.table.starts, dtype=q_cuts.dtype)
    first = torch.searchsorted(starts, q_cuts[:-1], right=True)
    last = torch.searchsorted(starts, q_cuts[1:] - 1, right=True)
    key = first * (len(starts) + 1) + last
    edges = [0] + (torch.nonzero(key.diff() != 0).flatten() + 1).tolist() + [t]
    runs = list(zip(edges[:-1], edges[1:]))
    return runs if len(runs) <= SPECIALIZED_RUNS else [(0, t)]


SPECIALIZED_RUNS = 256  # query-tile runs classified one by one (past it: one pass over the whole grid)


def classify_ranges(low, q_cuts: torch.Tensor, k_cuts: torch.Tensor, head: int = 0) -> tuple:
    """(must, may) bool [Tq, Tk] of one layout and head over tiles cut at arbitrary places (a
    segment start, a generation start): index intervals and each lookup table's per-tile range.
    Query tiles are taken in runs inside the same segments, each with the expression specialised
    to its range (expr.specialize), so the grid never runs the select over every segment."""
    k_lo, k_hi = k_cuts[None, :-1], k_cuts[None, 1:] - 1
    kv_tables, whole = {}, {}
    for name, col in low.tables:
        lo, hi = _reduce_tiles(col, k_cuts)
        kv_tables[(name, "kv")] = Interval(lo[None, :], hi[None, :])
        whole[(name, "kv")] = Interval(col.min(), col.max())
    h = torch.tensor(head)
    shape = (len(q_cuts) - 1, len(k_cuts) - 1)
    must, may = torch.empty(shape, dtype=torch.bool), torch.empty(shape, dtype=torch.bool)
    runs = _segment_runs(low, q_cuts)
    for a, b in runs:
        cuts = q_cuts[a:b + 1]
        env = {"q": Interval(cuts[:-1, None], cuts[1:, None] - 1), "kv": Interval(k_lo, k_hi), "h": h}
        tables = dict(kv_tables)
        ranges = dict(whole)
        for name, col in low.tables:
            lo, hi = _reduce_tiles(col, cuts)
            tables[(name, "q")] = Interval(lo[:, None], hi[:, None])
            ranges[(name, "q")] = Interval(lo.min(), hi.max())
        root = low.guarded
        if len(runs) > 1:
            region = {"q": Interval(cuts[0], cuts[-1] - 1), "kv": Interval(k_cuts[0], k_cuts[-1] - 1), "h": h}
            root = expr.specialize(root, region, low.params, low.slots, ranges)
        res = expr.evaluate_tiles(root, env, low.params, low.slots, tables)
        must[a:b] = torch.as_tensor(res.must)
        may[a:b] = torch.as_tensor(res.may)
    return must, must | may


def kv_blocks(blocks: torch.Tensor):
    """bool [..., Tq, Tk] -> (num [..., Tq] int32, indices [..., Tq, Tk] int32), ascending."""
    num = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, order


def tile_grid(q_tiles, k_tiles, block: int, length, side: int | None = None):
    """Token index grids of listed tiles: q [U, S, 1], kv [U, 1, S] (clamped to the layout) and
    which of those pairs lie inside it (padding past `length` counts as masked). side: S positions
    per tile side spread from its first token to its last (a probe), default all `block`."""
    offs = torch.arange(block, device=q_tiles.device)
    if side is not None and side < block:
        offs = torch.arange(side, device=q_tiles.device) * (block - 1) // (side - 1)
    q_idx = (q_tiles[:, None] * block + offs)[:, :, None]
    k_idx = (k_tiles[:, None] * block + offs)[:, None, :]
    valid = (q_idx < length) & (k_idx < length)
    return q_idx.clamp(max=length - 1), k_idx.clamp(max=length - 1), valid


def any_all(vals):
    """(any, all) allowed per tile of a [U, B, B] grid."""
    flat = vals.flatten(1)
    return flat.any(1), flat.all(1)


def first_true(flags: torch.Tensor, capacity: int):
    """Flat positions of the first `capacity` True entries of a 1-d bool tensor, in static shapes (no
    host sync): (rows [capacity] int64, live [capacity] bool); slots past the last True hold flags.numel()."""
    m = flags.numel()
    pos = torch.cumsum(flags, 0) - 1
    slot = torch.where(flags & (pos < capacity), pos, capacity)
    rows = torch.full((capacity + 1,), m, dtype=torch.int64, device=flags.device)
    rows.scatter_(0, slot, torch.arange(m, device=flags.device))  # everything else lands in slot `capacity`
    rows = rows[:capacity]
    return rows, rows < m


def unravel(flat: torch.Tensor, shape) -> torch.Tensor:
    """[U, len(shape)] coordinates of flat indices, by Python-int strides (torch.unravel_index
    copies its strides from the host, which a CUDA graph capture refuses)."""
    strides = [1]
    for dim in reversed(shape[1:]):
        strides.insert(0, strides[0] * dim)
    return torch.stack([flat // st % dim for st, dim in zip(strides, shape)], 1)


PROBE_SIDE = 16  # sampled positions per tile side in the partial-tile probe (256 of 16,384 pairs)


def probe_side(block: int) -> int:
    """Positions per side the probe samples (0: tiles too small to be worth probing)."""
    side = min(PROBE_SIDE, block // 2)
    return side if side >= 2 else 0


def _in_chunks(tokens, index, side: int):
    """tokens(index rows, side) over CHUNK_ELEMENTS sampled pairs per step: (any, all) [U]."""
    step = max(1, CHUNK_ELEMENTS // (side * side))
    parts = [tokens(index[c:c + step], side) for c in range(0, len(index), step)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])


def decide(must, may, block: int, tokens, capacity: tuple | None = None):
    """Exact (full, partial, counts) from tile bounds. Tiles they leave undecided are probed first:
    tokens(index rows [U, dims], side) -> (any, all) on a side x side grid of sampled pairs, and a
    tile whose samples disagree is partial without touching its other tokens (most of CCA's ring
    tiles); only the rest are evaluated in full, tokens(rows, block). capacity: (capacity for undecided
    tiles, capacity for tiles the probe leaves), or None for exactly their counts (host syncs); the
    result is exact when counts [2] (int64: undecided, left by the probe) are within capacity."""
    shape, cells = must.shape, must.numel()
    undecided = (may & ~must).flatten()
    count = left_count = undecided.sum()
    undecided_capacity, capacity_left = capacity if capacity is not None else (int(count), None)
    full = torch.cat([must.flatten(), must.new_zeros(1)])  # a spare last slot takes the empty slots' writes
    partial = torch.zeros_like(full)
    side = probe_side(block)
    if undecided_capacity:
        rows, live = first_true(undecided, undecided_capacity)
        index = unravel(torch.where(live, rows, 0), shape)
        dest = torch.where(live, rows, cells)
        if side:
            anyp, allp = _in_chunks(tokens, index, side)
            mixed = anyp & ~allp
            partial.scatter_(0, dest, mixed)
            left = live & ~mixed
            left_count = left.sum()
            if capacity_left is None:
                capacity_left = int(left_count)
            slots, live = first_true(left, capacity_left)
            pick = torch.where(live, slots, 0)
            index, dest = index[pick], torch.where(live, dest[pick], cells)
        step = max(1, CHUNK_ELEMENTS // (block * block))
        for c in range(0, len(index), step):
            anyv, allv = tokens(index[c:c + step], block)
            full.scatter_(0, dest[c:c + step], allv)
            partial.scatter_(0, dest[c:c + step], anyv & ~allv)
    return full[:-1].view(shape), partial[:-1].view(shape), torch.stack([count, left_count])


def block_indices(full, partial) -> tuple:
    """The eight BlockMask index tensors: kv (partial, full) and q (partial, full) directions; the
    q direction straight from the states (torch derives it through a vmap over the kv indices).
    The four are stacked and counted / sorted in one go (a few kernels instead of twenty)."""
    states = torch.stack([partial, full, partial.transpose(-1, -2), full.transpose(-1, -2)])
    num, idx = kv_blocks(states)
    return tuple(t for i in range(4) for t in (num[i], idx[i]))


def to_block_mask(indices: tuple, block_size: int, mask_mod, length: int):
    """BlockMask from the eight index tensors of block_indices."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx, full_num, full_idx, q_num, q_idx, fq_num, fq_idx = indices
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                  mask_mod=mask_mod, seq_lengths=(length, length), compute_q_blocks=False)
    bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices = q_num, q_idx, fq_num, fq_idx
    return bm


def _tile_tokens(steps, slots, batched, block, params, tables, rows, length, side):
    """(any, all) allowed per listed tile (side x side sampled pairs, or all when side == block);
    rows [U, 4]: batch, head, q tile, kv tile."""
    q_idx, k_idx, valid = tile_grid(rows[:, 2], rows[:, 3], block, length, side)
    env = {"q": q_idx, "kv": k_idx, "h": rows[:, 1, None, None]}
    return any_all(expr.run_tape(steps, env, _per_layout(params, batched, rows[:, 0]), slots, tables) & valid)


_COMPILED: dict = {}


def token_stage(low, block: int, compiled: bool):
    """The token stage for this structure: plain, or compiled once per structure and block size
    (called on tile lists padded to a power of two, so few shapes appear)."""
    if not compiled:
        return lambda *args: _tile_tokens(low.steps, low.slots, low.batched, block, *args)
    key = (low.steps, tuple(sorted(low.slots.items())), low.batched, block)
    fn = _COMPILED.get(key)
    if fn is None:
        steps, slots, batched = low.steps, low.slots, low.batched
        fn = torch.compile(lambda *args: _tile_tokens(steps, slots, batched, block, *args), dynamic=False)
        _COMPILED[key] = fn
    return fn


def head_indices(heads: int, device) -> list:
    """The head index of each head as a 0-d int64 tensor on the device (the `h` of the expression)."""
    return [torch.full((), h, dtype=torch.int64, device=device) for h in range(heads)]


def _pow2(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


def block_states(low, params, tables: dict, block: int, length: int, heads: list, stage, capacity=None,
                 pad: bool = False, edges=None):
    """(full, partial [B, H, T, T], counts) of a lowered layer (decide); heads: 0-d tensors;
    pad: tile lists padded to a power of two (a compiled stage then sees few shapes)."""
    states = [classify(low, params, tables, block, length, h, edges) for h in heads]
    must = torch.stack([m for m, _ in states], 1)
    may = torch.stack([m for _, m in states], 1)
    n = torch.full((), length, dtype=torch.int64, device=params.device)

    def tokens(rows, side):
        m = len(rows)
        if pad and m:
            rows = torch.cat([rows, rows[-1:].expand(_pow2(m) - m, 4)])
        anyv, allv = stage(params, tables, rows, n, side)
        return anyv[:m], allv[:m]
    return decide(must, may, block, tokens, capacity)


def _compiled_build(build, fallback=None):
    """The static build through torch.compile (static shapes: its ~100-200 small kernels fuse into
    ~30), or `fallback` (default: `build` itself, eager), with a warning saying why, if it does not
    compile or differs from the eager build (a compiler failure costs speed, never a build)."""
    fn = torch.compile(build, dynamic=False)
    try:
        ours, ref = fn(), build()
        if torch.equal(ours[0], ref[0]):
            return fn
        why = "its result differs from the eager build's"
    except Exception as err:  # noqa: BLE001
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        why = f"{type(err).__name__}: {first_line}"
    warnings.warn(f"knobs.COMPILE_BUILD: the block-mask build stays eager ({why})", RuntimeWarning, stacklevel=2)
    return fallback or build


class _CapturedBuild:
    """One structure's build at one length, captured as a CUDA graph with static inputs (off CUDA
    the same static build runs eagerly: what the CPU tests exercise)."""

    def __init__(self, low, block: int, length: int, heads: int, stage, capacity: tuple):
        device = low.params.device
        self.root, self.capacity = low.guarded, capacity  # the root kept alive: the cache key holds its id
        self.params = low.params.clone()
        self.tables = {k: v.clone() for k, v in low.tables}
        hs, edges = head_indices(heads, device), tile_edges(length, block, device)

        def build_with(tokens_stage):
            def build():
                full, partial, counts = block_states(low, self.params, self.tables, block, length, hs, tokens_stage,
                                                     capacity, edges=edges)
                idx = block_indices(full, partial)
                parts = [F.pad(t.flatten(), (0, _aligned(t.numel()) - t.numel())) for t in idx]
                return torch.cat(parts + [counts.to(torch.int32)]), [t.shape for t in idx]
            return build

        self.build, self.graph = build_with(stage), None
        if knobs.COMPILE_BUILD:  # compiled whole, its token stage inlined (not a nested compile)
            self.build = _compiled_build(build_with(token_stage(low, block, False)), fallback=self.build)
        if device.type != "cuda":
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: compiles and allocator pools settle outside capture
            for _ in range(2):
                self.build()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out, self.shapes = self.build()

    def run(self, low):
        """Copy the sizes in, replay; (the eight index tensors, whether the capacities held)."""
        self.params.copy_(low.params)
        for name, col in low.tables:
            self.tables[name].copy_(col)
        if self.graph is None:
            self.out, self.shapes = self.build()
        else:
            self.graph.replay()
        flat = self.out.clone()  # the graph's buffers are overwritten by the next replay
        held = all(c <= limit for c, limit in zip(flat[-2:].tolist(), self.capacity))
        parts, at = [], 0
        for shape in self.shapes:  # views at 16-byte boundaries: compiled kernels expect aligned inputs
            parts.append(flat[at:at + shape.numel()].view(shape))
            at += _aligned(shape.numel())
        return tuple(parts), held


_GRAPHS: "OrderedDict[tuple, _CapturedBuild]" = OrderedDict()


def _aligned(n: int) -> int:
    """int32 elements rounded up to 16 bytes."""
    return -(-n // 4) * 4


def _capacity(count: int, block: int) -> int:
    """Room for tiles: a power of two up to one chunk, then whole chunks, with 1/8 to
    spare (every slot is evaluated on each replay, so rounding a 10,430-tile count up to 16,384
    would evaluate half as much again)."""
    step = max(1, CHUNK_ELEMENTS // (block * block))
    want = max(64, count + count // 8)
    return _pow2(want) if want <= step else -(-want // step) * step


def _graph_indices(low, block: int, length: int, heads: int, stage) -> tuple:
    """block_indices of `low` through a cached CUDA graph (captured again if its capacity overflows)."""
    key = (knobs.COMPILE_BUILD, id(low.guarded), low.keys, low.batched, tuple(low.params.shape), low.params.dtype,
           tuple((k, tuple(v.shape)) for k, v in low.tables), block, length, heads, str(low.params.device))
    entry = _GRAPHS.get(key)
    if entry is not None:
        _GRAPHS.move_to_end(key)
        indices, held = entry.run(low)
        if held:
            return indices
    # first build, or a capacity overflowed: an exact build's counts size the capacities
    _, _, counts = block_states(low, low.params, dict(low.tables), block, length,
                                head_indices(heads, low.params.device),
                                stage, None, pad=True)
    capacity = tuple(_capacity(int(c), block) for c in counts)
    entry = _GRAPHS[key] = _CapturedBuild(low, block, length, heads, stage, capacity)
    while len(_GRAPHS) > GRAPH_CACHE:
        _GRAPHS.popitem(last=False)
    indices, held = entry.run(low)
    assert held
    return indices


def build_block_mask(low, block_size: int = 128, device=None, num_heads: int | None = None,
                     length: int | None = None, compiled: bool | None = None, graph: bool | None = None,
                     sizes_in_kernel: bool = False):
    """torch BlockMask [B, H, T, T] of a lowered layer (H = num_heads when given, else 1 unless the
    rules switch on heads).
    compiled: the token stage through torch.compile; graph: the whole build as a replayed CUDA
    graph (both default on CUDA). sizes_in_kernel: the BlockMask's mask_mod holds the sizes as
    constants (the blocks are built reading them at run time either way)."""
    device = torch.device(device or low.params.device)
    length = length or low.n
    if length < low.n:
        raise ValueError(f"length {length} is shorter than the layout ({low.n} tokens)")
    if length > low.n and not low.batched:
        low = low.padded_to(True, length=length)  # per-token tables too: the kernel reads padded indices
    low = low.on(device)
    heads = 1
    if compiled is None:
        compiled = device.type == "cuda"
    if graph is None:
        graph = compiled and device.type == "cuda"  # graph off CUDA: the same static build, uncaptured
    if low.uses_head:
        if num_heads is None:
            raise ValueError("this spec has per-head rules: pass num_heads=<the model's query heads>")
        heads = num_heads
    stage = token_stage(low, block_size, compiled)
    if graph:
        indices = _graph_indices(low, block_size, length, heads, stage)
    else:
        hs = head_indices(heads, device)
        full, partial, _ = block_states(low, low.params, dict(low.tables), block_size, length, hs, stage,
                                        pad=compiled)
        indices = block_indices(full, partial)
    if num_heads and num_heads > heads:  # asked for H heads of a mask that is the same on every head
        indices = tuple(t.expand(t.shape[0], num_heads, *t.shape[2:]).contiguous() for t in indices)
    return to_block_mask(indices, block_size, low.fixed_mask_mod if sizes_in_kernel else low.mask_mod, length)


COMPILE_BLOCK_MASK_FROM = 8192  # tokens: past this torch's create_block_mask runs compiled (see torch_block_mask)


@functools.cache
def compiled_create_block_mask():
    """torch.compile(create_block_mask), made once so that every later length reuses it."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def torch_block_mask(mask_mod, batch, heads, n, device, block_size=128):
    """torch's own create_block_mask over n x n, compiled past COMPILE_BLOCK_MASK_FROM tokens (the
    exported files' builder). Uncompiled it evaluates every (q, k) at once: 128 GiB at 128k tokens,
    an out-of-memory error on an 80 GB card (measured on an H100); compiled, the evaluation is fused
    into the block reduction, as torch's documentation advises for long sequences."""
    if n <= COMPILE_BLOCK_MASK_FROM:
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(mask_mod, batch, heads, n, n, device=device, BLOCK_SIZE=block_size)
    return compiled_create_block_mask()(mask_mod, batch, heads, n, n, device=device, BLOCK_SIZE=block_size)


def block_mask_from_rows(rows, batch, heads, length, mask_mod, device, block_size=128, chunk=1 << 24):
    """A BlockMask built one band of query blocks at a time from the mask's rows: rows(b, q) is the
    bool mask [heads, len(q), length] of row b at query indices q (a 1-D tensor < length). At most
    `chunk` pairs are evaluated at once, never length x length, and nothing is compiled (the packed
    rows of the transformers export index per-token tables by q, which torch.compile of
    create_block_mask cannot trace). Blocks as torch's create_block_mask makes them: a block reaching
    past `length` is never full."""
    nb = -(-length // block_size)
    span = nb * block_size
    band = max(1, chunk // (heads * block_size * span))
    partial = torch.zeros(batch, heads, nb, nb, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    for b in range(batch):
        for q0 in range(0, nb, band):
            q1 = min(nb, q0 + band)
            q = torch.arange(q0 * block_size, q1 * block_size, device=device)
            allow = rows(b, q.clamp(max=length - 1)) & (q < length)[None, :, None]
            blocks = torch.nn.functional.pad(allow, (0, span - length)).view(heads, q1 - q0, block_size, nb, block_size)
            count = blocks.sum(dim=(2, 4))
            partial[b, :, q0:q1] = (count > 0) & (count < block_size * block_size)
            full[b, :, q0:q1] = count == block_size * block_size
    return to_block_mask(block_indices(full, partial), block_size, mask_mod, length)
