"""Train a Mask Studio design with transformers' own `Trainer` (eager or sdpa on CPU,
flex_attention on a GPU).

    maskstudio export examples/kv_isolated_docs.json --format transformers -o design_attention.py
    python examples/train_trainer.py --design design_attention.py --backend sdpa

The design plugs in through transformers' attention registry: `design.register(backend)` returns the
attn_implementation name; `design.Collator` adds each batch's position ids and `design` (the
documents the attention function masks by). Keep `remove_unused_columns=False`: the examples'
`sizes` column must reach the collator.
"""
import argparse
import json

from tiny_setup import byte_tokenizer, kv_examples, load_design, tiny_model
from transformers import Trainer, TrainingArguments


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--design", default="design_attention.py", help="the exported module")
    ap.add_argument("--backend", default="sdpa", choices=("eager", "sdpa", "flex_attention"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pack-tokens", type=int, default=0, help="pack each batch into rows of at most N tokens")
    ap.add_argument("--out", default="runs/trainer")
    args = ap.parse_args()

    design = load_design(args.design)
    tokenizer = byte_tokenizer()
    model = tiny_model(tokenizer, attn_implementation=design.register(args.backend))
    train = kv_examples(design, tokenizer, n=args.steps * args.batch)
    targs = TrainingArguments(output_dir=args.out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                              learning_rate=3e-3, lr_scheduler_type="constant", remove_unused_columns=False,
                              logging_steps=5, save_strategy="no", report_to=[], disable_tqdm=True,
                              use_cpu=args.backend != "flex_attention")
    trainer = Trainer(model=model, args=targs, train_dataset=train,
                      data_collator=design.Collator(tokenizer.pad_token_id, pack_tokens=args.pack_tokens))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"design": design.SPEC_NAME, "backend": args.backend, "losses": losses}))


if __name__ == "__main__":
    main()
