"""Which FlexAttention set-up is fastest on a GPU for our BlockMasks? (attention alone)

Variants: the run package's bit-table mask_mod (one kernel for every spec) vs the spec's own mask_mod,
torch.compile dynamic vs static shapes. Prints ms (medians of >= 20 single calls after warm-up,
bench_core.measure via bench_gpu.cuda_time) and the ratio to density x full-attention SDPA.
The comparison with hand-written FlexAttention and the lowered path is bench_kernels.py.
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.bench_gpu import D, H, HKV, cuda_time, specs  # noqa: E402
from maskstudio import analyze  # noqa: E402
from maskstudio.run import flex_block_mask  # noqa: E402

torch._dynamo.config.cache_size_limit = 64  # one compile per mask_mod closure and shape
for n in (32768,):
    q = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    t_full = cuda_time(lambda: F.scaled_dot_product_attention(q, kr, vr))
    for name, spec in specs(n).items():
        if spec.n != n:
            continue
        density = analyze(spec).density
        masks = {"bits": flex_block_mask(spec, 0, H, torch.device("cuda")), "rule": spec.block_mask(device="cuda")}
        row = {"n": n, "spec": name, "density": density, "full_ms": round(t_full, 3),
               "density_x_full_ms": round(density * t_full, 3),
               "blocks": [int(masks["rule"].kv_num_blocks.sum()), int(masks["rule"].full_kv_num_blocks.sum())]}
        for mname, bm in masks.items():
            for cname, dyn in (("static", False), ("dynamic", True)):
                fn = torch.compile(flex_attention, dynamic=dyn)
                t = cuda_time(lambda: fn(q, k, v, block_mask=bm, enable_gqa=True))
                row[f"{mname}_{cname}_ms"] = round(t, 3)
            fn = torch.compile(flex_attention)
            t = cuda_time(lambda: fn(q, kr, vr, block_mask=bm))
            row[f"{mname}_static_expanded_kv_ms"] = round(t, 3)
        print(json.dumps(row), flush=True)
