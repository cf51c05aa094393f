"""The Audit tab: what attention a transformers model really uses on the design's layout, and
where the design differs from it (maskstudio.audit), as text, pictures and the model's own spec.

The model box takes a tiny local config name, a hub id (only its config is fetched) or a config
as JSON text; never a path on the server.
"""
from __future__ import annotations

from ..audit import TINY_CONFIGS, audit
from ..viz.audit_views import audit_layer_figure, audit_layers_figure, audit_positions_figure
from .pictures import figure_png, picture_spec
from .state import current, one_line

AUDIT_MODELS = list(TINY_CONFIGS)
AUDIT_HELP = ("**Audit a model**: run a transformers model's own mask construction (per layer: sliding and "
              "global layers, chunks, Gemma 3's bidirectional image blocks, Qwen2-VL's M-RoPE ids) on this design's "
              "layout, see what it really uses, get it as a spec, and where your design differs, cell by cell. "
              "Model: a tiny local config below, a hub id (only its config.json is read; built with tiny widths, "
              "every layer and attention setting kept) or a config as JSON text.")
EMPTY = {"error": "", "summary": "", "layers": None, "layer": None, "positions": None, "spec": ""}


def audit_for_state(state: dict, model_text: str = "", layer=0) -> dict:
    """{"error", "summary", "layers" (PNG: every layer against the design), "layer" (PNG: one layer's
    own mask and the difference), "positions" (PNG), "spec" (the model's attention as spec JSON)}."""
    try:
        spec, sizing = picture_spec(current(state))
        report = audit((model_text or "").strip() or AUDIT_MODELS[0], spec, allow_paths=False)
        chosen = min(max(int(float(layer or 0)), 0), report.model.num_layers - 1)
    except (ValueError, OverflowError) as err:  # SpecError, RunError: one line; the design stays
        return {**EMPTY, "error": one_line(err)}
    summary = report.summary() + (f"\nnote: {sizing}" if sizing else "")
    positions = audit_positions_figure(report)
    return {"error": "", "summary": summary, "layers": figure_png(audit_layers_figure(report)),
            "layer": figure_png(audit_layer_figure(report, chosen)),
            "positions": figure_png(positions) if positions is not None else None,
            "spec": report.model_spec.to_json() if report.model_spec is not None else ""}
