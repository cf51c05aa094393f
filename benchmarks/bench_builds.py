"""BlockMask builds only (no attention): the lowered device builder vs compiled `create_block_mask`
with the hand-written mask_mod, same run, blocks checked identical. The quick GPU check of a
builder change (bench_kernels.py times builds too, beside the attention kernels). On CUDA also:
the build with knobs.COMPILE_BUILD, and each captured graph's replay alone (the device part of a
build; the rest is host work: copying sizes in, one read of the counts, making the BlockMask).

    python benchmarks/bench_builds.py --sizes 16k,128k --designs cca,causal [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_core import measure, same_blocks  # noqa: E402
from benchmarks.bench_kernels import (BLOCK, DESIGNS, SIZES, hand_mask_mod, params, setup_dynamo, spec_of,  # noqa: E402
                                      with_compiled_build)
from maskstudio import lower_blocks  # noqa: E402
from maskstudio.lower import lower  # noqa: E402


def replay_ms(device) -> dict | None:
    """Median replay time of the most recently used captured build (None off CUDA)."""
    entry = next(reversed(lower_blocks._GRAPHS.values()), None)
    if entry is None or entry.graph is None:
        return None
    return measure(entry.graph.replay, reps=50, device=device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16k,128k")
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    ap.add_argument("--skip-compiled-build", action="store_true", help="no knobs.COMPILE_BUILD figure (~50 s "
                    "of compile per design and size on an H200)")
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask

    setup_dynamo()
    cbm = torch.compile(create_block_mask)
    rows = []
    for n in [SIZES.get(s) or int(s) for s in args.sizes.split(",")]:
        for name in args.designs.split(","):
            p = params(name, n)
            hand, low = hand_mask_mod(name, p), lower(spec_of(name, p)).on(args.device)
            ref = measure(lambda: cbm(hand, None, None, n, n, device=args.device, BLOCK_SIZE=BLOCK), reps=20,
                          device=args.device, budget_s=5, min_warmup=2)
            ours = measure(lambda: low.block_mask(BLOCK, args.device), reps=20, device=args.device, budget_s=5,
                           min_warmup=2)
            row = {"design": name, "n": n, "create_block_mask_compiled_ms": ref["median_ms"],
                   "lowered_ms": ours["median_ms"], "speedup": ref["median_ms"] / ours["median_ms"],
                   "identical": same_blocks(ours["out"], ref["out"])}
            replay = replay_ms(args.device)
            if replay is not None:
                row["replay_ms"] = replay["median_ms"]
            if replay is not None and not args.skip_compiled_build:
                fused = with_compiled_build(lambda: measure(lambda: low.block_mask(BLOCK, args.device), reps=20,
                                                            device=args.device, budget_s=5, min_warmup=2))
                row.update(compiled_build_ms=fused["median_ms"],
                           compiled_build_speedup=ref["median_ms"] / fused["median_ms"],
                           compiled_build_identical=same_blocks(fused["out"], ref["out"]),
                           compiled_build_replay_ms=replay_ms(args.device)["median_ms"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M"),
                       "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
