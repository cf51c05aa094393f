"""Where a training step's time goes: torch.profiler over maskstudio.train.loop.fit steps.

    python benchmarks/profile_train_step.py [--tokens 4096] [--design causal] [--steps 4]

The SmolLM2-135M architecture with random weights (as gpu_train_check.py), one example of N tokens a
step, bf16 autocast, AdamW. Fits once unprofiled (compiles and warms up), then profiles a second fit.
Prints every step's seconds of both fits (one-time work shows as outliers) and one JSON line with the
top operations by device time and by host time. `--hand` profiles, in the same process, the step a
researcher writes by hand for the same design (transformers' own flex_attention with a hand-written
BlockMask, as gpu_train_check.py's hf_flex row) and the model's SDPA step, so the three tables compare.
On a machine without CUDA: eager, small model (and --hand's flex row is skipped).
`--design packed_16`: 16 prefix-LM examples of N/16 tokens packed into one row (gpu_train_check.py's
packed row; the hand-written mask is its document mask, positions restarting per example).
"""
import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from bench_train import layouts, random_item, random_smollm2, sdpa_steps, stepper  # noqa: E402

from maskstudio import Spec  # noqa: E402
from maskstudio.train import trainable_copy  # noqa: E402
from maskstudio.train.data import Item  # noqa: E402
from maskstudio.train.loop import fit  # noqa: E402


def top(events, key, n=12):
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [(e.key[:90], round(getattr(e, key) / 1e3, 2), e.count) for e in rows]


def packed_items(n: int, vocab: int) -> list:
    """16 prefix-LM examples of n/16 tokens (gpu_train_check.py's packed row)."""
    d = n // 16
    doc = Spec.load({"name": "prefix_lm_doc", "segments": [{"name": "p", "length": d // 2}, {"name": "t", "length": d - d // 2}],
                     "mask": {"rules": [{"q": "*", "k": "p", "pattern": "full"}]}})
    return [random_item(doc, vocab, i, i) for i in range(16)]


def joined(items: list) -> Item:
    """The packed items as one Item for the hand-written step (ids, positions, targets concatenated)."""
    return Item(torch.cat([it.ids for it in items]), None, torch.cat([it.pos for it in items]),
                torch.cat([it.targets for it in items]), 0)


def hand_mask(design: str, n: int):
    """The mask a researcher writes by hand for bench_train's layouts (gpu_train_check.py's)."""
    if design == "packed_16":
        d = n // 16
        return lambda b, h, q, k: (q // d == k // d) & ((k % d < d // 2) | (k <= q))
    if design == "causal":
        return lambda b, h, q, k: k <= q
    if design == "prefix_lm":
        return lambda b, h, q, k: (k <= q) | (k < n // 2)
    d = (n - 64) // 4
    end = 4 * d
    return lambda b, h, q, k: torch.where((q < end) & (k < end), q // d == k // d, k <= q)


def hand_steps(src, item, block_mask, steps: int) -> list[float]:
    """transformers' flex_attention with a hand-written BlockMask: gpu_train_check.py's hf_flex step."""
    step = stepper(src, item, "flex_attention", block_mask)
    return [step() for _ in range(steps)]


def profiled(fn, cuda: bool):
    """(fn's result, profiler key averages) of one call under torch.profiler."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        result = fn()
    return result, prof.key_averages()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--design", default="causal", choices=["causal", "prefix_lm", "isolated_docs", "packed_16"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hand", action="store_true", help="also profile the hand-written flex and the SDPA step")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    src = random_smollm2("cuda" if cuda else "cpu", small=not cuda)
    vocab = src.model.config.vocab_size
    backend = "flex" if cuda else "eager"
    if args.design == "packed_16":
        items = packed_items(args.tokens, vocab)
        spec, item, pack = items[0].layout, joined(items), args.tokens
    else:
        spec = layouts(args.tokens)[args.design]
        item = random_item(spec, vocab, 0)
        items, pack = [item], 0

    def run(steps):
        lm, module = trainable_copy(src, False, 0)
        return fit(spec, lm, module, items, steps=steps, lr=1e-5, seed=0, batch=len(items), backend=backend,
                   progress=False, pack_tokens=pack)

    device_key = "device_time_total" if cuda else "cpu_time_total"
    card = torch.cuda.get_device_name() if cuda else "cpu"

    def report(path, warm, prof_steps, events):
        print(json.dumps({"path": path, "design": args.design, "tokens": args.tokens, "card": card,
                          "warm_step_s": [round(s, 4) for s in warm], "profiled_step_s": [round(s, 4) for s in prof_steps],
                          "top_device_ms": top(events, device_key), "top_host_self_ms": top(events, "self_cpu_time_total")}),
              flush=True)

    warm = [s["seconds"] for s in run(args.steps).steps]
    fitted, events = profiled(lambda: run(args.steps), cuda)
    report("maskstudio.fit", warm, [s["seconds"] for s in fitted.steps], events)
    if args.hand:
        if cuda:
            from torch.nn.attention.flex_attention import create_block_mask

            bm = create_block_mask(hand_mask(args.design, args.tokens), None, None, args.tokens, args.tokens,
                                   device="cuda")
            warm = hand_steps(src, item, bm, args.steps)
            times, events = profiled(lambda: hand_steps(src, item, bm, args.steps), cuda)
            report("hand-written flex", warm, times, events)
        warm = sdpa_steps(src, item, args.steps)
        times, events = profiled(lambda: sdpa_steps(src, item, args.steps), cuda)
        report("sdpa causal", warm, times, events)

if __name__ == "__main__":
    main()
