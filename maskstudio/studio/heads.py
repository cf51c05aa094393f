"""The Run tab's attention viewer and head-level experiments, and Compare on the model for A, B,
C, ...: plain functions over the session state that return values and an error line (never raise).

  viewer_for_state   the session's last run as the in-browser viewer's payload (viz.attention_viewer),
                     built once per run; `viewer_layer`: the page's server function for one layer
                     ("layer" mode); VIEWER: the gr.HTML block's arguments
  knockout_experiment  the knockout panel: the q -> k sweep with its noise band, or chosen heads
                     knocked out / patched from design B, against random heads of the same count
  compare_on_model   A against B, C, ... on one model: KL per position and per-head differences
"""
from __future__ import annotations

from .. import knobs
from ..errors import SpecError
from .actions import RUN_ERRORS, _backend_kw, _ready, app_message, get_run, model_name, spec_b
from .examples import run_blocker, with_examples
from .pictures import Cache, figure_png
from .provenance import labelled
from .state import current
from ..viz.attention_viewer import HELP as VIEWER_HELP
from ..viz.attention_viewer import VIEWER as _PAGE

KNOCKOUT_HELP = (
    "Empty **heads**: block the q → k edge in a sliding window of layers. **Heads** given (`layer.head`, e.g. "
    "`4.2, 5.*, 7.0-3`): knock those heads out (their output zeroed before the output projection) or patch them "
    "with the same heads' outputs in design B (Compare tab's B, same texts). **Noise band**: the same edit on "
    "random heads of the same count (or, for the sweep, a random key window of k's size in a random window of "
    "layers); a change outside the 5-95 % band is an effect, one inside it is noise.")
_PAYLOADS = Cache(knobs.RUNS_KEPT)  # run id -> the viewer's payload (its thumbnails and masks are built once)


def viewer_for_state(state: dict) -> dict | None:
    """The viewer's payload of the session's last run (None before a run or without attention),
    with the run's key: the page names it when it asks for a layer ("layer" mode)."""
    from ..viz.attention_viewer import viewer_payload

    result = get_run(state)
    if result is None or result.attentions is None:
        return None
    key = state.get("run_id")
    payload = _PAYLOADS.get(key)
    if payload is None:
        payload = _PAYLOADS.put(key, dict(viewer_payload(result), run=key))
    return payload


def viewer_layer(data) -> dict:
    """The viewer's server function ("layer" mode): {"run": key, "layer": i} -> {"layer", "maps"}
    of that run (a key is a random 128-bit id only its own page holds); an unknown run: no maps."""
    from ..viz.attention_viewer import layer_request

    data = data[0] if isinstance(data, list) and data else data
    if not isinstance(data, dict) or not isinstance(data.get("run"), str):
        return {"layer": None, "maps": {}}
    result = get_run({"run_id": data["run"]})
    if result is None or result.attentions is None:
        return {"layer": None, "maps": {}}
    return layer_request(result, data.get("layer"))


VIEWER = dict(_PAGE, server_functions=[viewer_layer])  # gr.HTML(**VIEWER): template, CSS, script, the layer fetch


def _noise(value) -> int:
    try:
        return min(max(int(float(value or 0)), 0), 64)
    except (TypeError, ValueError, OverflowError):
        return 0


def knockout_experiment(state: dict, q: str, k: str, window=3, model_id: str = "", target: str = "", heads: str = "",
                        mode: str = "knockout", choice: str = "snapshot", noise=16, progress=None) -> dict:
    """The knockout panel: without `heads` the q -> k sweep (run.knockout) and its noise band;
    with heads, head_experiment (knock out, or `mode` "patch" from design B = `choice`).
    {"error", "summary", "curve" (PNG)}."""
    from ..run import heads as H
    from ..run import knockout
    from ..viz.head_views import head_effect_figure, knockout_band_figure

    name = model_name(model_id)
    try:
        source = None
        if (heads or "").strip() and mode == "patch":
            source = spec_b(state, choice)
            blocker = run_blocker(source, name)
            if blocker:
                raise SpecError("B", blocker)
        if not (heads or "").strip() and not k:
            raise SpecError("", "pick the blocked source segment k, or name heads to knock out")
        lm, spec, _ = _ready(current(state), name, progress)
        kw = dict(model=lm, target=(target or None), **_backend_kw())
        if (heads or "").strip():
            if source is not None:
                source, _ = with_examples(source, lm.tokenizer)
            effect = H.head_experiment(spec, heads, source=source, noise=_noise(noise), **kw)
            return {"error": "", "summary": labelled("head experiment", current(state), effect.summary()), "curve": figure_png(head_effect_figure(effect))}
        ko = knockout(spec, q or "*", k, window=int(window or 3), **kw)
        H.knockout_band(ko, lm, samples=_noise(noise), **_backend_kw())
    except RUN_ERRORS as err:
        return {"error": app_message(err, name), "summary": "", "curve": None}
    return {"error": "", "summary": labelled("knockout", current(state), ko.summary()),
            "curve": figure_png(knockout_band_figure(ko))}


def compare_on_model(state: dict, choice: str = "snapshot", more=(), model_id: str = "", max_new_tokens: int = 0,
                     progress=None) -> dict:
    """A (the design) against B and C, D, ... on a model, A run once: each one's outputs and KL,
    per-head attention differences, the segment-mass difference of B.
    {"error", "summary", "kl" (KL lines + per-head maps, PNG), "mass_diff" (PNG)}."""
    from ..run.heads import compare_many
    from ..viz import mass_diff_figure
    from ..viz.head_views import compare_heads_figure

    name = model_name(model_id)
    try:
        others = [spec_b(state, choice)] + [spec_b(state, c) for c in (more or []) if c]
        for letter, sp in zip("BCDEFGHIJ", others):
            blocker = run_blocker(sp, name)
            if blocker:
                raise SpecError(letter, blocker)
        if len(others) > 8:
            raise SpecError("compare", f"compare at most 8 designs on the model at once ({len(others)} picked)")
        lm, a, _ = _ready(current(state), name, progress)
        others = [with_examples(sp, lm.tokenizer)[0] for sp in others]
        cmps = compare_many(a, others, model=lm, max_new_tokens=int(max_new_tokens or 0), **_backend_kw())
    except RUN_ERRORS as err:
        return {"error": app_message(err, name), "summary": "", "kl": None, "mass_diff": None}
    letters = [f"{chr(66 + i)} ({sp.name})" for i, sp in enumerate(others)]
    text = "\n\n".join(f"== A ({a.name}) vs {n} ==\n{c.summary()}" for n, c in zip(letters, cmps))
    return {"error": "", "summary": labelled("comparison on the model", current(state), text),
            "kl": figure_png(compare_heads_figure(cmps, letters)),
            "mass_diff": figure_png(mass_diff_figure(cmps[0])) if cmps[0].mass_diff is not None else None}
