"""Runner speed on the embedded SmolLM2-135M: a 256-token masked forward with attention capture
versus the model's plain forward with output_attentions (CPU target: < 2 s and <= 1.5x).

    python benchmarks/bench_runner.py [--tokens 256] [--repeats 5] [--backend eager|flex]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskstudio import runner
from maskstudio.runner import _Context, _attn_impl, _forward, _register, prepare


def timed(fns, repeats):
    """Median seconds of each function, calls interleaved so that load on a shared machine
    hits all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    lm = runner.load_model()
    print(f"load            {time.perf_counter() - t0:6.2f} s   {lm.name} on {lm.device}")
    words = ("the quick brown fox jumps over the lazy dog and then runs far away into the forest ") * 64
    ids = lm.tokenizer.encode(words, add_special_tokens=False)[:args.tokens]
    third = len(ids) // 3
    texts = [lm.tokenizer.decode(ids[:third]), lm.tokenizer.decode(ids[third:2 * third]),
             lm.tokenizer.decode(ids[2 * third:])]
    spec = {"segments": [{"name": "doc1", "text": texts[0], "branch": "d1"},
                         {"name": "doc2", "text": texts[1], "branch": "d2"},
                         {"name": "question", "text": texts[2]}],
            "mask": {"overlays": [{"op": "and", "pattern": "branch_isolated"},
                                  {"op": "and_not", "q": "question", "k": "doc2", "pattern": "full",
                                   "heads": [3], "layers": [5, 6]}]},
            "positions": {"scheme": "branches"}}
    layout = prepare(runner.Spec.load(spec), lm).layout
    n = layout.n
    input_ids = prepare(runner.Spec.load(spec), lm).input_ids
    backend = args.backend or ("flex" if lm.device.type == "cuda" else "eager")
    _register()

    @torch.no_grad()
    def plain():
        with _attn_impl(lm.model, "eager"):
            lm.model(input_ids=input_ids[None].to(lm.device), output_attentions=True, use_cache=False)

    @torch.no_grad()
    def masked_forward():  # mask building + forward + capture, as a fresh run does
        ctx = _Context(layout, lm.num_heads, backend, record=True)
        _forward(lm, ctx, input_ids, layout.position_ids())
        torch.stack([ctx.probs[i] for i in sorted(ctx.probs)])

    def full_run():
        runner.run(spec, lm, attentions=True, backend=backend)

    t_plain, t_masked, t_run = timed([plain, masked_forward, full_run], args.repeats)
    print(f"tokens          {n}")
    print(f"plain forward   {t_plain:6.3f} s   (eager, output_attentions=True)")
    print(f"masked forward  {t_masked:6.3f} s   ({t_masked / t_plain:.2f}x plain; per-head/per-layer mask, "
          f"probabilities recorded)")
    print(f"runner.run()    {t_run:6.3f} s   ({t_run / t_plain:.2f}x plain; + tokenize, segment mass, rollout)")
    ok = t_masked < 2 and t_masked <= 1.5 * t_plain
    print(f"target          masked forward < 2 s and <= 1.5x plain: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
