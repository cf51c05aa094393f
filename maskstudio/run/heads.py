"""Head-level experiments: knock chosen heads out, patch them from another design's run, compare
many designs head by head, and the noise band that says whether a change is an effect.

  knockout   zero the chosen heads' outputs (before the output projection) in the design's run;
  patch      replace them by the same heads' outputs in design B's run (same input tokens): how
             much of B's answer moves into A;
  noise      the same edit on random heads of the same count (R draws): the band of changes an
             arbitrary edit of that size makes. A change outside the band is an effect of those heads.
  knockout_band   the noise band of a segment knockout sweep (experiments.knockout): blocking the
             same readers from a random window of keys of the segment's size in a random window of
             layers of the sweep's size.

Every edit goes through attention.editing(HeadEdits(...)); the spec and its mask stay as they are.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

import torch

from ..errors import RunError
from ..progress import tick
from ..segments import resolve_selector
from .attention import HeadEdits, editing
from .experiments import Comparison, Knockout, comparison, target_token
from .inputs import as_spec
from .models import load_model
from .pipeline import run

NOISE_SAMPLES = 16          # random edits of the same size behind a noise band
HEADS_FORM = "'layer.head' items, e.g. '4.2, 5.*, 7.0-3, 10-12.1' (* = every head or layer)"


def _span(text: str, top: int, what: str) -> list[int]:
    text = text.strip()
    if text == "*":
        return list(range(top))
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not m:
        raise RunError(f"heads: '{text}' is not a {what} number or range; write {HEADS_FORM}")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo or hi >= top:
        raise RunError(f"heads: {what} {text} is outside 0-{top - 1}; write {HEADS_FORM}")
    return list(range(lo, hi + 1))


def parse_heads(text: str, num_layers: int, num_heads: int) -> list[tuple[int, int]]:
    """'4.2, 5.*, 7.0-3' -> sorted unique [(layer, head)]; a RunError naming the field otherwise."""
    items = [t for t in re.split(r"[,;\s]+", (text or "").strip()) if t]
    if not items:
        raise RunError(f"heads: name at least one head as {HEADS_FORM}")
    if len(items) > 1000:
        raise RunError("heads: at most 1000 items")
    out = set()
    for item in items:
        if item.count(".") != 1:
            raise RunError(f"heads: '{item[:40]}' needs one '.' between layer and head; write {HEADS_FORM}")
        lay, hd = item.split(".")
        out |= {(a, b) for a in _span(lay, num_layers, "layer") for b in _span(hd, num_heads, "head")}
    return sorted(out)


def format_heads(heads) -> str:
    return ", ".join(f"{a}.{b}" for a, b in heads)


def band(noise: list[float], low: float = 5, high: float = 95) -> tuple[float, float] | None:
    """The 5-95 % range of the noise draws' changes (None without draws)."""
    if not noise:
        return None
    q = torch.quantile(torch.tensor(noise, dtype=torch.float64), torch.tensor([low / 100, high / 100],
                                                                              dtype=torch.float64))
    return float(q[0]), float(q[1])


def verdict(delta: float, noise: list[float]) -> str:
    b = band(noise)
    if b is None:
        return "no noise band (0 draws)"
    inside = b[0] <= delta <= b[1]
    return (f"{'within' if inside else 'OUTSIDE'} the noise band [{b[0]:+.4f}, {b[1]:+.4f}] of "
            f"{len(noise)} random edits of the same size" + ("" if inside else ": an effect of these heads"))


@dataclass
class HeadEffect:
    """What editing heads did to p(token) at the last position of the design's run."""
    mode: str                 # "knockout" | "patch"
    heads: list               # [(layer, head)]
    token: str
    token_id: int
    base_prob: float          # the design intact
    prob: float               # with the heads edited
    source_prob: float | None = None    # design B (patch only)
    per_head: list = field(default_factory=list)   # the change from each head alone
    noise: list = field(default_factory=list)      # changes from random head sets of the same size
    design: str = ""
    source: str = ""

    @property
    def delta(self) -> float:
        return self.prob - self.base_prob

    def summary(self) -> str:
        what = "knocked out" if self.mode == "knockout" else f"patched from B ({self.source})"
        lines = [f"heads {format_heads(self.heads)} {what} in {self.design}; token "
                 f"{json.dumps(self.token, ensure_ascii=False)}",
                 f"  p intact {self.base_prob:.4f} -> edited {self.prob:.4f}  change {self.delta:+.4f}"]
        if self.source_prob is not None:
            gap = self.source_prob - self.base_prob
            moved = f", {self.delta / gap:.0%} of the way to B" if abs(gap) > 1e-6 else ""
            lines.append(f"  p in B {self.source_prob:.4f}{moved}")
        lines.append("  " + verdict(self.delta, self.noise))
        for (lay, h), d in zip(self.heads, self.per_head):
            lines.append(f"    head {lay}.{h} alone: change {d:+.4f}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode, "heads": self.heads, "token": self.token, "token_id": self.token_id,
                           "base_prob": self.base_prob, "prob": self.prob, "source_prob": self.source_prob,
                           "delta": self.delta, "per_head": self.per_head, "noise": self.noise,
                           "band": band(self.noise), "design": self.design, "source": self.source},
                          ensure_ascii=False, indent=1) + "\n"


def _p(layout, lm, token_id: int, edits: HeadEdits, **kw) -> float:
    with editing(edits):
        r = run(layout, lm, attentions=False, **kw)
    return float(torch.softmax(r.logits[-1], -1)[token_id])


def random_heads(count: int, num_layers: int, num_heads: int, rng: random.Random, avoid=()) -> list:
    pool = [(a, b) for a in range(num_layers) for b in range(num_heads) if (a, b) not in set(avoid)]
    return rng.sample(pool, min(count, len(pool)))


def head_experiment(spec, heads, model=None, source=None, target: str | None = None, noise: int = NOISE_SAMPLES,
                    per_head: bool = True, seed: int = 0, chat: bool = False, **kw) -> HeadEffect:
    """Knock out `heads` ([(layer, head)] or the text form of parse_heads) in `spec`'s run, or with
    `source` (design B, the same texts) patch them with B's outputs; p(target's first token) at the
    last position (default: the design's top-1), each head alone, and `noise` random head sets."""
    lm = load_model(model)
    base = run(spec, lm, attentions=False, chat=chat, **kw)
    layout = base.layout  # materialized once (chat segments, sizes): every edited run reads the same tokens
    if isinstance(heads, str):
        heads = parse_heads(heads, lm.num_layers, lm.num_heads)
    bad = [(a, b) for a, b in heads if not (0 <= a < lm.num_layers and 0 <= b < lm.num_heads)]
    if bad:
        raise RunError(f"heads: {format_heads(bad)} not in this model ({lm.num_layers} layers x {lm.num_heads} heads)")
    p_base = torch.softmax(base.logits[-1], -1)
    tid = target_token(lm.tokenizer, target, p_base)
    outputs, p_src, src_name = None, None, ""
    if source is not None:
        src = as_spec(source)
        keep = HeadEdits(keep={(a, b) for a in range(lm.num_layers) for b in range(lm.num_heads)})
        with editing(keep):
            b_run = run(src, lm, attentions=False, chat=chat, **kw)
        if not torch.equal(b_run.input_ids, base.input_ids):
            raise RunError("design B gives other input tokens than the design; patch between designs with the "
                           "same texts", src)
        outputs, p_src, src_name = keep.kept, float(torch.softmax(b_run.logits[-1], -1)[tid]), src.name

    def edit(hs) -> HeadEdits:
        return HeadEdits(zero=set(hs)) if outputs is None else HeadEdits(patch={h: outputs[h] for h in hs})
    prob = _p(layout, lm, tid, edit(heads), **kw)
    pb = float(p_base[tid])
    alone, draws, rng = [], [], random.Random(seed)
    for h in (heads if per_head and len(heads) > 1 else []):
        if tick(f"head {len(alone) + 1}/{len(heads)} alone"):  # Stop keeps the heads measured so far
            break
        alone.append(_p(layout, lm, tid, edit([h]), **kw) - pb)
    for i in range(max(int(noise), 0)):
        if tick(f"noise band: random edit {i + 1}/{noise}"):   # ... and the draws so far
            break
        draws.append(_p(layout, lm, tid, edit(random_heads(len(heads), lm.num_layers, lm.num_heads, rng, heads)),
                        **kw) - pb)
    return HeadEffect("knockout" if source is None else "patch", list(heads), lm.tokenizer.decode([tid]), tid, pb,
                      prob, p_src, alone, draws, layout.name, src_name)


# ---------------------------------------------------------------- the segment knockout's noise band
def _token_set(layout, selector, path: str) -> torch.Tensor:
    seg = layout.table["segment"]
    return torch.isin(seg, torch.tensor(resolve_selector(selector, layout.segments, path), dtype=seg.dtype))


def knockout_band(ko: Knockout, model=None, samples: int = NOISE_SAMPLES, seed: int = 0, **kw) -> list[float]:
    """The noise band of a knockout sweep: `samples` runs that block the same readers (ko.q) from a
    random window of as many keys as ko.k has, placed among the keys before the last reader, in a
    random window of ko.window layers. Stores and returns the changes of p(ko.token) (ko.noise)."""
    lm = load_model(model)
    layout = ko.layout
    rows, cols = _token_set(layout, ko.q, "knockout.q"), _token_set(layout, ko.k, "knockout.k")
    size, last = int(cols.sum()), int(rows.nonzero().max()) if rows.any() else layout.n - 1
    rng = random.Random(seed)
    deltas = []
    for i in range(max(int(samples), 0)):
        if tick(f"noise band: random window {i + 1}/{samples}"):  # Stop keeps the draws so far
            break
        start = rng.randint(0, max(last + 1 - size, 0))
        keys = torch.zeros(layout.n, dtype=torch.bool)
        keys[start:start + size] = True
        lo = rng.randint(0, max(lm.num_layers - ko.window, 0))
        block = rows[:, None] & keys[None, :]
        edits = HeadEdits(block={layer: block for layer in range(lo, min(lo + ko.window, lm.num_layers))})
        deltas.append(_p(layout, lm, ko.token_id, edits, **kw) - ko.base_prob)
    ko.noise = deltas
    return deltas


# ---------------------------------------------------------------- many designs on the model
def compare_many(spec_a, others: list, model=None, max_new_tokens: int = 0, **kw) -> list[Comparison]:
    """Design A against B, C, ... on one model (A runs once): one Comparison each, with per-head
    attention differences (Comparison.head_diff)."""
    lm = load_model(model)
    a = run(spec_a, lm, max_new_tokens=max_new_tokens, attentions=True, **kw)
    return [comparison(a, run(b, lm, max_new_tokens=max_new_tokens, attentions=True, **kw), b) for b in others]
