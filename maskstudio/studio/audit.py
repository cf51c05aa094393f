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
AUDIT_HELP = ("run the model's own mask construction on this design's layout (per layer: sliding and global "
              "layers, chunks, Gemma 3's bidirectional image blocks, Qwen2-VL's M-RoPE ids) and compare it with "
              "your design, cell by cell. A tiny local config, a hub id (only its config.json is read: built with "
              "tiny widths, every layer and attention setting kept) or a config as JSON text.")
AUDIT_TEXT = "the model, layer by layer, against your design"
AUDIT_PICTURES = "every layer against your design · one layer: the model's own mask · its position ids"
AUDIT_SPEC = "the model's attention as a spec (load it as a design to start from what the model does)"


def audit_for_state(state: dict, model_text: str = "", layer=None) -> dict:
    """{"error", "summary", "pictures" ([(PNG, caption)]: every layer against the design; one layer
    (`layer`, default the first that differs) with its own mask; the position ids), "spec" (the
    model's attention as spec JSON)}. Bad input is one line; the design stays."""
    try:
        spec, sizing = picture_spec(current(state))
        report = audit((model_text or "").strip() or AUDIT_MODELS[0], spec, allow_paths=False)
        first = next((d.layer for d in report.layers if not d.same), 0)
        chosen = first if layer is None else min(max(int(float(layer)), 0), report.model.num_layers - 1)
    except (ValueError, OverflowError) as err:  # SpecError, RunError: one line
        return {"error": one_line(err), "summary": "", "pictures": [], "spec": ""}
    pictures = [(figure_png(audit_layers_figure(report)), "every layer against your design"),
                (figure_png(audit_layer_figure(report, chosen)), f"layer {chosen}: the model's own mask")]
    positions = audit_positions_figure(report)
    if positions is not None:
        pictures.append((figure_png(positions), "the position ids the model uses"))
    return {"error": "", "summary": report.summary() + (f"\nnote: {sizing}" if sizing else ""), "pictures": pictures,
            "spec": report.model_spec.to_json() if report.model_spec is not None else ""}
