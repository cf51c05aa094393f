"""CCA attention under four ways of dividing by a grid side read at run time (attention alone, GPU).

The ring mask (`block_causal` by `ring`, CCA's concentric causal attention) divides each query's and
key's place in the image by the grid side. Hand-written code holds the side as a Python constant
(a multiply and shift); a size-parametric kernel reads it from the sizes tensor P:
  exact     `//` on int32 (a long software sequence per score: GPUs have no integer divider)
  corrected float32 quotient a / d, floored, then one correction each way (expr.floordiv_by_size
            before 7 Dec)
  recip     floor((a + 0.5) * (1 / d)) in float32: one multiply per score, the reciprocal once per
            tile; exact for |a| < 2**20 without a correction (see expr.floordiv_by_size)
  const     every size a Python constant (what a researcher writes by hand)
(No division at all, each token's ring read from a per-token table, is the lowering's own form
"grid tables": `bench_kernels.py --variants` times it as lowered_grid_tables.)
Prints one JSON line per N with medians of 25 calls and the ratios to `const`.
    python benchmarks/bench_division.py [N ...]
"""
import json
import statistics
import sys

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.bench_kernels import hand_mask_mod  # noqa: E402

H, D = 9, 64


def exact(a, d):
    return a // d


def corrected(a, d):
    q = torch.floor(a.to(torch.float32) / d.to(torch.float32)).to(a.dtype)
    r = a - q * d
    return q - (r < 0).to(a.dtype) + (r >= d).to(a.dtype)


def recip(a, d):
    return torch.floor((a.to(torch.float32) + 0.5) * (1.0 / d.to(torch.float32))).to(a.dtype)


def parametric(div, P):
    """The CCA mask with its sizes read from P = [image start, image end, side]."""
    def ring(i):
        loc = i - P[0]
        r = div(loc, P[2])
        c = loc - r * P[2]
        return torch.minimum(torch.minimum(r, c), torch.minimum(P[2] - 1 - r, P[2] - 1 - c))

    def cca(b, h, q, k):
        both = (q >= P[0]) & (q < P[1]) & (k >= P[0]) & (k < P[1])
        return torch.where(both, ring(k) <= ring(q), k <= q)
    return cca


def constant(start, side):
    """The CCA mask with every size a Python constant: bench_kernels.py's hand-written one."""
    return hand_mask_mod("cca", {"prefix": start, "side": side})


def cuda_ms(fn, reps=25):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def main():
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64  # each variant is its own mask_mod: no silent fallback
    flex = torch.compile(flex_attention, dynamic=False)
    for n in [int(x) for x in sys.argv[1:]] or [16384, 65536]:
        start, side = n // 16, int((0.8 * n) ** 0.5) // 2 * 2  # gpu_kernels_check.py's CCA layout
        P = torch.tensor([start, start + side * side, side], dtype=torch.int32, device="cuda")
        q = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16)
        k, v = torch.randn_like(q), torch.randn_like(q)
        mods = {"const": constant(start, side), **{f.__name__: parametric(f, P) for f in (exact, corrected, recip)}}
        ref = create_block_mask(mods["const"], None, None, n, n, device="cuda")
        row = {"N": n, "card": torch.cuda.get_device_name()}
        out_ref = flex(q, k, v, block_mask=ref)
        for name, mm in mods.items():
            bm = ref if name == "const" else create_block_mask(mm, None, None, n, n, device="cuda")
            row[f"{name}_blocks_equal"] = bool(torch.equal(bm.to_dense(), ref.to_dense()))
            bm.mask_mod = mm
            row[f"{name}_maxdiff"] = float((flex(q, k, v, block_mask=bm).float() - out_ref.float()).abs().max())
            row[f"{name}_ms"] = round(cuda_ms(lambda: flex(q, k, v, block_mask=bm)), 3)
        for name in mods:
            row[f"{name}_over_const"] = round(row[f"{name}_ms"] / row["const_ms"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
