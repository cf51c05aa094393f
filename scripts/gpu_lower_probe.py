"""Quick GPU probe of the lowered mask_mod vs a hand-written one (same run, static compile).

    python scripts/gpu_lower_probe.py [N ...]      # on a CUDA machine
Prints attention fwd medians (20 runs after warm-up) and BlockMask build medians.
"""
import statistics
import sys
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from maskstudio import Spec
from maskstudio.lower import lower

DEV = "cuda"
flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)


def med(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def designs(n):
    frames = n // 1024
    win = 4096 if n >= 65536 else 1024
    sinks = 256 if n >= 65536 else 4
    return {
        "causal": ({"segments": [{"name": "t", "modality": "text", "length": n}], "mask": {"base": {"pattern": "causal"}}},
                   lambda b, h, q, k: k <= q),
        "video": ({"segments": [{"name": "v", "modality": "video", "grid": [frames, 32, 32]}],
                   "mask": {"base": {"pattern": "block_causal", "by": "frame"}}},
                  lambda b, h, q, k: (k // 1024) <= (q // 1024)),
        "window_sinks": ({"segments": [{"name": "t", "modality": "text", "length": n}],
                          "mask": {"base": {"pattern": "window", "size": win},
                                   "overlays": [{"op": "or", "pattern": "first", "size": sinks}]}},
                         lambda b, h, q, k: (((q - k) >= 0) & ((q - k) < win)) | ((k < sinks) & (k <= q))),
    }


def main():
    sizes = [int(x) for x in sys.argv[1:]] or [16384]
    for n in sizes:
        q = torch.randn(1, 9, n, 64, device=DEV, dtype=torch.bfloat16)
        k, v = torch.randn_like(q), torch.randn_like(q)
        for name, (raw, hand) in designs(n).items():
            spec = Spec.load(raw, max_tokens=1 << 20)
            low = lower(spec).on(DEV)
            t0 = time.perf_counter()
            bm_low = low.block_mask(128, DEV)
            torch.cuda.synchronize()
            first_build = time.perf_counter() - t0
            bm_hand = create_block_mask(hand, None, None, n, n, device=DEV, _compile=True)
            same = torch.equal(bm_low.kv_num_blocks[0, 0], bm_hand.kv_num_blocks[0, 0]) and torch.equal(
                bm_low.full_kv_num_blocks[0, 0], bm_hand.full_kv_num_blocks[0, 0])
            t_hand = med(lambda: flex(q, k, v, block_mask=bm_hand))
            t_low = med(lambda: flex(q, k, v, block_mask=bm_low))
            b_low = med(lambda: low.block_mask(128, DEV), reps=20)
            b_hand = med(lambda: create_block_mask(hand, None, None, n, n, device=DEV, _compile=True), reps=20)
            diff = (flex(q, k, v, block_mask=bm_low) - flex(q, k, v, block_mask=bm_hand)).abs().max().item()
            print(f"N={n:7d} {name:13s} attn hand {t_hand:7.3f} ms  lowered {t_low:7.3f} ms  ratio {t_low / t_hand:5.2f} | "
                  f"build lowered {b_low:7.3f} ms  create_block_mask(compiled) {b_hand:7.3f} ms  "
                  f"({b_hand / b_low:5.1f}x) first build {first_build:.2f} s | blocks equal {same} max|d| {diff:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
