"""Model audit: what attention does a transformers model really use on my layout, and is it my design?

    report = maskstudio.audit.audit("tiny-gemma3", "my_design.json")   # or a hub id / config.json
    print(report.summary())
    report.model_spec          # the model's per-layer masks and positions as one spec (where patterns allow)
    report.layers[5].message   # "layer 5 (sliding_attention): your window is 1 key wider than the model's ..."

  capture   build the model from its config (tiny widths, every layer and attention setting kept), run
            its own forward on the layout, record each layer's mask and the rotary position ids
  express   the recorded masks as a spec (checked cell by cell at every layer), and the design's
            differences from them in words

The design is both the layout (its segments feed the model: text tokens, image / video
placeholders with the model's own token types and grids) and the mask compared at every layer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .. import knobs
from ..errors import RunError
from ..flow import LayerMasks
from ..spec import Spec
from .capture import TINY_CONFIGS, ModelAttention, load_config, model_attention, shrunk
from .express import Expressed, LayerDiff, express, layer_diff, positions_diff


@dataclass
class Audit:
    """The model's attention on the design's layout (`model`), as a spec (`expressed`), and the
    design against it layer by layer (`layers`) and in position ids (`positions_differ`)."""
    design: Spec
    model: ModelAttention
    expressed: Expressed
    layers: list[LayerDiff]
    positions_differ: int
    positions_line: str
    notes: list[str] = field(default_factory=list)

    @property
    def model_spec(self) -> Spec | None:
        return self.expressed.spec

    @property
    def matches(self) -> bool:
        """The design equals the model at every layer and in every position id."""
        return all(d.same for d in self.layers) and self.positions_differ == 0

    def summary(self) -> str:
        m, e = self.model, self.expressed
        lines = [f"audit: {m.name} ({m.model_type}, {m.num_layers} layers) on '{self.design.name}' "
                 f"({self.design.table.n} tokens)", "", "the model, layer by layer:"]
        kinds = [f"{kind}): {text}" for kind, text in zip(m.layer_types, e.descriptions)]
        lines += [f"  {layers_text(group)} ({text}" for text, group in _grouped(kinds)]
        if e.positions is not None:
            shown = json.dumps(e.positions) if e.positions["scheme"] != "explicit" else "explicit ids (no scheme fits)"
            lines.append(f"  positions: {shown}")
        inexact = [i for i, ok in enumerate(e.exact) if not ok]
        lines.append("  as a spec: " + ("exact at every layer" if not inexact else
                                        f"not exact at {layers_text(inexact)} (pictures show the model's own mask)"))
        lines += ["", "against your design:"]
        lines += [f"  {layers_text(group)} ({self.layers[group[0]].kind}): {body}"
                  for body, group in _grouped([d.body for d in self.layers])]
        lines.append(f"  {self.positions_line}")
        lines += [f"note: {note}" for note in self.notes + m.notes] + [""]
        differ = [d.layer for d in self.layers if not d.same]
        lines.append("verdict: your design is what the model does, at every layer and position" if self.matches else
                     f"verdict: your design differs from the model at {len(differ)} of {m.num_layers} layers"
                     + (f" and in {self.positions_differ} position ids" if self.positions_differ else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        m, e = self.model, self.expressed
        return {"model": m.name, "model_type": m.model_type, "layers": m.num_layers, "tokens": self.design.table.n,
                "layer_types": m.layer_types, "settings": m.settings, "model_layers": e.descriptions,
                "exact": e.exact, "model_spec": e.spec.to_dict() if e.spec else None,
                "differences": [{"layer": d.layer, "kind": d.kind, "cells": d.cells, "yours_only": d.yours_only,
                                 "model_only": d.model_only, "message": d.message} for d in self.layers],
                "positions": {"differ": self.positions_differ, "message": self.positions_line},
                "notes": self.notes + m.notes, "matches": self.matches}


def _grouped(texts: list[str]) -> list[tuple[str, list[int]]]:
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(text, []).append(i)
    return list(groups.items())


def layers_text(ids: list[int]) -> str:
    """[0, 1, 2, 4] -> 'layers 0-2, 4'; [3] -> 'layer 3'."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)
    return f"layer{'s' if len(ids) > 1 else ''} {text}"


def _provenance(model: ModelAttention) -> dict:
    import transformers

    family = model.model_type.removesuffix("_text")
    return {"source": "code", "repo": "huggingface/transformers", "file": f"src/transformers/models/{family}/"
            f"modeling_{family}.py", "note": f"read from the model's own forward in transformers "
            f"{transformers.__version__} (masking_utils), on this layout, by maskstudio audit"}


def audit(model, design, allow_paths: bool = True, small: bool = True) -> Audit:
    """Audit `model` (a tiny config name, a hub id, config JSON / dict, or with allow_paths a
    config.json or model folder) on `design` (a Spec, path, JSON text or dict; sized)."""
    design = design if isinstance(design, Spec) else Spec.load(design)
    design.require_sized()
    n = design.table.n
    if n > knobs.AUDIT_MAX_TOKENS:
        raise RunError(f"the layout has {n:,} tokens, over the audit's limit of {knobs.AUDIT_MAX_TOKENS:,} "
                       "(knobs.AUDIT_MAX_TOKENS: the model's masks are dense); shrink the segments")
    captured = model_attention(model, design, allow_paths=allow_paths, small=small)
    expressed = express(design, captured, _provenance(captured))
    yours = LayerMasks(design, 0)
    diffs = [layer_diff(design, layer, kind, yours.mask(layer), mask)
             for layer, (kind, mask) in enumerate(zip(captured.layer_types, captured.masks))]
    count, line = positions_diff(design, design.position_ids(), captured.positions)
    notes = []
    if design.varies_by_head:
        notes.append("your design varies by head; head 0 is compared (transformers' masks are the same for every head)")
    named = [layer for layers in design.layer_sets() for layer in layers if layer >= captured.num_layers]
    if named:
        notes.append(f"your design names layer {max(named)} but the model has {captured.num_layers} layers")
    return Audit(design, captured, expressed, diffs, count, line, notes)


__all__ = ["Audit", "ModelAttention", "Expressed", "LayerDiff", "TINY_CONFIGS", "audit", "layers_text", "load_config",
           "model_attention", "shrunk"]
