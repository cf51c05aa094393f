"""Shared figure helpers: colours, the pyplot-free Agg figure, saving, and the small drawing
pieces every view uses (segment bands and ticks, frame cuts, the modality legend, a labelled
heatmap). No computation lives here: a helper draws what it is given.

Colours: MODALITY_COLORS; segments of one modality get distinct colours around it
(segment_colors: hue and lightness steps), identically in every view.
"""
from __future__ import annotations

import os
import threading

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.colors import LinearSegmentedColormap, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.table import Table
from matplotlib.text import Text
from matplotlib.transforms import blended_transform_factory

MODALITY_COLORS = {
    "text": "#3b6fb6",     # blue
    "image": "#e08a2c",    # orange
    "video": "#c8424a",    # red
    "audio": "#3f9b5a",    # green
    "special": "#7d5bb5",  # purple
}
ALLOWED_COLOR = "#1f2a44"
MASKED_COLOR = "#ffffff"
BOUNDARY_COLOR = "#9aa5b8"
PALETTE = ["#3b6fb6", "#e08a2c", "#4a9a5b", "#b5485d", "#7d5ba6"]  # one colour per compared spec
MONO = "DejaVu Sans Mono"
SHADE = LinearSegmentedColormap.from_list("allowed", [MASKED_COLOR, "#8fa3c7", ALLOWED_COLOR])


# ---------------------------------------------------------------- figures
def new_figure(figsize=(8, 8), dpi: int = 100) -> Figure:
    """A pyplot-free Figure with an Agg canvas (thread-safe for the web app). Its dpi is what
    a plain fig.savefig uses."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def plain_text(fig: Figure) -> Figure:
    """Every text of the figure as plain text: names from a spec (`$x^$`, `a_b$`) are shown as
    typed instead of being parsed as math (which fails or garbles them). Call before drawing."""
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    for table in fig.findobj(Table):  # table cells keep their texts out of the artist tree
        for cell in table.get_celld().values():
            cell.get_text().set_parse_math(False)
    return fig


def tight(fig: Figure) -> Figure:
    """tight_layout on plain text (it measures the texts, so math parsing would run there too)."""
    plain_text(fig).tight_layout()
    return fig


def save(fig: Figure, path, dpi: int | None = None) -> None:
    """Write the figure (format from the suffix; PNG with fast compression). Figures made here are
    not registered with pyplot, so dropping the reference frees them; no plt.close needed."""
    png = str(path).lower().endswith(".png") or getattr(path, "write", None) is not None
    plain_text(fig)
    fig.savefig(path, dpi=dpi or fig.dpi, facecolor="white", **({"pil_kwargs": {"compress_level": 1}} if png else {}))


def write_png(fig: Figure, path: str, dpi: int) -> str:
    """Draw the figure on its Agg canvas at `dpi`, write the pixels as a PNG (fast zlib level)
    and clear the figure; returns `path`. Faster than savefig for the app's pictures.

    The file is written whole under a name of its own, then moved onto `path` (os.replace), so a
    reader never meets a half-written picture: the app's pictures are named by their content, and
    two requests drawing the same one at once (an edit's Blocks grid and the Blocks tab opening)
    rewrote the file while the server was sending it ("Too much data for declared Content-Length")."""
    from PIL import Image

    fig.set_dpi(dpi)
    plain_text(fig).canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    part = f"{path}.{os.getpid()}-{threading.get_ident()}.part"
    try:
        Image.fromarray(arr).save(part, "PNG", compress_level=1)
        os.replace(part, path)
    finally:
        if os.path.exists(part):  # the save failed (disk full): no stray part file
            os.remove(part)
    return path


def info(fig: Figure, view: str, **facts) -> None:
    """What a figure shows, for tests and the app: fig.maskstudio[view] = {...}."""
    if not hasattr(fig, "maskstudio"):
        fig.maskstudio = {}
    fig.maskstudio[view] = facts


# ---------------------------------------------------------------- text
def fmt(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def layer_note(spec, layer, head) -> str:
    """' (layer 2, head 1)' when the mask varies by layer / head, else ''."""
    parts = []
    if spec.varies_by_layer:
        parts.append(f"layer {layer}")
    if spec.varies_by_head:
        parts.append(f"head {head}")
    return f" ({', '.join(parts)})" if parts else ""


# ---------------------------------------------------------------- segments
HUE_SPREAD = 0.13  # segments of one modality spread over this much hue around its colour (0..1 = a full turn)
LIGHTNESS_STEPS = (0.0, 0.16, -0.1, 0.26)  # and cycle through these lightness shifts, so neighbours differ twice


def segment_colors(spec) -> list:
    """One colour per segment, distinct within a modality: the modality's colour for its only
    segment; k of n segments of one modality turned around its hue (`HUE_SPREAD`) and shifted in
    lightness, so `path1`, `path2`, `path3` are three colours, still all of the text family."""
    import colorsys

    mods = [seg["modality"] for seg in spec.segments]
    seen: dict[str, int] = {}
    out = []
    for mod in mods:
        k, n = seen.get(mod, 0), mods.count(mod)
        seen[mod] = k + 1
        if n == 1:
            out.append(to_rgb(MODALITY_COLORS[mod]))
            continue
        h, light, sat = colorsys.rgb_to_hls(*to_rgb(MODALITY_COLORS[mod]))
        h = (h + HUE_SPREAD * (k / (n - 1) - 0.5)) % 1.0
        light = min(0.82, max(0.22, light + LIGHTNESS_STEPS[k % len(LIGHTNESS_STEPS)]))
        out.append(colorsys.hls_to_rgb(h, light, sat))
    return out


BAND_PATCHES_MAX = 256  # segments drawn as one patch each (ids segment:name); past it one collection


def bands(spec, ax, axis: str, colors, depth: float = 0.04) -> None:
    """Coloured segment bands with names just outside one side of `ax` (axis 'x': above it,
    'y': left of it). Drawn into `ax` itself with blended transforms: no extra Axes to build."""
    t = spec.table
    n = t.n
    if axis == "x":
        trans = blended_transform_factory(ax.transData, ax.transAxes)
    else:
        trans = blended_transform_factory(ax.transAxes, ax.transData)
    many = len(t.names) > BAND_PATCHES_MAX  # one collection: a patch per segment took seconds past ~1k
    rects = []
    for s, (name, start, size) in enumerate(zip(t.names, t.starts, t.sizes)):
        if axis == "x":
            xy, w, h = (start, 1.01), size, depth
        else:
            xy, w, h = (-0.01 - depth, start), depth, size
        rect = Rectangle(xy, w, h, facecolor=colors[s], edgecolor="white", linewidth=0.6, label=name,
                         clip_on=False, **({} if many else {"transform": trans}))  # a collection's transform
        rect.set_gid(f"segment:{name}")
        rects.append(rect) if many else ax.add_patch(rect)
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
    if many:
        ax.add_collection(PatchCollection(rects, match_original=True, transform=trans, clip_on=False, gid="segments"),
                          autolim=False)


def arcs(ax, x0, x1, colors, widths, dashed, gid: str = "edges") -> None:
    """Many edges x0 -> x1 at once as one LineCollection (a patch each took minutes past ~10k): the
    quadratic curve with its apex 0.175 * (x1 - x0) above the axis (below when x1 < x0), a small
    loop where x0 == x1; thin and faint, dashed where `dashed`."""
    from matplotlib.collections import LineCollection

    xk, xq = np.asarray(x0, dtype=float)[:, None], np.asarray(x1, dtype=float)[:, None]
    u = np.linspace(0, 1, 17)[None, :]
    px = (1 - u) ** 2 * xk + u * (1 - u) * (xk + xq) + u ** 2 * xq   # control point: (mid, 2 * apex)
    py = 0.7 * u * (1 - u) * (xq - xk)
    loop, angle = (xk == xq)[:, 0], np.linspace(-np.pi / 3, 4 * np.pi / 3, 17)[None, :]
    px[loop], py[loop] = xk[loop] + 0.08 * np.cos(angle), 0.1 + 0.06 * np.sin(angle)
    lines = LineCollection(np.stack([px, py], axis=-1), linewidths=widths, colors=colors, alpha=0.35, zorder=3,
                           linestyles=["--" if d else "-" for d in dashed])
    lines.set_gid(gid)
    ax.add_collection(lines)


def segment_ticks(ax, layout, axis: str = "both") -> None:
    """Segment boundaries as thin lines and segment names as ticks at their middles (token cells
    centred on integers, as imshow draws them)."""
    t = layout.table
    mids = [s + z / 2 for s, z in zip(t.starts, t.sizes)]
    for start in t.starts[1:]:
        if axis in ("both", "x"):
            ax.axvline(start - 0.5, color=BOUNDARY_COLOR, lw=0.6)
        if axis in ("both", "y"):
            ax.axhline(start - 0.5, color=BOUNDARY_COLOR, lw=0.6)
    if axis in ("both", "x"):
        ax.set_xticks([m - 0.5 for m in mids])
        ax.set_xticklabels(t.names, rotation=60, fontsize=7, ha="right")
    if axis in ("both", "y"):
        ax.set_yticks([m - 0.5 for m in mids])
        ax.set_yticklabels(t.names, fontsize=7)


def frame_cuts(spec, max_lines: int = 400) -> list[int]:
    """Token indices where a new video frame starts (inside video segments)."""
    t = spec.table
    cuts = []
    for s, seg in enumerate(spec.segments):
        if seg["modality"] != "video":
            continue
        T, H, W = seg["grid"]
        cuts += [t.starts[s] + f * H * W for f in range(1, T)]
    return cuts if len(cuts) <= max_lines else []


def modality_legend(spec, ax, **kw):
    mods = list(dict.fromkeys(s["modality"] for s in spec.segments))
    handles = [Patch(facecolor=MODALITY_COLORS[m], label=m) for m in mods]
    return ax.legend(handles=handles, **kw)


# ---------------------------------------------------------------- matrices
def heatmap(m, names, title: str, cmap, vmin, vmax) -> Figure:
    """A segment x segment matrix with names on both axes and values written in (up to 12 names)."""
    fig = new_figure((6.5, 5.5))
    ax = fig.add_subplot(111)
    img = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(m[i, j]) < 0.6 * max(abs(vmin), abs(vmax)) else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04)
    tight(fig)
    return fig


def message_figure(text: str, figsize=(8, 2.2)) -> Figure:
    """A picture that says why there is no picture yet (a view drawn on demand)."""
    fig = new_figure(figsize)
    ax = fig.add_subplot(111)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, wrap=True, transform=ax.transAxes)
    return fig
