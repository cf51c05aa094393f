"""What a run's attention and logits say, as pure tensor computations (no plotting, no model).

Every function takes the recorded tensors (or a RunResult, read duck-typed: `layout`, `input_ids`,
`attentions`) and returns tensors and numbers; maskstudio.viz draws pictures on top of them.
"""
from __future__ import annotations

import torch

from ..errors import RunError

VISUAL = ("image", "video")   # modalities that come as pictures (grid segments)


def segment_mass(attentions: torch.Tensor, layout) -> torch.Tensor:
    """[L, S, S]: mean over heads and over a query segment's tokens of the attention mass that
    lands on each key segment (rows sum to 1 where the segment attends anything)."""
    seg = layout.table["segment"]
    onehot = torch.nn.functional.one_hot(seg, len(layout.segments)).float()  # [N, S]
    per_token = attentions.float().mean(1) @ onehot                          # [L, N, S]
    return (onehot.T @ per_token) / onehot.sum(0)[None, :, None]


def rollout(attentions: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): A_l = residual * I + (1 - residual) * mean_h P_l,
    rows renormalized, multiplied from the first layer up -> [N, N] (query -> input token)."""
    n = attentions.shape[-1]
    eye = torch.eye(n)
    out = eye
    for layer in attentions.float():
        a = residual * eye + (1 - residual) * layer.mean(0)
        a = a / a.sum(-1, keepdim=True)
        out = a @ out
    return out


def target_nll(layout, logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """Teacher-forced NLL of each `target` segment: token j is predicted from position j - 1.
    {name: {"mean", "sum", "tokens", "per_token"}} (nats)."""
    out = {}
    logp = None
    for i, s in enumerate(layout.segments):
        if "target" not in s.get("role", []):
            continue
        logp = torch.log_softmax(logits.float(), -1) if logp is None else logp
        start, size = layout.table.starts[i], layout.table.sizes[i]
        pos = torch.arange(max(start, 1), start + size)
        if len(pos) == 0:
            continue
        vals = -logp[pos - 1, ids[pos]]
        out[s["name"]] = {"mean": float(vals.mean()), "sum": float(vals.sum()), "tokens": len(pos),
                          "per_token": vals.tolist()}
    return out


def query_index(result, query) -> int:
    """A token index (negative counts from the end) or a segment name (its last token) -> index."""
    n = len(result.input_ids)
    if isinstance(query, str):
        t = result.layout.table
        if query not in t.names:
            raise RunError(f"no segment named '{query}'")
        j = t.names.index(query)
        return t.starts[j] + t.sizes[j] - 1
    q = int(query)
    if not -n <= q < n:
        raise RunError(f"query {q} is outside the {n} tokens")
    return q % n


def _recorded(result) -> torch.Tensor:
    if result.attentions is None:
        raise RunError("this run recorded no attention maps; run with attentions=True")
    return result.attentions


def first_visual(layout) -> str | None:
    """The name of the layout's first image or video segment, or None."""
    return next((s["name"] for s in layout.segments if s["modality"] in VISUAL), None)


def visual_tokens(layout) -> torch.Tensor:
    """bool [N]: the tokens of image and video segments."""
    t = layout.table
    vis = torch.zeros(t.n, dtype=torch.bool)
    for j, s in enumerate(layout.segments):
        if s["modality"] in VISUAL:
            vis[t.segment_slice(j)] = True
    return vis


def _layer_map(att: torch.Tensor, layer, head) -> torch.Tensor:
    """[N, N] of one layer (None = last), one head (None = mean over heads)."""
    L, H = att.shape[:2]
    layer = L - 1 if layer is None else int(layer)
    if not -L <= layer < L:
        raise RunError(f"layer {layer} is outside 0..{L - 1}")
    a = att[layer].float()
    if head is None:
        return a.mean(0)
    if not 0 <= int(head) < H:
        raise RunError(f"head {head} is outside 0..{H - 1}")
    return a[int(head)]


def image_attention(result, segment: str | None = None, query=-1, layer: int | None = None,
                    head: int | None = None) -> torch.Tensor:
    """Attention from one query token to the segment's visual tokens, reshaped to [t, h, w].
    segment None = the first image/video segment; layer None = last layer; head None = mean over heads."""
    att = _recorded(result)
    t = result.layout.table
    segment = segment or first_visual(result.layout)
    if segment is None or segment not in t.names:
        raise RunError("the run has no image or video segment" if segment is None else f"no segment named '{segment}'")
    j = t.names.index(segment)
    grid = result.layout.segments[j].get("grid")
    if grid is None:
        raise RunError(f"segment '{segment}' is not an image or video segment")
    a = _layer_map(att, layer, head)
    q = query_index(result, query)
    T, h, w = ([1] + grid) if len(grid) == 2 else grid
    return a[q, t.segment_slice(j)].reshape(T, h, w)


def visual_share(result, query=-1) -> tuple[torch.Tensor, str, float]:
    """Per-layer share of attention (mean over heads) that `query` gives to all image/video tokens:
    the curve hallucination papers plot. query: a token index, a segment name (its last token), or
    "all" (mean over non-visual tokens after the first visual token).
    Returns (share [L], the query's label, the fraction of tokens that are visual)."""
    att = _recorded(result)
    t = result.layout.table
    vis = visual_tokens(result.layout)
    if not vis.any():
        raise RunError("the run has no image or video segment")
    a = att.float().mean(1)            # [L, N, N]
    if query == "all":
        first = int(torch.nonzero(vis)[0])
        rows = torch.nonzero(~vis & (torch.arange(t.n) > first)).flatten()
        share = a[:, rows][:, :, vis].sum(-1).mean(-1)
        label = "non-visual tokens after the image (mean)"
    else:
        q = query_index(result, query)
        share = a[:, q, vis].sum(-1)
        label = t.label(q)
    return share, label, float(vis.float().mean())
