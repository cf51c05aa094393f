"""Pictures of head-level experiments (run.heads): a head knockout / patch against its noise band,
a segment knockout sweep with its band, and designs compared head by head on the model.
Matplotlib figures, no model here."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .figures import ALLOWED_COLOR, new_figure, segment_ticks, tight
from .run_views import knockout_figure

BAND_COLOR = "#9aa5b8"


def head_effect_figure(effect) -> Figure:
    """The change of p(token) from editing the chosen heads (and each alone) beside the changes
    from random head sets of the same size (dots) and their 5-95 % band (grey)."""
    fig = new_figure((8, 3.8))
    ax = fig.add_subplot(111)
    names = ["chosen heads"] + [f"{a}.{b} alone" for a, b in effect.heads[:len(effect.per_head)]]
    values = [effect.delta] + list(effect.per_head)
    if effect.noise:
        lo, hi = np.percentile(effect.noise, [5, 95])
        ax.axhspan(lo, hi, color=BAND_COLOR, alpha=0.35, label=f"noise band (5-95 % of {len(effect.noise)} random edits)")
        ax.scatter(np.full(len(effect.noise), -1.0) + np.linspace(-0.25, 0.25, len(effect.noise)), effect.noise,
                   s=10, color="#555", label="random heads, same count")
    colors = ["#c8424a"] + ["#e08a2c"] * (len(values) - 1)
    ax.bar(range(len(values)), values, color=colors, width=0.6)
    ax.axhline(0, color=ALLOWED_COLOR, lw=0.8)
    ax.set_xticks([-1] + list(range(len(values))), ["random"] + names, rotation=30, ha="right", fontsize=7)
    what = "knocked out" if effect.mode == "knockout" else "patched from B"
    ax.set_ylabel(f"change of p({effect.token!r})", fontsize=8)  # tight(): every text plain, never math
    ax.set_title(f"{len(effect.heads)} head(s) {what}: p {effect.base_prob:.3f} -> {effect.prob:.3f}", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="best")
    tight(fig)
    return fig


def knockout_band_figure(ko) -> Figure:
    """The segment knockout sweep (run_views.knockout_figure) with its noise band around the intact p."""
    fig = knockout_figure(ko)
    if ko.noise:
        ax = fig.axes[0]
        lo, hi = ko.band
        ax.axhspan(ko.base_prob + lo, ko.base_prob + hi, color=BAND_COLOR, alpha=0.35,
                   label=f"noise band ({len(ko.noise)} random key windows)")
        ax.legend(fontsize=8)
    return fig


def compare_heads_figure(cmps: list, names: list[str]) -> Figure:
    """A against B, C, ...: next-token KL per position (one line each) and, per design, how much
    each layer x head's attention differs from A's (mean total variation over query rows)."""
    k = len(cmps)
    heads = [c.head_diff for c in cmps if c.head_diff is not None]
    fig = new_figure((10, 3.4 + (2.6 * k if heads else 0)))
    grid = fig.add_gridspec(1 + (k if heads else 0), 1)
    ax = fig.add_subplot(grid[0])
    for c, name in zip(cmps, names):
        ax.plot(range(len(c.kl)), c.kl.numpy(), lw=1.2, label=f"A || {name}")
    segment_ticks(ax, cmps[0].a.layout, axis="x")
    ax.set_ylabel("KL", fontsize=8)
    ax.set_title("next-token KL divergence of A from each design, per position", fontsize=9)
    ax.legend(fontsize=7)
    if heads:
        top = max(float(h.max()) for h in heads) or 1.0
        for i, (c, name) in enumerate(zip(cmps, names)):
            if c.head_diff is None:
                continue
            hx = fig.add_subplot(grid[1 + i])
            img = hx.imshow(c.head_diff.numpy().T, cmap="viridis", vmin=0, vmax=top, aspect="auto",
                            interpolation="nearest")
            hx.set_xlabel("layer", fontsize=8)
            hx.set_ylabel("head", fontsize=8)
            hx.set_title(f"{name} vs A: attention difference per layer x head (mean total variation over queries)",
                         fontsize=9)
            fig.colorbar(img, ax=hx, fraction=0.03, pad=0.02)
    tight(fig)
    return fig
