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

from .figures import (ALLOWED_COLOR, MASKED_COLOR, PALETTE, heatmap, info, new_figure, plain_text, segment_colors,
                      segment_ticks, tight)


# ---------------------------------------------------------------- one run
def run_token_labels(result) -> list[str]:
    """Every prompt token of a run in layout order, as shown on axes ('\\n' for a newline); a
    segment without recorded tokens is named `segment[i]`."""
    t = result.layout.table
    out = []
    for s, seg in enumerate(result.layout.segments):
        toks = list(result.tokens.get(seg["name"], []))
        for i in range(t.sizes[s]):
            tok = toks[i] if i < len(toks) else None
            out.append(f"{seg['name']}[{i}]" if tok is None else
                       (repr(tok)[1:-1][:12] if tok.strip() else repr(tok)))
    return out


def _label_ticks(result, n: int) -> tuple[list[int], list[str]]:
    """Token ticks: every token up to TOKEN_LABEL_MAX, past that about 48 evenly spaced ones."""
    from ..knobs import TOKEN_LABEL_MAX

    labels = run_token_labels(result)[:n]
    step = 1 if n <= TOKEN_LABEL_MAX else max(1, -(-n // 48))
    ticks = list(range(0, len(labels), step))
    return ticks, [f"{i}:{labels[i]}" if step > 1 else labels[i] for i in ticks]


def _focus_box(ax, token: int, n: int) -> None:
    """Outline the focus token's row (what it attends to) and column (what attends to it)."""
    from matplotlib.patches import Rectangle

    for xy, w, h, col in (((-0.5, token - 0.5), n, 1, "#2ec4d6"), ((token - 0.5, -0.5), 1, n, "#7fff7f")):
        ax.add_patch(Rectangle(xy, w, h, fill=False, edgecolor=col, lw=1.4))


def attention_figure(result, layer: int, head: int | None, token: int | None = None) -> Figure | None:
    """Attention probabilities of one layer for one head (None: the head mean), sqrt colour scale;
    `token`: its row (cyan: what it attends to) and column (green: what attends to it) outlined."""
    if result.attentions is None:
        return None
    att = result.attentions
    m = att[layer].float().mean(0) if head is None else att[layer, head].float()
    which = "mean over heads" if head is None else f"head {head}"
    n = m.shape[0]
    fig = new_figure((7.5, 6.5))
    ax = fig.add_subplot(111)
    img = ax.imshow(m.numpy() ** 0.5, cmap="magma", interpolation="nearest", vmin=0, vmax=1)
    segment_ticks(ax, result.layout)
    ticks, labels = _label_ticks(result, n)
    fs = 6 if len(ticks) <= 64 else 5
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fs, family="monospace")
    ax.set_yticks(ticks, labels, fontsize=fs, family="monospace")
    ax.set_xlabel("key token (attended)", fontsize=8)
    ax.set_ylabel("query token (attending)", fontsize=8)
    focus = ""
    if token is not None and 0 <= token < n:
        _focus_box(ax, token, n)
        focus = f"\ntoken {token} {run_token_labels(result)[token]}: row (cyan) = what it attends to, " \
                f"column (green) = what attends to it"
    ax.set_title(f"{result.layout.name} on {result.model}: attention, layer {layer}, {which} (sqrt scale){focus}",
                 fontsize=9)
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04)
    tight(fig)
    return fig


def token_focus_figure(result, layer: int, head: int | None, token: int, k: int = 10) -> Figure | None:
    """Two bar charts for one token at one layer: the k tokens it attends to most (its row) and the
    k tokens that attend to it most (its column), coloured by segment."""
    if result.attentions is None:
        return None
    att = result.attentions
    m = (att[layer].float().mean(0) if head is None else att[layer, head].float()).numpy()
    labels = run_token_labels(result)
    seg = result.layout.table["segment"].tolist()
    colors = segment_colors(result.layout)
    fig = new_figure((9, 3.6))
    for i, (vals, what) in enumerate(((m[token, :], f"what {token}:{labels[token]} attends to"),
                                      (m[:, token], f"what attends to {token}:{labels[token]}"))):
        ax = fig.add_subplot(1, 2, i + 1)
        top = [j for j in np.argsort(-vals, kind="stable")[:k] if vals[j] > 0]
        ax.barh(range(len(top)), [vals[j] for j in top], color=[colors[seg[j]] for j in top])
        ax.set_yticks(range(len(top)), [f"{j}:{labels[j]}" for j in top], fontsize=7, family="monospace")
        for y, j in enumerate(top):
            ax.text(vals[j], y, f" {vals[j]:.3f}", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max([vals[j] for j in top], default=1) * 1.3)
        ax.set_title(what, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("attention probability", fontsize=8)
    fig.suptitle(f"layer {layer}, {'mean over heads' if head is None else f'head {head}'}: top {k}", fontsize=9)
    tight(fig)
    return fig


def _pooled(m: np.ndarray, cells: int) -> np.ndarray:
    """Max-pool an [N, N] map to at most `cells` a side (thin diagonals stay visible)."""
    n = m.shape[0]
    f = max(1, -(-n // cells))
    t = -(-n // f)
    pad = np.zeros((t * f, t * f), m.dtype)
    pad[:n, :n] = m
    return pad.reshape(t, f, t, f).max((1, 3))


def attention_grid_figure(result, layer: int | None = None, head: int | None = None, cells: int = 48) -> Figure | None:
    """Thumbnails of every recorded layer (columns) x head (rows), sqrt scale (max-pooled to `cells`
    a side); the map shown large (layer, head) is outlined."""
    if result.attentions is None:
        return None
    att = result.attentions.float()
    L, H = att.shape[:2]
    thumbs = [[_pooled(att[lay, h].numpy(), cells) for lay in range(L)] for h in range(H)]
    c = thumbs[0][0].shape[0]
    gap = max(1, c // 8)
    mosaic = np.full((H * (c + gap) - gap, L * (c + gap) - gap), np.nan)
    for h in range(H):
        for lay in range(L):
            mosaic[h * (c + gap):h * (c + gap) + c, lay * (c + gap):lay * (c + gap) + c] = thumbs[h][lay] ** 0.5
    fig = new_figure((min(max(0.42 * L + 1.4, 5), 16), max(0.42 * H + 1.3, 2.6)))
    ax = fig.add_subplot(111)
    cmap = matplotlib_cmap("magma").with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    mids = [i * (c + gap) + (c - 1) / 2 for i in range(max(L, H))]
    ax.set_xticks(mids[:L], [str(i) for i in range(L)], fontsize=7)
    ax.set_yticks(mids[:H], [str(i) for i in range(H)], fontsize=7)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("head", fontsize=8)
    ax.tick_params(length=0)
    if layer is not None:
        from matplotlib.patches import Rectangle

        rows = range(H) if head is None else [head]
        for h in rows:
            ax.add_patch(Rectangle((layer * (c + gap) - 0.5 - gap / 2, h * (c + gap) - 0.5 - gap / 2), c + gap,
                                   c + gap, fill=False, edgecolor="#2ec4d6", lw=1.5))
    ax.set_title(f"{result.layout.name} on {result.model}: attention of every layer x head ({L} x {H}, sqrt scale);"
                 f" outlined: the map shown above", fontsize=9)
    tight(fig)
    return fig


def matplotlib_cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].copy()


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


ROLLOUT_CAPTION = ("Rollout (Abnar & Zuidema 2020): how much of this token's last-layer state traces back to each "
                   "input token, multiplying\n(1/2 I + 1/2 mean-of-heads attention) up through every layer (residual "
                   "counted). Large on the first token = an attention sink.\nA flow estimate, not a causal effect "
                   "(Knockout measures that).")


def rollout_figure(result, token: int | None = None) -> Figure | None:
    """Attention rollout read from one token (default: the last, the one that predicts): its row
    over the input tokens, coloured by segment, and the share each segment gets, with a caption."""
    if result.rollout is None:
        return None
    m = result.rollout.float().numpy()
    n = m.shape[0]
    token = n - 1 if token is None or not 0 <= int(token) < n else int(token)
    row = m[token]
    t = result.layout.table
    seg = t["segment"].numpy()
    colors = segment_colors(result.layout)
    labels = run_token_labels(result)
    share = np.array([row[seg == s].sum() for s in range(len(t.names))])
    fig = new_figure((10, 4.4))
    gs = fig.add_gridspec(2, 2, width_ratios=[2.4, 1], height_ratios=[1, 0.16], wspace=0.25, hspace=0.5,
                          left=0.07, right=0.97, top=0.86, bottom=0.05)
    ax, bx, cx = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, :])
    ax.bar(range(n), row, width=1.0, color=[colors[s] for s in seg])
    segment_ticks(ax, result.layout, axis="x")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylabel("rollout weight", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    order = np.argsort(-row, kind="stable")
    second = float(row[order[1]]) if n > 1 else float(row.max())
    top = second * 1.5 if row.max() > 3 * second > 0 else float(row.max()) * 1.25  # a sink is clipped, said
    for rank, j in enumerate(order[:3]):  # the three largest named
        y = min(float(row[j]), top / 1.12)
        text = f"{j}:{labels[j]}" + (f" = {row[j]:.2f} (clipped)" if row[j] > top else "")
        ax.annotate(text, (j, y), xytext=(3, 2 + 9 * rank), textcoords="offset points", fontsize=7, ha="left",
                    va="bottom", family="monospace")
    ax.set_ylim(0, max(top, 1e-6))
    y = np.arange(len(t.names))
    bx.barh(y, share, color=colors)
    bx.set_yticks(y, t.names, fontsize=7)
    for yy, v in zip(y, share):
        bx.text(v, yy, f" {v:.2f}", va="center", fontsize=7)
    bx.invert_yaxis()
    bx.set_xlim(0, 1.15)
    bx.tick_params(axis="x", labelsize=7)
    bx.set_title("share per segment", fontsize=9)
    cx.axis("off")
    cx.text(0, 0.5, ROLLOUT_CAPTION, fontsize=7.5, va="center", ha="left", transform=cx.transAxes)
    fig.suptitle(f"attention rollout from token {token} {labels[token]} ({t.label(token)}) over the input, "
                 f"through all {result.attentions.shape[0] if result.attentions is not None else ''} layers",
                 fontsize=10)
    info(fig, "rollout", token=token, share=dict(zip(t.names, share.tolist())))
    return plain_text(fig)


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


DIFF_COLORS = {"both": (31, 42, 68), "only_this": (59, 111, 182), "only_a": (200, 66, 74), "split": (240, 160, 30)}


def masks_compare_figure(specs: list, names: list[str]) -> Figure:
    """Designs side by side (A, B, C, ...): A's mask, then each other design against A (dark = both
    allow, blue = only this design, red = only A); with three or more designs of one token count a
    last panel marks (orange) every cell where the designs do not all agree. A design of another
    token count is drawn alone and said so. fig.maskstudio["compare"]: pairs differing from A."""
    masks = [sp.dense_mask() for sp in specs]
    a = masks[0]
    same = [m.shape == a.shape for m in masks]
    k = len(specs) + (1 if len(specs) >= 3 and sum(same) >= 3 else 0)
    cols = min(k, 3)
    rows = -(-k // cols)
    fig = new_figure((4.3 * cols, 4.3 * rows + 0.4))
    differ = []
    for i, (sp, m) in enumerate(zip(specs, masks)):
        ax = fig.add_subplot(rows, cols, i + 1)
        rgb = np.full((*m.shape, 3), 255, np.uint8)
        if i == 0 or not same[i]:
            rgb[m.numpy()] = DIFF_COLORS["both"]
            note = "(A)" if i == 0 else f"({sp.n} tokens: not compared with A's {specs[0].n})"
            differ.append(0 if i == 0 else None)
        else:
            rgb[(m & a).numpy()] = DIFF_COLORS["both"]
            rgb[(m & ~a).numpy()] = DIFF_COLORS["only_this"]
            rgb[(~m & a).numpy()] = DIFF_COLORS["only_a"]
            differ.append(int((m ^ a).sum()))
            note = f"{differ[-1]:,} pairs differ from A"
        ax.imshow(rgb, interpolation="nearest")
        segment_ticks(ax, sp)
        ax.set_title(f"{chr(65 + i) if i < 26 else i}: {_wrapped(names[i], 36)}\n{note}", fontsize=9)
    if k > len(specs):
        stack = torch_stack([m for m, ok in zip(masks, same) if ok])
        allowed = stack.sum(0)
        split = (allowed > 0) & (allowed < stack.shape[0])
        rgb = np.full((*a.shape, 3), 255, np.uint8)
        rgb[(allowed == stack.shape[0]).numpy()] = DIFF_COLORS["both"]
        rgb[split.numpy()] = DIFF_COLORS["split"]
        ax = fig.add_subplot(rows, cols, k)
        ax.imshow(rgb, interpolation="nearest")
        segment_ticks(ax, specs[0])
        ax.set_title(f"where the {stack.shape[0]} designs disagree (orange: {int(split.sum()):,} pairs)\n"
                     f"dark: all allow", fontsize=9)
    fig.suptitle("designs side by side: dark = allowed in both, blue = only this design, red = only A", fontsize=10)
    info(fig, "compare", differ=differ, names=list(names))
    tight(fig)
    return fig


def torch_stack(masks):
    import torch

    return torch.stack(masks).to(torch.int32)


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
    ax_n.set_yticks(range(len(specs)), [_wrapped(e["name"], 22) for e in specs], fontsize=7)
    ax_n.set_xlabel("target NLL (nats/token)", fontsize=8)
    ax_n.invert_yaxis()
    ax_n.set_title("mean NLL, 95% CI", fontsize=9)
    tight(fig)
    return fig


# ---------------------------------------------------------------- training
def _wrapped(name: str, width: int) -> str:
    """A name whole, broken into lines of about `width` characters (never cut: an edited design's
    name differs from its template's only at the end)."""
    import textwrap

    return "\n".join(textwrap.wrap(name, width, break_long_words=True, break_on_hyphens=False)) or name


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
