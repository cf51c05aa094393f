"""The Train tab's handler: fine-tune the current design under its mask (`maskstudio.train`),
with its causal baseline trained identically when asked, step and loss shown live on the progress
bar, and the loss curves as a picture. A failure is one line and the session's design stays.

The run folder (under the app's work folder, swept like the other outputs) holds config.json,
metrics.json (every step of each model), summary.txt and loss_curve.png; no checkpoints (a web
session does not keep a copy of the weights per click: `maskstudio train --out DIR` writes those).
"""
from __future__ import annotations

import json
import os
import uuid

from .. import knobs
from ..errors import SpecError
from ..evaluate import TASKS, task_template
from ..train import OBJECTIVES, TINY_TEXT, compare, train
from .actions import RUN_ERRORS, _backend_kw, _progress_adapter, app_message, model_name
from .budget import BudgetError, disk_error_line, require_room, session_files
from .examples import run_blocker
from .jobs import load_model, require_model
from .pictures import figure_png, sweep_workdir
from .provenance import label
from .state import current, one_line

TRAIN_TASKS = tuple(TASKS)   # tasks whose parts are the design's segments (the Evaluate tab's templates)
TRAIN_MAX_STEPS = knobs.TRAIN_MAX_STEPS  # the app's limit (50 on a Space); the CLI has none
TRAIN_BATCH = 4              # examples per optimizer step in the app
TRAIN_HELP = (f"Fine-tune the model (the Run tab's model box; `tiny-llama` is a random-weight test model) under the "
              f"design's mask on generated task examples, {TRAIN_BATCH} per step. With the baseline, the design's "
              f"causal twin is trained identically and both are scored before and after on the same held-out "
              f"examples. A private copy is trained: the loaded model is untouched. Segment names must be the "
              f"task's parts — start from the task's template. The embedded SmolLM2 is slow on CPU: start with "
              f"few steps.")
TRAIN_EVAL_N = 16            # held-out examples scored before and after (baseline on)


def _settings(task, steps, lr, objective) -> tuple[int, float]:
    """Check the tab's inputs before any model loads; (steps, lr) as numbers. Raises ValueError."""
    if task not in TRAIN_TASKS:
        raise ValueError(f"unknown task '{task}'; use one of {', '.join(TRAIN_TASKS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective '{objective}'; use one of {', '.join(OBJECTIVES)}")
    try:
        n, rate = float(steps), float(lr)
    except (TypeError, ValueError):
        raise ValueError(f"steps and learning rate must be numbers, got {steps!r} and {lr!r}") from None
    if n != int(n) or not 1 <= n <= knobs.TRAIN_MAX_STEPS:
        raise ValueError(f"steps must be a whole number from 1 to {knobs.TRAIN_MAX_STEPS} on this server, got {steps}")
    if not 0 < rate < 1:
        raise ValueError(f"the learning rate must be between 0 and 1 (e.g. 1e-4), got {lr}")
    return int(n), rate


def _check_parts(spec, task: str) -> None:
    """The design's segments must be the task's parts (its examples fill them by name)."""
    parts = [s["name"] for s in task_template(task).segments]
    extra = [s["name"] for s in spec.segments if s["name"] not in parts]
    if extra:
        raise SpecError("segments", f"segment(s) {', '.join(extra)} of '{spec.name}' are not parts of the task "
                                    f"{task} ({', '.join(parts)}); press 'Load the task's template' and edit "
                                    f"its mask")


def _reporter(progress, steps: int, phases: tuple[str, ...]):
    """An `on_step` callback that puts "phase: step i/n, loss x" on the progress bar (compare
    trains the baseline first, then the design)."""
    say = _progress_adapter(progress)
    seen = [0]

    def on_step(record) -> bool:
        seen[0] += 1
        phase = phases[min((seen[0] - 1) // steps, len(phases) - 1)]
        if say is not None:
            say(seen[0] / (steps * len(phases) + 1), f"{phase}: step {record['step']}/{steps}, "
                                                     f"loss {record['loss']:.4f}")
        return False
    return on_step


def _loss_lines(losses: dict) -> list[str]:
    lines = []
    for name, ys in losses.items():
        k = min(5, len(ys))
        lines.append(f"{name}: loss {ys[0]:.4f} at step 1 -> {ys[-1]:.4f} at step {len(ys)} "
                     f"(mean of the last {k}: {sum(ys[-k:]) / k:.4f})")
    return lines


def _write_run(config: dict, losses: dict, summary: str, curve: str) -> str:
    """The run folder: this session's train slot (a new run replaces the last one's files)."""
    def write(folder: str) -> list[str]:
        files = {"config.json": json.dumps(config, indent=1, default=str),
                 "metrics.json": json.dumps({"losses": losses}, indent=1), "summary.txt": summary + "\n"}
        with open(curve, "rb") as src:
            png = src.read()
        require_room(sum(len(t.encode("utf-8", "backslashreplace")) for t in files.values()) + len(png), "the training run")
        for name, text in files.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8", errors="backslashreplace") as fh:
                fh.write(text)
        with open(os.path.join(folder, "loss_curve.png"), "wb") as out:
            out.write(png)
        return [os.path.join(folder, name) for name in [*files, "loss_curve.png"]]
    sweep_workdir()
    return os.path.dirname(session_files("train", uuid.uuid4().hex, write)[0])


def train_design(state: dict, task: str = "kv_retrieval", steps=20, lr=1e-4, lora: bool = False,
                 objective: str = "next_token", model_id: str = "", baseline: bool = True, progress=None,
                 batch: int = TRAIN_BATCH, eval_n: int = TRAIN_EVAL_N, seed: int = 0) -> dict:
    """Fine-tune the current design on generated `task` examples (a private copy of the model;
    "tiny-llama" is a random-weight test model). With `baseline` the causal twin is trained
    identically and both are scored before and after on the same held-out examples. Returns
    {"error" ("" when fine), "summary" (text), "curve" (PNG path), "run_dir"}; never raises for
    what the user can fix, and never changes the session's design."""
    from ..viz import loss_curve_figure

    name = model_name(model_id)
    failed = {"summary": "", "curve": None, "run_dir": None}
    try:
        require_model(name)
        n, rate = _settings(task, steps, lr, objective)
        spec = current(state)
        _check_parts(spec, task)
        blocker = run_blocker(spec, name)
        if blocker:
            raise SpecError("", blocker)
        lm = TINY_TEXT if name == TINY_TEXT else load_model(name, progress=_progress_adapter(progress))
        kw = dict(task=task, steps=n, lr=rate, seed=seed, batch=batch, lora=bool(lora), objective=objective,
                  n_train=min(256, max(16, n * batch)), progress=False, **_backend_kw())
        phases = ("causal baseline", "design") if baseline else ("design",)
        on_step = _reporter(progress, n, phases)
        if baseline:
            out = compare(spec, lm, eval_n=eval_n, on_step=on_step, **kw)
            losses = {"causal baseline": out["losses"].get("baseline", []),
                      f"design: {spec.name}": out["losses"].get("design", [])}
            text = out["text"]
        else:
            fit = train(spec, lm, on_step=on_step, **kw)
            losses = {f"design: {spec.name}": fit.losses}
            text = f"{len(fit.losses)} steps of {task}, objective {objective}{' (LoRA)' if lora else ''}, no baseline"
    except RUN_ERRORS as err:  # one line in the UI, never a traceback; the design stays
        return {"error": app_message(err, name), **failed}
    losses = {k: ys for k, ys in losses.items() if ys}  # a Stop before a model's first step: no curve
    if not losses:
        return {"error": "stopped before the first training step: nothing to show", **failed}
    summary = "\n".join([label("training", spec), text, ""] + _loss_lines(losses))
    curve = figure_png(loss_curve_figure(losses, f"{task}: training loss ({objective}, lr {rate:g}, batch {batch})"))
    config = {"spec": spec.to_dict(), "model": name or "embedded SmolLM2-135M-Instruct", "baseline": bool(baseline),
              "eval_n": eval_n if baseline else 0, **{k: v for k, v in kw.items() if k != "progress"}}
    try:
        run_dir = _write_run(config, losses, summary, curve)
    except BudgetError as err:
        return {"error": one_line(err), "summary": summary, "curve": curve, "run_dir": None}
    except OSError as err:  # a full disk: said without the server's paths
        return {"error": disk_error_line(err), "summary": summary, "curve": curve, "run_dir": None}
    return {"error": "", "summary": summary, "curve": curve, "run_dir": run_dir}
