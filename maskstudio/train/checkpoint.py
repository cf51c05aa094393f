"""Checkpoints a researcher can use: the trained model in `save_pretrained` form, the training
state only where a resumable run asks for it, the last K kept.

A checkpoint folder `checkpoints/step-N/` holds

* the model as transformers writes it (`config.json`, `model.safetensors`, `generation_config.json`)
  in `save_dtype` (bfloat16 by default: half the bytes; SmolLM2 ships in it), so
  `AutoModelForCausalLM.from_pretrained(folder)` loads it; with LoRA the adapter as peft writes it
  (`adapter_config.json`, `adapter_model.safetensors`, fp32), loaded by `PeftModel.from_pretrained`;
* the tokenizer (`AutoTokenizer.from_pretrained(folder)`), `spec.json` and `state.json`;
* with `resumable`: `optimizer.safetensors`, the exact fp32 trainable weights (`weights::NAME`) and
  AdamW's moments and step counters (`NAME::exp_avg`, ...): what a bit-identical resume reads.

Why the split: AdamW's state is twice the weights (1.1 GB for 135M), and a run that will not be
continued does not need it; with the defaults (bfloat16, keep 2) a 135M run folder stays near
0.55 GB whatever the number of steps.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import RunError
from ..spec import Spec

SAVE_DTYPES = ("bfloat16", "float32")
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_FILES = ("model.safetensors", "adapter_model.safetensors")  # a full model's, a LoRA adapter's


def checkpoint_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def _save_model(folder: Path, module, tokenizer, save_dtype: str) -> None:
    """The model in `save_pretrained` form: a peft adapter as peft writes it, a full model in
    `save_dtype` (the config's dtype says so, and from_pretrained loads it in it)."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar per checkpoint
    try:
        _save_weights(folder, module, save_dtype)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _save_weights(folder: Path, module, save_dtype: str) -> None:
    if hasattr(module, "peft_config"):
        module.save_pretrained(str(folder))
    else:
        dtype = getattr(torch, save_dtype)
        cast: dict = {}  # by storage, so tied weights stay one tensor and are saved once
        state = {k: cast.setdefault((v.data_ptr(), v.dtype, v.shape),
                                    v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype))
                 for k, v in module.state_dict().items()}
        module.save_pretrained(str(folder), state_dict=state)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["dtype"] = save_dtype  # save_pretrained writes the training copy's float32
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _training_state(opt, params: dict) -> dict:
    """The exact fp32 trainable weights and AdamW's state, by parameter name."""
    out = {f"weights::{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for n, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            out[f"{n}::{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return out


def save_checkpoint(path: Path, module, tokenizer, opt, params: dict, step: int, spec: Spec, extra: dict,
                    save_dtype: str = "bfloat16", resumable: bool = False) -> None:
    """Write one checkpoint folder (to a temporary folder, then renamed): the model in
    save_pretrained form, the tokenizer, spec.json, state.json and, when `resumable`, the training
    state (optimizer.safetensors)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _save_model(tmp, module, tokenizer, save_dtype)
    if resumable:
        save_file(_training_state(opt, params), str(tmp / OPTIMIZER_FILE))
    (tmp / "spec.json").write_text(spec.to_json(), encoding="utf-8")
    (tmp / "state.json").write_text(json.dumps({"step": step, "save_dtype": save_dtype, "resumable": resumable,
                                                **extra}, indent=1) + "\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _step_of(folder: Path) -> int | None:
    tail = folder.name[len("step-"):]
    return int(tail) if folder.name.startswith("step-") and tail.isdigit() else None


def prune_checkpoints(out_dir, keep: int, current: int) -> list[Path]:
    """Keep the `keep` newest checkpoints up to step `current` (0: every one); checkpoints past
    `current` are of a trajectory a resume abandoned and go too (a later resume would pick them).
    Returns the folders removed."""
    root = Path(out_dir) / "checkpoints"
    found = sorted((s, p) for p in root.glob("step-*") if p.is_dir() and (s := _step_of(p)) is not None)
    gone = [p for s, p in found if s > current]
    kept = [p for s, p in found if s <= current]
    if keep:
        gone += kept[:-keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def checkpoint_bytes(out_dir) -> int:
    """Bytes of every file under a run folder (what the size bound is about)."""
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())


# ---------------------------------------------------------------- reading back
def latest_checkpoint(path) -> Path:
    """`path` itself when it is a checkpoint folder, else the newest one under path/checkpoints."""
    p = Path(path)
    if (p / "state.json").exists():
        return p
    root = p / "checkpoints"
    found = sorted((s, c) for c in root.glob("step-*") if (s := _step_of(c)) is not None) if root.is_dir() else []
    if not found:
        raise RunError(f"no checkpoint to resume from in '{path}' (expected state.json or checkpoints/step-*)")
    return found[-1][1]


def read_json(path: Path, what: str, kind: type = dict):
    """A run folder's JSON file as `kind`, or RunError naming the file (crafted or damaged folders
    get one line, never a traceback)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this a Mask Studio run folder?") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise RunError(f"{path}: unreadable {what} ({reason})") from None
    if not isinstance(value, kind):
        raise RunError(f"{path}: the {what} must be a JSON {'object' if kind is dict else 'list'}")
    return value


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder holds (state.json's "step", a non-negative integer)."""
    step = read_json(path / "state.json", "checkpoint state").get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise RunError(f"{path / 'state.json'}: \"step\" must be a non-negative integer, got {step!r:.40}")
    return step


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise RunError(f"{path}: missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for damaged files
        raise RunError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:100]})") from None


def _check_model_file(path: Path) -> None:
    """The checkpoint's model file is there and readable (a resume reads the training state, but a
    checkpoint whose model is damaged is not one to continue)."""
    from safetensors import safe_open

    found = [path / f for f in MODEL_FILES if (path / f).is_file()]
    if not found:
        raise RunError(f"{path / MODEL_FILES[0]}: missing; the checkpoint is incomplete")
    try:
        with safe_open(str(found[0]), "pt") as fh:
            fh.keys()
    except Exception as err:  # safetensors raises its own error type for damaged files
        raise RunError(f"{found[0]}: not a readable safetensors file ({str(err).splitlines()[0][:100]})") from None


def load_checkpoint(path: Path, opt, params: dict, device) -> dict:
    """Restore the exact trainable weights and AdamW's state from a resumable checkpoint; the
    checkpoint's state.json (with its step). RunError in one line for a checkpoint saved without
    --resumable, or one that does not match the model."""
    step = checkpoint_step(path)
    _check_model_file(path)
    if not (path / OPTIMIZER_FILE).is_file():
        raise RunError(f"{path}: no optimizer state to continue from (the run was trained without --resumable, so "
                       "its checkpoints hold the model only); train with --resumable to continue a run exactly")
    state = load_tensors(path / OPTIMIZER_FILE)
    weights = {k.split("::", 1)[1]: v for k, v in state.items() if k.startswith("weights::")}
    missing = sorted(set(params) - set(weights))
    if missing:
        raise RunError(f"checkpoint {path} does not match this model/LoRA setting (missing {missing[0]}, ...)")
    wrong = [n for n, p in params.items() if weights[n].shape != p.shape]
    if wrong:
        raise RunError(f"checkpoint {path} does not match this model ({wrong[0]}: {tuple(weights[wrong[0]].shape)} "
                       f"vs {tuple(params[wrong[0]].shape)})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n].to(p.device, p.dtype))
    for n, p in params.items():
        entry = {k.split("::", 1)[1]: v for k, v in state.items() if k.split("::", 1)[0] == n}
        if entry:
            opt.state[p] = {k: (v if k == "step" else v.to(device)) for k, v in entry.items()}
    return {**read_json(path / "state.json", "checkpoint state"), "step": step}
