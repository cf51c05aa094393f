"""Experiment: the shape of the lowered expression vs attention speed (same run, same BlockMask).

    python benchmarks/bench_lowering_forms.py --n 16384 [--rounds 3] [--json OUT]

Two forms of the same mask: 'select' (today: each row's most common expression is the default,
every other run of segments one where(x in range, e, ...)) and 'or_of_ands' (the lowering before
2026-11-29: a row is an or of (kv in range & e), rows chained by where(q < start, ...)). Both are
timed with the hand-written mask_mod of bench_kernels in alternating rounds, so run-to-run drift
shows as spread. Prints a line per design and round; medians of 20 calls (CUDA events).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_core import measure  # noqa: E402
from benchmarks.bench_kernels import BLOCK, DESIGNS, D, H, hand_mask_mod, params, setup_dynamo, spec_of  # noqa: E402
from maskstudio import expr, lower as lowering  # noqa: E402
from maskstudio.expr import E, var  # noqa: E402


def _or_of_ands(x: E, items: list, n_segments: int) -> E:
    """The earlier lowering of one row (x = kv) or of the rows (x = q)."""
    if x is var("kv"):
        out = expr.const(False)
        for first, last, item in lowering._runs(items):
            if not (item.is_const and item.value is False):
                out = out | (lowering._in_range(x, first, last, n_segments) & item)
        return out
    runs = lowering._runs(items)
    out = runs[-1][2]
    for _, last, item in reversed(runs[:-1]):
        out = E.symbolic_where(var("q") < expr.param("start", last + 1), item, out)
    return out


def lowered_as(spec, form: str):
    if form == "select":
        return lowering.lower(spec)
    keep = lowering._select
    lowering._select = _or_of_ands
    try:
        return lowering.lower(spec)
    finally:
        lowering._select = keep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--json")
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    setup_dynamo()
    flex = torch.compile(flex_attention, dynamic=False)
    n, rows = args.n, []
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for name in args.designs.split(","):
        p = params(name, n)
        spec, hand = spec_of(name, p), hand_mask_mod(name, p)
        bm_hand = create_block_mask(hand, None, None, n, n, device="cuda", BLOCK_SIZE=BLOCK)
        masks = {"hand": bm_hand}
        for form in ("select", "or_of_ands"):
            low = lowered_as(spec, form).on("cuda")
            masks[form] = low.block_mask(BLOCK, "cuda")
        for r in range(args.rounds):
            row = {"design": name, "n": n, "round": r}
            for form, bm in masks.items():
                row[form] = measure(lambda: flex(q, k, v, block_mask=bm), reps=20, device="cuda")["median_ms"]
            rows.append(row)
            print(f"{name:19s} round {r}: hand {row['hand']:.3f} ms  select {row['select'] / row['hand']:.3f}x  "
                  f"or_of_ands {row['or_of_ands'] / row['hand']:.3f}x", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
