"""Training benchmarks and experiments for maskstudio.train (figures go to docs/TRAINING.md).

    python benchmarks/bench_train.py --part speed    [--tokens 4096] [--steps 8]       # 1 GPU
    python benchmarks/bench_train.py --part ddp      [--tokens 2048] [--batch 8]       # 1 process
    torchrun --nproc_per_node=2 benchmarks/bench_train.py --part ddp ...               # 2 GPUs, same global batch
    python benchmarks/bench_train.py --part reversal [--facts 64] [--steps 300]        # real SmolLM2 weights
    python benchmarks/bench_train.py --part prefix   [--steps 150]                     # real SmolLM2 weights
    (reversal and prefix take --pack-tokens N; scripts/reversal_gpu.py runs both, packed, in one go)

speed and ddp use RANDOM weights of the SmolLM2-135M architecture (timing does not depend on the
weights); reversal and prefix use the embedded SmolLM2-135M-Instruct (or --model).
  speed    : one training step (forward, backward, AdamW, bf16 autocast over fp32 weights) at N
             tokens through maskstudio.train (FlexAttention + BlockMask, the runner's attention
             function) for a causal, a prefix-LM and an isolated-documents spec, against the same
             step with the model's own SDPA causal attention (flash); tokens/s and the ratio.
  ddp      : maskstudio.train.fit on `batch` examples of N tokens per step; run once plainly and once
             under torchrun: step losses must agree, tokens/s shows the scaling.
  reversal : maskstudio.train.compare on generated parent facts: causal next-token fine-tuning vs a
             BICO-style design (bidirectional fact, 15% masked-key denoising steps alternating with
             causal steps), evaluated forward and backward, before and after, with CIs.
  prefix   : maskstudio.train.compare of a prefix-LM spec against causal on kv_retrieval.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from maskstudio import Spec  # noqa: E402
from maskstudio.run.models import LoadedModel  # noqa: E402
from maskstudio.train import compare, fact_specs, tiny_lm, trainable_copy  # noqa: E402
from maskstudio.train.data import Item  # noqa: E402
from maskstudio.train.loop import dist_info, fit  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def random_smollm2(device, small: bool = False) -> LoadedModel:
    """The SmolLM2-135M architecture with random weights (seeded), byte tokenizer (ids are random)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:  # CPU smoke test of this script
        return tiny_lm()
    tok = tiny_lm().tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, attn_implementation="eager"))
    model.set_attn_implementation("eager")
    return LoadedModel(model.to(device).eval(), tok, "SmolLM2-135M architecture (random weights)", torch.device(device))


def layouts(n: int) -> dict:
    docs = 4
    d = (n - 64) // docs
    segs = [{"name": f"doc{i}", "length": d} for i in range(docs)] + [{"name": "q", "length": n - docs * d}]
    return {
        "causal": Spec.load({"name": "causal", "segments": [{"name": "x", "length": n}]}),
        "prefix_lm": Spec.load({"name": "prefix_lm", "segments": [{"name": "p", "length": n // 2},
                                                                 {"name": "t", "length": n - n // 2}],
                                "mask": {"rules": [{"q": "*", "k": "p", "pattern": "full"}]}}),
        "isolated_docs": Spec.load({"name": "isolated_docs", "segments": segs,
                                    "mask": {"rules": [{"q": [f"doc{i}" for i in range(docs)],
                                                        "k": [f"doc{i}" for i in range(docs)],
                                                        "pattern": "same", "by": "segment"}]}}),
    }


def random_item(layout: Spec, vocab: int, seed: int, index: int = 0) -> Item:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (layout.table.n,), generator=g)
    targets = torch.ones(layout.table.n, dtype=torch.bool)
    targets[0] = False
    return Item(ids, layout, layout.position_ids(), targets, index)


def stepper(src, item, attn: str, block_mask=None):
    """One training step of a private copy of `src` with transformers' own attention `attn`
    ("flex_attention" with a hand-written BlockMask, as gpu_train_check.py's hf_flex row, or "sdpa"):
    a function that runs one step and returns its seconds."""
    lm, _ = trainable_copy(src, False, 0)
    lm.model.set_attn_implementation(attn)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=1e-5, weight_decay=0.0)
    dev = lm.device
    at = item.targets.nonzero().flatten()
    ids, pos, labels = item.ids[None].to(dev), item.pos[None].to(dev), item.ids[at].to(dev)
    mask = {"attention_mask": block_mask} if block_mask is not None else {}

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = lm.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=(at - 1).to(dev), **mask)
        loss = torch.nn.functional.cross_entropy(out.logits[0].float(), labels, reduction="sum")
        (loss / len(at)).backward()
        torch.nn.utils.clip_grad_norm_(lm.model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        return time.perf_counter() - t0
    return step


def sdpa_steps(src: LoadedModel, item: Item, steps: int) -> list[float]:
    """The same step with the model's own SDPA causal attention (no maskstudio)."""
    step = stepper(src, item, "sdpa")
    return [step() for _ in range(steps)]


def part_speed(args, out):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    src = random_smollm2(dev, small=dev == "cpu")
    n, steps, warm = args.tokens, args.steps, args.warmup
    vocab = src.config.vocab_size
    res = {"tokens": n, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
           "weights": src.name, "steps_timed": steps, "warmup": warm}
    t = sdpa_steps(src, random_item(layouts(n)["causal"], vocab, 0), warm + steps)[warm:]
    res["sdpa_causal"] = {"step_s": statistics.median(t), "tokens_per_s": n / statistics.median(t)}
    print(f"SDPA causal (flash): {n / statistics.median(t):,.0f} tokens/s", flush=True)
    backend = "flex" if dev == "cuda" else "eager"
    for name, layout in layouts(n).items():
        lm, module = trainable_copy(src, False, 0)
        item = random_item(layout, vocab, 0)
        t0 = time.perf_counter()
        f = fit(layout, lm, module, [item], steps=warm + steps, lr=1e-5, seed=0, batch=1, backend=backend,
                progress=False)
        wall = time.perf_counter() - t0
        t = [s["seconds"] for s in f.steps[warm:]]
        med = statistics.median(t)
        res[f"maskstudio_{name}"] = {"step_s": med, "tokens_per_s": n / med, "first_step_s": f.steps[0]["seconds"],
                                     "vs_sdpa_causal": med / res["sdpa_causal"]["step_s"], "wall_s": wall,
                                     "backend": backend}
        print(f"maskstudio {backend} {name}: {n / med:,.0f} tokens/s, {med / res['sdpa_causal']['step_s']:.2f}x "
              f"the SDPA step (first step {f.steps[0]['seconds']:.1f} s incl. compile)", flush=True)
        del lm, module, f
        if dev == "cuda":
            torch.cuda.empty_cache()
    out["speed"] = res


def part_ddp(args, out):
    rank, world = dist_info()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    src = random_smollm2(dev, small=not torch.cuda.is_available())
    layout = layouts(args.tokens)["prefix_lm"]
    items = [random_item(layout, src.config.vocab_size, i, i) for i in range(args.batch * 2)]
    lm, module = trainable_copy(src, False, 0)
    f = fit(layout, lm, module, items, steps=args.warmup + args.steps, lr=1e-5, seed=0, batch=args.batch,
            backend="flex" if torch.cuda.is_available() else "eager", progress=False)
    if rank == 0:
        t = [s["seconds"] for s in f.steps[args.warmup:]]
        med = statistics.median(t)
        out["ddp"] = {"world_size": world, "tokens": args.tokens, "global_batch": args.batch, "step_s": med,
                      "tokens_per_s": args.batch * args.tokens / med, "losses": f.losses,
                      "weights": src.name}
        print(f"{world} process(es): {args.batch * args.tokens / med:,.0f} tokens/s, step {med:.3f} s, "
              f"losses {[round(x, 6) for x in f.losses]}", flush=True)


def part_reversal(args, out):
    sp = fact_specs()
    t0 = time.perf_counter()
    r = compare(sp["train_full"], args.model, task="parent_facts", objective="bico", eval_spec=sp["eval_prefix"],
                n_train=args.facts, eval_n=2 * args.facts, steps=args.steps, lr=args.lr, batch=args.batch,
                seed=args.seed, out_dir=args.run_dir and os.path.join(args.run_dir, "reversal"), progress=False,
                pack_tokens=args.pack_tokens)
    print(r["text"], flush=True)
    out["reversal"] = {"summary": r["summary"], "text": r["text"], "losses": r["losses"], "facts": args.facts,
                       "steps": args.steps, "lr": args.lr, "batch": args.batch, "seconds": time.perf_counter() - t0}


def part_prefix(args, out):
    from maskstudio.evaluate import task_template

    d = task_template("kv_retrieval").to_dict()
    d["name"] = "prefix-LM prompt"
    prompt = [s["name"] for s in d["segments"] if s["name"] != "answer"]
    d["mask"] = {"base": {"pattern": "causal"}, "rules": [{"q": "*", "k": prompt, "pattern": "full"}]}
    t0 = time.perf_counter()
    r = compare(Spec.load(d), args.model, task="kv_retrieval", n_train=args.n_train, eval_n=args.eval_n,
                steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed,
                out_dir=args.run_dir and os.path.join(args.run_dir, "prefix"), progress=False,
                pack_tokens=args.pack_tokens)
    print(r["text"], flush=True)
    out["prefix"] = {"summary": r["summary"], "text": r["text"], "losses": r["losses"], "steps": args.steps,
                     "lr": args.lr, "batch": args.batch, "n_train": args.n_train, "seconds": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", required=True, choices=("speed", "ddp", "reversal", "prefix"))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--facts", type=int, default=64)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--eval-n", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pack-tokens", type=int, default=0, help="reversal/prefix: pack examples into rows of N tokens")
    p.add_argument("--model", default=None, help="reversal/prefix: model (default embedded SmolLM2-135M)")
    p.add_argument("--run-dir", default=None, help="reversal/prefix: keep the run folders here")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    out = {"torch": torch.__version__}
    {"speed": part_speed, "ddp": part_ddp, "reversal": part_reversal, "prefix": part_prefix}[args.part](args, out)
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
