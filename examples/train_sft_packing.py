"""Train a Mask Studio design with TRL's `SFTTrainer`, several examples packed in each row.

    maskstudio export examples/kv_isolated_docs.json --format transformers -o design_attention.py
    python examples/train_sft_packing.py --design design_attention.py --pack-tokens 512

The design's collator packs: each batch's examples are laid, in order, into rows of at most
--pack-tokens tokens; each example attends only inside itself, under the design at its own sizes,
with its own position ids (the document mask). TRL's own `packing=True` keeps only input_ids and
labels (the examples' `sizes` would be lost), so it stays off and the collator packs.
"""
import argparse
import json

from datasets import Dataset
from tiny_setup import byte_tokenizer, kv_examples, load_design, tiny_model
from trl import SFTConfig, SFTTrainer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--design", default="design_attention.py", help="the exported module")
    ap.add_argument("--backend", default="sdpa", choices=("eager", "sdpa", "flex_attention"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pack-tokens", type=int, default=512)
    ap.add_argument("--out", default="runs/sft")
    args = ap.parse_args()

    design = load_design(args.design)
    tokenizer = byte_tokenizer()
    model = tiny_model(tokenizer, attn_implementation=design.register(args.backend))
    train = Dataset.from_list(kv_examples(design, tokenizer, n=args.steps * args.batch))
    config = SFTConfig(output_dir=args.out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                       learning_rate=3e-3, lr_scheduler_type="constant", packing=False, max_length=None,
                       remove_unused_columns=False, bf16=False, logging_steps=5, save_strategy="no", report_to=[],
                       disable_tqdm=True, use_cpu=args.backend != "flex_attention")
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         data_collator=design.Collator(tokenizer.pad_token_id, pack_tokens=args.pack_tokens))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"design": design.SPEC_NAME, "pack_tokens": args.pack_tokens, "losses": losses}))


if __name__ == "__main__":
    main()
