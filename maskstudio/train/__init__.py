"""Train under the mask: fine-tune a model with a spec's mask and positions, against a causal
baseline trained identically, and evaluate both with maskstudio.evaluate's statistics.

    from maskstudio.train import train, compare
    fit = train(spec, "tiny-llama", task="kv_retrieval", steps=50, lr=1e-3, out_dir="runs/x")
    table = compare(spec, None, task="reversal", steps=200, objective="bico", out_dir="runs/cmp")

* The forward is the runner's: `run.attention`'s registered function reads each example's
  `MaskContext` (per layer and head), positions come from the spec (`run.inputs.model_positions`).
* The loss is on role `target` tokens (or `loss_on` segments), each predicted from the token before.
* objective "bico": alternate plain causal next-token steps (even steps) with masked-denoising steps
  (odd): 15% of the non-special tokens become the mask token, are invisible as keys to every
  query (the spec's mask AND NOT flagged_key), and are predicted.
* lora=True (or a dict of peft.LoraConfig options) trains LoRA adapters through `peft`.
* pack_tokens=N packs each step's examples into rows of at most N tokens (attention never crosses
  examples, positions restart per example): one forward per row instead of per example, the
  same loss, data order and gradient. Evaluation in `compare` packs the same way.
* Deterministic given `seed`: data order and BICO corruption are pure functions of (seed, step,
  example); a resumed run continues with the very next loss of the uninterrupted one.
* `out_dir`: config.json, spec.json, metrics.json (per-step loss, evaluations), scores.json (every
  evaluated example) and checkpoints/step-N/: the model in `save_pretrained` form (a peft adapter
  with LoRA) in `save_dtype`, the tokenizer, spec.json, state.json, and optimizer.safetensors only
  when `resumable`; the `keep` newest checkpoints are kept (`train.checkpoint`).

Modules: data (examples -> items, data order, BICO corruption), model (private trainable copy,
LoRA, tiny model, memory estimate and refusal), checkpoint (save_pretrained form, training state,
keep K), loop (forward, loop, resume, DDP).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from ..callable_package import make_callable
from ..evaluate import report, summarize
from ..errors import RunError
from ..progress import stopped
from ..run.inputs import as_spec
from ..spec import Spec
from .data import (FACT_TASKS, TRAIN_BREAKDOWN, TRAIN_TASKS, batch_indices, bico_item, causal_twin, encode_all,
                   fact_specs, held_out, pack, pack_rows, parent_facts, train_examples)
from .checkpoint import SAVE_DTYPES, checkpoint_bytes, latest_checkpoint
from .loop import (OBJECTIVES, RESUMED, Fit, dist_info, evaluate_model, fit, item_loss, resumed_settings, run_folder,
                   score_packed)
from .model import TINY_TEXT, check_memory, estimate_bytes, model_id, source_model, tiny_lm, trainable_copy

__all__ = ["train", "compare", "Fit", "causal_twin", "batch_indices", "bico_item", "tiny_lm", "TINY_TEXT",
           "estimate_bytes", "check_memory", "item_loss", "latest_checkpoint", "OBJECTIVES", "prepare_training",
           "fact_specs", "parent_facts", "held_out", "TRAIN_TASKS", "FACT_TASKS", "pack", "pack_rows",
           "evaluate_model", "score_packed", "SAVE_DTYPES", "checkpoint_bytes"]


def _check(steps, lr, batch, n_train, eval_n=1, **counts):
    """Refuse settings out of range (one line each); counts: name -> value, 0 allowed."""
    for name, value, lo in (("steps", steps, 1), ("batch", batch, 1), ("n_train", n_train, 1), ("eval_n", eval_n, 1),
                            *((k, v, 0) for k, v in counts.items())):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            kind = "a positive integer" if lo else "0 or a positive integer"
            raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < 1):
        raise ValueError(f"lr must be a number in (0, 1), got {lr!r}")


def _resumed(spec, resume, given: dict, defaults: dict, override: bool) -> tuple:
    """(spec, settings, out folder) of a resumed run: settings left at train()'s defaults follow
    the run's config.json, explicit ones must agree with it (or override); the spec defaults to
    the run's own and must equal it; the resumed steps go into the run's folder."""
    loaded = given["model"] if not isinstance(given["model"], (str, type(None))) else None  # a LoadedModel
    explicit = {k: v for k, v in given.items() if v != defaults[k] and not (k == "model" and loaded is not None)}
    settings = {**given, **resumed_settings(resume, explicit, override)}
    if loaded is not None:  # a model object handed in is the caller's choice (its id cannot be compared)
        settings["model"] = loaded
    folder = run_folder(resume)
    own = Spec.load(str(folder / "spec.json")) if (folder / "spec.json").is_file() else None
    if spec is None:
        if own is None:
            raise RunError(f"{folder}: no spec.json to resume with; give the spec file")
        spec = own
    spec = as_spec(spec)
    if own is not None and spec.to_json() != own.to_json() and not override:
        raise RunError(f"resume: the spec '{spec.name}' differs from the run's ({folder / 'spec.json'}); "
                       "leave the spec out to continue the run's, or pass --override")
    return spec, settings, folder


def prepare_training(spec, model=None, task: str | None = "kv_retrieval", data: str | None = None,
                     n_train: int = 256, seed: int = 0, loss_on=None, device=None, eval_data: str | None = None):
    """(spec, source LoadedModel, examples, items): the examples tokenized under `spec`."""
    spec = as_spec(spec)
    src = source_model(model, device)
    examples = train_examples(task, data, n_train, seed, eval_data)
    return spec, src, examples, encode_all(spec, examples, src, loss_on)


def train(spec, model=None, task: str | None = "kv_retrieval", data: str | None = None, steps: int = 100,
          lr: float = 1e-4, seed: int = 0, batch: int = 8, lora=False, objective: str = "next_token",
          eval_every: int = 0, eval_n: int = 32, out_dir: str | None = None, resume=None, loss_on=None,
          n_train: int = 256, eval_spec=None, backend: str | None = None, device=None, warmup: int = 0,
          save_every: int = 0, max_memory: int | None = None, progress: bool = True, on_step=None,
          pack_tokens: int = 0, eval_data: str | None = None, override: bool = False, keep: int = 2,
          save_dtype: str = "bfloat16", resumable: bool = False, _prepared=None) -> Fit:
    """Fine-tune `model` (LoadedModel, "tiny-llama", hub id, None = embedded SmolLM2-135M) under
    `spec` on a generated `task` (evaluate.TASKS) or your `data` JSONL. The model given is never
    modified: a private copy is trained and returned in `Fit.lm`. `on_step(record)` sees every
    step's metrics (a live loss curve) and may return True to stop. `pack_tokens=N` packs each
    step's examples into rows of at most N tokens (one forward per row). Raises RunError / ValueError
    with a one-line fix (including the memory refusal with its estimate).

    Checkpoints (with `out_dir`, every `save_every` steps and at the end) hold the model in
    `save_pretrained` form in `save_dtype` ("bfloat16" or "float32"; a LoRA adapter as peft saves
    it), the optimizer state only when `resumable` (what `resume` needs), the `keep` newest kept
    (0: every one).

    `resume` (a run folder or checkpoint): the run continues as it was configured — settings left
    at their defaults follow its config.json, an explicit one that contradicts it is refused
    (`override=True` changes it on purpose), spec None takes the run's spec, and the new steps
    are written into the run's folder unless `out_dir` says otherwise."""
    if resume is not None and _prepared is None:
        given = {arg: value for arg, value in locals().items() if arg in _RESUMABLE}
        spec, settings, folder = _resumed(spec, resume, given, _DEFAULTS, override)
        model, task, data, lr, seed, batch, lora, objective, loss_on, n_train, eval_every, eval_n, warmup, \
            save_every, pack_tokens, backend, eval_data, keep, resumable, save_dtype = \
            (settings[k] for k in _RESUMABLE)
        out_dir = out_dir or str(folder)
    _check(steps, lr, batch, n_train, save_every=save_every, eval_every=eval_every, warmup=warmup,
           eval_n=eval_n, pack_tokens=pack_tokens, keep=keep)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective '{objective}'; use one of {', '.join(OBJECTIVES)}")
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    spec, src, examples, items = _prepared or prepare_training(spec, model, task, data, n_train, seed, loss_on, device,
                                                               eval_data)
    lm, module = trainable_copy(src, lora, seed)
    eval_examples = held_out(task, eval_n, seed, n_train, data, eval_data) if eval_every else None
    config = {"spec": spec.name, "model": src.name, "model_id": model if isinstance(model, str) else model_id(src),
              "task": None if data else task, "data": data, "steps": steps,
              "lr": lr, "seed": seed, "batch": batch, "lora": lora, "objective": objective, "loss_on": loss_on,
              "n_train": n_train, "examples": len(examples), "eval_every": eval_every, "eval_n": eval_n,
              "warmup": warmup, "save_every": save_every, "pack_tokens": pack_tokens, "backend": backend,
              "eval_data": eval_data, "keep": keep, "resumable": bool(resumable), "save_dtype": save_dtype,
              "resumed_from": str(latest_checkpoint(resume)) if resume else None}
    return fit(spec, lm, module, items, steps=steps, lr=lr, seed=seed, batch=batch, objective=objective,
               warmup=warmup, eval_every=eval_every, eval_examples=eval_examples,
               eval_spec=as_spec(eval_spec) if eval_spec is not None else None,
               breakdown=None if (data or eval_data) else TRAIN_BREAKDOWN.get(task),
               out_dir=out_dir, save_every=save_every, resume=resume, backend=backend, max_memory=max_memory,
               progress=progress, config=config, desc=f"training {spec.name}", on_step=on_step,
               pack_tokens=pack_tokens, keep=keep, save_dtype=save_dtype, resumable=bool(resumable))


def same_attention(a: Spec, b: Spec) -> bool:
    """Do two designs attend alike: the same mask rules and position scheme (canonical forms)?"""
    return a.mask == b.mask and a.positions == b.positions


_RESUMABLE = tuple(RESUMED.values())  # train()'s arguments a resumed run takes from its config.json
_DEFAULTS = {k: v.default for k, v in inspect.signature(train).parameters.items() if k in _RESUMABLE}


def compare(spec, model=None, task: str | None = "kv_retrieval", data: str | None = None, eval_data=None,
            steps: int = 100, lr: float = 1e-4, seed: int = 0, batch: int = 8, lora=False,
            objective: str = "next_token", eval_n: int = 64, out_dir: str | None = None, n_train: int = 256,
            loss_on=None, eval_spec=None, baseline=None, progress: bool = True, **kwargs) -> dict:
    """The design against its causal baseline, trained identically (same seed, data order, steps,
    lr; the baseline's objective is next-token), both evaluated before and after training on the
    same held-out examples. Returns {"summary": {"before", "after"}, "text": one table, "fits"}
    (None on torchrun ranks other than 0)."""
    spec = as_spec(spec)
    base = as_spec(baseline) if baseline is not None else causal_twin(spec, "causal baseline")
    design_eval = as_spec(eval_spec) if eval_spec is not None else spec
    base_eval = causal_twin(design_eval, "causal baseline") if eval_spec is not None else base
    src = source_model(model, kwargs.get("device"))
    examples = train_examples(task, data, n_train, seed, eval_data)
    out = Path(out_dir) if out_dir else None
    fits = {}
    twin = same_attention(spec, base) and objective == "next_token"
    for label, s, obj in (("baseline", base, "next_token"), ("design", spec, objective)):
        if stopped():  # Stop: the losses so far are kept, nothing more is trained
            break
        if twin and label == "design":  # the same mask, positions and objective: the same run
            fits["design"] = fits["baseline"]
            break
        items = encode_all(s, examples, src, loss_on)
        fits[label] = train(s, src, task, data, steps=steps, lr=lr, seed=seed, batch=batch, lora=lora,
                            objective=obj, out_dir=str(out / label) if out else None, loss_on=loss_on,
                            n_train=n_train, progress=progress, eval_data=eval_data,
                            _prepared=(s, src, examples, items), **kwargs)
    if dist_info()[0] != 0:
        return None  # other torchrun ranks: training only; rank 0 evaluates
    if stopped():
        return _stopped_result(fits, twin)
    held = held_out(task, eval_n, seed, n_train, data, eval_data)
    breakdown = TRAIN_BREAKDOWN.get(task) if not (data or eval_data) else None
    rows = {"before": {}, "after": {}}
    names = ["causal baseline", f"design: {spec.name}"]
    for when in rows:
        for name, s, label in ((names[0], base_eval, "baseline"), (names[1], design_eval, "design")):
            lm = src if when == "before" else fits[label].lm
            rows[when][name] = evaluate_model(s, lm, held, kwargs.get("pack_tokens", 0))
    if stopped():
        return _stopped_result(fits, twin)
    summary = {when: summarize(names, rows[when], breakdown) for when in rows}
    note = ([f"note: '{spec.name}' has the causal baseline's mask and positions; it was trained once and "
             "both rows are that run (no difference to test)", ""] if twin else [])
    text = "\n".join(note + [f"{'before training':^40}", report(summary["before"]), "",
                      f"{f'after {steps} steps (design objective {objective})':^40}", report(summary["after"])])
    result = {"summary": summary, "text": text, "fits": fits, "same_as_baseline": twin,
              "losses": {k: f.losses for k, f in fits.items()}}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(
            {"summary": summary, "losses": result["losses"], "task": task, "data": data, "steps": steps,
             "lr": lr, "seed": seed, "batch": batch, "objective": objective, "lora": lora, "eval_n": len(held),
             "pack_tokens": kwargs.get("pack_tokens", 0)},
            indent=1, default=str) + "\n")
        (out / "comparison.txt").write_text(text + "\n")
        # per-example scores, so every interval and p-value can be recomputed from the folder
        (out / "scores.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return result


def _stopped_result(fits: dict, twin: bool) -> dict:
    """compare's answer when its job was stopped: the losses trained so far, nothing scored."""
    steps = {k: len(f.losses) for k, f in fits.items()}
    done = ", ".join(f"{k} {n} steps" for k, n in steps.items()) or "no step"
    return {"summary": None, "text": f"stopped ({stopped()}) after {done}: the losses so far are kept; "
                                     f"nothing was scored", "fits": fits, "same_as_baseline": twin,
            "losses": {k: f.losses for k, f in fits.items()}, "stopped": stopped()}


make_callable(__name__, train)  # `maskstudio.train(spec, ...)` keeps working although train is a package
