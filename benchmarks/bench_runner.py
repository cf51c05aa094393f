"""Run speed on the embedded SmolLM2-135M: a 256-token masked forward with attention capture
versus the model's plain forward with output_attentions (CPU target: < 2 s and <= 1.5x), and a
greedy generation of --generate tokens (KV cache and full recompute).

    python benchmarks/bench_runner.py [--tokens 256] [--repeats 5] [--backend eager|flex] [--generate 40]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import maskstudio.run as R
from maskstudio import Spec
from maskstudio.run.attention import attn_impl, register
from maskstudio.run.inputs import forward_ids


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


def texts(lm, tokens: int) -> list[str]:
    words = ("the quick brown fox jumps over the lazy dog and then runs far away into the forest ") * 64
    ids = lm.tokenizer.encode(words, add_special_tokens=False)[:tokens]
    third = len(ids) // 3
    return [lm.tokenizer.decode(ids[:third]), lm.tokenizer.decode(ids[third:2 * third]),
            lm.tokenizer.decode(ids[2 * third:])]


def forward_part(lm, args):
    t = texts(lm, args.tokens)
    spec = {"segments": [{"name": "doc1", "text": t[0], "branch": "d1"},
                         {"name": "doc2", "text": t[1], "branch": "d2"},
                         {"name": "question", "text": t[2]}],
            "mask": {"overlays": [{"op": "and", "pattern": "branch_isolated"},
                                  {"op": "and_not", "q": "question", "k": "doc2", "pattern": "full",
                                   "heads": [3], "layers": [5, 6]}]},
            "positions": {"scheme": "branches"}}
    prep = R.prepare(Spec.load(spec), lm)
    layout, input_ids = prep.layout, prep.input_ids
    backend = args.backend or ("flex" if lm.device.type == "cuda" else "eager")
    register()

    @torch.no_grad()
    def plain():
        with attn_impl(lm.model, "eager"):
            lm.model(input_ids=input_ids[None].to(lm.device), output_attentions=True, use_cache=False)

    @torch.no_grad()
    def masked_forward():  # mask building + forward + capture, as a fresh run does
        ctx = R.MaskContext(layout, lm.num_heads, backend, record=True)
        forward_ids(lm, ctx, input_ids, layout.position_ids())
        torch.stack([ctx.probs[i] for i in sorted(ctx.probs)])

    def full_run():
        R.run(spec, lm, attentions=True, backend=backend)

    t_plain, t_masked, t_run = timed([plain, masked_forward, full_run], args.repeats)
    print(f"tokens          {layout.n}")
    print(f"plain forward   {t_plain:6.3f} s   (eager, output_attentions=True)")
    print(f"masked forward  {t_masked:6.3f} s   ({t_masked / t_plain:.2f}x plain; per-head/per-layer mask, "
          f"probabilities recorded)")
    print(f"maskstudio.run  {t_run:6.3f} s   ({t_run / t_plain:.2f}x plain; + tokenize, segment mass, rollout)")
    ok = t_masked < 2 and t_masked <= 1.5 * t_plain
    print(f"target          masked forward < 2 s and <= 1.5x plain: {'PASS' if ok else 'FAIL'}")


def generation_part(lm, args):
    """--generate greedy new tokens after a prompt (fewer if the model ends its answer: the count is printed)."""
    t = texts(lm, args.tokens)
    spec = {"segments": [{"name": "doc", "text": t[0] + t[1]}, {"name": "question", "text": t[2]},
                         {"name": "answer", "text": " and", "role": "generate"}],
            "mask": {"rules": [{"q": "answer", "k": "doc", "pattern": "window", "size": 64}]}}

    def gen(use_cache):
        return lambda: R.run(spec, lm, max_new_tokens=args.generate, attentions=False, use_cache=use_cache,
                             backend=args.backend)

    t_kv, t_re = timed([gen(True), gen(False)], args.repeats)
    got = R.run(spec, lm, max_new_tokens=args.generate, attentions=False, use_cache=True, backend=args.backend)
    print(f"generation      {len(got.new_ids)} tokens: KV cache {t_kv:6.3f} s, recompute {t_re:6.3f} s "
          f"({'KV cache used' if not any('KV cache not used' in n for n in got.notes) else 'no KV cache'})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--generate", type=int, default=40, help="new tokens to time (0: skip)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    lm = R.load_model()
    print(f"load            {time.perf_counter() - t0:6.2f} s   {lm.name} on {lm.device}")
    forward_part(lm, args)
    if args.generate > 0:
        generation_part(lm, args)


if __name__ == "__main__":
    main()
