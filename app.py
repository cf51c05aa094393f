"""Mask Studio web app: layout and event wiring only. Every handler is a thin call into
`maskstudio.studio` (tested without a browser in tests/test_studio.py).

    python app.py            # serves on 0.0.0.0:7860 (or $PORT)
"""
from __future__ import annotations

import importlib.util
import os

import gradio as gr

os.environ.setdefault("MASKSTUDIO_RENDER_PROCESSES", str(min(2, os.cpu_count() or 1)))  # before studio draws

from maskstudio import studio
from maskstudio.patterns import PATTERNS
from maskstudio.positions import SCHEMES
from maskstudio.spec import MODALITIES, OVERLAY_OPS

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
#checks textarea, #run-summary textarea, #compare-text textarea { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }
"""


# ---------------------------------------------------------------- output packing (wiring only)
def _error_md(error: str) -> str:
    return f"⚠ {error}" if error else ""


def _view_opts(layer, head, reach_layers, reach_token, query, flow_level) -> dict:
    return {"layer": layer, "head": head, "reach_layers": reach_layers, "reach_token": reach_token,
            "query": query, "flow_level": flow_level}


def _pictures(state, opts):
    spec = studio.current(state)
    pics = studio.render_views(spec, opts)
    ctl = studio.controls(spec)
    segs = ctl["segments"]
    o = pics["options"]
    return [pics["mask"], pics["positions"], pics["distance"], pics["flow"], pics["reach"], pics["checks"],
            gr.update(value=pics["density"]["data"], headers=pics["density"]["headers"]),
            gr.update(visible=ctl["varies_by_layer"], maximum=max(ctl["layers"] - 1, 1), value=o["layer"]),
            gr.update(visible=ctl["varies_by_head"], maximum=max(ctl["heads"] - 1, 1), value=o["head"]),
            gr.update(choices=segs, value=o["query"]),
            gr.update(choices=["*"] + segs), gr.update(choices=segs),
            pics["note"]]


N_PICTURE_OUTPUTS = 13


def _design(state, error, opts, keep_tables=False, keep_json=False):
    """Outputs after an edit: on error keep every picture (and what the user typed)."""
    if error:
        return [state, gr.skip() if keep_json else studio.current(state).to_json()] + \
               [gr.skip()] * 5 + [_error_md(error)] + [gr.skip()] * N_PICTURE_OUTPUTS
    t = studio.spec_to_tables(state["spec"])
    tables = [gr.skip()] * 5 if keep_tables else [t["segments"], t["rules"], t["overlays"], t["scheme"],
                                                   t["position_params"]]
    spec = studio.current(state)
    return [state, spec.to_json()] + tables + [""] + _pictures(state, opts) + [studio.preset_card(spec.name)]


def on_preset(state, name, *opts):
    state, error = studio.load_preset_into_state(state, name)
    return _design(state, error, _view_opts(*opts)) + ([gr.skip()] if error else [])


def on_blank(state, *opts):
    state, error = studio.load_blank(state)
    return _design(state, error, _view_opts(*opts)) + ([gr.skip()] if error else [])


def on_undo(state, *opts):
    state, error = studio.undo(state)
    return _design(state, error, _view_opts(*opts)) + ([gr.skip()] if error else [])


def on_tables(state, segs, rules, overlays, scheme, params, *opts):
    state, error = studio.apply_table_edit(state, segs, rules, overlays, (scheme, params))
    return _design(state, error, _view_opts(*opts), keep_tables=True) + ([gr.skip()] if error else [])


def on_json(state, text, *opts):
    state, error = studio.apply_json_edit(state, text)
    return _design(state, error, _view_opts(*opts), keep_json=True) + ([gr.skip()] if error else [])


def on_upload(state, file, *opts):
    state, error = studio.import_file(state, file)
    return _design(state, error, _view_opts(*opts)) + ([gr.skip()] if error else [])


def on_view_options(state, *opts):
    return _pictures(state, _view_opts(*opts))


def on_export(state, fmt, layer, head):
    try:
        return studio.export_file(studio.current(state), fmt, int(layer or 0), int(head or 0)), ""
    except Exception as err:  # noqa: BLE001 - shown, never raised into gradio
        return None, _error_md(str(err).splitlines()[0])


@gpu
def on_run(state, model_id, max_new_tokens, images=None, progress=gr.Progress()):
    state, out = studio.run_model(state, model_id, max_new_tokens, progress=progress, images=images)
    if out["error"]:
        return [state, _error_md(out["error"])] + [gr.skip()] * 11
    return [state, "", out["summary"], out["tokens"], out["top_k"], out["continuation"], out["nll"],
            out["attention"], out["mass"], out["curves"], out["rollout"],
            gr.update(maximum=max(out["layers"] - 1, 1), value=max(out["layers"] - 1, 0)),
            gr.update(choices=["mean"] + [str(h) for h in range(out["heads"])], value="mean")]


def on_attention(state, layer, head):
    return studio.attention_for_state(state, layer, head)


def on_overlay(state, layer, head, query, segment):
    overlay, share, error = studio.overlay_for_state(state, layer, head, query, segment)
    return overlay, share, _error_md(error) if error else ""


@gpu
def on_knockout(state, q, k, window, model_id, progress=gr.Progress()):
    out = studio.knockout_sweep(state, q, k, window, model_id, progress=progress)
    return _error_md(out["error"]), out["summary"], out["curve"]


def on_snapshot(state):
    state = studio.set_snapshot(state)
    return state, f"Snapshot kept as B: **{studio.current(state).name}**"


def on_compare(state, choice):
    out = studio.compare_static(state, choice)
    return _error_md(out["error"]), out["summary"], out["diff"]


@gpu
def on_compare_run(state, choice, model_id, max_new_tokens, progress=gr.Progress()):
    out = studio.compare_runs(state, choice, model_id, max_new_tokens, progress=progress)
    return _error_md(out["error"]), out["summary"], out["kl"], out["mass_diff"]


def on_eval_template(state, task, *opts):
    from maskstudio.evaluate import task_template

    state, error = studio.apply_json_edit(state, task_template(task).to_json())
    return _design(state, error, _view_opts(*opts)) + ([gr.skip()] if error else [])


@gpu
def on_evaluate(state, task, n, baseline, model_id, progress=gr.Progress()):
    from maskstudio.evaluate import evaluate_design

    try:
        progress(0.05, desc="loading the model and scoring examples")
        base = state.get("snapshot") if baseline == "snapshot" else None
        if baseline == "snapshot" and base is None:
            return _error_md("no snapshot kept yet: use Compare → Keep snapshot as B"), "", None
        out = evaluate_design(studio.current(state), task, int(n), baseline=base,
                              model=studio.model_name(model_id))
    except Exception as err:  # noqa: BLE001 - one line in the UI, never a traceback; the design stays
        return _error_md(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__), "", None
    return "", out["text"], studio.figure_png(out["figure"])


# ---------------------------------------------------------------- layout
def build() -> gr.Blocks:
    init = studio.new_state()
    tables = studio.spec_to_tables(init["spec"])
    presets = studio.preset_choices()
    preset_names = [v for _, v in presets]
    first = init["spec"].get("name") if init["spec"].get("name") in preset_names else None
    str_cols = lambda n: ["str"] * n  # noqa: E731

    with gr.Blocks(title="Mask Studio") as demo:
        state = gr.State(init)
        gr.Markdown("# Mask Studio\nDesign an attention mask from modality segments, **see** it, "
                    "**check** it, **run** it on a real model and **export** it (JSON spec or "
                    "FlexAttention code).")
        with gr.Row(equal_height=False):
            # ------------------------------------------------ design
            with gr.Column(scale=5):
                with gr.Row():
                    preset = gr.Dropdown(presets, value=first, label="Preset gallery (group · name)",
                                         scale=4, elem_id="preset")
                    blank = gr.Button("New from scratch", scale=1, elem_id="blank")
                    undo = gr.Button("Undo", scale=1, elem_id="undo")
                card = gr.Markdown(studio.preset_card(first) if first else "", elem_id="preset-card")
                with gr.Accordion("All presets (what each does, citation)", open=False):
                    gr.Markdown(studio.gallery_markdown())
                error = gr.Markdown("", elem_id="design-error", elem_classes=["error-line"])
                with gr.Tabs():
                    with gr.Tab("Tables", id="tables"):
                        gr.Markdown(f"<small>**Segments**: modality {' / '.join(MODALITIES)}; size `12`, `24x24`, "
                                    f"`8x16x16` or `4+4+4` (frames); roles `a, b`. **Rules**: one `base` row, "
                                    f"then rules (last match wins). **Overlays**: op {' / '.join(OVERLAY_OPS)}. "
                                    f"Edit a cell and press Enter.</small>")
                        segs = gr.Dataframe(tables["segments"], headers=studio.SEGMENT_COLUMNS,
                                            datatype=str_cols(6), type="array", interactive=True,
                                            label="Segments",
                                            elem_id="segments", wrap=True,
                                            column_widths=["16%", "13%", "13%", "10%", "14%", "34%"])
                        rules = gr.Dataframe(tables["rules"], headers=studio.RULE_COLUMNS,
                                             datatype=str_cols(7), type="array", interactive=True,
                                             label="Rules",
                                             elem_id="rules", wrap=True,
                                             column_widths=["10%", "14%", "14%", "18%", "24%", "10%", "10%"])
                        overlays = gr.Dataframe(tables["overlays"], headers=studio.OVERLAY_COLUMNS,
                                                datatype=str_cols(7), type="array", interactive=True,
                                                label="Overlays",
                                                elem_id="overlays", wrap=True,
                                                column_widths=["10%", "14%", "14%", "18%", "24%", "10%", "10%"])
                        with gr.Row():
                            scheme = gr.Dropdown(list(SCHEMES), value=tables["scheme"], label="Position scheme",
                                                 elem_id="scheme")
                            pos_params = gr.Textbox(tables["position_params"], label="Scheme parameters",
                                                    placeholder="align=start, span=longest", elem_id="pos-params")
                        gr.Markdown(f"<small>patterns: {', '.join(PATTERNS)}. Parameters as `size=4, "
                                    f"causal=false`; layers/heads as `0, 1` or `0:12:2`.</small>")
                    with gr.Tab("JSON", id="json"):
                        code = gr.Code(studio.current(init).to_json(), language="json", label="Spec (JSON)",
                                       elem_id="json-editor", lines=24, max_lines=40)
                        apply_json = gr.Button("Apply JSON", variant="primary", elem_id="apply-json")
            # ------------------------------------------------ see
            with gr.Column(scale=6):
                note = gr.Markdown("", elem_id="note")
                with gr.Tabs():
                    with gr.Tab("Mask", id="see-mask"):
                        with gr.Row():
                            layer = gr.Slider(0, 11, value=0, step=1, label="layer", visible=False, elem_id="layer")
                            head = gr.Slider(0, 3, value=0, step=1, label="head", visible=False, elem_id="head")
                        mask_img = gr.Image(type="filepath", label="mask", elem_id="mask-img", format="png")
                    with gr.Tab("Positions", id="see-positions"):
                        pos_img = gr.Image(type="filepath", label="position ids", elem_id="positions-img")
                        query = gr.Dropdown([], label="RoPE distance from query segment", elem_id="query")
                        dist_img = gr.Image(type="filepath", label="RoPE distance", elem_id="distance-img")
                    with gr.Tab("Flow", id="see-flow"):
                        flow_level = gr.Radio(["segment", "frame", "token"], value="segment", label="level")
                        flow_img = gr.Image(type="filepath", label="flow graph", elem_id="flow-img")
                        density = gr.Dataframe(label="segment density (rows: query, cols: key)",
                                               interactive=False, elem_id="density")
                    with gr.Tab("Reachability", id="see-reach"):
                        with gr.Row():
                            reach_layers = gr.Slider(1, 32, value=4, step=1, label="layers")
                            reach_token = gr.Textbox("", label="token (index, segment or segment[i])",
                                                     placeholder="last token", elem_id="reach-token")
                        reach_img = gr.Image(type="filepath", label="reachability", elem_id="reach-img")
                    with gr.Tab("Checks", id="see-checks"):
                        checks = gr.Textbox(label="checks", lines=24, max_lines=60, elem_id="checks")
        # ---------------------------------------------------- run / compare / export
        with gr.Tabs():
            with gr.Tab("Run", id="run"):
                with gr.Row():
                    model_id = gr.Textbox("", label="model (empty: embedded SmolLM2-135M-Instruct; or a hub id; "
                                          "vision-language: HuggingFaceTB/SmolVLM-256M-Instruct, "
                                          "Qwen/Qwen2-VL-2B-Instruct, offline tiny-qwen2-vl / tiny-idefics3)",
                                          placeholder="HuggingFaceTB/SmolLM2-135M-Instruct", scale=3,
                                          elem_id="model-id")
                    max_new = gr.Slider(0, 64, value=16, step=1, label="new tokens (0 = one forward pass)",
                                        scale=2, elem_id="max-new")
                    run_btn = gr.Button("Run / Generate", variant="primary", scale=1, elem_id="run-btn")
                gr.Markdown("<small>Texts come from the segments table's `text` column.</small>")
                run_images = gr.File(file_count="multiple", file_types=["image"], elem_id="run-images",
                                     label="images and frames for image/video segments (VLM runs): a file named "
                                           "after a segment (img.png, clip_01.png) goes there; the rest in order, "
                                           "one per image segment, then frames shared by video segments")
                run_error = gr.Markdown("", elem_classes=["error-line"], elem_id="run-error")
                with gr.Row():
                    continuation = gr.Textbox(label="continuation", elem_id="continuation", scale=3)
                    nll = gr.Textbox(label="target NLL", scale=2)
                with gr.Row():
                    tokens = gr.Dataframe(headers=["segment", "tokens", "text"], label="tokens per segment",
                                          interactive=False, wrap=True)
                    top_k = gr.Dataframe(headers=["token", "p"], label="top-k at the last position",
                                         interactive=False)
                with gr.Row():
                    att_layer = gr.Slider(0, 29, value=29, step=1, label="attention layer")
                    att_head = gr.Dropdown(["mean"], value="mean", label="head")
                with gr.Row():
                    att_img = gr.Image(type="filepath", label="attention map")
                    mass_img = gr.Image(type="filepath", label="segment mass (last layer)")
                with gr.Row():
                    curves_img = gr.Image(type="filepath", label="segment mass per layer")
                    rollout_img = gr.Image(type="filepath", label="rollout")
                with gr.Row():
                    ov_query = gr.Textbox("", label="overlay query token (index, segment or segment[i])",
                                          placeholder="last token", elem_id="overlay-query")
                    ov_segment = gr.Textbox("", label="image/video segment", placeholder="the first one",
                                            elem_id="overlay-segment")
                ov_error = gr.Markdown("", elem_classes=["error-line"])
                with gr.Row():
                    ov_img = gr.Image(type="filepath", label="attention over the image (VLM runs)",
                                      elem_id="overlay-img")
                    share_img = gr.Image(type="filepath", label="share of attention to visual tokens per layer",
                                         elem_id="share-img")
                run_summary = gr.Textbox(label="run summary", lines=12, elem_id="run-summary")
                with gr.Accordion("Knockout sweep (block q -> k in a sliding window of layers)", open=False):
                    with gr.Row():
                        ko_q = gr.Dropdown(["*"], value="*", label="q (reading)", allow_custom_value=True)
                        ko_k = gr.Dropdown([], label="k (blocked source)", allow_custom_value=True)
                        ko_window = gr.Slider(1, 32, value=3, step=1, label="window (layers)")
                        ko_btn = gr.Button("Sweep")
                    ko_error = gr.Markdown("", elem_classes=["error-line"])
                    ko_img = gr.Image(type="filepath", label="knockout")
                    ko_text = gr.Textbox(label="knockout summary", lines=8)
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    snap_btn = gr.Button("Keep snapshot as B", elem_id="snapshot")
                    b_choice = gr.Dropdown([("the snapshot", "snapshot")] + presets, value="snapshot",
                                           label="B", elem_id="b-choice")
                    cmp_btn = gr.Button("Compare masks", elem_id="compare-btn")
                    cmp_run_btn = gr.Button("Compare on the model", variant="primary")
                snap_md = gr.Markdown("")
                cmp_error = gr.Markdown("", elem_classes=["error-line"])
                cmp_text = gr.Textbox(label="A vs B", lines=18, elem_id="compare-text")
                with gr.Row():
                    diff_img = gr.Image(type="filepath", label="mask difference")
                    kl_img = gr.Image(type="filepath", label="KL per position")
                    mdiff_img = gr.Image(type="filepath", label="segment mass difference")
            with gr.Tab("Evaluate", id="evaluate"):
                gr.Markdown("Score the design against a baseline on generated examples (the same examples for "
                            "both): target NLL and exact match with bootstrap 95% intervals, a paired test, and "
                            "accuracy by the gold document's position / passkey depth / direction. Segment names "
                            "must be the task's parts — start from the task's template.")
                with gr.Row():
                    ev_task = gr.Dropdown(["kv_retrieval", "passkey", "multihop", "reversal"], value="kv_retrieval",
                                          label="task", elem_id="eval-task")
                    ev_n = gr.Slider(2, 64, value=8, step=1, label="examples")
                    ev_base = gr.Radio([("the task's causal template", "template"), ("the snapshot (B)", "snapshot")],
                                       value="template", label="baseline")
                with gr.Row():
                    ev_template = gr.Button("Load the task's template into the design")
                    ev_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-btn")
                ev_error = gr.Markdown("", elem_classes=["error-line"])
                ev_text = gr.Textbox(label="results", lines=10, elem_id="eval-text")
                ev_img = gr.Image(type="filepath", label="accuracy and NLL with 95% intervals")
            with gr.Tab("Export / Import", id="export"):
                with gr.Row():
                    fmt = gr.Radio([("JSON spec (canonical)", "json"), ("FlexAttention .py", "flex"),
                                    ("mask .npy", "npy"), ("positions .npy", "positions"),
                                    ("pictures (PNG zip)", "png")], value="json", label="format",
                                   elem_id="fmt")
                    export_btn = gr.Button("Export", variant="primary", elem_id="export-btn")
                export_error = gr.Markdown("", elem_classes=["error-line"])
                download = gr.File(label="download", elem_id="download")
                upload = gr.File(label="import a JSON spec", file_types=[".json"], elem_id="upload")

        # ---------------------------------------------------- events
        view_opts = [layer, head, reach_layers, reach_token, query, flow_level]
        pictures = [mask_img, pos_img, dist_img, flow_img, reach_img, checks, density, layer, head, query,
                    ko_q, ko_k, note]
        design = [state, code, segs, rules, overlays, scheme, pos_params, error] + pictures + [card]
        preset.input(on_preset, [state, preset] + view_opts, design, api_name="load_preset")
        blank.click(on_blank, [state] + view_opts, design, api_name="new_blank")
        undo.click(on_undo, [state] + view_opts, design, api_name="undo")
        table_inputs = [state, segs, rules, overlays, scheme, pos_params] + view_opts
        gr.on([segs.input, rules.input, overlays.input, scheme.input, pos_params.submit], on_tables,
              table_inputs, design, api_name="edit_tables", trigger_mode="always_last")
        gr.on([apply_json.click, code.blur], on_json, [state, code] + view_opts, design, api_name="edit_json",
              trigger_mode="always_last")
        upload.upload(on_upload, [state, upload] + view_opts, design, api_name="import_spec")
        gr.on([layer.release, head.release, reach_layers.release, reach_token.submit, query.input,
               flow_level.input], on_view_options, [state] + view_opts, pictures, api_name="render",
              trigger_mode="always_last")
        export_btn.click(on_export, [state, fmt, layer, head], [download, export_error], api_name="export")
        overlay_io = ([state, att_layer, att_head, ov_query, ov_segment], [ov_img, share_img, ov_error])
        run_btn.click(on_run, [state, model_id, max_new, run_images],
                      [state, run_error, run_summary, tokens, top_k, continuation, nll, att_img, mass_img,
                       curves_img, rollout_img, att_layer, att_head],
                      api_name="run_model", concurrency_limit=1, concurrency_id="model"
                      ).then(on_overlay, *overlay_io, api_name=False)
        gr.on([att_layer.release, att_head.input, ov_query.submit, ov_segment.submit], on_overlay, *overlay_io,
              api_name="image_overlay")
        gr.on([att_layer.release, att_head.input], on_attention, [state, att_layer, att_head], att_img,
              api_name="attention_map")
        ko_btn.click(on_knockout, [state, ko_q, ko_k, ko_window, model_id], [ko_error, ko_text, ko_img],
                     api_name="knockout", concurrency_limit=1, concurrency_id="model")
        snap_btn.click(on_snapshot, [state], [state, snap_md], api_name="keep_snapshot")
        cmp_btn.click(on_compare, [state, b_choice], [cmp_error, cmp_text, diff_img], api_name="compare_masks")
        cmp_run_btn.click(on_compare_run, [state, b_choice, model_id, max_new],
                          [cmp_error, cmp_text, kl_img, mdiff_img], api_name="compare_runs",
                          concurrency_limit=1, concurrency_id="model")
        ev_template.click(on_eval_template, [state, ev_task] + view_opts, design, api_name="eval_template")
        ev_btn.click(on_evaluate, [state, ev_task, ev_n, ev_base, model_id], [ev_error, ev_text, ev_img],
                     api_name="evaluate", concurrency_limit=1, concurrency_id="model")
        demo.load(on_view_options, [state] + view_opts, pictures, api_name=False)
    demo.queue(default_concurrency_limit=RENDER_CONCURRENCY)
    return demo


if __name__ != "__mp_main__":  # render worker processes import this file but need no UI
    demo = build()

if __name__ == "__main__":
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run atexit: render workers shut down too
    studio.warm_up()
    demo.launch(server_name=os.environ.get("HOST", "0.0.0.0"), server_port=int(os.environ.get("PORT", "7860")),
                css=CSS, footer_links=["api", "gradio"])
