"""The training loop: forwards through the runner's attention path, checkpoints, resume, DDP.

Every forward goes through `run.attention`: the model is switched to the registered "maskstudio"
attention function (`attn_impl`) for the whole run and each example carries its own
`MaskContext(layout)` as the forward kwarg `maskstudio=` - eager dense rows on CPU, FlexAttention
with a BlockMask on CUDA past knobs.FLEX_MIN_TOKENS (a plain causal layer: transformers' SDPA, the
same mask recognized from its lowered expression). There is no second masking path.

One optimizer step = `batch` examples, one forward each (each has its own layout and mask), the
loss summed over every target token of the step and divided by their number, so the step's
gradient does not depend on how the examples are split between processes: under
`torchrun --nproc_per_node=G` rank r takes examples r, r+G, ... of the step and DistributedDataParallel
averages the gradients (each rank's loss is scaled by G / total tokens), which equals the
one-process gradient of the same global batch.

`pack_tokens=N` packs each process's examples of a step, in order, into rows of at most N tokens
(`data.pack_rows`: the document mask of `lower_packed`, each example under its own design and
sizes with places counted from its own start, positions restarting per example), one forward per
row instead of per example. The loss, the data order
and the gradient are those of the unpacked step (up to float rounding); only the number of
forwards changes. Evaluation packs the same way (`evaluate_model(..., pack_tokens=N)`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import RunError
from ..progress import stopped, tick
from ..evaluate import ANSWER, Example, ranked, rivals, score, summarize
from ..run.attention import ATTN_NAME, MaskContext, attn_impl, register
from ..run.models import LoadedModel
from ..run.pipeline import choose_backend
from ..spec import Spec
from .checkpoint import (SAVE_DTYPES, checkpoint_dir, latest_checkpoint, load_checkpoint, prune_checkpoints,
                         read_json, save_checkpoint)
from .data import Item, batch_indices, bico_item, causal_twin, encode, mask_token_id, pack_rows, packed_span, with_layout
from .model import check_memory, trainable_parameters

OBJECTIVES = ("next_token", "bico")
CONTEXTS_KEPT = 256   # examples whose mask contexts (dense rows / BlockMasks) are kept between steps


@dataclass
class Fit:
    """What one training run produced."""

    lm: LoadedModel                 # the trained model (forward module), for evaluate.score / run
    module: object                  # the module whose trainable parameters are saved (peft model with LoRA)
    spec: Spec
    steps: list = field(default_factory=list)    # {"step", "loss", "tokens", "kind", "lr", "seconds"}
    evals: list = field(default_factory=list)    # {"step", "nll", "accuracy", ...}
    scores: dict = field(default_factory=dict)   # step (str) -> every evaluated example's {"id", "nll", "correct"}
    out_dir: str | None = None
    memory: dict = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]


# ---------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; initialises the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    return rank, world


def _all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ---------------------------------------------------------------- one forward
def item_loss(net, item: Item, num_heads: int, backend: str, device, autocast: bool, ctx=None) -> torch.Tensor:
    """Summed cross-entropy over item's target tokens, through the registered attention function
    (the model must be switched to it: `attn_impl(model, ATTN_NAME)`). `ctx`: a MaskContext of
    item.layout to reuse (its masks are built once and kept)."""
    ctx = ctx or MaskContext(item.layout, num_heads, backend, record=False)
    pos = item.pos[..., None, :] if item.pos.dim() == 2 else item.pos[None]
    at = item.targets.nonzero().flatten()
    labels = (item.labels if item.labels is not None else item.ids)[at].to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with amp:
        out = net(input_ids=item.ids[None].to(device), position_ids=pos.to(device), use_cache=False,
                  logits_to_keep=(at - 1).to(device), **{ATTN_NAME: ctx})
    logits = out.logits[0].float()
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


# what a resumed run keeps from its config.json (config key -> train() argument)
RESUMED = {"model_id": "model", "task": "task", "data": "data", "lr": "lr", "seed": "seed", "batch": "batch",
           "lora": "lora", "objective": "objective", "loss_on": "loss_on", "n_train": "n_train",
           "eval_every": "eval_every", "eval_n": "eval_n", "warmup": "warmup", "save_every": "save_every",
           "pack_tokens": "pack_tokens", "backend": "backend", "eval_data": "eval_data", "keep": "keep",
           "resumable": "resumable", "save_dtype": "save_dtype"}


def run_folder(resume) -> Path:
    """The run folder of `resume`: a run folder, or a checkpoint folder inside one."""
    ck = latest_checkpoint(resume)
    return ck.parent.parent if ck.parent.name == "checkpoints" else Path(resume)


def resumed_settings(resume, given: dict, override: bool = False) -> dict:
    """The settings a resumed run continues with: its config.json's. `given` holds the caller's
    explicit settings (train() argument names); one that contradicts the run is refused with both
    values named, unless `override` (then the given value wins and the run changes on purpose)."""
    folder = run_folder(resume)
    config = read_json(folder / "config.json", "run configuration")
    out = dict(given)
    for key, arg in RESUMED.items():
        if key not in config:
            continue
        if arg not in given:
            out[arg] = config[key]
        elif given[arg] != config[key] and not override:
            flag = "--" + arg.replace("_", "-")
            raise RunError(f"resume: {flag} {given[arg]!r} contradicts the run's {config[key]!r} "
                           f"({folder / 'config.json'}); leave it out to keep the run's value, or pass --override")
    return out


def _previous_metrics(path: Path, start: int) -> tuple[list, list, dict]:
    """(steps, evals, per-example scores) a resumed run keeps from its folder's metrics.json and
    scores.json (up to its checkpoint)."""
    if not path.exists():
        return [], [], {}
    prev = read_json(path, "metrics")
    scores_file = path.with_name("scores.json")
    scores = read_json(scores_file, "per-example scores") if scores_file.exists() else {}
    kept = {k: v for k, v in scores.items() if k.isdigit() and int(k) <= start}
    out = []
    for key in ("steps", "evals"):
        rows = prev.get(key, [])
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in rows):
            raise RunError(f"{path}: \"{key}\" must be a list of objects with an integer \"step\"")
        out.append([r for r in rows if r["step"] <= start])
    return out[0], out[1], kept


# ---------------------------------------------------------------- evaluation during / after training
def evaluate_model(spec: Spec, lm: LoadedModel, examples: list[Example], pack_tokens: int = 0) -> list[dict]:
    """evaluate.score for every example (target NLL and exact match), the model in eval mode;
    with `pack_tokens` the examples are packed into rows (`score_packed`, the same numbers).
    Examples with candidate answers (meta "candidates") also get the true answer's rank among
    them by total log-probability (`evaluate.ranked`): each rival answer is scored the same way."""
    was = lm.model.training
    lm.model.eval()
    try:
        rows = _scores(spec, lm, examples, pack_tokens)
        extra = [rivals(ex) for ex in examples[:len(rows)]]
        if not any(extra):
            return rows
        flat = _scores(spec, lm, [r for rs in extra for r in rs], pack_tokens)
        out, at = [], 0
        for row, rs in zip(rows, extra):
            if at + len(rs) > len(flat):  # stopped while scoring rivals: keep the rows fully ranked
                break
            out.append(ranked(row, flat[at: at + len(rs)]))
            at += len(rs)
        return out
    finally:
        lm.model.train(was)


def _scores(spec: Spec, lm: LoadedModel, examples: list[Example], pack_tokens: int) -> list[dict]:
    if pack_tokens:
        return score_packed(spec, lm, examples, pack_tokens)
    rows = []
    for i, ex in enumerate(examples):
        if tick(f"scoring example {i + 1}/{len(examples)}"):  # Stop keeps the rows scored so far
            break
        rows.append(score(spec, ex, lm))
    return rows


@torch.no_grad()
def score_packed(spec: Spec, lm: LoadedModel, examples: list[Example], pack_tokens: int) -> list[dict]:
    """evaluate.score's rows (mean NLL of the answer segment, exact match of its argmax) from
    packed forwards: each example tokenized like a run, packed in order into rows of at most
    `pack_tokens` tokens, one forward per row through the registered attention function."""
    items = [encode(spec, ex, lm, ANSWER, i) for i, ex in enumerate(examples)]
    register()
    out = []
    with attn_impl(lm.model, ATTN_NAME):
        for row in pack_rows(items, pack_tokens):
            backend = choose_backend(None, lm, len(row.ids))
            ctx = MaskContext(row.layout, lm.num_heads, backend, record=False)
            at = row.targets.nonzero().flatten()
            pos = row.pos[..., None, :] if row.pos.dim() == 2 else row.pos[None]
            logits = lm.model(input_ids=row.ids[None].to(lm.device), position_ids=pos.to(lm.device),
                              use_cache=False, logits_to_keep=(at - 1).to(lm.device),
                              **{ATTN_NAME: ctx}).logits[0].float().cpu()
            labels = row.ids[at]
            nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            hit = logits.argmax(-1) == labels
            for ex, a, b in row.members or ((row.example, 0, len(row.ids)),):
                sel = (at >= a) & (at < b)
                out.append({"id": examples[ex].id, "nll": float(nll[sel].mean()), "correct": bool(hit[sel].all()),
                            "tokens": int(sel.sum()), "meta": examples[ex].meta})
    return out


def eval_entry(step: int, rows: list[dict], breakdown: str | None) -> dict:
    s = summarize(["model"], {"model": rows}, breakdown)["specs"][0]
    return {"step": step, **{k: s[k] for k in ("n", "nll", "nll_ci", "accuracy", "accuracy_ci")},
            **({"breakdown": s["breakdown"]} if "breakdown" in s else {})}


# ---------------------------------------------------------------- the loop
def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)


def fit(spec: Spec, lm: LoadedModel, module, items: list[Item], *, steps: int, lr: float, seed: int,
        batch: int, objective: str = "next_token", warmup: int = 0, clip: float | None = 1.0,
        eval_every: int = 0, eval_examples: list[Example] | None = None, eval_spec: Spec | None = None,
        breakdown: str | None = None, out_dir: str | None = None, save_every: int = 0, resume=None,
        backend: str | None = None, max_memory: int | None = None, progress: bool = True,
        config: dict | None = None, desc: str = "training", on_step=None, pack_tokens: int = 0,
        keep: int = 2, save_dtype: str = "bfloat16", resumable: bool = False) -> Fit:
    """Train `lm.model` (a private trainable copy) on `items` (encoded under `spec`).

    `on_step(record)` is called on rank 0 after every step with the step's metrics dict (and the
    latest evaluation under "eval" when one ran), e.g. to draw a live loss curve; returning True
    stops after this step (a checkpoint is written when out_dir is set). `pack_tokens`: pack each
    step's examples into rows of at most that many tokens (see the module docstring).
    Checkpoints (`checkpoint`): the model in save_pretrained form in `save_dtype`, the optimizer
    state only when `resumable`, the `keep` newest kept (0: all)."""
    if objective not in OBJECTIVES:
        raise RunError(f"unknown objective '{objective}'; use one of {', '.join(OBJECTIVES)}")
    if save_dtype not in SAVE_DTYPES:
        raise RunError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    rank, world = dist_info()
    if batch % world:
        raise RunError(f"batch {batch} does not split over {world} processes; use a multiple of {world}")
    device = lm.device
    if not isinstance(pack_tokens, int) or isinstance(pack_tokens, bool) or pack_tokens < 0:
        raise RunError(f"pack_tokens must be 0 (no packing) or a positive number of tokens, got {pack_tokens!r}")
    longest = packed_span(items, batch // world, pack_tokens)
    backend = choose_backend(backend, lm, longest)
    if backend == "flex" and device.type != "cuda":
        raise RunError("FlexAttention has no backward pass on CPU; train with backend='eager' (the default "
                       "on CPU) or on a GPU")
    params = trainable_parameters(module)
    memory = check_memory(lm, longest, module is not lm.model, backend, max_memory,
                          sum(p.numel() for p in params.values()))
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    causal = None
    if objective == "bico":  # the causal steps: the same tokens under the causal twin
        twins: dict = {}
        causal = []
        for it in items:
            key = it.layout.to_json()
            twins.setdefault(key, causal_twin(it.layout))
            causal.append(with_layout(it, twins[key], lm))
    mask_id = mask_token_id(lm.tokenizer)
    fitted = Fit(lm, module, spec, out_dir=out_dir, memory=memory)
    start = 0
    if resume:
        ck = latest_checkpoint(resume)
        start = load_checkpoint(ck, opt, params, device)["step"]
        if start >= steps:
            raise RunError(f"the run in {ck} is already at step {start}; pass more steps than that to continue it")
        fitted.steps, fitted.evals, fitted.scores = _previous_metrics(Path(ck).parent.parent / "metrics.json", start)
    out = Path(out_dir) if out_dir else None
    if out and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(spec.to_json(), encoding="utf-8")
        (out / "config.json").write_text(json.dumps({**(config or {}), "backend": backend, "world_size": world,
                                                     "memory_estimate_bytes": memory["estimate_bytes"]},
                                                    indent=1, default=str) + "\n")
    autocast = device.type == "cuda"
    net = lm.model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(lm.model, device_ids=[device.index] if device.type == "cuda" else None)
    register()
    bar = _progress(steps, start, progress and rank == 0, desc)
    heads = lm.num_heads
    contexts: dict = {}  # (kind, example) -> MaskContext: a fixed layout's masks are built once per run
    with attn_impl(lm.model, ATTN_NAME):
        lm.model.train()
        for step in range(start, steps):
            t0 = time.perf_counter()
            kind = ("causal" if step % 2 == 0 else "denoise") if objective == "bico" else "next_token"
            order = batch_indices(len(items), batch, step, seed)
            idx = order[rank::world]
            if kind == "causal":
                mine = [causal[i] for i in idx]
            elif kind == "denoise":
                mine = [bico_item(items[i], step, seed, mask_id) for i in idx]
            else:
                mine = [items[i] for i in idx]
            mine = pack_rows(mine, pack_tokens)  # unchanged without packing
            local = torch.tensor([float(sum(it.n_targets for it in mine))], device=device)
            total = float(_all_sum(local, world))
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
            loss_sum = torch.zeros((), device=device)
            for j, it in enumerate(mine):
                if tick():  # Stop: this step is dropped, the steps before it are kept
                    break
                sync = net.no_sync() if world > 1 and j < len(mine) - 1 else contextlib.nullcontext()
                # kept per example; not for packed rows (their examples meet only in this step) nor
                # denoising layouts (they change every step)
                key = (kind, it.example)
                reuse = not it.members and kind != "denoise"
                ctx = contexts.get(key) if reuse else None
                if reuse and ctx is None and len(contexts) < CONTEXTS_KEPT:
                    ctx = contexts[key] = MaskContext(it.layout, heads, backend, record=False)
                with sync:
                    loss = item_loss(net, it, heads, backend, device, autocast, ctx)
                    (loss * (world / total)).backward()
                loss_sum += loss.detach()
            if stopped():
                break
            if clip:
                torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = float(_all_sum(loss_sum[None], world)) / total
            if not math.isfinite(mean):
                raise RunError(f"the loss became {mean} at step {step + 1}; lower the learning rate (lr={lr})")
            fitted.steps.append({"step": step + 1, "loss": mean, "tokens": int(total), "kind": kind, "examples": order,
                                 "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
                                 "forwards": len(mine)})
            bar.set_postfix(loss=f"{mean:.4f}")
            bar.update(1)
            done = step + 1
            if eval_every and eval_examples and (done % eval_every == 0 or done == steps):
                if rank == 0:
                    rows = evaluate_model(eval_spec or spec, lm, eval_examples, pack_tokens)
                    fitted.evals.append(eval_entry(done, rows, breakdown))
                    fitted.scores[str(done)] = rows
                    bar.write(f"step {done}: eval NLL {fitted.evals[-1]['nll']:.4f}, "
                              f"accuracy {fitted.evals[-1]['accuracy']:.3f}")
                _barrier(world)
            stop = bool(on_step({**fitted.steps[-1], **({"eval": fitted.evals[-1]} if fitted.evals and
                                                         fitted.evals[-1]["step"] == done else {})})
                        ) if on_step and rank == 0 else False
            if world > 1:  # every rank stops together
                stop = bool(_all_sum(torch.tensor([float(stop)], device=device), world))
            if out and ((save_every and done % save_every == 0) or done == steps or stop):
                if rank == 0:
                    save_checkpoint(checkpoint_dir(out, done), module, lm.tokenizer, opt, params, done, spec,
                                    {"loss": mean, "seed": seed, "objective": objective}, save_dtype, resumable)
                    prune_checkpoints(out, keep, done)
                    write_metrics(fitted)
                _barrier(world)
            if stop:
                break
    bar.close()
    if out and rank == 0:
        write_metrics(fitted)
    return fitted


def write_metrics(fitted: Fit) -> None:
    if fitted.out_dir:
        path = Path(fitted.out_dir) / "metrics.json"
        path.write_text(json.dumps({"steps": fitted.steps, "evals": fitted.evals}, indent=1) + "\n")
        if fitted.scores:  # every evaluated example, so each interval can be recomputed from the folder
            path.with_name("scores.json").write_text(json.dumps(fitted.scores, indent=1, default=str) + "\n")
