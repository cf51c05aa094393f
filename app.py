"""Mask Studio web app: layout and event wiring only. Every handler is a thin call into
`maskstudio.studio` (tested without a browser in tests/test_studio.py).

    python app.py            # serves on 0.0.0.0:7860 ($GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT, or $HOST / $PORT)

The layout is built section by section (`_design_column`, `_see_column`, `_run_tab`, ...), each
adding its components to one namespace `ui`; the `_wire_*` functions connect them. Every edit of
the design (preset, blank, undo, tables, JSON, upload, task template) goes through `wire_edit`:
an edit `(state, *inputs) -> (state, error)` and the same outputs (editor, tables, pictures, card).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from types import SimpleNamespace

import gradio as gr

os.environ.setdefault("MASKSTUDIO_RENDER_PROCESSES", str(min(2, os.cpu_count() or 1)))  # before studio draws

from maskstudio import knobs, studio
from maskstudio.patterns import PATTERNS
from maskstudio.positions import SCHEMES
from maskstudio.segments import MODALITIES, OVERLAY_OPS

if importlib.util.find_spec("spaces") is not None:  # Hugging Face ZeroGPU
    import spaces

    gpu = spaces.GPU(duration=120)
else:
    def gpu(fn):
        return fn

RENDER_CONCURRENCY = int(os.environ.get("MASKSTUDIO_RENDER_CONCURRENCY", "4"))
CSS = """
.error-line p { color: #b3261e; font-weight: 600; margin: 0; }
.ok-line p { color: #2e7d32; margin: 0; }
#checks textarea, #run-summary textarea, #compare-text textarea, #eval-text textarea, #train-text textarea { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }
"""
MODEL = dict(concurrency_limit=1, concurrency_id="model")  # model events run one at a time


# ---------------------------------------------------------------- output packing (wiring only)
log = logging.getLogger("maskstudio.app")
ERROR_BOXES = ("preset", "tables", "json", "upload", "template", "train_template")  # where an edit's error is shown
STALE = "⚠ **The pictures show the last valid design**: the edit has an error (shown next to it)."


def _error_md(error: str) -> str:
    return f"⚠ {error}" if error else ""


def _view_opts(layer, head, reach_layers, reach_token, query, flow_level) -> dict:
    return {"layer": layer, "head": head, "reach_layers": reach_layers, "reach_token": reach_token,
            "query": query, "flow_level": flow_level}


def _pictures(state, opts) -> list:
    """The picture outputs: five views, checks, density, layer/head pickers, query, knockout
    pickers, note, the messages next to the reach token box and the query dropdown."""
    out = studio.design_views(studio.current(state), opts)
    o = out["options"]
    warn = o["warnings"]
    return [out["mask"], out["positions"], out["distance"], out["flow"], out["reach"], out["checks"],
            gr.update(value=out["density"]["data"], headers=out["density"]["headers"]),
            gr.update(visible=out["varies_by_layer"], maximum=out["layer_max"], value=o["layer"]),
            gr.update(visible=out["varies_by_head"], maximum=out["head_max"], value=o["head"]),
            gr.update(choices=out["segments"], value=o["query"]),
            gr.update(choices=["*"] + out["segments"]), gr.update(choices=out["segments"]),
            out["note"], _error_md(warn.get("reach_token", "")), _error_md(warn.get("query", ""))]


N_PICTURE_OUTPUTS = 15
NOTE = 12  # the note's place among the picture outputs


def _failed(state, box, error) -> list:  # what the user typed stays in the editor and the tables
    """An edit that failed: the last good design stays, the error goes next to the control that
    caused it, the pictures keep showing the last good design, marked as such."""
    pics = [gr.skip()] * N_PICTURE_OUTPUTS
    pics[NOTE] = STALE
    return [state, gr.skip()] + [gr.skip()] * 5 + [_error_md(error)] + pics + \
        [gr.skip()] * 3 + [gr.skip()] * (len(ERROR_BOXES) - 1)


def _design(state, error, opts, box, keep_tables=False, old=None) -> list:
    """The outputs after an edit: state, editor, 5 table parts, this edit's error, pictures, card,
    preset dropdown, download, the other error boxes (cleared)."""
    if error:
        return _failed(state, box, error)
    spec = studio.current(state)
    t = studio.spec_to_tables(spec)
    table_out = [t["segments"], t["rules"], t["overlays"], t["scheme"], t["position_params"]]
    if keep_tables:  # the user's own rows stay, unless the edit changed them (a pattern's parameters)
        fixed = old is not None and studio.tables_need_refresh(old, spec)
        table_out = [gr.skip(), t["rules"] if fixed else gr.skip(), t["overlays"] if fixed else gr.skip(),
                     gr.skip(), gr.skip()]
    return [state, spec.to_json()] + table_out + [""] + _pictures(state, opts) + \
        [studio.design_card(spec), gr.update(value=studio.preset_of(spec)), None] + [""] * (len(ERROR_BOXES) - 1)


def edit_handler(edit, n_inputs: int, box: str, keep_tables=False):
    """A handler for `edit(state, *inputs) -> (state, error)`, followed by the view options. Total:
    whatever goes wrong, the last good design stays and the error is shown next to `box`."""
    def handler(state, *args):
        try:
            new, error = edit(state, *args[:n_inputs])
            return _design(new, error, _view_opts(*args[n_inputs:]), box, keep_tables,
                           old=studio.current(state))
        except Exception as err:  # noqa: BLE001 -- a bug must not leave the page in "Error"
            log.exception("edit %s failed", getattr(edit, "__name__", edit))
            return _failed(state, box, f"could not apply this edit ({type(err).__name__}: {err}); "
                                       f"the last good design is kept")
    return handler


def wire_edit(ui, triggers, edit, inputs: list, api_name: str, box: str, keep_tables=False,
              extra_outputs=(), **kw):
    """Wire one edit of the design to the shared design outputs, its error to `box`."""
    others = [ui.errors[b] for b in ERROR_BOXES if b != box]
    outputs = ui.design_head + [ui.errors[box]] + ui.pictures + [ui.card, ui.preset, ui.download] + others
    handler = edit_handler(edit, len(inputs), box, keep_tables)
    if extra_outputs:
        base = handler

        def handler(state, *args):  # noqa: F811 -- the upload box: cleared when the upload was refused
            out = base(state, *args)
            return out + [None if out[7] else gr.skip()]
    gr.on(triggers, handler, [ui.state] + inputs + ui.view_opts, outputs + list(extra_outputs),
          api_name=api_name, **kw)


# ---------------------------------------------------------------- handlers (thin calls into studio)
def total(n_outputs: int, error_at: int | None):
    """Make a handler total: an unexpected exception is logged and said in its error line (output
    `error_at`), every other output stays as it was -- never Gradio's "Error" badge."""
    def wrap(fn):
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001
                log.exception("%s failed", fn.__name__)
                out = [gr.skip()] * n_outputs
                if error_at is not None:
                    out[error_at] = _error_md(f"this did not work ({type(err).__name__}: {err})")
                return out if n_outputs > 1 else out[0]
        return handler
    return wrap


def on_reach(state, *opts):
    """The reach options changed: draw reachability now, whatever the design's size."""
    return on_view_options(state, *opts, reach_now=True)


def on_view_options(state, *opts, reach_now=False):
    try:
        return _pictures(state, dict(_view_opts(*opts), reach_now=reach_now))
    except Exception as err:  # noqa: BLE001 -- keep the pictures, say what went wrong
        log.exception("drawing failed")
        out = [gr.skip()] * N_PICTURE_OUTPUTS
        out[NOTE] = _error_md(f"could not draw these pictures ({type(err).__name__}: {err})")
        return out


@total(2, 1)
def on_export(state, fmt, layer, head):
    path, message = studio.export_for_state(state, fmt, layer, head)
    return path, (f"<small>{message}</small>" if message else "") if path else _error_md(message)


@gpu
@total(13, 1)
def on_run(state, model_id, max_new_tokens, images=None, progress=gr.Progress()):
    state, out = studio.run_model(state, model_id, max_new_tokens, progress=progress, images=images)
    if out["error"]:
        return [state, _error_md(out["error"])] + [gr.skip()] * 11
    return [state, "", out["summary"], out["tokens"], out["top_k"], out["continuation"], out["nll"],
            out["attention"], out["mass"], out["curves"], out["rollout"],
            gr.update(maximum=max(out["layers"] - 1, 1), value=max(out["layers"] - 1, 0)),
            gr.update(choices=["mean"] + [str(h) for h in range(out["heads"])], value="mean")]


@total(1, None)
def on_attention(state, layer, head):
    return studio.attention_for_state(state, layer, head)


@total(3, 2)
def on_overlay(state, layer, head, query, segment):
    overlay, share, error = studio.overlay_for_state(state, layer, head, query, segment)
    return overlay, share, _error_md(error)


@gpu
@total(3, 0)
def on_knockout(state, q, k, window, model_id, target="", progress=gr.Progress()):
    out = studio.knockout_sweep(state, q, k, window, model_id, progress=progress, target=target)
    return _error_md(out["error"]), out["summary"], out["curve"]


@total(2, 1)
def on_snapshot(state):
    state = studio.set_snapshot(state)
    return state, f"Snapshot kept as B: **{studio.current(state).name}**"


@total(3, 0)
def on_compare(state, choice):
    out = studio.compare_static(state, choice)
    return _error_md(out["error"]), out["summary"], out["diff"]


@gpu
@total(4, 0)
def on_compare_run(state, choice, model_id, max_new_tokens, progress=gr.Progress()):
    out = studio.compare_runs(state, choice, model_id, max_new_tokens, progress=progress)
    return _error_md(out["error"]), out["summary"], out["kl"], out["mass_diff"]


@gpu
@total(3, 0)
def on_evaluate(state, task, n, baseline, model_id, progress=gr.Progress()):
    out = studio.evaluate_for_state(state, task, n, baseline, model_id, progress=progress)
    return _error_md(out["error"]), out["text"], out["figure"]


@gpu
@total(3, 0)
def on_train(state, task, steps, lr, lora, objective, baseline, model_id, progress=gr.Progress()):
    out = studio.train_design(state, task, steps, lr, lora, objective, model_id, baseline, progress=progress)
    return _error_md(out["error"]), out["summary"], out["curve"]


# ---------------------------------------------------------------- layout: design (left)
def _message(elem_id: str) -> gr.Markdown:
    """An error line placed next to the control whose input it is about."""
    return gr.Markdown("", elem_id=elem_id, elem_classes=["error-line"])


def _table(value, headers, elem_id, label, widths):
    return gr.Dataframe(value, headers=headers, datatype=["str"] * len(headers), type="array", interactive=True,
                        label=label, elem_id=elem_id, wrap=True, column_widths=widths,
                        column_count=(len(headers), "fixed"))  # rows may be added; the columns are the codec's


def _tables_tab(ui, tables):
    gr.Markdown(f"<small>**Segments**: modality {' / '.join(MODALITIES)}; size `12`, `24x24`, "
                f"`8x16x16` or `4+4+4` (frames); roles `a, b`. **Rules**: one `base` row, "
                f"then rules (last match wins). **Overlays**: op {' / '.join(OVERLAY_OPS)}. "
                f"Edit a cell and press Enter.</small>")
    steps = ["10%", "14%", "14%", "18%", "24%", "10%", "10%"]
    ui.segs = _table(tables["segments"], studio.SEGMENT_COLUMNS, "segments", "Segments",
                     ["16%", "13%", "13%", "10%", "14%", "34%"])
    ui.rules = _table(tables["rules"], studio.RULE_COLUMNS, "rules", "Rules", steps)
    ui.overlays = _table(tables["overlays"], studio.OVERLAY_COLUMNS, "overlays", "Overlays", steps)
    with gr.Row():
        ui.scheme = gr.Dropdown(list(SCHEMES), value=tables["scheme"], label="Position scheme", elem_id="scheme")
        ui.pos_params = gr.Textbox(tables["position_params"], label="Scheme parameters",
                                   placeholder="align=start, span=longest", elem_id="pos-params")
    gr.Markdown(f"<small>patterns: {', '.join(PATTERNS)}. Parameters as `size=4, "
                f"causal=false`; layers/heads as `0, 1` or `0:12:2`.</small>")


def _design_column(ui, init, presets):
    preset_names = [v for _, v in presets]
    first = init["spec"].name if init["spec"].name in preset_names else None
    with gr.Row():
        ui.preset = gr.Dropdown(presets, value=first, label="Preset gallery (group · name)", scale=4, elem_id="preset")
        ui.blank = gr.Button("New from scratch", scale=1, elem_id="blank")
        ui.undo = gr.Button("Undo", scale=1, elem_id="undo")
    ui.errors = {"preset": _message("design-error")}
    ui.card = gr.Markdown(studio.design_card(init["spec"]), elem_id="preset-card")
    with gr.Accordion("All presets (what each does, citation)", open=False):
        gr.Markdown(studio.gallery_markdown())
    with gr.Tabs():
        with gr.Tab("Tables", id="tables"):
            _tables_tab(ui, studio.spec_to_tables(init["spec"]))
            ui.errors["tables"] = _message("tables-error")
        with gr.Tab("JSON", id="json"):
            ui.code = gr.Code(studio.current(init).to_json(), language="json", label="Spec (JSON)",
                              elem_id="json-editor", lines=24, max_lines=40)
            ui.errors["json"] = _message("json-error")
            ui.apply_json = gr.Button("Apply JSON", variant="primary", elem_id="apply-json")


# ---------------------------------------------------------------- layout: see (right)
def _see_column(ui):
    ui.note = gr.Markdown("", elem_id="note")
    with gr.Tabs():
        with gr.Tab("Mask", id="see-mask"):
            with gr.Row():
                ui.layer = gr.Slider(0, 31, value=0, step=1, label="layer", visible=False, elem_id="layer")
                ui.head = gr.Slider(0, 15, value=0, step=1, label="head", visible=False, elem_id="head")
            ui.mask_img = gr.Image(type="filepath", label="mask", elem_id="mask-img", format="png", show_label=False)
        with gr.Tab("Positions", id="see-positions"):
            ui.pos_img = gr.Image(type="filepath", label="position ids", elem_id="positions-img", show_label=False)
            ui.query = gr.Dropdown([], label="RoPE distance from query segment", elem_id="query",
                                   allow_custom_value=True)  # a stale name is answered, never refused
            ui.query_msg = _message("query-error")
            ui.dist_img = gr.Image(type="filepath", label="RoPE distance", elem_id="distance-img", show_label=False)
        with gr.Tab("Flow", id="see-flow"):
            ui.flow_level = gr.Radio(["segment", "frame", "token"], value="segment", label="level")
            ui.flow_img = gr.Image(type="filepath", label="flow graph", elem_id="flow-img", show_label=False)
            ui.density = gr.Dataframe(label="segment density (rows: query, cols: key)", interactive=False,
                                      elem_id="density", wrap=True)
        with gr.Tab("Reachability", id="see-reach"):
            with gr.Row():
                ui.reach_layers = gr.Slider(1, 32, value=4, step=1, label="layers")
                ui.reach_token = gr.Textbox("", label="token (index, segment or segment[i])", placeholder="last token",
                                            elem_id="reach-token")
            ui.reach_msg = _message("reach-error")
            ui.reach_img = gr.Image(type="filepath", label="reachability", elem_id="reach-img", show_label=False)
        with gr.Tab("Checks", id="see-checks"):
            ui.checks = gr.Textbox(label="checks", lines=24, max_lines=60, elem_id="checks")


# ---------------------------------------------------------------- layout: run / compare / evaluate / export
def _run_controls(ui):
    with gr.Row():
        ui.model_id = gr.Textbox("", label="model (empty: the embedded SmolLM2-135M-Instruct; or a hub id; "
                                 "vision-language: HuggingFaceTB/SmolVLM-256M-Instruct, "
                                 "Qwen/Qwen2-VL-2B-Instruct; tiny-qwen2-vl / tiny-idefics3 are random-weight "
                                 "test models: they check the wiring, their outputs mean nothing)",
                                 placeholder="HuggingFaceTB/SmolLM2-135M-Instruct", scale=3, elem_id="model-id")
        ui.max_new = gr.Slider(0, 64, value=16, step=1, label="new tokens (0 = one forward pass)", scale=2,
                               elem_id="max-new")
        ui.run_btn = gr.Button("Run / Generate", variant="primary", scale=1, elem_id="run-btn")
    ui.run_error = gr.Markdown("", elem_classes=["error-line"], elem_id="run-error")  # and the run's progress
    gr.Markdown("<small>Texts come from the segments table's `text` column; a text segment without "
                "text runs with an example of its size (the run's notes say so).</small>")
    ui.run_images = gr.File(file_count="multiple", file_types=["image"], elem_id="run-images",
                            label="images and frames for image/video segments (VLM runs): a file named "
                                  "after a segment (img.png, clip_01.png) goes there; the rest in order, "
                                  "one per image segment, then frames shared by video segments")


def _run_results(ui):
    with gr.Row():
        ui.continuation = gr.Textbox(label="continuation", elem_id="continuation", scale=3)
        ui.nll = gr.Textbox(label="target NLL", scale=2)
    with gr.Row():
        ui.tokens = gr.Dataframe(headers=["segment", "tokens", "text"], label="tokens per segment",
                                 interactive=False, wrap=True)
        ui.top_k = gr.Dataframe(headers=["token", "p"], label="top-k at the last position", interactive=False)
    with gr.Row():
        ui.att_layer = gr.Slider(0, 29, value=29, step=1, label="attention layer")
        ui.att_head = gr.Dropdown(["mean"], value="mean", label="head", allow_custom_value=True)
    with gr.Row():
        ui.att_img = gr.Image(type="filepath", label="attention map")
        ui.mass_img = gr.Image(type="filepath", label="segment mass (last layer)")
    with gr.Row():
        ui.curves_img = gr.Image(type="filepath", label="segment mass per layer")
        ui.rollout_img = gr.Image(type="filepath", label="rollout")
    with gr.Row():
        ui.ov_query = gr.Textbox("", label="overlay query token (index, segment or segment[i])",
                                 placeholder="last token", elem_id="overlay-query")
        ui.ov_segment = gr.Textbox("", label="image/video segment", placeholder="the first one",
                                   elem_id="overlay-segment")
    ui.ov_error = gr.Markdown("", elem_classes=["error-line"])
    with gr.Row():
        ui.ov_img = gr.Image(type="filepath", label="attention over the image (VLM runs)", elem_id="overlay-img")
        ui.share_img = gr.Image(type="filepath", label="share of attention to visual tokens per layer",
                                elem_id="share-img")
    ui.run_summary = gr.Textbox(label="run summary", lines=12, elem_id="run-summary")


def _knockout_panel(ui):
    with gr.Accordion("Knockout sweep (block q -> k in a sliding window of layers)", open=False):
        with gr.Row():
            ui.ko_q = gr.Dropdown(["*"], value="*", label="q (reading)", allow_custom_value=True)
            ui.ko_k = gr.Dropdown([], label="k (blocked source)", allow_custom_value=True)
            ui.ko_window = gr.Slider(1, 32, value=3, step=1, label="window (layers)")
            ui.ko_target = gr.Textbox("", label="target token (empty: the current top-1)",
                                      placeholder='e.g. " Rome"')
            ui.ko_btn = gr.Button("Sweep")
        ui.ko_error = gr.Markdown("", elem_classes=["error-line"])
        ui.ko_img = gr.Image(type="filepath", label="knockout")
        ui.ko_text = gr.Textbox(label="knockout summary", lines=8)


def _compare_tab(ui, presets):
    with gr.Row():
        ui.snap_btn = gr.Button("Keep snapshot as B", elem_id="snapshot")
        ui.b_choice = gr.Dropdown([("the snapshot", "snapshot")] + presets, value="snapshot", label="B",
                                  elem_id="b-choice")
        ui.cmp_btn = gr.Button("Compare masks", elem_id="compare-btn")
        ui.cmp_run_btn = gr.Button("Compare on the model", variant="primary")
    ui.snap_md = gr.Markdown("")
    ui.cmp_error = gr.Markdown("", elem_classes=["error-line"])
    ui.cmp_text = gr.Textbox(label="A vs B", lines=18, elem_id="compare-text")
    with gr.Row():
        ui.diff_img = gr.Image(type="filepath", label="mask difference")
        ui.kl_img = gr.Image(type="filepath", label="KL per position")
        ui.mdiff_img = gr.Image(type="filepath", label="segment mass difference")


def _evaluate_tab(ui):
    gr.Markdown("Score the design against a baseline on generated examples (the same examples for "
                "both): target NLL and exact match with bootstrap 95% intervals, a paired test, and "
                "accuracy by the gold document's position / passkey depth / direction. Segment names "
                "must be the task's parts — start from the task's template.")
    with gr.Row():
        ui.ev_task = gr.Dropdown(["kv_retrieval", "passkey", "multihop", "reversal"], value="kv_retrieval",
                                 label="task", elem_id="eval-task")
        ui.ev_n = gr.Slider(2, 64, value=8, step=1, label="examples")
        ui.ev_base = gr.Radio([("the task's causal template", "template"), ("the snapshot (B)", "snapshot")],
                              value="template", label="baseline")
    with gr.Row():
        ui.ev_template = gr.Button("Load the task's template into the design")
        ui.ev_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-btn")
    ui.errors["template"] = _message("template-error")
    ui.ev_error = gr.Markdown("", elem_classes=["error-line"])
    ui.ev_text = gr.Textbox(label="results", lines=10, elem_id="eval-text")
    ui.ev_img = gr.Image(type="filepath", label="accuracy and NLL with 95% intervals")


def _train_tab(ui):
    gr.Markdown(f"Fine-tune the model (the Run tab's model box; `tiny-llama` is a random-weight test model) "
                f"under the design's mask on generated task examples, {studio.TRAIN_BATCH} per step. With the "
                f"baseline, the design's causal twin is trained identically and both are scored before and "
                f"after on the same held-out examples. A private copy is trained: the loaded model is untouched. "
                f"Segment names must be the task's parts — start from the task's template. The embedded "
                f"SmolLM2 is slow on CPU: start with few steps.")
    with gr.Row():
        ui.tr_task = gr.Dropdown(list(studio.TRAIN_TASKS), value="kv_retrieval", label="task", elem_id="train-task")
        ui.tr_steps = gr.Slider(1, 200, value=20, step=1, label="steps", elem_id="train-steps")
        ui.tr_lr = gr.Number(1e-4, label="learning rate", elem_id="train-lr")
        ui.tr_objective = gr.Radio([("next token", "next_token"), ("BICO (causal + masked denoising)", "bico")],
                                   value="next_token", label="objective", elem_id="train-objective")
    with gr.Row():
        ui.tr_lora = gr.Checkbox(False, label="LoRA (adapters on q/k/v/o only)", elem_id="train-lora")
        ui.tr_baseline = gr.Checkbox(True, label="train the causal baseline too, score both", elem_id="train-baseline")
        ui.tr_template = gr.Button("Load the task's template into the design")
        ui.tr_btn = gr.Button("Train", variant="primary", elem_id="train-btn")
    ui.errors["train_template"] = _message("train-template-error")
    ui.tr_error = gr.Markdown("", elem_classes=["error-line"], elem_id="train-error")  # and the step / loss
    ui.tr_img = gr.Image(type="filepath", label="training loss", elem_id="train-curve")
    ui.tr_text = gr.Textbox(label="results", lines=14, elem_id="train-text")


def _export_tab(ui):
    with gr.Row():
        ui.fmt = gr.Radio([("JSON spec (canonical)", "json"), ("FlexAttention .py", "flex"),
                           ("mask .npy", "npy"), ("positions .npy", "positions"),
                           ("pictures (PNG zip)", "png")], value="json", label="format", elem_id="fmt")
        ui.export_btn = gr.Button("Export", variant="primary", elem_id="export-btn")
    ui.export_error = gr.Markdown("", elem_id="export-message")
    ui.download = gr.File(label="download", elem_id="download")
    ui.upload = gr.File(label="import a JSON spec", file_types=[".json"], elem_id="upload")
    ui.errors["upload"] = _message("upload-error")


def _lower_tabs(ui, presets):
    with gr.Tabs():
        with gr.Tab("Run", id="run"):
            _run_controls(ui)
            _run_results(ui)
            _knockout_panel(ui)
        with gr.Tab("Compare", id="compare"):
            _compare_tab(ui, presets)
        with gr.Tab("Evaluate", id="evaluate"):
            _evaluate_tab(ui)
        with gr.Tab("Train", id="train"):
            _train_tab(ui)
        with gr.Tab("Export / Import", id="export"):
            _export_tab(ui)


# ---------------------------------------------------------------- events
def _wire_design(ui):
    """Every edit of the design, and the picture options."""
    ui.view_opts = [ui.layer, ui.head, ui.reach_layers, ui.reach_token, ui.query, ui.flow_level]
    ui.pictures = [ui.mask_img, ui.pos_img, ui.dist_img, ui.flow_img, ui.reach_img, ui.checks, ui.density,
                   ui.layer, ui.head, ui.query, ui.ko_q, ui.ko_k, ui.note, ui.reach_msg, ui.query_msg]
    ui.design_head = [ui.state, ui.code, ui.segs, ui.rules, ui.overlays, ui.scheme, ui.pos_params]
    wire_edit(ui, [ui.preset.input], studio.load_preset_into_state, [ui.preset], "load_preset", "preset")
    wire_edit(ui, [ui.blank.click], studio.load_blank, [], "new_blank", "preset")
    wire_edit(ui, [ui.undo.click], studio.undo, [], "undo", "preset")
    wire_edit(ui, [ui.segs.input, ui.rules.input, ui.overlays.input, ui.scheme.input, ui.pos_params.submit],
              studio.apply_tables, [ui.segs, ui.rules, ui.overlays, ui.scheme, ui.pos_params], "edit_tables",
              "tables", keep_tables=True, trigger_mode="always_last")
    wire_edit(ui, [ui.apply_json.click, ui.code.blur], studio.apply_json_edit, [ui.code], "edit_json", "json",
              trigger_mode="always_last")
    wire_edit(ui, [ui.upload.upload], studio.import_file, [ui.upload], "import_spec", "upload",
              extra_outputs=[ui.upload])
    wire_edit(ui, [ui.ev_template.click], studio.load_task_template, [ui.ev_task], "eval_template", "template")
    wire_edit(ui, [ui.tr_template.click], studio.load_task_template, [ui.tr_task], "train_template",
              "train_template")
    # .input: a drag, the arrow keys and the number box alike (release misses the last two)
    gr.on([ui.layer.input, ui.head.input, ui.query.input, ui.flow_level.input], on_view_options,
          [ui.state] + ui.view_opts, ui.pictures, api_name="render", trigger_mode="always_last")
    gr.on([ui.reach_layers.release, ui.reach_token.submit], on_reach, [ui.state] + ui.view_opts, ui.pictures,
          api_name="reach", trigger_mode="always_last")


def _wire_run(ui):
    overlay_io = ([ui.state, ui.att_layer, ui.att_head, ui.ov_query, ui.ov_segment],
                  [ui.ov_img, ui.share_img, ui.ov_error])
    ui.run_btn.click(on_run, [ui.state, ui.model_id, ui.max_new, ui.run_images],
                     [ui.state, ui.run_error, ui.run_summary, ui.tokens, ui.top_k, ui.continuation, ui.nll,
                      ui.att_img, ui.mass_img, ui.curves_img, ui.rollout_img, ui.att_layer, ui.att_head],
                     api_name="run_model", show_progress_on=[ui.run_error], **MODEL) \
        .then(on_overlay, *overlay_io, api_name=False)
    gr.on([ui.att_layer.input, ui.att_head.input, ui.ov_query.submit, ui.ov_segment.submit], on_overlay,
          *overlay_io, api_name="image_overlay", trigger_mode="always_last")
    gr.on([ui.att_layer.input, ui.att_head.input], on_attention, [ui.state, ui.att_layer, ui.att_head],
          ui.att_img, api_name="attention_map", trigger_mode="always_last")
    ui.ko_btn.click(on_knockout, [ui.state, ui.ko_q, ui.ko_k, ui.ko_window, ui.model_id, ui.ko_target],
                    [ui.ko_error, ui.ko_text, ui.ko_img], api_name="knockout", show_progress_on=[ui.ko_error], **MODEL)


def _wire_compare_evaluate_export(ui):
    ui.snap_btn.click(on_snapshot, [ui.state], [ui.state, ui.snap_md], api_name="keep_snapshot")
    ui.cmp_btn.click(on_compare, [ui.state, ui.b_choice], [ui.cmp_error, ui.cmp_text, ui.diff_img],
                     api_name="compare_masks")
    ui.cmp_run_btn.click(on_compare_run, [ui.state, ui.b_choice, ui.model_id, ui.max_new],
                         [ui.cmp_error, ui.cmp_text, ui.kl_img, ui.mdiff_img], api_name="compare_runs",
                         show_progress_on=[ui.cmp_error], **MODEL)
    ui.ev_btn.click(on_evaluate, [ui.state, ui.ev_task, ui.ev_n, ui.ev_base, ui.model_id],
                    [ui.ev_error, ui.ev_text, ui.ev_img], api_name="evaluate", show_progress_on=[ui.ev_error], **MODEL)
    ui.tr_btn.click(on_train, [ui.state, ui.tr_task, ui.tr_steps, ui.tr_lr, ui.tr_lora, ui.tr_objective,
                               ui.tr_baseline, ui.model_id],
                    [ui.tr_error, ui.tr_text, ui.tr_img], api_name="train", show_progress_on=[ui.tr_error], **MODEL)
    ui.export_btn.click(on_export, [ui.state, ui.fmt, ui.layer, ui.head], [ui.download, ui.export_error],
                        api_name="export")


def build() -> gr.Blocks:
    init = studio.new_state()
    presets = studio.preset_choices()
    ui = SimpleNamespace()
    with gr.Blocks(title="Mask Studio", delete_cache=(600, 1800)) as demo:  # Gradio's copies go too
        ui.state = gr.State(init)
        gr.Markdown("# Mask Studio\nDesign an attention mask from modality segments, **see** it, "
                    "**check** it, **run** it on a real model and **export** it (JSON spec or "
                    "FlexAttention code).")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                _design_column(ui, init, presets)
            with gr.Column(scale=6):
                _see_column(ui)
        _lower_tabs(ui, presets)
        _wire_design(ui)
        _wire_run(ui)
        _wire_compare_evaluate_export(ui)
        demo.load(on_view_options, [ui.state] + ui.view_opts, ui.pictures, api_name=False)
    demo.queue(default_concurrency_limit=RENDER_CONCURRENCY)
    return demo


if __name__ != "__mp_main__":  # render worker processes import this file but need no UI
    demo = build()

if __name__ == "__main__":
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run atexit: render workers shut down too
    studio.warm_up()
    # Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT win; HOST / PORT are the fallbacks
    host = os.environ.get("GRADIO_SERVER_NAME") or os.environ.get("HOST", "0.0.0.0")
    port = int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT", "7860"))
    demo.launch(server_name=host, server_port=port, css=CSS, footer_links=["api", "gradio"],
                max_file_size=f"{knobs.MAX_SPEC_BYTES >> 20}mb")
