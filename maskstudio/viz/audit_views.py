"""Pictures of a model audit (maskstudio.audit.Audit): the masks a model really builds, layer by
layer, against the design, and the position ids it really uses. The model's own mask is drawn by
the studio's mask view (segment bands, token labels) and its positions by the positions view;
differences use the compare colours: dark = both allow, blue = only your design, red = only the
model.
"""
from __future__ import annotations

import textwrap

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .figures import info, new_figure, segment_ticks, tight
from .run_views import DIFF_COLORS
from .spec_views import pool_factor, render, view_mask

PANELS_MAX = 12  # distinct layer groups drawn in the overview (the rest are said in its title)


class _ModelMasks:
    """The model's recorded per-layer masks in the shape view_mask reads (`head`, `mask(layer)`)."""

    def __init__(self, masks, head: int = 0):
        self.masks, self.head = masks, head

    def mask(self, layer: int = 0) -> torch.Tensor:
        return self.masks[layer]


def diff_rgb(yours: torch.Tensor, model: torch.Tensor, pixels: int = 800) -> np.ndarray:
    """RGB cells: dark = both allow, blue = only yours, red = only the model's; past `pixels` a
    side, each pixel shows the strongest thing in its cells (a difference wins over agreement)."""
    n = model.shape[0]
    f = pool_factor(n, pixels)

    def pooled(m: torch.Tensor) -> torch.Tensor:
        if f == 1:
            return m
        x = m.float()[None, None]
        return torch.nn.functional.max_pool2d(x, f, f, ceil_mode=True)[0, 0] > 0
    both, mine, theirs = pooled(yours & model), pooled(yours & ~model), pooled(model & ~yours)
    rgb = np.full((*both.shape, 3), 255, np.uint8)
    rgb[both.numpy()] = DIFF_COLORS["both"]
    rgb[mine.numpy()] = DIFF_COLORS["only_this"]
    rgb[theirs.numpy()] = DIFF_COLORS["only_a"]
    return rgb


def _legend(fig: Figure) -> None:
    handles = [Patch(color=np.array(DIFF_COLORS[k]) / 255, label=text) for k, text in
               (("both", "both allow"), ("only_this", "only your design"), ("only_a", "only the model"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)


def _groups(report) -> list[list[int]]:
    """Layers that look the same (one model mask, one difference) drawn once."""
    groups: dict[tuple, list[int]] = {}
    for d, mask in zip(report.layers, report.model.masks):
        groups.setdefault((id(mask), d.kind, d.body), []).append(d.layer)
    return list(groups.values())


def audit_layers_figure(report) -> Figure:
    """Every layer of the model against the design, layers that look the same drawn once."""
    from ..audit import layers_text
    from ..flow import LayerMasks

    groups = _groups(report)
    shown = groups[:PANELS_MAX]
    cols = min(len(shown), 3)
    rows = -(-len(shown) // cols)
    fig = new_figure((4.2 * cols, 4.2 * rows + 0.8))
    yours = LayerMasks(report.design, 0)
    for i, layers in enumerate(shown):
        d = report.layers[layers[0]]
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(diff_rgb(yours.mask(d.layer), report.model.masks[d.layer]), interpolation="nearest",
                  extent=(-0.5, report.design.table.n - 0.5, report.design.table.n - 0.5, -0.5))
        segment_ticks(ax, report.design)
        state = "same as your design" if d.same else f"{d.cells:,} cells differ"
        ax.set_title(f"{layers_text(layers)} ({d.kind})\n{state}", fontsize=9, color="#1f2a44" if d.same else "#b3261e")
    more = f"  ·  {len(groups) - len(shown)} more layer groups not drawn" if len(groups) > len(shown) else ""
    fig.suptitle(f"{report.model.name}: every layer against '{report.design.name}'{more}", fontsize=10)
    _legend(fig)
    tight(fig)
    fig.subplots_adjust(bottom=0.1 if rows == 1 else 0.06)
    info(fig, "audit_layers", groups=[list(g) for g in groups], differ=[d.cells for d in report.layers])
    return fig


def audit_layer_figure(report, layer: int = 0) -> Figure:
    """One layer: the model's own mask in the studio's mask view, and the design against it."""
    from ..flow import LayerMasks

    n_layers = report.model.num_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    d = report.layers[layer]
    fig = new_figure((15, 7.4))
    gs = fig.add_gridspec(1, 2, left=0.05, right=0.97, top=0.86, bottom=0.12, wspace=0.25)
    view_mask(report.design, fig, gs[0], layer=layer, masks=_ModelMasks(report.model.masks),
              title=f"{report.model.name}, layer {layer} ({d.kind}): its own mask")
    ax = fig.add_subplot(gs[1])
    yours = LayerMasks(report.design, 0).mask(layer)
    n = report.design.table.n
    ax.imshow(diff_rgb(yours, report.model.masks[layer]), interpolation="nearest",
              extent=(-0.5, n - 0.5, n - 0.5, -0.5))
    segment_ticks(ax, report.design)
    ax.set_title(f"your design against it: {'same' if d.same else f'{d.cells:,} cells differ'}", fontsize=10)
    words = textwrap.fill(textwrap.shorten(f"layer {layer}: {d.body}", 330, placeholder=" ..."), 165)
    fig.text(0.5, 0.985, words, ha="center", va="top", fontsize=9)
    _legend(fig)
    info(fig, "audit_layer", layer=layer, cells=d.cells, yours_only=d.yours_only, model_only=d.model_only)
    return fig


def audit_positions_figure(report) -> Figure | None:
    """The position ids the model really uses (the studio's positions view of the model's spec)."""
    spec = report.model_spec
    if spec is None or report.model.positions is None:
        return None
    scheme = spec.positions["scheme"]
    return render(spec, "positions", title=f"{report.model.name}: position ids it really uses ({scheme})")
