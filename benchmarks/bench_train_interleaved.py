"""Training-step ratios from interleaved steps: maskstudio.train.fit, the hand-written flex step and the
model's SDPA step take turns, one step each per round, in one process (GPU).

A 4k-token step of SmolLM2-135M is host-bound (~3,700 kernel launches a step, measured with
profile_train_step.py), so step times drift between runs and over a run; medians of back-to-back
blocks of steps (gpu_train_check.py) then compare different moments. Here each round runs one
`fit` step, then (from fit's on_step) one hand-written flex step and one SDPA step; the ratios are
the medians of the per-round ratios. Random weights of the SmolLM2-135M architecture.
    python benchmarks/bench_train_interleaved.py [--tokens 4096] [--rounds 20] [--designs causal ...]
"""
import argparse
import json
import statistics
import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from bench_train import layouts, random_item, random_smollm2  # noqa: E402
from profile_train_step import hand_mask, joined, packed_items, stepper  # noqa: E402

from maskstudio.train import trainable_copy  # noqa: E402
from maskstudio.train.loop import fit  # noqa: E402

DESIGNS = ["causal", "prefix_lm", "isolated_docs", "packed_16"]
WARM = 3


def interleaved(src, design: str, n: int, rounds: int) -> dict:
    cuda = src.device.type == "cuda"
    vocab = src.model.config.vocab_size
    if design == "packed_16":
        items = packed_items(n, vocab)
        spec, item, pack = items[0].layout, joined(items), n
    else:
        spec = layouts(n)[design]
        item = random_item(spec, vocab, 0)
        items, pack = [item], 0
    others = {"sdpa": stepper(src, item, "sdpa")}
    if cuda:
        from torch.nn.attention.flex_attention import create_block_mask

        bm = create_block_mask(hand_mask(design, n), None, None, n, n, device="cuda")
        others["hand_flex"] = stepper(src, item, "flex_attention", bm)
    times = {k: [] for k in others}

    def on_step(record):
        for name, step in others.items():
            times[name].append(step())

    lm, module = trainable_copy(src, False, 0)
    fitted = fit(spec, lm, module, items, steps=WARM + rounds, lr=1e-5, seed=0, batch=len(items),
                 backend="flex" if cuda else "eager", progress=False, pack_tokens=pack, on_step=on_step)
    ours = [s["seconds"] for s in fitted.steps][WARM:]
    row = {"design": design, "tokens": n, "rounds": rounds,
           "card": torch.cuda.get_device_name() if cuda else "cpu", "maskstudio_ms": round(statistics.median(ours) * 1e3, 2)}
    for name, ts in times.items():
        ts = ts[WARM:]
        row[f"{name}_ms"] = round(statistics.median(ts) * 1e3, 2)
        per_round = sorted(a / b for a, b in zip(ours, ts))
        row[f"maskstudio_over_{name}"] = round(statistics.median(per_round), 3)
        row[f"maskstudio_over_{name}_iqr"] = [round(per_round[len(per_round) // 4], 3), round(per_round[3 * len(per_round) // 4], 3)]
    if "hand_flex" in times:
        row["hand_flex_over_sdpa"] = round(statistics.median(a / b for a, b in zip(times["hand_flex"][WARM:], times["sdpa"][WARM:])), 3)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--designs", nargs="+", default=DESIGNS, choices=DESIGNS)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    src = random_smollm2("cuda" if cuda else "cpu", small=not cuda)
    for design in args.designs:
        print(json.dumps(interleaved(src, design, args.tokens, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
