"""The one run and the one generation loop, for every model family, and the one result type.

    spec --adapter.prepare--> Prepared (layout + ids) --adapter.forward under a MaskContext--> logits
         --measures--> RunResult;  greedy generation: adapter.extend + adapter.forward per new token.

The adapter (inputs.TextAdapter, vision.VisionAdapter) is all that differs between families.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..analysis import kv_cache_compatible
from ..errors import RunError
from ..knobs import FLEX_MIN_TOKENS, MAX_CAPTURE
from ..progress import check, stopped, tick
from ..segments import all_steps
from ..spec import Spec
from .attention import MaskContext, register
from .inputs import Prepared, TextAdapter, as_spec, decode_tokens
from .measures import rollout, segment_mass, target_nll
from .models import LoadedModel, VLModel, load_model
from .vision import VisionAdapter


# ================================================================= the result
@dataclass
class RunResult:
    layout: Spec
    input_ids: torch.Tensor
    tokens: dict
    logits: torch.Tensor
    top_k: list
    text: str
    target_nll: dict
    attentions: torch.Tensor | None
    segment_mass: torch.Tensor | None
    rollout: torch.Tensor | None
    model: str = ""
    backend: str = "eager"
    new_ids: list = field(default_factory=list)
    generated_layout: Spec | None = None
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    visuals: dict = field(default_factory=dict)   # image/video segment -> {"frames": [PIL], "grid", "modality"}
    positions: torch.Tensor | None = None         # the position ids the forward got ([N] or [3, N])

    @property
    def segment_names(self) -> list[str]:
        return [s["name"] for s in self.layout.segments]

    @property
    def visual_segments(self) -> list[str]:
        return list(self.visuals)

    def summary(self) -> str:
        lines = [f"model      {self.model}  ({self.backend}, {self.seconds:.2f} s)",
                 f"tokens     {len(self.input_ids)} in {len(self.tokens)} segments"]
        for name, toks in self.tokens.items():
            shown = "".join(toks)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            lines.append(f"  {name:<14} {len(toks):>5}  {json.dumps(shown, ensure_ascii=False)}")
        lines.append("top-k at the last position")
        for tok, p in self.top_k:
            lines.append(f"  {p:7.4f}  {json.dumps(tok, ensure_ascii=False)}")
        if self.new_ids:
            lines.append(f"continuation  {json.dumps(self.text, ensure_ascii=False)}")
        for name, t in self.target_nll.items():
            lines.append(f"target NLL  {name}: {t['mean']:.4f} nats/token over {t['tokens']} tokens "
                         f"(perplexity {math.exp(t['mean']):.2f})")
        if self.segment_mass is not None:
            lines += self._mass_lines()
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _mass_lines(self) -> list[str]:
        names = self.segment_names
        width = max(8, *(len(n) for n in names))
        lines = ["attention mass, last layer (rows = query segment, cols = key segment)",
                 " " * width + " " + " ".join(f"{n[:7]:>7}" for n in names)]
        for name, row in zip(names, self.segment_mass[-1].tolist()):
            lines.append(f"{name:>{width}} " + " ".join(f"{v:7.3f}" for v in row))
        return lines

    def to_dict(self) -> dict:
        return {"model": self.model, "backend": self.backend, "seconds": self.seconds,
                "layout": self.layout.to_dict(), "input_ids": self.input_ids.tolist(), "tokens": self.tokens,
                "top_k": [{"token": t, "prob": p} for t, p in self.top_k], "text": self.text,
                "new_ids": list(self.new_ids), "target_nll": self.target_nll,
                "segment_mass": self.segment_mass.tolist() if self.segment_mass is not None else None,
                "rollout_last": self.rollout[-1].tolist() if self.rollout is not None else None,
                "generated_layout": self.generated_layout.to_dict() if self.generated_layout else None,
                "notes": list(self.notes)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n"


# ================================================================= choices made before the forward
def adapter_for(lm: LoadedModel) -> TextAdapter:
    return VisionAdapter(lm) if isinstance(lm, VLModel) else TextAdapter(lm)


def choose_backend(backend, lm: LoadedModel, n: int | None = None) -> str:
    """flex on CUDA (eager below FLEX_MIN_TOKENS, where a small dense mask is cheaper than building
    a BlockMask and launching the compiled kernel), eager on CPU."""
    if backend is None:
        short = n is not None and n < FLEX_MIN_TOKENS
        backend = "flex" if lm.device.type == "cuda" and not short else "eager"
    if backend not in ("flex", "eager"):
        raise RunError(f"unknown backend '{backend}'; use 'flex' or 'eager'")
    return backend


def _record(attentions: bool, n: int, backend: str, notes: list) -> bool:
    """Whether to record attention maps (not past MAX_CAPTURE tokens); says why in `notes`."""
    if attentions and n > MAX_CAPTURE:
        notes.append(f"{n} tokens > {MAX_CAPTURE}: attention maps not captured (no-maps mode); "
                     f"segment_mass and rollout are unavailable")
        return False
    if attentions and backend == "flex":
        notes.append("attention capture uses the eager kernel (FlexAttention returns no probabilities)")
    return attentions


def distinct_layers(layout: Spec) -> list[int]:
    """One layer for each distinct per-layer mask (layers with equal `layer_key` share a mask);
    every layer past the largest listed one has the key of that largest + 1."""
    top = max((max(ls) for ls in layout.layer_sets() if ls), default=-1)
    first: dict[tuple, int] = {}
    for layer in range(top + 2):
        first.setdefault(layout.layer_key(layer), layer)
    return sorted(first.values())


KV_CHECK_GROWTH = 64  # new tokens the KV check grows the layout by (chunks, blocks, windows inside the region)


def kv_ok(layout: Spec, prep: Prepared, num_heads: int, grow: int = KV_CHECK_GROWTH) -> tuple[bool, str]:
    """Whether generation may use the KV cache, and why not. Checked on the layout grown by `grow`
    tokens as generation will grow it: a rule inside the generation region (e.g. block-causal by
    segment: generated tokens see each other both ways) shows only once it holds several tokens."""
    if prep.gen is not None and prep.gen != len(layout.segments) - 1:
        return False, "the generate segment is not last"
    for _, step in all_steps(layout.mask):
        if step["pattern"] == "spread_causal" or any(v in ("length", "frames") for v in step.values()
                                                      if isinstance(v, str)):
            return False, "the mask depends on segment lengths, which change while generating"
    if layout.positions["scheme"] in ("explicit", "branches", "concentric") or layout.positions.get("share"):
        return False, f"positions scheme '{layout.positions['scheme']}' may move earlier tokens"
    if grow > 0:
        layout = layout.with_tokens_appended(prep.gen, "", grow)
    heads = range(num_heads) if layout.varies_by_head else [0]
    for layer in distinct_layers(layout):
        for h in heads:
            if not kv_cache_compatible(layout, layer, h):
                return False, "analysis: an earlier token attends the generation region"
    return True, ""


def _kv_plan(adapter: TextAdapter, prep: Prepared, max_new_tokens: int, use_cache) -> tuple[bool, str]:
    if max_new_tokens <= 0 or use_cache is False:
        return False, ""
    if adapter.no_kv_reason:
        return False, adapter.no_kv_reason
    return kv_ok(prep.layout, prep, adapter.lm.num_heads, min(max_new_tokens, KV_CHECK_GROWTH))


def _is_oom(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


# ================================================================= the run
@torch.no_grad()
def run(spec, model=None, max_new_tokens: int = 0, attentions: bool = True, chat: bool = False,
        backend: str | None = None, top_k: int = 10, use_cache: bool | None = None,
        progress: Callable[[float, str], None] | None = None, images: dict | None = None,
        positions: str | None = None) -> RunResult:
    """Run `spec` (Spec, dict, JSON text or path) on a model (LoadedModel, hub id, or None for the
    embedded default). Raises RunError (a ValueError) with a one-line fix for bad input.

    On a vision-language model (Qwen2-VL, Idefics3/SmolVLM, tiny-*) `images` maps image/video
    segment names to pictures or frame lists (missing ones get a test pattern), and positions="model"
    uses the model's own position ids instead of the spec's scheme."""
    t0 = time.perf_counter()
    spec = as_spec(spec)
    lm = load_model(model, progress=progress)
    adapter = adapter_for(lm)
    register()
    prep = adapter.prepare(spec, chat=chat, images=images, positions=positions)
    notes = list(prep.notes)
    n = len(prep.input_ids)
    backend = choose_backend(backend, lm, n + max(max_new_tokens, 0))
    record = _record(attentions, n, backend, notes)
    pos = adapter.position_ids(prep.layout)
    kv, why = _kv_plan(adapter, prep, max_new_tokens, use_cache)
    ctx = MaskContext(prep.layout, lm.num_heads, backend, record)
    cache = adapter.new_cache() if kv else None
    check(f"forward pass over {n} tokens" if record else "")  # inner runs (scoring, knockout) keep their loop's line
    with adapter.masked():  # the model's attention switched once for the whole run, not per forward
        try:
            logits = adapter.forward(ctx, prep, pos, cache)
        except RuntimeError as err:  # torch.OutOfMemoryError is one; CPU allocators raise plain RuntimeErrors
            if _is_oom(err):
                raise RunError(f"out of memory at {n} tokens; {adapter.oom_hint}", spec) from None
            raise
        probs = torch.stack([ctx.probs[i] for i in sorted(ctx.probs)]).cpu() if record else None
        new_ids, grown = [], None
        if max_new_tokens > 0:
            new_ids, grown = generate(adapter, prep, logits[prep.predict_at], max_new_tokens, backend, cache)
    if max_new_tokens > 0 and stopped():  # the tokens made so far are kept
        notes.append(f"generation stopped after {len(new_ids)} of {max_new_tokens} new tokens: {stopped()}")
    if max_new_tokens > 0 and use_cache and not kv:
        notes.append(f"KV cache not used: {why}")
    if max_new_tokens > 0 and not kv and use_cache is None:
        notes.append(f"generation recomputed the prefix each step ({why})")
    result = _result(adapter, prep, logits, probs, top_k, new_ids, grown, pos)
    result.backend, result.notes, result.seconds = backend, notes, time.perf_counter() - t0
    return result


def _result(adapter: TextAdapter, prep: Prepared, logits, probs, top_k: int, new_ids, grown, pos) -> RunResult:
    tok, layout = adapter.lm.tokenizer, prep.layout
    p_last = torch.softmax(logits[prep.predict_at], -1)
    top = torch.topk(p_last, min(top_k, p_last.numel()))
    return RunResult(
        layout=layout, input_ids=prep.input_ids, tokens=decode_tokens(prep, tok), logits=logits.cpu(),
        top_k=[(tok.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)],
        text=tok.decode(new_ids) if new_ids else "", target_nll=target_nll(layout, logits, prep.input_ids),
        attentions=probs, segment_mass=segment_mass(probs, layout) if probs is not None else None,
        rollout=rollout(probs) if probs is not None else None, model=adapter.lm.name, new_ids=new_ids,
        generated_layout=grown.layout if grown else None, positions=pos,
        visuals={k: {"frames": v.frames, "grid": v.grid, "modality": v.modality} for k, v in prep.visuals.items()})


# ================================================================= generation
def _eos_ids(tokenizer) -> set:
    eos = getattr(tokenizer, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()


def generate(adapter: TextAdapter, prep: Prepared, first_logits, max_new_tokens: int, backend: str,
             cache=None) -> tuple[list[int], Prepared | None]:
    """Greedy decoding; new tokens join the generate segment (else a new trailing "generated" one)
    under the spec's rules. With a KV `cache` each step forwards the new token only; without one
    it recomputes the whole grown layout. Returns (new ids, the grown Prepared or None)."""
    eos = _eos_ids(adapter.lm.tokenizer)
    new: list[int] = []
    nxt = int(first_logits.argmax())
    grown = None
    while nxt not in eos:
        new.append(nxt)
        grown = adapter.extend(prep, new)
        if len(new) >= max_new_tokens or tick(f"token {len(new)}/{max_new_tokens}"):  # Stop keeps the tokens
            break
        nxt = _next_token(adapter, grown, backend, cache)
    return new, grown


def _next_token(adapter: TextAdapter, grown: Prepared, backend: str, cache) -> int:
    layout = grown.layout
    pos = adapter.position_ids(layout)
    ctx = MaskContext(layout, adapter.lm.num_heads, backend, record=False)
    if cache is not None:
        return int(adapter.forward(ctx, grown, pos, cache, tail=1)[-1].argmax())
    return int(adapter.forward(ctx, grown, pos)[grown.predict_at].argmax())
