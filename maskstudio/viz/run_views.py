"""Views of a run: what a model did with a mask. The attention map, segment mass (one layer and
layer by layer), rollout, an A/B comparison (mask difference, KL per position, mass difference),
a knockout sweep, attention over an image (heat overlay on the picture) and the share of attention
going to visual tokens, and an evaluation summary.

Each function takes a run's result object (RunResult / Comparison / Knockout, read by attribute)
and returns a matplotlib Figure (or None when the run recorded nothing to draw). The numbers come
from maskstudio.run.measures; nothing here loads or runs a model.
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .figures import ALLOWED_COLOR, PALETTE, heatmap, new_figure, segment_colors, segment_ticks, tight


# ---------------------------------------------------------------- one run
def _token_labels(result, n: int) -> list[str] | None:
    """The run's tokens in layout order, one label each, when there are few enough to read."""
    from ..knobs import TOKEN_LABEL_MAX

    toks = [t for s in result.layout.segments for t in result.tokens.get(s["name"], [])]
    if n > TOKEN_LABEL_MAX or len(toks) < n:
        return None
    return [repr(t)[1:-1][:12] if t.strip() else repr(t) for t in toks[:n]]


def attention_figure(result, layer: int, head: int | None) -> Figure | None:
    """Attention probabilities of one layer for one head (None: the head mean), sqrt colour scale."""
    if result.attentions is None:
        return None
    att = result.attentions
    m = att[layer].float().mean(0) if head is None else att[layer, head].float()
    which = "mean over heads" if head is None else f"head {head}"
    fig = new_figure((7.5, 6.5))
    ax = fig.add_subplot(111)
    img = ax.imshow(m.numpy() ** 0.5, cmap="magma", interpolation="nearest", vmin=0, vmax=1)
    segment_ticks(ax, result.layout)
    labels = _token_labels(result, m.shape[0])
    if labels is not None:  # small runs: every token named on both axes, like the mask picture
        ticks = list(range(len(labels)))
        ax.set_xticks(ticks, labels, rotation=90, fontsize=6, family="monospace")
        ax.set_yticks(ticks, labels, fontsize=6, family="monospace")
    ax.set_xlabel("key token", fontsize=8)
    ax.set_ylabel("query token", fontsize=8)
    ax.set_title(f"{result.model}: attention, layer {layer}, {which} (sqrt scale)", fontsize=9)
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04)
    tight(fig)
    return fig


def segment_mass_figure(result, layer: int | None = None) -> Figure | None:
    """Segment-mass heatmap (rows = query segment, cols = key segment) at one layer (default last)."""
    if result.segment_mass is None:
        return None
    mass = result.segment_mass
    layer = mass.shape[0] - 1 if layer is None else layer
    return heatmap(mass[layer].numpy(), result.segment_names,
                   f"attention mass per segment pair, layer {layer} (rows: query, cols: key)", "viridis", 0, 1)


def mass_curves_figure(result) -> Figure | None:
    """Per-layer curves: for the last segment's queries, the mass on each key segment by layer."""
    if result.segment_mass is None:
        return None
    mass = result.segment_mass
    names = result.segment_names
    q = len(names) - 1
    fig = new_figure((8, 4.2))
    ax = fig.add_subplot(111)
    colors = segment_colors(result.layout)
    for k, name in enumerate(names):
        ax.plot(range(mass.shape[0]), mass[:, q, k].numpy(), marker=".", color=colors[k], label=name)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("attention mass", fontsize=8)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=min(4, len(names)))
    ax.set_title(f"where '{names[q]}' reads from, layer by layer", fontsize=9)
    tight(fig)
    return fig


def rollout_figure(result) -> Figure | None:
    """Attention rollout through all layers, colour clipped at the 99th percentile."""
    if result.rollout is None:
        return None
    fig = new_figure((7.5, 6.5))
    ax = fig.add_subplot(111)
    m = result.rollout.numpy()
    rest = m[:, 1:] if m.shape[1] > 1 else m  # the first token is usually an attention sink
    vmax = float(np.quantile(rest, 0.99)) if rest.size else 1.0
    img = ax.imshow(m, cmap="magma", interpolation="nearest", vmin=0, vmax=max(vmax, 1e-6))
    segment_ticks(ax, result.layout)
    ax.set_title("attention rollout through all layers (colour clipped at the 99th percentile "
                 "of non-first tokens)", fontsize=9)
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04)
    tight(fig)
    return fig


# ---------------------------------------------------------------- A vs B
def mask_diff_figure(a, b) -> Figure:
    """Where two masks of the same token count differ: dark = both, blue = only A, red = only B."""
    ma, mb = a.dense_mask(), b.dense_mask()
    rgb = np.full((a.n, a.n, 3), 255, np.uint8)
    rgb[(ma & mb).numpy()] = (31, 42, 68)
    rgb[(ma & ~mb).numpy()] = (59, 111, 182)
    rgb[(~ma & mb).numpy()] = (200, 66, 74)
    fig = new_figure((7, 6.5))
    ax = fig.add_subplot(111)
    ax.imshow(rgb, interpolation="nearest")
    segment_ticks(ax, a)
    changed = int((ma ^ mb).sum())
    ax.set_title(f"A vs B: dark = both, blue = only A, red = only B  ({changed} pairs differ)", fontsize=9)
    tight(fig)
    return fig


def kl_figure(cmp) -> Figure:
    """Next-token KL(A || B) per position of a comparison."""
    fig = new_figure((9, 3.8))
    ax = fig.add_subplot(111)
    ax.bar(range(len(cmp.kl)), cmp.kl.numpy(), color="#c8424a", width=1.0)
    segment_ticks(ax, cmp.a.layout, axis="x")
    ax.set_ylabel("KL(A || B)", fontsize=8)
    ax.set_title("next-token KL divergence per position", fontsize=9)
    tight(fig)
    return fig


def mass_diff_figure(cmp) -> Figure | None:
    """Segment mass B - A at the last layer (None when the runs recorded no attention)."""
    if cmp.mass_diff is None:
        return None
    m = cmp.mass_diff[-1].numpy()
    lim = max(float(np.abs(m).max()), 1e-6)
    return heatmap(m, cmp.a.segment_names, "segment mass B - A, last layer", "RdBu_r", -lim, lim)


def knockout_figure(ko) -> Figure:
    """p(token) with the q -> k edge blocked in each window of layers, against the intact run."""
    fig = new_figure((8, 4))
    ax = fig.add_subplot(111)
    mids = [(a + b) / 2 for a, b in ko.windows]
    ax.plot(mids, ko.probs, marker="o", color="#c8424a", label="edge blocked")
    ax.axhline(ko.base_prob, color=ALLOWED_COLOR, ls="--", label="intact")
    ax.set_xlabel(f"layer window centre (window {ko.window})", fontsize=8)
    ax.set_ylabel(f"p({ko.token!r})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"knockout {ko.q} -> {ko.k}", fontsize=9)
    tight(fig)
    return fig


# ---------------------------------------------------------------- vision-language runs
def image_overlay(result, segment: str | None = None, query=-1, layer: int | None = None,
                  head: int | None = None, max_frames: int = 8) -> Figure:
    """Heat overlay of run.image_attention on the segment's image (one panel per frame, up to
    max_frames). layer None = last layer; head None = mean over heads."""
    from ..run.measures import first_visual, image_attention, query_index

    att = image_attention(result, segment, query, layer, head)
    t = result.layout.table
    segment = segment or first_visual(result.layout)
    vis = getattr(result, "visuals", {}).get(segment)
    frames = vis["frames"] if vis else []
    T = att.shape[0]
    shown = min(T, max_frames)
    fig = new_figure((max(3.2 * shown + 1.0, 5.0), 3.8))
    vmax = float(att.max()) or 1.0
    per = max(1, len(frames) // T) if frames else 1
    q = query_index(result, query)
    im = None
    for i in range(shown):
        ax = fig.add_subplot(1, shown, i + 1)
        if frames:
            img = np.asarray(frames[min(i * per, len(frames) - 1)])
            ax.imshow(img, extent=(0, img.shape[1], img.shape[0], 0))
            extent = (0, img.shape[1], img.shape[0], 0)
        else:
            extent = (0, att.shape[2], att.shape[1], 0)
        im = ax.imshow(att[i].numpy(), cmap="inferno", alpha=0.6 if frames else 1.0, vmin=0, vmax=vmax,
                       extent=extent, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"frame {i}" if T > 1 else f"{segment} {list(att.shape[1:])}", fontsize=9)
    lay = result.attentions.shape[0] - 1 if layer is None else layer % result.attentions.shape[0]
    fig.suptitle(f"attention from {t.label(q)} (token {q}) to '{segment}'\nlayer {lay}, "
                 f"{'mean of heads' if head is None else f'head {head}'}; total {float(att.sum()):.3f}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.8, label="attention")
    return fig


def visual_share_figure(result, query=-1) -> Figure:
    """Per-layer share of attention that `query` (token, segment name or "all") gives to all
    image/video tokens, against the share of tokens that are visual (run.visual_share)."""
    from ..run.measures import visual_share

    share, label, visual_fraction = visual_share(result, query)
    fig = new_figure((5.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(len(share)), share.numpy(), marker="o")
    ax.axhline(visual_fraction, color="grey", ls="--", lw=1, label="visual share of tokens")
    ax.set_xlabel("layer"), ax.set_ylabel("attention to visual tokens")
    ax.set_xticks(range(len(share)))
    ax.set_ylim(0, 1)
    ax.set_title(f"share of attention to image/video tokens, query {label}", fontsize=9)
    ax.legend(fontsize=8)
    tight(fig)
    return fig


# ---------------------------------------------------------------- evaluation
def evaluation_figure(summary: dict) -> Figure:
    """Accuracy (by the task's breakdown) and target NLL per spec, with bootstrap 95% intervals."""
    specs = summary["specs"]
    fig = new_figure((10, 3.6))
    ax_b, ax_n = fig.add_subplot(1, 3, (1, 2)), fig.add_subplot(1, 3, 3)
    groups = specs[0].get("breakdown", {}).get("groups", [])
    width = 0.8 / len(specs)
    for i, e in enumerate(specs):
        color = PALETTE[i % len(PALETTE)]
        if groups:
            rows = e["breakdown"]["groups"]
            x = np.arange(len(rows)) + (i - (len(specs) - 1) / 2) * width
            acc = np.array([g["accuracy"] for g in rows])
            lo = np.array([g["ci"][0] for g in rows])
            hi = np.array([g["ci"][1] for g in rows])
            ax_b.bar(x, acc, width, color=color, label=e["name"], yerr=np.vstack([acc - lo, hi - acc]), capsize=3,
                     error_kw={"lw": 0.8})
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
    tight(fig)
    return fig


# ---------------------------------------------------------------- training
def loss_curve_figure(losses_by_name: dict, title: str = "training loss") -> Figure:
    """Per-step training loss of each named run (e.g. the causal baseline and the design), one
    line each; a moving average is drawn over the raw steps when a run is long enough to be noisy."""
    fig = new_figure((8, 3.6))
    ax = fig.add_subplot(111)
    for i, (name, losses) in enumerate(losses_by_name.items()):
        y = np.asarray(list(losses), dtype=float)
        if not len(y):
            continue
        x = np.arange(1, len(y) + 1)
        color = PALETTE[i % len(PALETTE)]
        window = max(1, len(y) // 10)
        if window > 1:
            ax.plot(x, y, color=color, alpha=0.3, lw=0.8)
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            ax.plot(x[window - 1:], smooth, color=color, lw=1.6, label=f"{name} (mean of {window})")
        else:
            ax.plot(x, y, color=color, lw=1.6, marker="o" if len(y) <= 30 else None, ms=3, label=name)
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.set_ylabel("loss (nats / target token)", fontsize=8)
    ax.grid(alpha=0.3)
    if losses_by_name:
        ax.legend(fontsize=8, frameon=False)
    ax.set_title(title, fontsize=9)
    tight(fig)
    return fig
