"""Pictures of a spec: what may attend what, where tokens sit in RoPE space, and how information
flows through the layers. Every picture is drawn from the core analysis (compile / analysis /
positions / flow); there is no second copy of a mask here.

    fig = maskstudio.render(spec, view, **options)       # a matplotlib Figure (Agg, no pyplot)
    maskstudio.viz.save(fig, "out.png")                   # saves and frees the figure

Views (one small function each, `view_<name>(spec, fig, region, **options)`):
  mask       heatmap allowed / masked, segment bands named on both axes (coloured by modality),
             frame ticks for video, token labels when N <= 64, density legend. Past
             `block_threshold` (4096) tokens a block view: each cell a 128 x 128 block shaded by the
             fraction allowed, computed tile by tile (flow.pair_counts), no N^2 memory.
  positions  position id against token index per segment (three panels t/h/w for 3-D schemes),
             and each image/video segment's ids laid out on its H x W grid.
  distance   |delta pos| between a query segment (default: the last text segment) and every key
             segment: a heatmap of the distribution and the exact mean per segment (per axis in 3-D).
  flow       flow_graph(spec) drawn left to right in sequence order: edge k -> q when q may read k,
             width = density, dashed = partial, arcs above = reading the past, below = the future.
  reach      receptive field of a token after 1..L layers (residual stream counted, per-layer rules
             honoured) and the table "layers until every token of A sees B".
  summary    Analysis.summary() and the reach table as a monospace text block (summary_text()
             returns the same text without a picture).
  all        ONE figure holding every view above (render(spec, "all"), same as render_all(spec)).

Options (all views): layer=0, head=0, title=None, figsize=None. Per view:
  mask: token_labels (list[str], one per token), tokenizer (has .tokenize(str); labels segments
        that carry `text`), block_threshold=4096, block_size=128, block (force True/False)
  distance: query (segment name)         flow: level ("segment" | "frame" | "token")
  reach: token (index, default the last token), layers (count or list of layer ids)

Colours: MODALITY_COLORS; consecutive segments of one modality alternate a lighter shade
(segment_colors) so neighbours stay apart, identically in every view.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, ListedColormap, Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Arc, FancyArrowPatch, Patch, Rectangle
from matplotlib.path import Path
from matplotlib.transforms import blended_transform_factory

from . import flow as _flow

MODALITY_COLORS = {
    "text": "#3b6fb6",     # blue
    "image": "#e08a2c",    # orange
    "video": "#c8424a",    # red
    "audio": "#3f9b5a",    # green
    "special": "#7d5bb5",  # purple
}
ALLOWED_COLOR = "#1f2a44"
MASKED_COLOR = "#ffffff"
BLOCK_THRESHOLD = 4096
TOKEN_LABEL_MAX = 64
DISPLAY_PIXELS = 800      # dense masks with more tokens are pooled to <= this many cells a side
VIEWS = ("mask", "positions", "distance", "flow", "reach", "summary")
MONO = "DejaVu Sans Mono"
_SHADE = LinearSegmentedColormap.from_list("allowed", [MASKED_COLOR, "#8fa3c7", ALLOWED_COLOR])


# ---------------------------------------------------------------- helpers
def segment_colors(spec) -> list:
    """One colour per segment: its modality's, every second segment of a run a lighter shade."""
    out, prev, flip = [], None, False
    for seg in spec.segments:
        mod = seg["modality"]
        flip = (not flip) if mod == prev else False
        base = np.array(to_rgb(MODALITY_COLORS[mod]))
        out.append(tuple(base + (1 - base) * 0.45) if flip else tuple(base))
        prev = mod
    return out


def new_figure(figsize=(8, 8), dpi: int = 100) -> Figure:
    """A pyplot-free Figure with an Agg canvas (thread-safe for the web app). Its dpi is what
    a plain fig.savefig uses."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path, dpi: int | None = None) -> None:
    """Write the figure (format from the suffix; PNG with fast compression). Figures made here are
    not registered with pyplot, so dropping the reference frees them; no plt.close needed."""
    png = str(path).lower().endswith(".png") or getattr(path, "write", None) is not None
    fig.savefig(path, dpi=dpi or fig.dpi, facecolor="white", **({"pil_kwargs": {"compress_level": 1}} if png else {}))


def _info(fig, view, **facts):
    """What a figure shows, for tests and the app: fig.maskstudio[view] = {...}."""
    if not hasattr(fig, "maskstudio"):
        fig.maskstudio = {}
    fig.maskstudio[view] = facts


def _fmt(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def _layer_note(spec, layer, head) -> str:
    parts = []
    if spec.varies_by_layer:
        parts.append(f"layer {layer}")
    if spec.varies_by_head:
        parts.append(f"head {head}")
    return f" ({', '.join(parts)})" if parts else ""


def _default_labels(spec, tokenizer=None) -> list[str]:
    t = spec.table
    labels = []
    for s, seg in enumerate(spec.segments):
        sl = t.segment_slice(s)
        toks = None
        if tokenizer is not None and isinstance(seg.get("text"), str):
            try:
                toks = [str(x) for x in tokenizer.tokenize(seg["text"])]
            except Exception:  # a tokenizer that cannot help just leaves the default labels
                toks = None
            if toks is not None and len(toks) != t.sizes[s]:
                toks = None
        if toks is not None:
            labels += [x.replace("Ġ", "·").replace("▁", "·") for x in toks]
        elif seg["modality"] == "video":
            labels += [f"{a},{b},{c}" for a, b, c in zip(t["t"][sl].tolist(), t["row"][sl].tolist(),
                                                         t["col"][sl].tolist())]
        elif seg["modality"] == "image":
            labels += [f"{b},{c}" for b, c in zip(t["row"][sl].tolist(), t["col"][sl].tolist())]
        else:
            labels += [f"{seg['name'][:6]}{i}" for i in range(t.sizes[s])]
    return labels


def _bands(spec, ax, axis: str, colors, depth: float = 0.04):
    """Coloured segment bands with names just outside one side of `ax` (axis 'x': above it,
    'y': left of it). Drawn into `ax` itself with blended transforms: no extra Axes to build."""
    t = spec.table
    n = t.n
    if axis == "x":
        trans = blended_transform_factory(ax.transData, ax.transAxes)
    else:
        trans = blended_transform_factory(ax.transAxes, ax.transData)
    for s, (name, start, size) in enumerate(zip(t.names, t.starts, t.sizes)):
        if axis == "x":
            xy, w, h = (start, 1.01), size, depth
        else:
            xy, w, h = (-0.01 - depth, start), depth, size
        rect = Rectangle(xy, w, h, facecolor=colors[s], edgecolor="white", linewidth=0.6, label=name,
                         transform=trans, clip_on=False)
        rect.set_gid(f"segment:{name}")
        ax.add_patch(rect)
        frac = size / n
        label = name if frac * 60 >= len(name) else (name[:3] if frac >= 0.012 else "")
        if label:
            mid = start + size / 2
            kw = dict(ha="center", va="center", fontsize=8, color="white", fontweight="bold",
                      transform=trans, clip_on=False)
            if axis == "x":
                ax.text(mid, 1.01 + depth / 2, label, **kw)
            else:
                ax.text(-0.01 - depth / 2, mid, label, rotation=90, **kw)


def _frame_cuts(spec, max_lines: int = 400) -> list[int]:
    """Token indices where a new video frame starts (inside video segments)."""
    t = spec.table
    cuts = []
    for s, seg in enumerate(spec.segments):
        if seg["modality"] != "video":
            continue
        T, H, W = seg["grid"]
        cuts += [t.starts[s] + f * H * W for f in range(1, T)]
    return cuts if len(cuts) <= max_lines else []


def _modality_legend(spec, ax, **kw):
    mods = list(dict.fromkeys(s["modality"] for s in spec.segments))
    handles = [Patch(facecolor=MODALITY_COLORS[m], label=m) for m in mods]
    return ax.legend(handles=handles, **kw)


# ---------------------------------------------------------------- mask
def block_fraction(spec, block_size: int = 128, layer: int = 0, head: int = 0) -> torch.Tensor:
    """float [T, T]: fraction of allowed pairs in each block_size x block_size block (the last
    row/column of blocks is partial when N is not a multiple). O(N + T^2) memory at any N."""
    n = spec.table.n
    groups = torch.arange(n) // block_size
    counts = _flow.pair_counts(spec, groups, layer, head)
    sizes = torch.bincount(groups).double()
    return counts.double() / (sizes[:, None] * sizes[None, :])


def pool_factor(n: int, pixels: int = DISPLAY_PIXELS) -> int:
    return max(1, math.ceil(n / pixels))


def pool_fraction(m: torch.Tensor, f: int) -> torch.Tensor:
    """float [ceil(N/f), ceil(N/f)]: fraction of allowed pairs in each f x f cell of a dense mask."""
    n = m.shape[0]
    t = math.ceil(n / f)
    padded = torch.zeros(t * f, t * f, dtype=torch.bool)
    padded[:n, :n] = m
    sums = padded.view(torch.uint8).view(t, f, t, f).sum((1, 3), dtype=torch.int32).float()
    sizes = torch.bincount(torch.arange(n) // f).float()
    return sums / (sizes[:, None] * sizes[None, :])


def view_mask(spec, fig, region, layer=0, head=0, token_labels=None, tokenizer=None,
              block_threshold=BLOCK_THRESHOLD, block_size=128, block=None, title=None, model=None, **_):
    t = spec.table
    n = t.n
    colors = segment_colors(spec)
    use_blocks = (n > block_threshold) if block is None else bool(block)
    label_room = 0.14 if n <= TOKEN_LABEL_MAX else 0.08
    gs = region.subgridspec(2, 4, width_ratios=[0.045, 1, label_room, 0.03], height_ratios=[0.045, 1],
                            wspace=0.0, hspace=0.0)
    ax = fig.add_subplot(gs[1, 1])
    cax = fig.add_subplot(gs[1, 3])
    if use_blocks:
        frac = block_fraction(spec, block_size, layer, head)
        allowed = None
        sizes = torch.bincount(torch.arange(n) // block_size).double()
        allowed_pairs = int(round(float((frac * sizes[:, None] * sizes[None, :]).sum())))
        tq = frac.shape[0]
        img = ax.imshow(frac.float().numpy(), cmap=_SHADE, vmin=0, vmax=1, interpolation="nearest",
                        extent=(0, tq * block_size, tq * block_size, 0), aspect="auto")
        cb = fig.colorbar(img, cax=cax)
        cb.set_label(f"fraction allowed per {block_size}x{block_size} block", fontsize=8)
        mode = "block"
    else:
        model = model if model is not None and model.head == head else _flow.Model(spec, head)
        allowed = model.mask(layer)
        allowed_pairs = int(torch.count_nonzero(allowed))
        f = pool_factor(n)
        if f == 1:  # exact token cells; RGBA bytes straight to Agg, no colormap pass
            lut = np.array([(255, 255, 255, 255), (*(int(255 * c) for c in to_rgb(ALLOWED_COLOR)), 255)],
                           np.uint8)
            ax.imshow(lut[allowed.numpy().view(np.uint8)], interpolation="nearest", extent=(0, n, n, 0),
                      aspect="auto")
            sm = ScalarMappable(norm=Normalize(0, 1), cmap=ListedColormap([MASKED_COLOR, ALLOWED_COLOR]))
            cb = fig.colorbar(sm, cax=cax, ticks=[0.25, 0.75])
            cb.ax.set_yticklabels(["masked", "allowed"], fontsize=8)
        else:  # more tokens than pixels: show each f x f cell's allowed fraction (what the eye gets)
            img = ax.imshow(pool_fraction(allowed, f).numpy(), cmap=_SHADE, vmin=0, vmax=1,
                            interpolation="nearest", extent=(0, n, n, 0), aspect="auto")
            cb = fig.colorbar(img, cax=cax)
            cb.set_label(f"fraction allowed per {f}x{f}-token pixel", fontsize=8)
        mode = "dense"
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    density = allowed_pairs / float(n * n)
    # segment boundaries and frame ticks
    bounds = t.starts[1:]
    ax.vlines(bounds, 0, n, color="#9aa5b8", lw=0.8)
    ax.hlines(bounds, 0, n, color="#9aa5b8", lw=0.8)
    frames = _frame_cuts(spec)
    ax.vlines(frames, 0, n, color="#c8424a", lw=0.4, alpha=0.35, ls=":")
    ax.hlines(frames, 0, n, color="#c8424a", lw=0.4, alpha=0.35, ls=":")
    ax.set_xticks(frames, minor=True)
    ax.set_yticks(frames, minor=True)
    ax.tick_params(which="minor", length=3, color="#c8424a")
    labels = None
    if n <= TOKEN_LABEL_MAX:
        if token_labels is not None and len(token_labels) != n:
            raise ValueError(f"token_labels has {len(token_labels)} entries but the layout has {n} tokens")
        labels = list(token_labels) if token_labels is not None else _default_labels(spec, tokenizer)
        fs = 7 if n <= 32 else 5
        ax.set_xticks(np.arange(n) + 0.5)
        ax.set_xticklabels(labels, rotation=90, fontsize=fs)
        ax.set_yticks(np.arange(n) + 0.5)
        ax.set_yticklabels(labels, fontsize=fs)
        ax.yaxis.tick_right()
    else:
        ticks = []
        for x in list(t.starts) + [n]:  # segment starts, skipping any that would overprint
            if not ticks or x - ticks[-1] >= 0.03 * n:
                ticks.append(x)
            elif x == n:
                ticks[-1] = n
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(x) for x in ticks], fontsize=7, rotation=90)
        ax.set_yticks(ticks)
        ax.set_yticklabels([str(x) for x in ticks], fontsize=7)
        ax.yaxis.tick_right()
    ax.set_xlabel("key token  (attended)", fontsize=9)
    _bands(spec, ax, "x", colors)
    _bands(spec, ax, "y", colors)
    ax.set_ylabel("query token  (attending)", fontsize=9)
    ax.yaxis.set_label_coords(-0.075, 0.5)
    name = title or f"{spec.name}: mask{_layer_note(spec, layer, head)}"
    ax.set_title(f"{name}\ndensity {density:.3f}  ({allowed_pairs:,} of {n * n:,} pairs)"
                 + (f"  ·  {block_size}-token blocks" if mode == "block" else ""), fontsize=10, y=1.06)
    _modality_legend(spec, ax, loc="upper right", fontsize=7, framealpha=0.9, title="modality",
                     title_fontsize=7)
    _info(fig, "mask", mode=mode, n=n, density=density, allowed=allowed_pairs, layer=layer, head=head,
          labels=labels, block_size=block_size if mode == "block" else None, axes=ax)
    return ax


# ---------------------------------------------------------------- positions
def _subsample(idx: np.ndarray, vals: np.ndarray, most: int = 4000):
    if len(idx) <= most:
        return idx, vals
    step = math.ceil(len(idx) / most)
    return idx[::step], vals[::step]


def view_positions(spec, fig, region, title=None, **_):
    t = spec.table
    n = t.n
    ids = spec.position_ids()
    three = ids.dim() == 2
    axes_names = ["t", "h", "w"] if three else [None]
    rows = ids.numpy() if three else ids.numpy()[None]
    colors = segment_colors(spec)
    grid_segs = [s for s, seg in enumerate(spec.segments) if "grid" in seg][:3]
    n_line = len(axes_names)
    gs = region.subgridspec(2 if grid_segs else 1, 1, height_ratios=[1.3, 1] if grid_segs else [1],
                            hspace=0.45)
    lines_gs = gs[0].subgridspec(n_line, 1, hspace=0.08)
    line_axes = []
    index = np.arange(n)
    marker = "." if n <= 256 else None
    for a, axname in enumerate(axes_names):
        ax = fig.add_subplot(lines_gs[a], sharex=line_axes[0] if line_axes else None)
        for s, name in enumerate(t.names):
            sl = t.segment_slice(s)
            x, y = _subsample(index[sl], rows[a][sl])
            ax.plot(x, y, color=colors[s], lw=1.4, marker=marker, ms=3, label=name)
        ax.vlines(t.starts[1:], 0, 1, transform=ax.get_xaxis_transform(), color="#cccccc", lw=0.6, zorder=0)
        ax.set_ylabel(f"pos id ({axname})" if axname else "position id", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
        if a < n_line - 1:
            ax.tick_params(labelbottom=False)
        line_axes.append(ax)
    line_axes[-1].set_xlabel("token index", fontsize=8)
    line_axes[0].legend(fontsize=7, ncol=min(4, len(t.names)), loc="upper left", framealpha=0.85)
    scheme = spec.positions["scheme"]
    line_axes[0].set_title(title or f"{spec.name}: position ids ({scheme}"
                           f"{', 3-D t/h/w' if three else ''})", fontsize=10)
    grid_axes = []
    if grid_segs:
        per = len(axes_names)
        ggs = gs[1].subgridspec(1, len(grid_segs) * per, wspace=0.35)
        for g, s in enumerate(grid_segs):
            seg = spec.segments[s]
            grid = seg["grid"]
            T, H, W = ([1] + grid) if len(grid) == 2 else grid
            sl = t.segment_slice(s)
            for a, axname in enumerate(axes_names):
                ax = fig.add_subplot(ggs[g * per + a])
                frame0 = rows[a][sl][: H * W].reshape(H, W)
                ax.imshow(frame0, cmap="viridis", interpolation="nearest")
                if H * W <= 144:
                    mid = (frame0.max() + frame0.min()) / 2
                    for r in range(H):
                        for c in range(W):
                            ax.text(c, r, str(frame0[r, c]), ha="center", va="center", fontsize=6,
                                    color="white" if frame0[r, c] < mid else "black")
                what = f"{seg['name']}" + (f" [{axname}]" if axname else "")
                sub = f"{H}x{W}" + (f", frame 0 of {T}" if T > 1 else "")
                ax.set_title(f"{what}\n{sub}", fontsize=8, color=colors[s])
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor(colors[s])
                    spine.set_linewidth(2)
                grid_axes.append(ax)
    _info(fig, "positions", three_d=three, line_axes=line_axes, grid_axes=grid_axes,
          grid_segments=[t.names[s] for s in grid_segs])
    return line_axes


# ---------------------------------------------------------------- distance
def default_query(spec) -> int:
    """The last text segment (the answer / question that reads the image), else the last segment."""
    text = [s for s, seg in enumerate(spec.segments) if seg["modality"] == "text"]
    return text[-1] if text else len(spec.segments) - 1


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact mean |a_i - b_j| over all pairs in O((|a| + |b|) log |b|)."""
    b = torch.sort(b.double()).values
    a = a.double()
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), b.cumsum(0)])
    k = torch.searchsorted(b, a, right=True)
    below = a * k - prefix[k]
    above = (prefix[-1] - prefix[k]) - a * (len(b) - k)
    return float((below + above).sum() / (len(a) * len(b)))


def distance_stats(spec, query=None) -> dict:
    """Mean RoPE |delta pos| from the query segment to every key segment (exact, all pairs, mask
    ignored: the distance a pair WOULD have). 3-D schemes: [t, h, w] per segment."""
    t = spec.table
    q = default_query(spec) if query is None else t.names.index(query)
    ids = spec.position_ids()
    ids = ids if ids.dim() == 2 else ids[None]
    qs = t.segment_slice(q)
    means = {}
    for s, name in enumerate(t.names):
        ks = t.segment_slice(s)
        vals = [_mean_abs_diff(ids[a, qs], ids[a, ks]) for a in range(ids.shape[0])]
        means[name] = vals if ids.shape[0] > 1 else vals[0]
    return {"query": t.names[q], "axes": ["t", "h", "w"] if ids.shape[0] > 1 else ["pos"], "mean": means}


def view_distance(spec, fig, region, query=None, title=None, max_pairs: int = 2_000_000, **_):
    t = spec.table
    stats = distance_stats(spec, query)
    q = t.names.index(stats["query"])
    ids = spec.position_ids()
    ids = ids if ids.dim() == 2 else ids[None]
    naxes = ids.shape[0]
    colors = segment_colors(spec)
    qs = t.segment_slice(q)
    gs = region.subgridspec(naxes, 2, width_ratios=[1.6, 1], wspace=0.08, hspace=0.35)
    heat_axes = []
    for a in range(naxes):
        axname = stats["axes"][a]
        qpos = ids[a, qs]
        dmax = 1
        hists = []
        for s in range(len(t.names)):
            kpos = ids[a, t.segment_slice(s)]
            # deterministic strided sample when all pairs would be too many (means stay exact)
            qstep = max(1, math.ceil(len(qpos) * len(kpos) / max_pairs / max(1, len(kpos))))
            kstep = max(1, math.ceil(len(qpos[::qstep]) * len(kpos) / max_pairs))
            d = (qpos[::qstep, None] - kpos[None, ::kstep]).abs().flatten()
            hists.append(d)
            dmax = max(dmax, int(d.max()))
        nbins = min(dmax + 1, 60)
        edges = np.linspace(0, dmax + 1, nbins + 1)
        heat = np.stack([np.histogram(d.numpy(), bins=edges)[0] / max(1, len(d)) for d in hists])
        ax = fig.add_subplot(gs[a, 0])
        ax.imshow(heat, aspect="auto", cmap="magma_r", interpolation="nearest",
                  extent=(0, dmax + 1, len(t.names), 0))
        ax.set_yticks(np.arange(len(t.names)) + 0.5)
        ax.set_yticklabels(t.names, fontsize=7)
        for tick, c in zip(ax.get_yticklabels(), colors):
            tick.set_color(c)
        ax.set_ylabel("key segment", fontsize=8)
        ax.set_xlabel(f"|Δ position{' ' + axname if naxes > 1 else ''}|  (query {stats['query']})", fontsize=8)
        ax.tick_params(labelsize=7)
        heat_axes.append(ax)
    # one bar panel: mean |delta| per key segment (grouped t/h/w bars for 3-D schemes)
    bx = fig.add_subplot(gs[:, 1])
    hatches = ["", "//", ".."]
    height = 0.8 / naxes
    top = 1.0
    for a in range(naxes):
        means = [stats["mean"][name][a] if naxes > 1 else stats["mean"][name] for name in t.names]
        ys = np.arange(len(t.names)) + 0.1 + height * (a + 0.5)
        bx.barh(ys, means, height=height * 0.9, color=colors, hatch=hatches[a], edgecolor="white",
                label=f"|Δ{stats['axes'][a]}|" if naxes > 1 else None)
        for y, m in zip(ys, means):
            bx.text(m, y, " " + _fmt(m), va="center", fontsize=6 if naxes > 1 else 7)
        top = max(top, max(means))
    bx.set_ylim(len(t.names), 0)
    bx.set_yticks(np.arange(len(t.names)) + 0.5)
    bx.set_yticklabels([])
    bx.set_xlim(0, top * 1.35)
    bx.tick_params(labelsize=7)
    bx.set_xlabel("mean |Δ position|" + (" per axis" if naxes > 1 else ""), fontsize=8)
    if naxes > 1:
        bx.legend(fontsize=7, loc="lower right")
    bar_axes = [bx]
    heat_axes[0].set_title(title or f"{spec.name}: RoPE distance from '{stats['query']}' "
                           f"({spec.positions['scheme']})", fontsize=10, loc="left")
    _info(fig, "distance", **stats, heat_axes=heat_axes, bar_axes=bar_axes)
    return heat_axes


# ---------------------------------------------------------------- flow
def view_flow(spec, fig, region, level="segment", layer=0, head=0, analysis=None, title=None, **_):
    g = _flow.flow_graph(spec, level=level, layer=layer, head=head, analysis=analysis)
    ax = fig.add_subplot(region)
    colors = segment_colors(spec)
    seg_color = {name: colors[i] for i, name in enumerate(spec.table.names)}
    nodes = sorted(g.nodes, key=lambda v: g.nodes[v]["order"])
    x = {v: i for i, v in enumerate(nodes)}
    span = max(1, len(nodes) - 1)
    sizes = {v: 6 + 16 * math.sqrt(g.nodes[v]["tokens"] / max(g.nodes[u]["tokens"] for u in nodes)) for v in nodes}
    n_edges = g.number_of_edges()
    label_edges = n_edges <= 40
    for k, q, d in g.edges(data=True):
        col = seg_color[g.nodes[k]["segment"]]
        width = 0.6 + 4.5 * d["density"]
        style = "--" if d["partial"] else "-"
        if k == q:
            loop = Arc((x[k], 0.1), 0.16, 0.12, theta1=-60, theta2=240, color=col, lw=width, ls=style)
            loop.set_gid(f"edge:{k}->{q}")
            ax.add_patch(loop)
            if label_edges:
                ax.text(x[k], 0.17, f"{d['density']:.2f}", ha="center", va="bottom", fontsize=6,
                        color="#333333")
            continue
        # a quadratic Bezier in data coordinates: apex 0.175 * |dx| above (reading the past) or
        # below (reading the future) the axis, ends pulled off the node centres for the arrow head
        dx = x[q] - x[k]
        sgn = 1 if dx > 0 else -1
        apex = 0.175 * dx
        start = (x[k] + 0.06 * sgn, 0.04 * sgn)
        end = (x[q] - 0.1 * sgn, 0.05 * sgn)
        path = Path([start, ((x[k] + x[q]) / 2, 2 * apex), end], [Path.MOVETO, Path.CURVE3, Path.CURVE3])
        arrow = FancyArrowPatch(path=path, arrowstyle="-|>", mutation_scale=9 + width * 2, lw=width,
                                ls=style, color=col, alpha=0.8, zorder=3)
        arrow.set_gid(f"edge:{k}->{q}")
        ax.add_patch(arrow)
        if label_edges:
            ax.text((x[k] + x[q]) / 2, apex, f"{d['density']:.2f}", ha="center", va="center", fontsize=6,
                    color="#333333", zorder=4,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    for v in nodes:
        node_col = seg_color[g.nodes[v]["segment"]]
        ax.plot([x[v]], [0], "o", ms=sizes[v], color=node_col, mec="white", mew=1.5, zorder=5)
        ax.text(x[v], -0.06, f"{v}\n{g.nodes[v]['tokens']:,} tok", ha="center", va="top",
                fontsize=7 if len(nodes) <= 12 else 5, zorder=6)
    up = max([0.175 * (x[q] - x[k]) for k, q in g.edges if x[q] > x[k]], default=0)
    down = max([0.175 * (x[k] - x[q]) for k, q in g.edges if x[q] < x[k]], default=0)
    ax.set_xlim(-0.7, span + 0.7)
    ax.set_ylim(-max(down, 0.25) - 0.3, max(up, 0.45) + 0.15)
    ax.axis("off")
    note = "edge k → q: q may read k · width = density · dashed = partial · above: reads the past, below: the future"
    ax.set_title((title or f"{spec.name}: information flow ({level}s){_layer_note(spec, layer, head)}")
                 + "\n" + note, fontsize=9)
    _modality_legend(spec, ax, loc="upper left", fontsize=7, frameon=False)
    _info(fig, "flow", graph=g, axes=ax)
    return ax


# ---------------------------------------------------------------- reach
def view_reach(spec, fig, region, token=None, layers=None, head=0, title=None, model=None, **_):
    t = spec.table
    n = t.n
    order = _flow._layer_list(_flow.default_layers(spec) if layers is None else layers)
    token = n - 1 if token is None else int(token)
    model = model if model is not None and model.head == head else _flow.Model(spec, head)
    field = _flow.receptive_field(spec, token, order, head, model=model)
    table = _flow.layers_until_reach(spec, order, head, model=model)
    colors = segment_colors(spec)
    gs = region.subgridspec(4, 1, height_ratios=[0.06, 1, 0.45, 1.2], hspace=0.0)
    ax = fig.add_subplot(gs[1])
    ax.imshow(field.numpy().astype(np.uint8), aspect="auto", interpolation="nearest",
              cmap=ListedColormap([MASKED_COLOR, "#2e8b57"]), vmin=0, vmax=1,
              extent=(0, n, len(order) + 0.5, 0.5))
    ax.set_yticks(np.arange(1, len(order) + 1))
    ax.set_yticklabels([f"after {i}" for i in range(1, len(order) + 1)], fontsize=7)
    ax.set_xlabel("input token  (green: its information can have reached the chosen token)", fontsize=8)
    ax.axvline(token + 0.5, color="#c8424a", lw=1)
    ax.vlines(t.starts[1:], 0.5, len(order) + 0.5, color="#9aa5b8", lw=0.6)
    ax.tick_params(labelsize=7)
    ax.set_xlim(0, n)
    _bands(spec, ax, "x", colors, depth=0.06)
    seg = int(t["segment"][token])
    label = f"{t.names[seg]}[{int(t['local'][token])}]"
    ax.set_title(title or f"{spec.name}: receptive field of token {token} = {label} after 1..{len(order)} "
                 f"layers (residual counted)", fontsize=10, y=1.07)
    tx = fig.add_subplot(gs[3])
    tx.axis("off")
    s = len(t.names)
    cells = [["-" if v is None else str(v) for v in row] for row in table.steps]
    steps_colors = {0: "#ffffff", 1: "#9fd5ae", 2: "#c4e6cc", 3: "#dcf0e1"}
    shade = [["#eeeeee" if v is None else steps_colors.get(v, "#ecf7ef") for v in row] for row in table.steps]
    if s <= 16:
        tab = tx.table(cellText=cells, rowLabels=t.names, colLabels=t.names, cellColours=shade,
                       loc="upper center", cellLoc="center")
        tab.auto_set_font_size(False)
        tab.set_fontsize(7 if s <= 10 else 6)
        for (r, c), cell in tab.get_celld().items():
            if r == 0 and c >= 0:
                cell.get_text().set_color(colors[c])
            if c == -1 and r >= 1:
                cell.get_text().set_color(colors[r - 1])
        tx.set_title(f"layers until every token of segment A (row) can read segment B (column);"
                     f"  - = not within {len(order)}", fontsize=9)
    else:
        tx.text(0, 1, table.text(), family=MONO, fontsize=6, va="top")
    _info(fig, "reach", token=token, layers=order, field=field, table=table)
    return ax


# ---------------------------------------------------------------- summary
def summary_text(spec, layer=0, head=0, layers=None, analysis=None, model=None) -> str:
    """The check report (Analysis.summary()) plus the reach table, as plain text."""
    from .analysis import analyze

    a = analysis or analyze(spec, layer=layer, head=head, dense_limit=_flow.ANALYSIS_DENSE_LIMIT)
    table = _flow.layers_until_reach(spec, layers, head, model=model)
    return f"{spec.name}\n\n{a.summary()}\n\n{table.text()}"


def view_summary(spec, fig, region, layer=0, head=0, layers=None, analysis=None, title=None, model=None, **_):
    text = summary_text(spec, layer, head, layers, analysis, model)
    ax = fig.add_subplot(region)
    ax.axis("off")
    lines = text.count("\n") + 1
    ax.text(0, 1, text, family=MONO, fontsize=max(5, min(9, 420 / max(lines, 1) / 1.4)), va="top", ha="left",
            transform=ax.transAxes)
    _info(fig, "summary", text=text)
    return ax


VIEW_FUNCTIONS = {"mask": view_mask, "positions": view_positions, "distance": view_distance,
                  "flow": view_flow, "reach": view_reach, "summary": view_summary}
FIGSIZES = {"mask": (8.5, 8), "positions": (10, 7), "distance": (10, 5), "flow": (11, 5.5),
            "reach": (10, 7), "summary": (8, 8)}


# ---------------------------------------------------------------- entry points
def render(spec, view: str = "mask", **options) -> Figure:
    """One view as a matplotlib Figure (no pyplot). view: mask | positions | distance | flow |
    reach | summary | all ("all" = every view in one figure, see render_all)."""
    if view == "all":
        return render_all(spec, **options)
    if view not in VIEW_FUNCTIONS:
        raise ValueError(f"unknown view {view!r}; use one of {', '.join(VIEWS + ('all',))}")
    fig = new_figure(options.pop("figsize", None) or FIGSIZES[view], dpi=options.pop("dpi", 100))
    region = fig.add_gridspec(1, 1, left=0.08, right=0.92, top=0.9, bottom=0.1)[0]
    VIEW_FUNCTIONS[view](spec, fig, region, **options)
    fig.maskstudio_view = view
    return fig


def render_all(spec, **options) -> Figure:
    """Every view in one figure: mask | flow, positions | distance, reach | summary.
    The analysis is computed once and shared by the mask legend, flow graph and summary."""
    from .analysis import analyze

    layer, head = options.get("layer", 0), options.get("head", 0)
    analysis = options.pop("analysis", None) or analyze(spec, layer=layer, head=head,
                                                        dense_limit=_flow.ANALYSIS_DENSE_LIMIT)
    options.setdefault("model", _flow.Model(spec, head))
    fig = new_figure(options.pop("figsize", None) or (16, 19.5), dpi=options.pop("dpi", 80))
    gs = fig.add_gridspec(3, 2, left=0.05, right=0.96, top=0.93, bottom=0.03, hspace=0.28, wspace=0.22,
                          height_ratios=[1.15, 1, 1])
    options.pop("title", None)
    view_mask(spec, fig, gs[0, 0], **options)
    view_flow(spec, fig, gs[0, 1], analysis=analysis, **options)
    view_positions(spec, fig, gs[1, 0], **options)
    view_distance(spec, fig, gs[1, 1], **options)
    view_reach(spec, fig, gs[2, 0], **options)
    view_summary(spec, fig, gs[2, 1], analysis=analysis, **options)
    fig.suptitle(f"{spec.name}  ·  {spec.table.n:,} tokens  ·  {len(spec.segments)} segments", fontsize=14,
                 y=0.985)
    fig.maskstudio_view = "all"
    return fig


def evaluation_figure(summary: dict) -> Figure:
    """Accuracy (by the task's breakdown) and target NLL per spec, with bootstrap 95% intervals."""
    specs = summary["specs"]
    fig = new_figure((10, 3.6))
    ax_b, ax_n = fig.add_subplot(1, 3, (1, 2)), fig.add_subplot(1, 3, 3)
    palette = ["#3b6fb6", "#e08a2c", "#4a9a5b", "#b5485d", "#7d5ba6"]
    groups = specs[0].get("breakdown", {}).get("groups", [])
    width = 0.8 / len(specs)
    for i, e in enumerate(specs):
        color = palette[i % len(palette)]
        if groups:
            rows = e["breakdown"]["groups"]
            x = np.arange(len(rows)) + (i - (len(specs) - 1) / 2) * width
            acc = np.array([g["accuracy"] for g in rows])
            lo = np.array([g["ci"][0] for g in rows])
            hi = np.array([g["ci"][1] for g in rows])
            ax_b.bar(x, acc, width, color=color, label=e["name"],
                     yerr=np.vstack([acc - lo, hi - acc]), capsize=3, error_kw={"lw": 0.8})
        lo, hi = e["nll_ci"]
        ax_n.errorbar([e["nll"]], [i], xerr=[[e["nll"] - lo], [hi - e["nll"]]], fmt="o", color=color, capsize=3)
    if groups:
        ax_b.set_xticks(range(len(groups)), [str(g["value"]) for g in groups], fontsize=8)
        ax_b.set_xlabel(specs[0]["breakdown"]["by"].replace("_", " "), fontsize=8)
    ax_b.set_ylim(0, 1.05)
    ax_b.set_ylabel("exact-match accuracy", fontsize=8)
    ax_b.legend(fontsize=7, frameon=False)
    ax_b.set_title(f"{summary.get('task', '')}: accuracy with bootstrap 95% CI (n={summary.get('n')})", fontsize=9)
    ax_n.set_yticks(range(len(specs)), [e["name"][:18] for e in specs], fontsize=7)
    ax_n.set_xlabel("target NLL (nats/token)", fontsize=8)
    ax_n.invert_yaxis()
    ax_n.set_title("mean NLL, 95% CI", fontsize=9)
    fig.tight_layout()
    return fig
