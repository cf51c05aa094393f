"""Views of a spec: what may attend what, where tokens sit in RoPE space, and how information
flows through the layers. Every view draws facts computed in the core (flow, positions, tokens,
analysis); there is no second copy of a mask and no computation here beyond pooling pixels.

Each view is one function `view_<name>(spec, fig, region, **options)` drawing into a gridspec
region of `fig`; `render` gives one view its own figure, `render_all` puts every view in one.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Arc, FancyArrowPatch, Patch
from matplotlib.path import Path
from matplotlib.ticker import MaxNLocator

from .. import flow as _flow
from .. import knobs
from ..knobs import ANALYSIS_DENSE_MAX, BLOCK, DISPLAY_PIXELS, PICTURE_DENSE_MAX, TOKEN_LABEL_MAX
from ..positions import distance_stats
from ..tokens import token_labels as default_token_labels
from .figures import (ALLOWED_COLOR, BOUNDARY_COLOR, MASKED_COLOR, MONO, SHADE, arcs, bands, fmt, frame_cuts, info,
                      layer_note, modality_legend, new_figure, segment_colors)

VIEWS = ("mask", "positions", "distance", "flow", "reach", "summary", "blocks")
LABELLED_SEGMENTS = 64  # segments named one by one (ticks, values, legend lines); past it the axis counts them


def _layer_masks(spec, head, masks):
    """The per-layer masks of one head, reused when the caller already built them."""
    return masks if masks is not None and masks.head == head else _flow.LayerMasks(spec, head)


# ---------------------------------------------------------------- mask
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


def _draw_blocks(spec, fig, ax, cax, block_size, layer, head) -> int:
    """Each block_size x block_size block shaded by its allowed fraction; returns allowed pairs."""
    n = spec.table.n
    frac = _flow.block_fraction(spec, block_size, layer, head)
    sizes = torch.bincount(torch.arange(n) // block_size).double()
    allowed_pairs = int(round(float((frac * sizes[:, None] * sizes[None, :]).sum())))
    tq = frac.shape[0]
    img = ax.imshow(frac.float().numpy(), cmap=SHADE, vmin=0, vmax=1, interpolation="nearest",
                    extent=(0, tq * block_size, tq * block_size, 0), aspect="auto")
    cb = fig.colorbar(img, cax=cax)
    cb.set_label(f"fraction allowed per {block_size}x{block_size} block", fontsize=8)
    return allowed_pairs


def _draw_dense(fig, ax, cax, allowed: torch.Tensor) -> int:
    """Token cells (pooled to <= DISPLAY_PIXELS a side past that); returns allowed pairs."""
    n = allowed.shape[0]
    f = pool_factor(n)
    if f == 1:  # exact token cells; RGBA bytes straight to Agg, no colormap pass
        lut = np.array([(255, 255, 255, 255), (*(int(255 * c) for c in to_rgb(ALLOWED_COLOR)), 255)], np.uint8)
        ax.imshow(lut[allowed.numpy().view(np.uint8)], interpolation="nearest", extent=(0, n, n, 0), aspect="auto")
        sm = ScalarMappable(norm=Normalize(0, 1), cmap=ListedColormap([MASKED_COLOR, ALLOWED_COLOR]))
        cb = fig.colorbar(sm, cax=cax, ticks=[0.25, 0.75])
        cb.ax.set_yticklabels(["masked", "allowed"], fontsize=8)
    else:  # more tokens than pixels: show each f x f cell's allowed fraction (what the eye gets)
        img = ax.imshow(pool_fraction(allowed, f).numpy(), cmap=SHADE, vmin=0, vmax=1, interpolation="nearest",
                        extent=(0, n, n, 0), aspect="auto")
        cb = fig.colorbar(img, cax=cax)
        cb.set_label(f"fraction allowed per {f}x{f}-token pixel", fontsize=8)
    return int(torch.count_nonzero(allowed))


def _boundaries(spec, ax) -> None:
    """Segment boundaries and video frame ticks."""
    t = spec.table
    n = t.n
    ax.vlines(t.starts[1:], 0, n, color=BOUNDARY_COLOR, lw=0.8)
    ax.hlines(t.starts[1:], 0, n, color=BOUNDARY_COLOR, lw=0.8)
    frames = frame_cuts(spec)
    ax.vlines(frames, 0, n, color="#c8424a", lw=0.4, alpha=0.35, ls=":")
    ax.hlines(frames, 0, n, color="#c8424a", lw=0.4, alpha=0.35, ls=":")
    ax.set_xticks(frames, minor=True)
    ax.set_yticks(frames, minor=True)
    ax.tick_params(which="minor", length=3, color="#c8424a")


def _token_ticks(spec, ax, token_labels, tokenizer) -> list[str] | None:
    """One label per token up to TOKEN_LABEL_MAX tokens (returned), else segment-start indices."""
    t = spec.table
    n = t.n
    if n <= TOKEN_LABEL_MAX:
        if token_labels is not None and len(token_labels) != n:
            raise ValueError(f"token_labels has {len(token_labels)} entries but the layout has {n} tokens")
        labels = list(token_labels) if token_labels is not None else default_token_labels(spec, tokenizer)
        fs = 7 if n <= 32 else 5
        ax.set_xticks(np.arange(n) + 0.5)
        ax.set_xticklabels(labels, rotation=90, fontsize=fs)
        ax.set_yticks(np.arange(n) + 0.5)
        ax.set_yticklabels(labels, fontsize=fs)
        ax.yaxis.tick_right()
        return labels
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
    return None


def view_mask(spec, fig, region, layer=0, head=0, token_labels=None, tokenizer=None,
              block_threshold=PICTURE_DENSE_MAX, block_size=BLOCK, block=None, title=None, masks=None, **_):
    """Allowed / masked heatmap with segment bands on both axes; a block view past block_threshold."""
    n = spec.table.n
    colors = segment_colors(spec)
    use_blocks = (n > block_threshold) if block is None else bool(block)
    label_room = 0.14 if n <= TOKEN_LABEL_MAX else 0.08
    gs = region.subgridspec(2, 4, width_ratios=[0.045, 1, label_room, 0.03], height_ratios=[0.045, 1],
                            wspace=0.0, hspace=0.0)
    ax = fig.add_subplot(gs[1, 1])
    cax = fig.add_subplot(gs[1, 3])
    if use_blocks:
        allowed_pairs, mode = _draw_blocks(spec, fig, ax, cax, block_size, layer, head), "block"
    else:
        allowed = _layer_masks(spec, head, masks).mask(layer)
        allowed_pairs, mode = _draw_dense(fig, ax, cax, allowed), "dense"
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    density = allowed_pairs / float(n * n)
    _boundaries(spec, ax)
    labels = _token_ticks(spec, ax, token_labels, tokenizer)
    ax.set_xlabel("key token  (attended)", fontsize=9)
    bands(spec, ax, "x", colors)
    bands(spec, ax, "y", colors)
    ax.set_ylabel("query token  (attending)", fontsize=9)
    ax.yaxis.set_label_coords(-0.075, 0.5)
    name = title or f"{spec.name}: mask{layer_note(spec, layer, head)}"
    ax.set_title(f"{name}\ndensity {density:.3f}  ({allowed_pairs:,} of {n * n:,} pairs)"
                 + (f"  ·  {block_size}-token blocks" if mode == "block" else ""), fontsize=10, y=1.06)
    # in the empty top-left corner, outside the cells (a legend inside hid some of them)
    modality_legend(spec, ax, loc="lower right", bbox_to_anchor=(-0.005, 1.005), fontsize=7, frameon=False,
                    title="modality", title_fontsize=7, borderaxespad=0.0, handlelength=1.2)
    info(fig, "mask", mode=mode, n=n, density=density, allowed=allowed_pairs, layer=layer, head=head,
         labels=labels, block_size=block_size if mode == "block" else None, axes=ax)
    return ax


# ---------------------------------------------------------------- positions
def _subsample(idx: np.ndarray, vals: np.ndarray, most: int = 4000):
    if len(idx) <= most:
        return idx, vals
    step = math.ceil(len(idx) / most)
    return idx[::step], vals[::step]


def _position_lines(spec, fig, region, rows, axes_names, colors) -> list:
    """Position id against token index, one line per segment, one panel per axis (t/h/w)."""
    t = spec.table
    lines_gs = region.subgridspec(len(axes_names), 1, hspace=0.08)
    line_axes = []
    index = np.arange(t.n)
    marker = "." if t.n <= 256 else None
    for a, axname in enumerate(axes_names):
        ax = fig.add_subplot(lines_gs[a], sharex=line_axes[0] if line_axes else None)
        if len(t.names) > LABELLED_SEGMENTS:  # one collection, no legend: a line and entry per segment took a minute at 4k
            from matplotlib.collections import LineCollection

            ax.add_collection(LineCollection([np.column_stack(_subsample(index[t.segment_slice(s)], rows[a][t.segment_slice(s)]))
                                              for s in range(len(t.names))], colors=colors, lw=1.4))
            ax.autoscale_view()
        for s, name in enumerate(t.names) if len(t.names) <= LABELLED_SEGMENTS else ():
            sl = t.segment_slice(s)
            x, y = _subsample(index[sl], rows[a][sl])
            ax.plot(x, y, color=colors[s], lw=1.4, marker=marker, ms=3, label=name)
        ax.vlines(t.starts[1:], 0, 1, transform=ax.get_xaxis_transform(), color="#cccccc", lw=0.6, zorder=0)
        ax.set_ylabel(f"pos id ({axname})" if axname else "position id", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
        if a < len(axes_names) - 1:
            ax.tick_params(labelbottom=False)
        line_axes.append(ax)
    line_axes[-1].set_xlabel("token index", fontsize=8)
    if len(t.names) <= LABELLED_SEGMENTS:
        line_axes[0].legend(fontsize=7, ncol=min(4, len(t.names)), loc="upper left", framealpha=0.85)
    return line_axes


def _grid_panel(ax, frame0: np.ndarray, color, title: str) -> None:
    H, W = frame0.shape
    ax.imshow(frame0, cmap="viridis", interpolation="nearest")
    if H * W <= 144:
        mid = (frame0.max() + frame0.min()) / 2
        for r in range(H):
            for c in range(W):
                ax.text(c, r, str(frame0[r, c]), ha="center", va="center", fontsize=6,
                        color="white" if frame0[r, c] < mid else "black")
    ax.set_title(title, fontsize=8, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2)


def _position_grids(spec, fig, region, rows, axes_names, colors, grid_segs) -> list:
    """Each image/video segment's ids (frame 0) on its H x W grid, one panel per axis."""
    t = spec.table
    per = len(axes_names)
    ggs = region.subgridspec(1, len(grid_segs) * per, wspace=0.35)
    grid_axes = []
    for g, s in enumerate(grid_segs):
        seg = spec.segments[s]
        grid = seg["grid"]
        T, H, W = ([1] + grid) if len(grid) == 2 else grid
        sl = t.segment_slice(s)
        for a, axname in enumerate(axes_names):
            ax = fig.add_subplot(ggs[g * per + a])
            what = f"{seg['name']}" + (f" [{axname}]" if axname else "")
            sub = f"{H}x{W}" + (f", frame 0 of {T}" if T > 1 else "")
            _grid_panel(ax, rows[a][sl][: H * W].reshape(H, W), colors[s], f"{what}\n{sub}")
            grid_axes.append(ax)
    return grid_axes


def view_positions(spec, fig, region, title=None, **_):
    """Position ids per segment (three panels t/h/w for 3-D schemes) and on each visual grid."""
    t = spec.table
    ids = spec.position_ids()
    three = ids.dim() == 2
    axes_names = ["t", "h", "w"] if three else [None]
    rows = ids.numpy() if three else ids.numpy()[None]
    colors = segment_colors(spec)
    grid_segs = [s for s, seg in enumerate(spec.segments) if "grid" in seg][:3]
    gs = region.subgridspec(2 if grid_segs else 1, 1, height_ratios=[1.3, 1] if grid_segs else [1], hspace=0.45)
    line_axes = _position_lines(spec, fig, gs[0], rows, axes_names, colors)
    line_axes[0].set_title(title or f"{spec.name}: position ids ({spec.positions['scheme']}"
                           f"{', 3-D t/h/w' if three else ''})", fontsize=10)
    grid_axes = _position_grids(spec, fig, gs[1], rows, axes_names, colors, grid_segs) if grid_segs else []
    info(fig, "positions", three_d=three, line_axes=line_axes, grid_axes=grid_axes,
         grid_segments=[t.names[s] for s in grid_segs])
    return line_axes


# ---------------------------------------------------------------- distance
def _distance_heat(spec, ax, qpos, ids_axis, max_pairs: int):
    """Histogram of |delta pos| per key segment (deterministic strided sample past max_pairs)."""
    t = spec.table
    dmax, hists = 1, []
    for s in range(len(t.names)):
        kpos = ids_axis[t.segment_slice(s)]
        qstep = max(1, math.ceil(len(qpos) * len(kpos) / max_pairs / max(1, len(kpos))))
        kstep = max(1, math.ceil(len(qpos[::qstep]) * len(kpos) / max_pairs))
        d = (qpos[::qstep, None] - kpos[None, ::kstep]).abs().flatten()
        hists.append(d)
        dmax = max(dmax, int(d.max()))
    edges = np.linspace(0, dmax + 1, min(dmax + 1, 60) + 1)
    heat = np.stack([np.histogram(d.numpy(), bins=edges)[0] / max(1, len(d)) for d in hists])
    return ax.imshow(heat, aspect="auto", cmap="magma_r", interpolation="nearest",
                     extent=(0, dmax + 1, len(t.names), 0), vmin=0)


def _distance_bars(spec, bx, stats, naxes, colors) -> None:
    """Mean |delta| per key segment (grouped t/h/w bars for 3-D schemes)."""
    names = spec.table.names
    hatches = ["", "//", ".."]
    height = 0.8 / naxes
    top = 1.0
    for a in range(naxes):
        means = [stats["mean"][name][a] if naxes > 1 else stats["mean"][name] for name in names]
        ys = np.arange(len(names)) + 0.1 + height * (a + 0.5)
        bx.barh(ys, means, height=height * 0.9, color=colors, hatch=hatches[a], edgecolor="white",
                label=f"|Δ{stats['axes'][a]}|" if naxes > 1 else None)
        for y, m in zip(ys, means) if len(names) <= LABELLED_SEGMENTS else ():
            bx.text(m, y, " " + fmt(m), va="center", fontsize=6 if naxes > 1 else 7)
        top = max(top, max(means))
    bx.set_ylim(len(names), 0)
    bx.set_yticks(np.arange(len(names)) + 0.5 if len(names) <= LABELLED_SEGMENTS else [])
    bx.set_xlim(0, top * 1.35)
    bx.tick_params(labelsize=7)
    bx.set_xlabel("mean |Δ position|" + (" per axis" if naxes > 1 else ""), fontsize=8)
    if naxes > 1:
        bx.legend(fontsize=7, loc="lower right")


def view_distance(spec, fig, region, query=None, title=None, max_pairs: int = 2_000_000, **_):
    """|delta pos| from a query segment to every key segment: distribution and exact mean."""
    t = spec.table
    stats = distance_stats(spec, query)
    ids = spec.position_ids()
    ids = ids if ids.dim() == 2 else ids[None]
    naxes = ids.shape[0]
    colors = segment_colors(spec)
    qs = t.segment_slice(t.names.index(stats["query"]))
    gs = region.subgridspec(naxes, 2, width_ratios=[1.6, 1], wspace=0.32, hspace=0.35)  # room for the colour bar and its label
    heat_axes = []
    for a in range(naxes):
        ax = fig.add_subplot(gs[a, 0])
        im = _distance_heat(spec, ax, ids[a, qs], ids[a], max_pairs)
        if len(t.names) <= LABELLED_SEGMENTS:  # a tick per segment: seconds of text past a few hundred
            ax.set_yticks(np.arange(len(t.names)) + 0.5)
            ax.set_yticklabels(t.names, fontsize=7)
            for tick, c in zip(ax.get_yticklabels(), colors):
                tick.set_color(c)
        ax.set_ylabel("key segment", fontsize=8)
        axname = stats["axes"][a]
        ax.set_xlabel(f"|Δ position{' ' + axname if naxes > 1 else ''}|  (query {stats['query']})", fontsize=8)
        ax.tick_params(labelsize=7)
        heat_axes.append(ax)
    bar = fig.colorbar(im, ax=heat_axes, fraction=0.035, pad=0.015)
    bar.set_label("share of (query, key) pairs", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    bx = fig.add_subplot(gs[:, 1])
    _distance_bars(spec, bx, stats, naxes, colors)
    heat_axes[0].set_title(title or f"{spec.name}: RoPE distance from '{stats['query']}' "
                           f"({spec.positions['scheme']})", fontsize=10, loc="left")
    info(fig, "distance", **stats, heat_axes=heat_axes, bar_axes=[bx])
    return heat_axes


# ---------------------------------------------------------------- flow
def _flow_edge(ax, x, k, q, d, col, label_edges: bool, fs: int = 6, thin: bool = False) -> None:
    """One edge k -> q: a self loop, or a quadratic Bezier in data coordinates with its apex
    0.175 * |dx| above (reading the past) or below (reading the future) the axis."""
    width = (0.3 + 1.2 * d["density"]) if thin else (0.6 + 4.5 * d["density"])
    style = "--" if d["partial"] else "-"
    if k == q:
        loop = Arc((x[k], 0.1), 0.16, 0.12, theta1=-60, theta2=240, color=col, lw=width, ls=style)
        loop.set_gid(f"edge:{k}->{q}")
        ax.add_patch(loop)
        if label_edges:
            ax.text(x[k], 0.17, f"{d['density']:.2f}", ha="center", va="bottom", fontsize=fs, color="#333333")
        return
    dx = x[q] - x[k]
    sgn = 1 if dx > 0 else -1
    apex = 0.175 * dx
    start = (x[k] + 0.06 * sgn, 0.04 * sgn)  # ends pulled off the node centres for the arrow head
    end = (x[q] - 0.1 * sgn, 0.05 * sgn)
    path = Path([start, ((x[k] + x[q]) / 2, 2 * apex), end], [Path.MOVETO, Path.CURVE3, Path.CURVE3])
    arrow = FancyArrowPatch(path=path, arrowstyle="-|>", mutation_scale=9 + width * 2, lw=width,
                            ls=style, color=col, alpha=0.35 if thin else 0.8, zorder=3)
    arrow.set_gid(f"edge:{k}->{q}")
    ax.add_patch(arrow)
    if label_edges:
        ax.text((x[k] + x[q]) / 2, apex, f"{d['density']:.2f}", ha="center", va="center", fontsize=fs,
                color="#333333", zorder=4, bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))


FLOW_PATCHES_MAX = 400  # edges drawn one arrow patch each (ids edge:k->q); past it one line collection, no heads


def view_flow(spec, fig, region, level="segment", layer=0, head=0, analysis=None, title=None, **_):
    """flow_graph(spec) left to right in sequence order: edge k -> q when q may read k."""
    g = _flow.flow_graph(spec, level=level, layer=layer, head=head, analysis=analysis)
    ax = fig.add_subplot(region)
    colors = segment_colors(spec)
    seg_color = {name: colors[i] for i, name in enumerate(spec.table.names)}
    nodes = sorted(g.nodes, key=lambda v: g.nodes[v]["order"])
    x = {v: i for i, v in enumerate(nodes)}
    biggest = max(g.nodes[u]["tokens"] for u in nodes)
    label_edges = g.number_of_edges() <= 40
    few = len(nodes) <= 12  # segment level, mostly: large text (issue 15 item 14)
    thin = g.number_of_edges() > 120  # a token graph: thin, faint edges so the nodes stay readable
    if g.number_of_edges() > FLOW_PATCHES_MAX:  # one collection: a patch per edge took minutes past ~10k edges
        edges = list(g.edges(data=True))
        arcs(ax, [x[k] for k, _, _ in edges], [x[q] for _, q, _ in edges], [seg_color[g.nodes[k]["segment"]] for k, _, _ in edges],
             [0.3 + 1.2 * d["density"] for _, _, d in edges], [d["partial"] for _, _, d in edges])
    for k, q, d in g.edges(data=True) if g.number_of_edges() <= FLOW_PATCHES_MAX else ():
        _flow_edge(ax, x, k, q, d, seg_color[g.nodes[k]["segment"]], label_edges, 8 if few else 6, thin)
    for v in nodes:
        size = 6 + 16 * math.sqrt(g.nodes[v]["tokens"] / biggest)
        ax.plot([x[v]], [0], "o", ms=size, color=seg_color[g.nodes[v]["segment"]], mec="white", mew=1.5, zorder=5)
        label = str(v) if level == "token" else f"{v}\n{g.nodes[v]['tokens']:,} tok"
        ax.text(x[v], -0.08, label, ha="center", va="top",
                fontsize=(10 if len(nodes) <= 8 else 9) if few else (6 if len(nodes) <= 32 else 5), zorder=6,
                rotation=0 if len(nodes) <= 24 else 90)
    up = max([0.175 * (x[q] - x[k]) for k, q in g.edges if x[q] > x[k]], default=0)
    down = max([0.175 * (x[k] - x[q]) for k, q in g.edges if x[q] < x[k]], default=0)
    ax.set_xlim(-0.7, max(1, len(nodes) - 1) + 0.7)
    ax.set_ylim(-max(down, 0.25) - 0.3, max(up, 0.45) + 0.15)
    ax.axis("off")
    note = "edge k → q: q may read k · width = density · dashed = partial · above: reads the past, below: the future"
    ax.set_title((title or f"{spec.name}: information flow ({level}s){layer_note(spec, layer, head)}")
                 + "\n" + note, fontsize=10 if few else 9)
    modality_legend(spec, ax, loc="upper left", fontsize=8 if few else 7, frameon=False)
    info(fig, "flow", graph=g, axes=ax)
    return ax


# ---------------------------------------------------------------- reach
def _reach_table(spec, tx, table, n_layers: int, colors) -> None:
    """'layers until every token of A sees B' as a coloured table (as text past 16 segments)."""
    names = spec.table.names
    s = len(names)
    tx.axis("off")
    if 16 < s <= 48:
        tx.text(0, 1, table.text(), family=MONO, fontsize=6, va="top")
        return
    if s > 48:  # one pixel a pair: text of S^2 cells took minutes to draw past a few hundred segments
        steps = np.array([[-1 if v is None else v for v in row] for row in table.steps], dtype=float)
        im = tx.imshow(np.ma.masked_less(steps, 0), cmap="Greens_r", interpolation="nearest", aspect="auto",
                       vmin=0, vmax=max(n_layers, 1))
        im.cmap.set_bad("#eeeeee")
        tx.axis("on")
        tx.set_xlabel("segment B (source), in order", fontsize=8)
        tx.set_ylabel("segment A (reading)", fontsize=8)
        tx.tick_params(labelsize=6)
        tx.figure.colorbar(im, ax=tx, fraction=0.03, pad=0.01).set_label("layers (grey: never)", fontsize=7)
        tx.set_title(f"layers until every token of segment A can read segment B ({s:,} segments)", fontsize=9)
        return
    cells = [["-" if v is None else str(v) for v in row] for row in table.steps]
    steps_colors = {0: "#ffffff", 1: "#9fd5ae", 2: "#c4e6cc", 3: "#dcf0e1"}
    shade = [["#eeeeee" if v is None else steps_colors.get(v, "#ecf7ef") for v in row] for row in table.steps]
    tab = tx.table(cellText=cells, rowLabels=names, colLabels=names, cellColours=shade, loc="upper center",
                   cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7 if s <= 10 else 6)
    for (r, c), cell in tab.get_celld().items():
        if r == 0 and c >= 0:
            cell.get_text().set_color(colors[c])
        if c == -1 and r >= 1:
            cell.get_text().set_color(colors[r - 1])
    tx.set_title(f"layers until every token of segment A (row) can read segment B (column);"
                 f"  - = not within {n_layers}", fontsize=9)


def view_reach(spec, fig, region, token=None, layers=None, head=0, title=None, masks=None, **_):
    """Receptive field of a token after 1..L layers (residual counted) and the reach table."""
    t = spec.table
    n = t.n
    order = _flow._layer_list(_flow.default_layers(spec) if layers is None else layers)
    token = n - 1 if token is None else int(token)
    masks = _layer_masks(spec, head, masks)
    field = _flow.receptive_field(spec, token, order, head, model=masks)
    big = len(t.names) > knobs.FLOW_MAX_NODES  # the table is L x N x S work: a minute and 2 GB at 4,096 segments
    table = None if big else _flow.layers_until_reach(spec, order, head, model=masks)
    colors = segment_colors(spec)
    gs = region.subgridspec(4, 1, height_ratios=[0.06, 1, 0.45, 1.2], hspace=0.0)
    ax = fig.add_subplot(gs[1])
    ax.imshow(field.numpy().astype(np.uint8), aspect="auto", interpolation="nearest",
              cmap=ListedColormap([MASKED_COLOR, "#2e8b57"]), vmin=0, vmax=1, extent=(0, n, len(order) + 0.5, 0.5))
    ax.set_yticks(np.arange(1, len(order) + 1))
    ax.set_yticklabels([f"after {i}" for i in range(1, len(order) + 1)], fontsize=7)
    ax.set_xlabel("input token  (green: its information can have reached the chosen token)", fontsize=8)
    ax.axvline(token + 0.5, color="#c8424a", lw=1)
    ax.vlines(t.starts[1:], 0.5, len(order) + 0.5, color=BOUNDARY_COLOR, lw=0.6)
    ax.tick_params(labelsize=7)
    ax.set_xlim(0, n)
    bands(spec, ax, "x", colors, depth=0.06)
    ax.set_title(title or f"{spec.name}: receptive field of token {token} = {t.label(token)} after "
                 f"1..{len(order)} layers (residual counted)", fontsize=10, y=1.07)
    if big:
        tx = fig.add_subplot(gs[3])
        tx.axis("off")
        tx.text(0.5, 0.6, f"the table 'layers until segment A reads segment B' is drawn up to {knobs.FLOW_MAX_NODES} segments "
                f"(MASKSTUDIO_FLOW_MAX_NODES);\nthis design has {len(t.names):,}: merge segments to see it",
                ha="center", va="center", fontsize=9)
    else:
        _reach_table(spec, fig.add_subplot(gs[3]), table, len(order), colors)
    info(fig, "reach", token=token, layers=order, field=field, table=table)
    return ax


# ---------------------------------------------------------------- blocks (what a FlexAttention kernel skips)
BLOCK_STATE_COLORS = (MASKED_COLOR, "#e08a2c", ALLOWED_COLOR)  # empty, partial, full


def view_blocks(spec, fig, region, block_size=BLOCK, layer=0, head=0, title=None, **_):
    """The BlockMask grid at `block_size`: every query block x key block full (kernel runs it without
    a mask_mod), partial (runs it with the mask_mod) or empty (skipped), from tiled.block_states,
    and kv_num_blocks (blocks visited) per query block beside it."""
    from ..tiled import block_states

    full, partial = block_states(spec, int(block_size), layer, head)
    states = full.to(torch.uint8) * 2 + partial.to(torch.uint8)
    tq, tk = states.shape
    kv_num = (full | partial).sum(1)
    nf, np_, total = int(full.sum()), int(partial.sum()), tq * tk
    gs = region.subgridspec(1, 2, width_ratios=[1, 0.22], wspace=0.06)
    ax, bx = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    ax.imshow(states.numpy(), cmap=ListedColormap(BLOCK_STATE_COLORS), vmin=0, vmax=2, interpolation="nearest",
              extent=(0, tk, tq, 0), aspect="auto")
    if tq <= 64:  # grid lines between blocks while they can be told apart
        ax.hlines(range(1, tq), 0, tk, color=BOUNDARY_COLOR, lw=0.3)
        ax.vlines(range(1, tk), 0, tq, color=BOUNDARY_COLOR, lw=0.3)
    cuts = [x / block_size for x in spec.table.starts[1:]]  # segment boundaries, in blocks
    ax.vlines(cuts, 0, tq, color="#c8424a", lw=0.8, ls="--")
    ax.hlines(cuts, 0, tk, color="#c8424a", lw=0.8, ls="--")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"key block ({block_size} tokens each; dashed: segment boundaries)", fontsize=9)
    ax.set_ylabel(f"query block ({block_size} tokens each)", fontsize=9)
    ax.tick_params(labelsize=7)
    handles = [Patch(facecolor=c, edgecolor=BOUNDARY_COLOR, label=f"{w} ({k:,})") for c, w, k in
               zip(BLOCK_STATE_COLORS[::-1], ("full", "partial: mask_mod runs", "empty: skipped"),
                   (nf, np_, total - nf - np_))]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.09), ncol=3, fontsize=8, frameon=False)
    bx.barh(np.arange(tq) + 0.5, kv_num.numpy(), height=1.0, color="#8fa3c7", edgecolor="white", lw=0.3)
    if tq <= 32:
        for i, v in enumerate(kv_num.tolist()):
            bx.text(v, i + 0.5, f" {v}", va="center", fontsize=7)
    bx.set_ylim(tq, 0)
    bx.set_xlim(0, max(1, tk) * 1.25)
    bx.set_yticks([])
    bx.tick_params(labelsize=7)
    bx.set_xlabel("kv_num_blocks", fontsize=8)
    skipped = 1 - (nf + np_) / total
    name = title or f"{spec.name}: BlockMask at {block_size}-token blocks{layer_note(spec, layer, head)}"
    ax.set_title(f"{name}\n{tq} x {tk} blocks: {nf:,} full, {np_:,} partial, {total - nf - np_:,} empty "
                 f"-> the kernel skips {skipped:.1%}", fontsize=10)
    info(fig, "blocks", block_size=int(block_size), full=full, partial=partial, kv_num_blocks=kv_num,
         skipped=skipped, axes=ax)
    return ax


# ---------------------------------------------------------------- summary
def summary_text(spec, layer=0, head=0, layers=None, analysis=None, masks=None) -> str:
    """The check report (Analysis.summary()) plus the reach table, as plain text."""
    from ..analysis import analyze

    a = analysis or analyze(spec, layer=layer, head=head, dense_limit=ANALYSIS_DENSE_MAX)
    table = _flow.layers_until_reach(spec, layers, head, model=masks)
    return f"{spec.name}\n\n{a.summary()}\n\n{table.text()}"


def view_summary(spec, fig, region, layer=0, head=0, layers=None, analysis=None, title=None, masks=None, **_):
    text = summary_text(spec, layer, head, layers, analysis, masks)
    ax = fig.add_subplot(region)
    ax.axis("off")
    lines = text.count("\n") + 1
    ax.text(0, 1, text, family=MONO, fontsize=max(5, min(9, 420 / max(lines, 1) / 1.4)), va="top", ha="left",
            transform=ax.transAxes)
    info(fig, "summary", text=text)
    return ax


VIEW_FUNCTIONS = {"mask": view_mask, "positions": view_positions, "distance": view_distance,
                  "flow": view_flow, "reach": view_reach, "summary": view_summary,
                  "blocks": view_blocks}
FIGSIZES = {"mask": (8.5, 8), "positions": (10, 7), "distance": (10, 5), "flow": (11, 5.5),
            "reach": (10, 7), "summary": (8, 8), "blocks": (9, 7.5)}


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
    The analysis and the per-layer masks are computed once and shared by the views."""
    from ..analysis import analyze

    layer, head = options.get("layer", 0), options.get("head", 0)
    analysis = options.pop("analysis", None) or analyze(spec, layer=layer, head=head, dense_limit=ANALYSIS_DENSE_MAX)
    options.setdefault("masks", _flow.LayerMasks(spec, head))
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
    fig.suptitle(f"{spec.name}  ·  {spec.table.n:,} tokens  ·  {len(spec.segments)} segments", fontsize=14, y=0.985)
    fig.maskstudio_view = "all"
    return fig
