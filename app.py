"""Mask Studio web app: layout and event wiring only. Every handler is a thin call into
`maskstudio.studio` (tested without a browser in tests/test_studio.py).

    python app.py            # serves on 0.0.0.0:7860 ($GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT, or $HOST / $PORT)

The layout is built section by section (`_design_column`, `_see_column`, ...) into one namespace `ui`; `_wire_*`
connect them. Every edit of the design goes through `wire_edit`: `(state, *inputs) -> (state, error)`.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from types import SimpleNamespace

import gradio as gr

os.environ.setdefault("MASKSTUDIO_RENDER_PROCESSES", str(min(2, os.cpu_count() or 1)))  # before studio draws
os.environ.setdefault("MASKSTUDIO_TEMP", gr.utils.get_upload_folder())  # our files in Gradio's cache: served, not copied

from maskstudio import knobs, studio
from maskstudio.positions import SCHEMES

gpu = __import__("spaces").GPU(duration=120) if importlib.util.find_spec("spaces") else (lambda fn: fn)  # ZeroGPU

RENDER_CONCURRENCY = int(os.environ.get("MASKSTUDIO_RENDER_CONCURRENCY", "16"))  # heavy designs wait in their lane, not here
CSS = """
.error-line p { color: #b3261e; font-weight: 600; margin: 0; }
.ok-line p { color: #2e7d32; margin: 0; } .picture > label[data-testid="block-label"] { position: static; } /* not on titles */
#checks textarea, #run-summary textarea, #compare-text textarea, #eval-text textarea, #train-text textarea, #audit-text textarea { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }
.status-line { min-height: 3.2em; } .status-line p { margin: 0; color: #555; }
"""
MODEL = dict(concurrency_limit=knobs.MODEL_QUEUE_MAX + 4, concurrency_id="model")  # queued in studio.jobs, not here


# ---------------------------------------------------------------- output packing (wiring only)
log = logging.getLogger("maskstudio.app")
ERROR_BOXES = ("preset", "tables", "json", "upload", "template", "train_template")  # where an edit's error is shown
STALE = "⚠ **The pictures show the last valid design**: the edit has an error (shown next to it)."


def _error_md(error: str) -> str:
    return f"⚠ {studio.markdown_text(studio.plain_text(error))}" if error else ""


def _said(out: dict, *keys) -> list:  # a studio answer as outputs: its error line first, then `keys`
    return [_error_md(out["error"])] + [out[k] for k in keys]


def _view_opts(*values) -> dict:  # the values of ui.view_opts, in order
    return dict(zip(("layer", "head", "reach_layers", "reach_token", "query", "flow_level"), values))


def _pictures(state, opts) -> list:
    """The picture outputs: five views, checks, density, pickers, the note, messages, the button adopting run sizes."""
    out = studio.design_views(studio.current(state), {**opts, "sizes_by": state.get("sizes_by")})
    o, warn = out["options"], out["options"]["warnings"]
    return [out["mask"], out["positions"], out["distance"], out["flow"], out["reach"], out["checks"],
            gr.update(value=out["density"]["data"], headers=out["density"]["headers"]),
            gr.update(visible=out["varies_by_layer"], maximum=out["layer_max"], value=o["layer"]),
            gr.update(visible=out["varies_by_head"], maximum=out["head_max"], value=o["head"]),
            gr.update(choices=out["segments"], value=o["query"]),
            gr.update(choices=["*"] + out["segments"]), gr.update(choices=out["segments"]),
            out["note"], _error_md(warn.get("reach_token", "")), _error_md(warn.get("query", "")),
            _error_md(warn.get("flow_level", "")), gr.update(visible=out["sizes_differ"])]


N_PICTURE_OUTPUTS, NOTE = 17, 12  # the picture outputs, the note's place among them


def _failed(state, box, error) -> list:  # what the user typed stays in the editor and the tables
    """A failed edit: the last good design stays (its pictures marked), the error goes next to its control."""
    pics = [gr.skip()] * NOTE + [STALE] + [gr.skip()] * (N_PICTURE_OUTPUTS - NOTE - 1)
    return [state] + [gr.skip()] * 6 + [_error_md(error)] + pics + [gr.skip()] * (2 + len(ERROR_BOXES))


def _design(state, error, opts, box, keep_tables=False, old=None) -> list:
    """After an edit: state, editor, 5 table parts, its error, pictures, card, preset, download, other errors."""
    if error:
        return _failed(state, box, error)
    spec, t = studio.current(state), studio.spec_to_tables(studio.current(state))
    table_out = [t["segments"], t["rules"], t["overlays"], t["scheme"], t["position_params"]]
    if keep_tables:  # the user's own rows stay, unless the edit changed them (a pattern's parameters)
        fixed = old is not None and studio.tables_need_refresh(old, spec)
        table_out = [gr.skip()] + [t[k] if fixed else gr.skip() for k in ("rules", "overlays")] + [gr.skip()] * 2
    return [state, spec.to_json()] + table_out + [""] + _pictures(state, dict(opts, fresh=True)) + \
        [studio.state_card(state), gr.update(value=studio.preset_of(spec)), None] + [""] * (len(ERROR_BOXES) - 1)


def edit_handler(edit, n_inputs: int, box: str, keep_tables=False):
    """A handler for `edit(state, *inputs) -> (state, error)`, then the view options. Total: the last good design stays, the
    error goes next to `box`. The page's second copy of one action (studio.edit_once) waits for the first and moves nothing."""
    def handler(state, *args):
        session, name = getattr(gr.context.LocalContext.request.get(None), "session_hash", None), getattr(edit, "__name__", "edit")
        with studio.edit_once(session, name, args if n_inputs else ()) as repeat:
            try:
                if repeat:
                    return [gr.skip()] * (8 + N_PICTURE_OUTPUTS + 2 + len(ERROR_BOXES))
                new, error = edit(state, *studio.plain_text(args[:n_inputs]))
                return _design(new, error, _view_opts(*args[n_inputs:]), box, keep_tables, old=studio.current(state))
            except Exception as err:  # noqa: BLE001 -- a bug must not leave the page in "Error"
                log.exception("edit %s failed", name)
                return _failed(state, box, f"could not apply this edit ({type(err).__name__}: {err}); the last good design is kept")
    return handler


def wire_edit(ui, triggers, edit, inputs: list, api_name: str, box: str, keep_tables=False, extra_outputs=(), after=None, **kw):
    """Wire one edit to the design outputs, its error to `box` (on `triggers`, or `after` an event); blocks follow."""
    others = [ui.errors[b] for b in ERROR_BOXES if b != box]
    outputs = ui.design_head + [ui.errors[box]] + ui.pictures + [ui.card, ui.preset, ui.download] + others
    handler = edit_handler(edit, len(inputs), box, keep_tables)
    if extra_outputs:  # the upload box: cleared when the upload was refused
        handler = (lambda base: lambda *a: (out := base(*a)) + [None if isinstance(out[7], str) and out[7] else gr.skip()])(handler)
    args = (handler, [ui.state] + inputs + ui.view_opts, outputs + list(extra_outputs))
    dep = after.then(*args, api_name=api_name, **kw) if after is not None else gr.on(triggers, *args, api_name=api_name, **kw)
    dep.then(functools.partial(on_blocks, live=False), *ui.blocks_io, api_name=False)
    dep.then(studio.stored_design, ui.state, ui.saved, api_name=False)  # kept in the browser: a reload restores it


# ---------------------------------------------------------------- handlers (thin calls into studio)
def total(n_outputs: int, error_at: int | None, job: str | None = None):
    """Make a handler total: an unexpected exception is logged and said in its error line (output `error_at`), every other
    output stays as it was -- never Gradio's "Error" badge. With `job`: a model job (`studio.run_job`, ZeroGPU's `gpu`)."""
    def wrap(fn):
        @functools.wraps(fn)
        def handler(*args, **kwargs):
            out, ctx = [gr.skip()] * n_outputs, gr.context.LocalContext
            try:
                with studio.session(ctx.request.get(None)):  # its files count against the session's budget
                    if job:  # the fair model queue; the status line shows its place and steps; Stop ends it
                        return studio.call_as_job(ctx.request.get(None), job, fn, studio.plain_text(args), kwargs,
                                                  gr.Progress, studio.event_alive(demo._queue, ctx.event_id.get(None)))
                    return fn(*studio.plain_text(args), **kwargs)
            except Exception as err:  # noqa: BLE001 -- a refused or stopped model job is its own line; a bug is logged
                said = isinstance(err, (studio.Refused, studio.Stopped)) or log.exception("%s failed", fn.__name__)
                if error_at is not None:
                    out[error_at] = _error_md(str(err) if said else f"this did not work ({type(err).__name__}: {err})")
            return out if n_outputs > 1 else out[0]
        return gpu(handler) if job else handler
    return wrap


def on_view_options(state, *opts, reach_now=False):  # reach_now: the reach options changed, draw it at any size
    try:
        return _pictures(state, dict(_view_opts(*opts), reach_now=reach_now))
    except Exception as err:  # noqa: BLE001 -- keep the pictures, say what went wrong
        log.exception("drawing failed")
        error = _error_md(f"could not draw these pictures ({type(err).__name__}: {err})")
        return [gr.skip()] * NOTE + [error] + [gr.skip()] * (N_PICTURE_OUTPUTS - NOTE - 1)


@total(2, 1)
def on_export(state, fmt, layer, head):
    path, message = studio.export_for_state(state, fmt, layer, head)
    return path, (f"<small>{studio.markdown_text(message)}</small>" if message else "") if path else _error_md(message)


@total(18, 1, "run")
def on_run(state, model_id, max_new_tokens, images=None, progress=gr.Progress()):
    state, out = studio.run_model(state, model_id, max_new_tokens, progress=progress, images=images)
    if out["error"]:
        return [state, _error_md(out["error"])] + [gr.skip()] * 16
    last, keys = max(out["layers"] - 1, 0), "summary tokens top_k continuation nll attention mass curves rollout".split()
    return [state, ""] + [out[k] for k in keys] + [gr.update(maximum=max(last, 1), value=last),
            gr.update(choices=["mean"] + [str(h) for h in range(out["heads"])], value="mean"),
            gr.update(choices=out["token_choices"], value=out["token"]), out["focus"], out["grid"], "",
            studio.viewer_for_state(state)]  # the last: the in-browser viewer's payload


@total(5, 4)
def on_attention(state, layer, head, token=None):  # the map, the token's top-k bars, the grid, the rollout
    out = studio.focus_for_state(state, layer, head, token)
    return _said(out, "attention", "focus", "grid", "rollout")[1:] + [_error_md(out["error"])]


@total(2, 1)
def on_run_download(state):
    files, message = studio.run_download(state)
    return files, (f"<small>{studio.markdown_text(message)}</small>" if message and files else _error_md(message))


@total(2, 1)
def on_blocks(state, block_size, layer, head, live=True):  # live=False (after an edit): a large design waits
    path, message = studio.block_view(studio.current(state), block_size, layer, head, live=live)
    return path, _error_md(message)


def on_gallery_pick(evt: gr.SelectData):  # a row of the presets table: its preset into the dropdown
    return studio.gallery_pick(evt.row_value) or gr.skip()


def on_segment_pick(state, evt: gr.SelectData):  # a segments-table row: its name and text into the text editor
    return studio.segment_pick(state, evt.row_value)


def show_filled(*values):  # show the picture boxes that hold a picture, hide the empty ones (after a handler)
    out = [gr.update(visible=v is not None) for v in values]
    return out if len(out) > 1 else out[0]


@total(3, 2)
def on_overlay(state, layer, head, query, segment):
    overlay, share, error = studio.overlay_for_state(state, layer, head, query, segment)
    return overlay, share, _error_md(error)


@total(3, 0, "knockout")
def on_knockout(state, q, k, window, model_id, target, heads, mode, noise, b, progress=gr.Progress()):
    return _said(studio.knockout_experiment(state, q, k, window, model_id, target, heads, mode, b, noise,
                                            progress=progress), "summary", "curve")


@total(2, 1)
def on_snapshot(state):
    return (state := studio.set_snapshot(state)), f"Snapshot kept as B: **{studio.card_text(studio.current(state).name)}**"


@total(3, 0)
def on_compare(state, choice, more=()):
    return _said(studio.compare_static(state, choice, more), "summary", "diff")


@total(4, 0, "compare on the model")
def on_compare_run(state, choice, model_id, max_new, more=(), progress=gr.Progress()):
    return _said(studio.compare_on_model(state, choice, more, model_id, max_new, progress=progress), "summary", "kl", "mass_diff")


@total(3, 0, "evaluate")
def on_evaluate(state, task, n, baseline, model_id, progress=gr.Progress()):
    return _said(studio.evaluate_for_state(state, task, n, baseline, model_id, progress=progress), "text", "figure")


@total(3, 0, "train")
def on_train(state, task, steps, lr, lora, objective, baseline, model_id, progress=gr.Progress()):
    return _said(studio.train_design(state, task, steps, lr, lora, objective, model_id, baseline, progress=progress),
                 "summary", "curve")


# ---------------------------------------------------------------- layout: design (left)
def _message(elem_id: str) -> gr.Markdown:  # an error line placed next to the control whose input it is about
    return gr.Markdown("", elem_id=elem_id, elem_classes=["error-line"])


def _job_row(ui, key: str, error: str):  # under a model action's button: its status line (queue place, step, how it
    with gr.Row():                      # ended) and Stop; then its error line (elem_id `error`)
        setattr(ui, f"{key}_status", gr.Markdown("", elem_id=f"{key}-status", elem_classes=["status-line"]))
        setattr(ui, f"{key}_stop", gr.Button("Stop", variant="stop", scale=0, min_width=70, elem_id=f"{key}-stop"))
    setattr(ui, f"{key}_error", _message(error))


def _img(label, elem_id=None, visible=True, **kw) -> gr.Image:
    return gr.Image(type="filepath", label=label, elem_id=elem_id, visible=visible, interactive=False,
                    elem_classes=["picture"], **kw)  # a result: no upload toolbar, no X that clears it


def _table(value, headers, elem_id, label, widths):
    return gr.Dataframe(value, headers=headers, datatype=["str"] * len(headers), type="array", interactive=True, label=label,
                        elem_id=elem_id, wrap=True, column_widths=widths, column_count=(len(headers), "fixed"))  # rows may grow


def _tables_tab(ui, tables):
    gr.Markdown(studio.TABLES_HELP[0])
    steps = ["10%", "14%", "14%", "18%", "24%", "10%", "10%"]
    ui.segs = _table(tables["segments"], studio.SEGMENT_COLUMNS, "segments", "Segments", ["16%", "13%", "13%", "10%", "14%", "34%"])
    with gr.Row():  # texts, multi-line: a click on a segment's row loads its text here, leaving the box applies it
        ui.text_seg = gr.Textbox("", label="segment", scale=1, elem_id="text-seg")
        ui.text_box = gr.Textbox("", label=studio.TEXT_EDITOR_HELP, lines=3, max_lines=12, scale=5, elem_id="text-box")
    ui.rules = _table(tables["rules"], studio.RULE_COLUMNS, "rules", "Rules", steps)
    ui.overlays = _table(tables["overlays"], studio.OVERLAY_COLUMNS, "overlays", "Overlays", steps)
    with gr.Row():
        ui.scheme = gr.Dropdown(list(SCHEMES), value=tables["scheme"], label="Position scheme", elem_id="scheme")
        ui.pos_params = gr.Textbox(tables["position_params"], label="Scheme parameters",
                                   placeholder="align=start, span=longest", elem_id="pos-params")
    gr.Markdown(studio.TABLES_HELP[1])


def _design_column(ui, init, presets):
    first = next((v for _, v in presets if v == init["spec"].name), None)
    with gr.Row():
        ui.preset = gr.Dropdown(presets, value=first, label="Preset gallery (group · name)", scale=4, elem_id="preset")
        ui.blank = gr.Button("New from scratch", scale=0, min_width=110, elem_id="blank")  # the names get the width
        ui.undo, ui.redo = (gr.Button(w, scale=0, min_width=70, elem_id=w.lower()) for w in ("Undo", "Redo"))
    ui.errors = {"preset": _message("design-error")}
    ui.card = gr.Markdown(studio.state_card(init), elem_id="preset-card")
    with gr.Accordion("All presets (click a row to load it)", open=False):
        ui.gallery = gr.Dataframe(studio.gallery_rows(), headers=studio.GALLERY_COLUMNS, interactive=False, wrap=True,
                                  max_height=360, elem_id="gallery", show_search="search", column_widths=["18%", "10%", "50%", "22%"])
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
    ui.note, ui.adopt = gr.Markdown("", elem_id="note"), gr.Button(studio.ADOPT_LABEL, visible=False, elem_id="adopt-sizes")
    with gr.Tabs():
        with gr.Tab("Mask", id="see-mask"):
            with gr.Row():
                ui.layer = gr.Slider(0, 31, value=0, step=1, label="layer", visible=False, elem_id="layer")
                ui.head = gr.Slider(0, 15, value=0, step=1, label="head", visible=False, elem_id="head")
            ui.mask_img = _img("mask", "mask-img", format="png", show_label=False)
        with gr.Tab("Positions", id="see-positions"):
            ui.pos_img = _img("position ids", "positions-img", show_label=False)
            ui.query = gr.Dropdown([], label="RoPE distance from query segment", elem_id="query", allow_custom_value=True)
            ui.query_msg, ui.dist_img = _message("query-error"), _img("RoPE distance", "distance-img", show_label=False)
        with gr.Tab("Flow", id="see-flow"):
            ui.flow_level = gr.Radio(["segment", "frame", "token"], value="segment", label="level", elem_id="flow-level")
            ui.flow_msg, ui.flow_img = _message("flow-error"), _img("flow graph", "flow-img", show_label=False)
            ui.density = gr.Dataframe(label="segment density (rows: query, cols: key)", interactive=False, elem_id="density")
        with gr.Tab("Reachability", id="see-reach"):
            with gr.Row():
                ui.reach_layers = gr.Slider(1, 32, value=4, step=1, label="layers")
                ui.reach_token = gr.Textbox("", label="token (index, segment or segment[i])", placeholder="last token",
                                            elem_id="reach-token")
            ui.reach_msg, ui.reach_img = _message("reach-error"), _img("reachability", "reach-img", show_label=False)
        with gr.Tab("Blocks", id="see-blocks") as ui.blocks_tab:
            ui.block_size = gr.Radio(list(studio.BLOCK_SIZES), value=knobs.BLOCK, elem_id="block-size", label="BlockMask "
                                     "block size (tokens): full / partial / empty blocks, what a FlexAttention kernel skips")
            ui.blocks_msg, ui.blocks_img = _message("blocks-error"), _img("block grid", "blocks-img", show_label=False)
        with gr.Tab("Checks", id="see-checks"):
            ui.checks = gr.Textbox(label="checks", lines=24, max_lines=60, elem_id="checks")


# ---------------------------------------------------------------- layout: run / compare / evaluate / export
def _run_controls(ui):
    with gr.Row():
        ui.model_id = gr.Textbox("", label=studio.HELP["model"], placeholder="HuggingFaceTB/SmolLM2-135M-Instruct",
                                 scale=3, elem_id="model-id")
        ui.max_new = gr.Slider(0, 64, value=16, step=1, label="new tokens (0 = one forward pass)", scale=2, elem_id="max-new")
        ui.run_btn = gr.Button("Run / Generate", variant="primary", scale=1, elem_id="run-btn")
    _job_row(ui, "run", "run-error")
    gr.Markdown(studio.HELP["texts"])
    ui.run_images = gr.File(file_count="multiple", file_types=["image"], elem_id="run-images", label=studio.HELP["images"])


def _run_results(ui):
    ui.run_hint = gr.Markdown(studio.HELP["run_hint"], elem_id="run-hint")
    with gr.Column(visible=False) as ui.run_out:  # shown once there is a run
        with gr.Row():
            ui.continuation = gr.Textbox(label="continuation", elem_id="continuation", scale=3)
            ui.nll = gr.Textbox(label="target NLL", scale=2)
        with gr.Row():
            ui.tokens = gr.Dataframe(headers=["segment", "tokens", "text"], label="tokens per segment",
                                     interactive=False, wrap=True)
            ui.top_k = gr.Dataframe(headers=["token", "p"], label="top-k at the last position", interactive=False)
        ui.viewer = gr.HTML(None, elem_id="att-viewer", **studio.VIEWER)  # drawn in the browser (attention_viewer.js)
        with gr.Row():
            ui.att_layer = gr.Slider(0, 29, value=29, step=1, label="attention layer", elem_id="att-layer")
            ui.att_head = gr.Dropdown(["mean"], value="mean", label="head", allow_custom_value=True)
            ui.att_token = gr.Dropdown([], label="focus token (pick, or type an index / segment / segment[i])",
                                       allow_custom_value=True, elem_id="att-token")
        ui.focus_msg = _message("focus-error")
        with gr.Row():
            ui.att_img, ui.rollout_img = _img("attention map", "att-img"), _img("rollout from the focus token", "rollout-img")
        ui.focus_img = _img("what the focus token attends to / what attends to it", "focus-img")
        ui.grid_img = _img("every layer × head", "grid-img")
        with gr.Row():
            ui.mass_img, ui.curves_img = _img("segment mass (last layer)"), _img("segment mass per layer")
        with gr.Row():
            ui.ov_query = gr.Textbox("", label="overlay query token (index, segment or segment[i])",
                                     placeholder="last token", elem_id="overlay-query")
            ui.ov_segment = gr.Textbox("", label="image/video segment", placeholder="the first one",
                                       elem_id="overlay-segment")
        ui.ov_error = gr.Markdown("", elem_classes=["error-line"])
        with gr.Row():  # VLM runs only
            ui.ov_img = _img("attention over the image (VLM runs)", "overlay-img", False)
            ui.share_img = _img("share of attention to visual tokens per layer", "share-img", False)
        ui.run_summary = gr.Textbox(label="run summary", lines=12, elem_id="run-summary")
        with gr.Row():
            ui.run_dl_btn = gr.Button("Download the run: attention .npz (float16 [layers, heads, N, N]) + run .json",
                                      elem_id="run-download-btn")
            ui.run_files = gr.File(label="run data", file_count="multiple", elem_id="run-files")
        ui.run_dl_msg = gr.Markdown("", elem_id="run-download-message")


def _knockout_panel(ui):
    with gr.Accordion("Knockout and patching: q -> k over windows of layers, or chosen heads; a noise band", open=False):
        with gr.Row():
            ui.ko_q = gr.Dropdown(["*"], value="*", label="q (reading)", allow_custom_value=True)
            ui.ko_k = gr.Dropdown([], label="k (blocked source)", allow_custom_value=True)
            ui.ko_window = gr.Slider(1, 32, value=3, step=1, label="window (layers)")
            ui.ko_target = gr.Textbox("", label="target token (empty: the current top-1)", placeholder='e.g. " Rome"')
            ui.ko_heads = gr.Textbox("", label="or heads (layer.head)", info=studio.KNOCKOUT_HELP, elem_id="ko-heads")
            ui.ko_mode = gr.Radio([("knock out", "knockout"), ("patch from B", "patch")], value="knockout", elem_id="ko-mode")
            ui.ko_noise = gr.Slider(0, 64, value=16, step=1, label="noise band: random edits", elem_id="ko-noise")
            ui.ko_btn = gr.Button("Sweep / edit heads", elem_id="ko-btn")
        _job_row(ui, "ko", "ko-error")
        ui.ko_img, ui.ko_text = _img("knockout", visible=False), gr.Textbox(label="knockout summary", lines=8)


def _compare_tab(ui):
    designs = [("the snapshot", "snapshot")] + ui.presets
    with gr.Row():
        ui.snap_btn = gr.Button("Keep snapshot as B", elem_id="snapshot")
        ui.b_choice = gr.Dropdown(designs, value="snapshot", label="B", elem_id="b-choice")
        ui.more_choice = gr.Dropdown(designs, value=[], multiselect=True, label="C, D, …", elem_id="more-choice")
        ui.cmp_btn = gr.Button("Compare masks", elem_id="compare-btn")
        ui.cmp_run_btn = gr.Button("Compare A, B, C… on the model", variant="primary", elem_id="cmp-run-btn")
    _job_row(ui, "cmp_run", "cmp-error")
    ui.snap_md, ui.cmp_error = gr.Markdown(""), ui.cmp_run_error
    ui.cmp_text = gr.Textbox(label="A (the design) vs B, C, …: ≠ marks the lines that differ", lines=18, elem_id="compare-text")
    ui.diff_img = _img("masks side by side, cells that differ coloured", "diff-img", False)
    with gr.Row():
        ui.kl_img, ui.mdiff_img = _img("KL per position", visible=False), _img("segment mass difference", visible=False)


def _evaluate_tab(ui):
    gr.Markdown(studio.HELP["evaluate"])
    with gr.Row():
        ui.ev_task = gr.Dropdown(["kv_retrieval", "passkey", "multihop", "reversal"], value="kv_retrieval",
                                 label="task", elem_id="eval-task")
        ui.ev_n = gr.Slider(2, knobs.EVAL_MAX_EXAMPLES, value=8, step=1, label="examples")
        ui.ev_base = gr.Radio([("the task's causal template", "template"), ("the snapshot (B)", "snapshot")],
                              value="template", label="baseline")
    with gr.Row():
        ui.ev_template = gr.Button("Load the task's template into the design")
        ui.ev_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-btn")
    _job_row(ui, "ev", "ev-error")
    ui.errors["template"] = _message("template-error")
    ui.ev_text = gr.Textbox(label="results", lines=10, elem_id="eval-text")
    ui.ev_img = _img("accuracy and NLL with 95% intervals", visible=False)


def _train_tab(ui):
    gr.Markdown(studio.TRAIN_HELP)
    with gr.Row():
        ui.tr_task = gr.Dropdown(list(studio.TRAIN_TASKS), value="kv_retrieval", label="task", elem_id="train-task")
        ui.tr_steps = gr.Slider(1, min(200, knobs.TRAIN_MAX_STEPS), value=20, step=1, label="steps", elem_id="train-steps")
        ui.tr_lr = gr.Number(1e-4, label="learning rate", elem_id="train-lr")
        ui.tr_objective = gr.Radio([("next token", "next_token"), ("BICO (causal + masked denoising)", "bico")],
                                   value="next_token", label="objective", elem_id="train-objective")
    with gr.Row():
        ui.tr_lora = gr.Checkbox(False, label="LoRA (adapters on q/k/v/o only)", elem_id="train-lora")
        ui.tr_baseline = gr.Checkbox(True, label="train the causal baseline too, score both", elem_id="train-baseline")
        ui.tr_template = gr.Button("Load the task's template into the design")
        ui.tr_btn = gr.Button("Train", variant="primary", elem_id="train-btn")
    _job_row(ui, "tr", "train-error")
    ui.errors["train_template"] = _message("train-template-error")
    ui.tr_img = _img("training loss", "train-curve", False)
    ui.tr_text = gr.Textbox(label="results", lines=14, elem_id="train-text")


def _audit_tab(ui):  # a model's own masks on this layout, against the design (studio.audit_for_state)
    ui.au_model = gr.Dropdown(studio.AUDIT_MODELS, value="tiny-gemma3-vision", allow_custom_value=True, label="model",
                              info=studio.AUDIT_HELP, elem_id="audit-model")
    ui.au_btn = gr.Button("Audit the model on this layout", variant="primary", elem_id="audit-btn")
    ui.au_out = [_message("audit-error"), gr.Textbox(label=studio.AUDIT_TEXT, lines=16, elem_id="audit-text"),
                 gr.Gallery(label=studio.AUDIT_PICTURES, columns=3, object_fit="contain"), gr.Code(language="json", label=studio.AUDIT_SPEC)]
    ui.au_btn.click(total(4, 0)(lambda *a: _said(studio.audit_for_state(*a), "summary", "pictures", "spec")),
                    [ui.state, ui.au_model], ui.au_out, api_name="audit")


def _export_tab(ui):
    with gr.Row():
        ui.fmt = gr.Radio([("JSON spec (canonical)", "json"), ("FlexAttention .py", "flex"), ("mask .npy", "npy"),
                           ("positions .npy", "positions"), ("pictures (PNG zip)", "png"),
                           ("the last run's layout (JSON spec)", "run_layout")], value="json", label="format", elem_id="fmt")
        ui.export_btn = gr.Button("Export", variant="primary", elem_id="export-btn")
    ui.export_error, ui.download = gr.Markdown("", elem_id="export-message"), gr.File(label="download", elem_id="download")
    ui.upload = gr.File(label="import a JSON spec", file_types=[".json"], elem_id="upload")
    ui.errors["upload"] = _message("upload-error")


def _lower_tabs(ui):
    parts = {"Run": (_run_controls, _run_results, _knockout_panel), "Compare": (_compare_tab,), "Evaluate": (_evaluate_tab,),
             "Train": (_train_tab,), "Audit": (_audit_tab,), "Export / Import": (_export_tab,)}
    with gr.Tabs():
        for title, fns in parts.items():
            with gr.Tab(title, id=title.split()[0].lower()):
                for fn in fns:
                    fn(ui)


# ---------------------------------------------------------------- events
def _wire_design(ui):
    """Every edit of the design, and the picture options."""
    ui.view_opts = [ui.layer, ui.head, ui.reach_layers, ui.reach_token, ui.query, ui.flow_level]
    ui.pictures = [ui.mask_img, ui.pos_img, ui.dist_img, ui.flow_img, ui.reach_img, ui.checks, ui.density,
                   ui.layer, ui.head, ui.query, ui.ko_q, ui.ko_k, ui.note, ui.reach_msg, ui.query_msg, ui.flow_msg, ui.adopt]
    ui.blocks_io = ([ui.state, ui.block_size, ui.layer, ui.head], [ui.blocks_img, ui.blocks_msg])
    ui.design_head = [ui.state, ui.code, ui.segs, ui.rules, ui.overlays, ui.scheme, ui.pos_params]
    wire_edit(ui, [ui.preset.input], studio.load_preset_into_state, [ui.preset], "load_preset", "preset")
    wire_edit(ui, None, studio.load_preset_into_state, [ui.preset], False, "preset",
              after=ui.gallery.select(on_gallery_pick, None, ui.preset, api_name=False))
    wire_edit(ui, [ui.blank.click], studio.load_blank, [], "new_blank", "preset")
    wire_edit(ui, [ui.adopt.click], studio.adopt_run_sizes, [ui.model_id], "adopt_run_sizes", "preset")
    wire_edit(ui, [ui.undo.click], studio.undo, [], "undo", "preset")
    wire_edit(ui, [ui.redo.click], studio.redo, [], "redo", "preset")
    wire_edit(ui, [ui.text_box.blur], studio.set_segment_text, [ui.text_seg, ui.text_box], "edit_text", "tables")
    ui.segs.select(on_segment_pick, ui.state, [ui.text_seg, ui.text_box], api_name=False)
    wire_edit(ui, [ui.segs.input, ui.rules.input, ui.overlays.input, ui.scheme.input, ui.pos_params.submit],
              studio.apply_tables, [ui.segs, ui.rules, ui.overlays, ui.scheme, ui.pos_params], "edit_tables",
              "tables", keep_tables=True, trigger_mode="always_last")
    wire_edit(ui, [ui.apply_json.click, ui.code.blur], studio.apply_json_edit, [ui.code], "edit_json", "json", trigger_mode="always_last")
    wire_edit(ui, [ui.upload.upload], studio.import_file, [ui.upload], "import_spec", "upload", extra_outputs=[ui.upload])
    wire_edit(ui, [ui.ev_template.click], studio.load_task_template, [ui.ev_task], "eval_template", "template")
    wire_edit(ui, [ui.tr_template.click], studio.load_task_template, [ui.tr_task], "train_template", "train_template")
    # .input: a drag, the arrow keys and the number box alike (release misses the last two)
    gr.on([ui.layer.input, ui.head.input, ui.query.input, ui.flow_level.input], on_view_options,
          [ui.state] + ui.view_opts, ui.pictures, api_name="render", trigger_mode="always_last") \
        .then(on_blocks, *ui.blocks_io, api_name=False)
    gr.on([ui.block_size.input, ui.blocks_tab.select], on_blocks, *ui.blocks_io, api_name="block_grid",
          trigger_mode="always_last")
    gr.on([ui.reach_layers.input, ui.reach_token.submit], functools.partial(on_view_options, reach_now=True),
          [ui.state] + ui.view_opts, ui.pictures, api_name="reach", trigger_mode="always_last")


def _model_event(ui, key, fn, inputs, outputs, api_name, shown=()):
    """A model action: its button off while it runs (its last error line cleared as it starts), queue place and steps on
    its status line, Stop; `shown` boxes follow."""
    btn, status, now = getattr(ui, f"{key}_btn"), getattr(ui, f"{key}_status"), dict(concurrency_limit=None)
    req = gr.context.LocalContext.request.get  # the session: Stop ends its job; the line says how it ended
    getattr(ui, f"{key}_stop").click(lambda: studio.markdown_text(studio.stop_job(req(None))), None, status, api_name=key == "run" and "stop", **now)
    dep = btn.click(lambda: (gr.update(interactive=False), ""), None, [btn, getattr(ui, f"{key}_error")],
                    api_name=False, **now) \
        .then(fn, inputs, outputs, api_name=api_name, show_progress_on=[status], **MODEL)
    dep.then(lambda: (gr.update(interactive=True), studio.markdown_text(studio.job_line(req(None)))), None, [btn, status], api_name=False, **now)
    return dep.then(show_filled, shown, shown, api_name=False) if shown else dep


def _wire_run(ui):
    overlay_io = ([ui.state, ui.att_layer, ui.att_head, ui.ov_query, ui.ov_segment], [ui.ov_img, ui.share_img, ui.ov_error])
    _model_event(ui, "run", on_run, [ui.state, ui.model_id, ui.max_new, ui.run_images],
                 [ui.state, ui.run_error, ui.run_summary, ui.tokens, ui.top_k, ui.continuation, ui.nll,
                  ui.att_img, ui.mass_img, ui.curves_img, ui.rollout_img, ui.att_layer, ui.att_head,
                  ui.att_token, ui.focus_img, ui.grid_img, ui.focus_msg, ui.viewer], "run_model") \
        .then(lambda s: show_filled(studio.get_run(s), None if studio.get_run(s) else 1), ui.state,
              [ui.run_out, ui.run_hint], api_name=False).then(on_overlay, *overlay_io, api_name=False) \
        .then(show_filled, overlay_io[1][:2], overlay_io[1][:2], api_name=False)
    gr.on([ui.att_layer.input, ui.att_head.input, ui.ov_query.submit, ui.ov_segment.submit], on_overlay,
          *overlay_io, api_name="image_overlay", trigger_mode="always_last")
    gr.on([ui.att_layer.input, ui.att_head.input, ui.att_token.input], on_attention,
          [ui.state, ui.att_layer, ui.att_head, ui.att_token],
          [ui.att_img, ui.focus_img, ui.grid_img, ui.rollout_img, ui.focus_msg], api_name="attention_map",
          trigger_mode="always_last")
    ui.run_dl_btn.click(on_run_download, [ui.state], [ui.run_files, ui.run_dl_msg], api_name="download_run")
    _model_event(ui, "ko", on_knockout, [ui.state, ui.ko_q, ui.ko_k, ui.ko_window, ui.model_id, ui.ko_target, ui.ko_heads,
                                         ui.ko_mode, ui.ko_noise, ui.b_choice],
                 [ui.ko_error, ui.ko_text, ui.ko_img], "knockout", [ui.ko_img])


def _wire_compare_evaluate_export(ui):
    ui.snap_btn.click(on_snapshot, [ui.state], [ui.state, ui.snap_md], api_name="keep_snapshot")
    ui.cmp_btn.click(on_compare, [ui.state, ui.b_choice, ui.more_choice], [ui.cmp_error, ui.cmp_text, ui.diff_img],
                     api_name="compare_masks").then(show_filled, ui.diff_img, ui.diff_img, api_name=False)
    _model_event(ui, "cmp_run", on_compare_run, [ui.state, ui.b_choice, ui.model_id, ui.max_new, ui.more_choice],
                 [ui.cmp_error, ui.cmp_text, ui.kl_img, ui.mdiff_img], "compare_runs", [ui.kl_img, ui.mdiff_img])
    _model_event(ui, "ev", on_evaluate, [ui.state, ui.ev_task, ui.ev_n, ui.ev_base, ui.model_id],
                 [ui.ev_error, ui.ev_text, ui.ev_img], "evaluate", [ui.ev_img])
    _model_event(ui, "tr", on_train, [ui.state, ui.tr_task, ui.tr_steps, ui.tr_lr, ui.tr_lora, ui.tr_objective,
                                      ui.tr_baseline, ui.model_id], [ui.tr_error, ui.tr_text, ui.tr_img], "train", [ui.tr_img])
    ui.export_btn.click(on_export, [ui.state, ui.fmt, ui.layer, ui.head], [ui.download, ui.export_error], api_name="export")


def build() -> gr.Blocks:
    init, presets = studio.new_state(), studio.preset_choices()
    ui = SimpleNamespace(presets=presets)
    with gr.Blocks(title="Mask Studio", delete_cache=(600, 1800)) as demo:  # Gradio's copies go too
        ui.state, ui.saved = gr.State(init), gr.BrowserState(None, storage_key=studio.STORAGE_KEY, secret=studio.SECRET)
        gr.Markdown("# Mask Studio\nDesign an attention mask from modality segments, **see** it, **check** it, "
                    "**run** it on a real model and **export** it (JSON spec or FlexAttention code).")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                _design_column(ui, init, presets)
            with gr.Column(scale=6):
                _see_column(ui)
        ui.results_note = gr.Markdown("", elem_id="results-note", elem_classes=["error-line"])
        _lower_tabs(ui)
        _wire_design(ui)
        _wire_run(ui)
        _wire_compare_evaluate_export(ui)
        wire_edit(ui, [demo.load], studio.restore_design, [ui.saved], False, "preset")  # the design this browser kept
        texts = [ui.run_summary, ui.ko_text, ui.cmp_text, ui.ev_text, ui.tr_text]  # results of another design: said
        gr.on([ui.state.change] + [t.change for t in texts], studio.results_note, [ui.state] + texts, ui.results_note,
              api_name=False, trigger_mode="always_last", show_progress="hidden")
        demo.unload(lambda: [f(gr.context.LocalContext.request.get(None)) for f in (studio.end_session, studio.leave)])
    demo.queue(default_concurrency_limit=RENDER_CONCURRENCY)
    return demo


if __name__ != "__mp_main__":  # render worker processes import this file but need no UI
    demo = build()

if __name__ == "__main__":
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run atexit: render workers shut down too
    studio.warm_up()
    env = os.environ.get  # Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT win; HOST / PORT are the fallbacks
    demo.launch(server_name=env("GRADIO_SERVER_NAME") or env("HOST", "0.0.0.0"), css=CSS, head=studio.PAGE_HEAD,
                server_port=int(env("GRADIO_SERVER_PORT") or env("PORT", "7860")), footer_links=["api", "gradio"],
                max_file_size=f"{knobs.MAX_SPEC_BYTES >> 20}mb")
