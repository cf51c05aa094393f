"""A training step through transformers' Trainer with the exported design (`export --format
transformers`, flex_attention) against the same step through maskstudio.train (#26), one process.

    python benchmarks/bench_trainer_export.py [--tokens 4096] [--steps 8]

SmolLM2-135M architecture with random weights (timing does not depend on them), one example of N
tokens a step, bf16 autocast over fp32 weights, AdamW, clip 1.0, for a prefix-LM and an
isolated-documents design; also the model's own SDPA causal step. Prints one JSON line per design:
median seconds per step after warm-up, tokens/s, first-step losses of both paths (the same
weights, data and mask: they agree to bf16 rounding).
"""
import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from bench_train import layouts, random_item, random_smollm2, sdpa_steps  # noqa: E402

from maskstudio.export import transformers_code  # noqa: E402
from maskstudio.train import trainable_copy  # noqa: E402
from maskstudio.train.loop import fit  # noqa: E402

WARM = 3


def exported(spec, folder):
    path = f"{folder}/design_{spec.name}.py"
    with open(path, "w") as fh:
        fh.write(transformers_code(spec))
    mod_spec = importlib.util.spec_from_file_location(f"design_{spec.name}", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module  # torch.compile re-imports a mask_mod's module
    mod_spec.loader.exec_module(module)
    return module


def trainer_steps(src, design, item, steps, folder):
    """Seconds per Trainer step and the losses, the exported design on flex_attention."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    lm, _ = trainable_copy(src, False, 0)
    design.use(lm.model, "flex_attention")
    row = {"input_ids": item.ids.tolist(), "labels": torch.where(item.targets, item.ids, -100).tolist(),
           "sizes": {s["name"]: s["length"] for s in item.layout.segments}}
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    args = TrainingArguments(output_dir=f"{folder}/trainer", per_device_train_batch_size=1, max_steps=steps,
                             learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                             optim="adamw_torch", bf16=True, remove_unused_columns=False, report_to=[],
                             logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=lm.model, args=args, train_dataset=[row] * steps, callbacks=[Clock()],
                      data_collator=design.Collator(src.tokenizer.pad_token_id, pad_to_multiple_of=128))
    trainer.train()
    return times, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    src = random_smollm2("cuda")
    folder = tempfile.mkdtemp()
    base = statistics.median(sdpa_steps(src, random_item(layouts(args.tokens)["causal"], 49152, 0), args.steps)[WARM:])
    print(json.dumps({"path": "sdpa causal (the model's own)", "tokens": args.tokens, "s_per_step": round(base, 4)}))
    for name in ("prefix_lm", "isolated_docs"):
        spec = layouts(args.tokens)[name]
        item = random_item(spec, 49152, 0)
        lm, module = trainable_copy(src, False, 0)
        ran = fit(spec, lm, module, [item] * args.steps, steps=args.steps, lr=1e-5, seed=0, batch=1,
                  backend="flex", progress=False)
        ours = statistics.median(s["seconds"] for s in ran.steps[WARM:])
        times, losses = trainer_steps(src, exported(spec, folder), item, args.steps, folder)
        theirs = statistics.median(times[WARM:])
        print(json.dumps({"design": name, "tokens": args.tokens, "card": torch.cuda.get_device_name(),
                          "maskstudio_train_s": round(ours, 4), "trainer_exported_flex_s": round(theirs, 4),
                          "trainer_over_maskstudio": round(theirs / ours, 3), "sdpa_causal_s": round(base, 4),
                          "trainer_tokens_per_s": round(args.tokens / theirs),
                          "first_loss_maskstudio": ran.losses[0], "first_loss_trainer": losses[0]}))


if __name__ == "__main__":
    main()
