"""Train a Mask Studio design in a plain accelerate loop, on one process or many.

    maskstudio export examples/kv_isolated_docs.json --format transformers -o design_attention.py
    torchrun --nproc_per_node 2 examples/train_accelerate.py --design design_attention.py       # CPU
    accelerate launch --num_processes 2 examples/train_accelerate.py --design design_attention.py   # 2 GPUs

--batch is the global batch: with G processes each takes batch / G consecutive examples of a step.
The loss is summed over every target token of the step and divided by the step's token count on
all processes (times G, since DDP averages gradients), so G processes give the one-process run's
gradient, losses and weights (up to float rounding).
"""
import argparse
import json
import os

import torch
from accelerate import Accelerator
from tiny_setup import byte_tokenizer, kv_examples, load_design, tiny_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--design", default="design_attention.py", help="the exported module")
    ap.add_argument("--backend", default="sdpa", choices=("eager", "sdpa", "flex_attention"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4, help="global batch (a multiple of the process count)")
    ap.add_argument("--pack-tokens", type=int, default=0)
    ap.add_argument("--out", default="runs/accelerate")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu: several processes use gloo
    world = accelerator.num_processes
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} processes; use a multiple of {world}")
    design = load_design(args.design)
    tokenizer = byte_tokenizer()
    model = tiny_model(tokenizer, attn_implementation=design.register(args.backend))
    data = kv_examples(design, tokenizer, n=args.steps * args.batch)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch // world, shuffle=False,
                                         collate_fn=design.Collator(tokenizer.pad_token_id, args.pack_tokens))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model, opt, loader = accelerator.prepare(model, opt, loader)  # moves each batch's `design` too
    model.train()
    losses = []
    for step, batch in enumerate(loader):
        targets = (batch["labels"][:, 1:] != -100).sum()
        total = accelerator.reduce(targets, "sum")  # the step's target tokens on every process
        loss = model(**batch, num_items_in_batch=total).loss  # summed cross-entropy / total
        accelerator.backward(loss * world)  # DDP averages gradients over processes
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "sum").item())
        if step + 1 == args.steps:
            break
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        os.makedirs(args.out, exist_ok=True)
        weights = accelerator.unwrap_model(model).state_dict()
        save_file({k: v.detach().clone().contiguous() for k, v in weights.items()}, os.path.join(args.out, "model.safetensors"))
        print(json.dumps({"design": design.SPEC_NAME, "processes": world, "losses": losses}))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
