"""Experiments built from ordinary runs: A/B comparison of two specs, and attention knockout."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..errors import RunError
from ..progress import tick
from ..spec import Spec
from .inputs import as_spec
from .models import load_model
from .pipeline import RunResult, run


@dataclass
class Comparison:
    a: RunResult
    b: RunResult
    kl: torch.Tensor              # [N] KL(a || b) of next-token distributions per position
    mass_diff: torch.Tensor | None  # [L, S, S] b - a
    head_diff: torch.Tensor | None = None  # [L, H] mean over queries of 0.5 * sum_k |b - a| (total variation)

    def summary(self) -> str:
        top = torch.topk(self.kl, min(5, len(self.kl)))
        t = self.a.layout.table
        lines = [f"KL(a||b) next-token: mean {float(self.kl.mean()):.4g}, last {float(self.kl[-1]):.4g}, "
                 f"max {float(self.kl.max()):.4g}",
                 "largest KL at " + ", ".join(f"{t.label(int(i))} ({float(v):.3g})"
                                              for v, i in zip(top.values, top.indices)),
                 f"{'top-k a':<30} {'top-k b':<30}"]
        for (ta, pa), (tb, pb) in zip(self.a.top_k, self.b.top_k):
            lines.append(f"{pa:6.3f} {json.dumps(ta, ensure_ascii=False):<23} {pb:6.3f} {json.dumps(tb, ensure_ascii=False)}")
        if self.a.new_ids or self.b.new_ids:
            lines += [f"continuation a: {json.dumps(self.a.text, ensure_ascii=False)}",
                      f"continuation b: {json.dumps(self.b.text, ensure_ascii=False)}"]
        if self.mass_diff is not None:
            lines.append(f"segment mass |b - a|, max over layers: {float(self.mass_diff.abs().max()):.4f}")
        if self.head_diff is not None:
            top = torch.topk(self.head_diff.flatten(), min(5, self.head_diff.numel()))
            H = self.head_diff.shape[1]
            lines.append("heads whose attention differs most (layer.head: mean total variation over queries): " +
                         ", ".join(f"{int(i) // H}.{int(i) % H} {float(v):.3f}" for v, i in zip(top.values, top.indices)))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"a": self.a.to_dict(), "b": self.b.to_dict(), "kl": self.kl.tolist(),
                           "mass_diff": self.mass_diff.tolist() if self.mass_diff is not None else None,
                           "head_diff": self.head_diff.tolist() if self.head_diff is not None else None},
                          ensure_ascii=False, indent=1) + "\n"


def compare(spec_a, spec_b, model=None, max_new_tokens: int = 0, attentions: bool = True, **kw) -> Comparison:
    """The same input under two specs: per-position KL, top-k and continuations, segment-mass difference.
    Both specs must tokenize to the same input ids (same texts, any masks/positions)."""
    lm = load_model(model)
    a = run(spec_a, lm, max_new_tokens=max_new_tokens, attentions=attentions, **kw)
    b = run(spec_b, lm, max_new_tokens=max_new_tokens, attentions=attentions, **kw)
    return comparison(a, b, spec_b)


def comparison(a: RunResult, b: RunResult, spec_b=None) -> Comparison:
    """Two runs of the same input tokens compared: KL per position, segment mass and per-head
    attention differences (heads: mean over query rows of the total variation between the rows)."""
    if not torch.equal(a.input_ids, b.input_ids):
        raise RunError("the two specs give different input tokens; compare specs with the same texts",
                       as_spec(spec_b) if spec_b is not None else None)
    la, lb = torch.log_softmax(a.logits, -1), torch.log_softmax(b.logits, -1)
    kl = (la.exp() * (la - lb)).sum(-1).clamp_min(0)
    both = a.segment_names == b.segment_names and a.segment_mass is not None and b.segment_mass is not None
    heads = None
    if a.attentions is not None and b.attentions is not None and a.attentions.shape == b.attentions.shape:
        heads = 0.5 * (b.attentions.float() - a.attentions.float()).abs().sum(-1).mean(-1)
    return Comparison(a, b, kl, b.segment_mass - a.segment_mass if both else None, heads)


@dataclass
class Knockout:
    q: object
    k: object
    window: int
    token: str
    token_id: int
    base_prob: float
    windows: list        # [(first layer, last layer)]
    probs: list          # probability of the original top token with the edge blocked
    layout: Spec
    noise: list = field(default_factory=list)  # changes from blocking random key windows (heads.knockout_band)

    @property
    def deltas(self) -> list[float]:
        return [p - self.base_prob for p in self.probs]

    def summary(self) -> str:
        lines = [f"knockout {self.q} -> {self.k}, window {self.window} layers; token "
                 f"{json.dumps(self.token, ensure_ascii=False)} p = {self.base_prob:.4f}"]
        for (lo, hi), p, d in zip(self.windows, self.probs, self.deltas):
            lines.append(f"  layers {lo:>2}-{hi:<2}  p = {p:.4f}  change {d:+.4f}{self._mark(d)}")
        if self.noise:
            lo, hi = self.band
            lines.append(f"noise band [{lo:+.4f}, {hi:+.4f}]: 5-95 % of {len(self.noise)} knockouts of a random key "
                         f"window of {self.k}'s size in a random layer window; * = a change outside it")
        return "\n".join(lines)

    @property
    def band(self) -> tuple[float, float] | None:
        """The 5-95 % range of the noise draws' changes (None without draws)."""
        if not self.noise:
            return None
        q = torch.quantile(torch.tensor(self.noise, dtype=torch.float64), torch.tensor([0.05, 0.95], dtype=torch.float64))
        return float(q[0]), float(q[1])

    def _mark(self, d: float) -> str:
        b = self.band
        return "" if b is None or b[0] <= d <= b[1] else "  *"

    def to_json(self) -> str:
        return json.dumps({"q": self.q, "k": self.k, "window": self.window, "token": self.token,
                           "token_id": self.token_id,
                           "base_prob": self.base_prob, "windows": self.windows, "probs": self.probs,
                           "deltas": self.deltas, "noise": self.noise, "band": self.band},
                          ensure_ascii=False, indent=1) + "\n"


def target_token(tokenizer, target: str | None, p_last: torch.Tensor) -> int:
    """The token to measure: the first token of `target` (e.g. " Rome"), or the current top-1."""
    if target is None or target == "":
        return int(p_last.argmax())
    ids = list(tokenizer.encode(target, add_special_tokens=False))
    if not ids:
        raise RunError(f"the target {target!r} has no tokens; give a word such as \" Rome\"")
    return int(ids[0])


def knockout(spec, q, k, window: int = 3, model=None, chat: bool = False, target: str | None = None,
             **kw) -> Knockout:
    """Attention knockout (Geva et al. 2023): block the edge q -> k in `window` consecutive layers,
    sliding over depth, and report the probability at the last position of `target`'s first token
    (default: the original top token). Each blocked edge is an ordinary per-layer overlay added to
    the spec (no special code)."""
    lm = load_model(model)
    base = run(spec, lm, attentions=False, chat=chat, **kw)
    layout = base.layout  # materialized once: chat segments and sizes stay fixed across windows
    p_base = torch.softmax(base.logits[-1], -1)
    top_id = target_token(lm.tokenizer, target, p_base)
    windows, probs = [], []
    L = lm.num_layers
    starts = range(0, max(L - window, 0) + 1)
    for lo in starts:
        if tick(f"window {lo + 1}/{len(starts)}"):  # Stop keeps the windows measured so far
            break
        layers = list(range(lo, min(lo + window, L)))
        data = layout.to_dict()
        data["mask"]["overlays"] = data["mask"]["overlays"] + [
            {"op": "and_not", "q": q, "k": k, "pattern": "full", "layers": layers}]
        r = run(data, lm, attentions=False, **kw)
        windows.append((layers[0], layers[-1]))
        probs.append(float(torch.softmax(r.logits[-1], -1)[top_id]))
    return Knockout(q, k, window, lm.tokenizer.decode([top_id]), top_id, float(p_base[top_id]), windows, probs, layout)
