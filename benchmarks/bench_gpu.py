"""GPU benchmarks (run on an H200 through the device tool; figures go to README as ratios).

    python benchmarks/bench_gpu.py --model-dir DIR [--parts core,kernel,model]

DIR holds a SmolLM2-135M config and tokenizer (weights random: timing does not depend on them).
  core   : spec.block_mask vs create_block_mask on the same mask_mod (identical blocks checked)
  kernel : attention alone at 4k/16k/32k: FlexAttention + maskstudio.run's BlockMask, against
           SDPA with a dense additive mask, SDPA causal (flash) and SDPA full (no mask);
           reports flex / (density x full) — the goal is <= 1.1
  model  : whole-model prefill through maskstudio.run (flex) vs the model's own SDPA with a
           dense 4-D mask vs SDPA causal
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from maskstudio import Spec, analyze  # noqa: E402

H, HKV, D = 9, 3, 64  # SmolLM2-135M attention shape


def specs(n: int) -> dict:
    """Three designs at about n tokens: causal, block-causal video (+ text), sliding window + sinks."""
    frames = max(1, (n - 512) // 1024)
    text = n - frames * 1024
    return {
        "causal": Spec.load({"segments": [{"name": "x", "length": n}]}),
        "video_block_causal": Spec.load({
            "segments": [{"name": "sys", "length": text // 2},
                         {"name": "video", "modality": "video", "grid": [frames, 32, 32]},
                         {"name": "q", "length": text - text // 2}],
            "mask": {"rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": "frame"}]}}),
        "window_sinks": Spec.load({
            "segments": [{"name": "x", "length": n}],
            "mask": {"base": {"pattern": "window", "size": 1024},
                     "overlays": [{"op": "or", "pattern": "first", "size": 4},
                                  {"op": "and", "pattern": "causal"}]}}),
    }


def cuda_time(fn, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters  # ms


def part_core(out):
    from torch.nn.attention.flex_attention import create_block_mask

    for n in (16384, 131072):
        spec = specs(n)["video_block_causal"]
        n = spec.n
        spec.block_mask(device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        ours = spec.block_mask(device="cuda")
        torch.cuda.synchronize()
        t_ours = time.perf_counter() - t
        mod = spec.mask_mod(device="cuda")
        create_block_mask(mod, None, None, 4096, 4096, device="cuda")  # warm the path
        row = {"part": "core", "n": n, "maskstudio_ms": t_ours * 1e3}
        for compiled in (False, True):
            torch.cuda.empty_cache()
            try:
                if compiled:  # first call compiles; time the second
                    create_block_mask(mod, None, None, n, n, device="cuda", _compile=True)
                torch.cuda.synchronize()
                t = time.perf_counter()
                ref = create_block_mask(mod, None, None, n, n, device="cuda", _compile=compiled)
                torch.cuda.synchronize()
            except torch.OutOfMemoryError as err:
                row[f"create_block_mask{'_compiled' if compiled else ''}"] = f"OOM: {str(err)[:60]}"
                continue
            t_ref = time.perf_counter() - t
            same = torch.equal(ours.kv_num_blocks, ref.kv_num_blocks) and torch.equal(
                ours.full_kv_num_blocks, ref.full_kv_num_blocks)
            key = "create_block_mask_compiled" if compiled else "create_block_mask"
            row.update({f"{key}_ms": t_ref * 1e3, f"{key}_ratio": t_ref / t_ours, f"{key}_identical": same})
            del ref
        out.append(row)
        print(json.dumps(row), flush=True)


def part_kernel(out):
    from maskstudio.run.attention import flex_block_mask, flex_fn

    flex = flex_fn(torch.device("cuda"))
    for n in (4096, 16384, 32768):
        q = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        t_full = cuda_time(lambda: F.scaled_dot_product_attention(q, kr, vr))
        t_causal = cuda_time(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        for name, spec in specs(n).items():
            n_spec = spec.n
            if n_spec != n:
                continue
            density = analyze(spec).density
            bm = flex_block_mask(spec, 0, H, torch.device("cuda"))
            t_flex = cuda_time(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
            row = {"part": "kernel", "n": n, "spec": name, "density": density, "flex_ms": t_flex,
                   "sdpa_full_ms": t_full, "sdpa_causal_ms": t_causal,
                   "flex_over_density_x_full": t_flex / (density * t_full)}
            if n <= 16384:
                dense = torch.zeros(n, n, device="cuda", dtype=torch.bfloat16)
                dense.masked_fill_(~spec.dense_mask().cuda(), float("-inf"))
                t_dense = cuda_time(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=dense[None, None]))
                row.update(sdpa_dense_mask_ms=t_dense, dense_over_flex=t_dense / t_flex)
                del dense
            out.append(row)
            print(json.dumps(row), flush=True)


def part_model(out, model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    from maskstudio.run.attention import ATTN_NAME, MaskContext, attn_impl, register

    register()
    cfg = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.bfloat16).cuda().eval()
    for n in (4096, 16384, 32768):
        ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
        pos = torch.arange(n, device="cuda")[None]
        with torch.no_grad():
            t_causal = cuda_time(lambda: model(input_ids=ids, position_ids=pos, use_cache=False), 2, 5)
            for name, spec in specs(n).items():
                if spec.n != n:
                    continue
                ctx = MaskContext(spec, cfg.num_attention_heads, "flex", record=False)

                def ours():
                    with attn_impl(model, ATTN_NAME):
                        model(input_ids=ids, position_ids=pos, use_cache=False, **{ATTN_NAME: ctx})
                t_flex = cuda_time(ours, 2, 5)
                row = {"part": "model", "n": n, "spec": name, "maskstudio_flex_ms": t_flex, "sdpa_causal_ms": t_causal,
                       "flex_over_causal": t_flex / t_causal}
                if n <= 16384:
                    mask = torch.zeros(1, 1, n, n, device="cuda", dtype=torch.bfloat16)
                    mask.masked_fill_(~spec.dense_mask().cuda(), torch.finfo(torch.bfloat16).min)
                    t_dense = cuda_time(lambda: model(input_ids=ids, position_ids=pos, attention_mask=mask,
                                                      use_cache=False), 2, 5)
                    row.update(sdpa_dense_mask_ms=t_dense, dense_over_flex=t_dense / t_flex)
                    del mask
                out.append(row)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir")
    ap.add_argument("--parts", default="core,kernel,model")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    rows: list = []
    parts = args.parts.split(",")
    if "core" in parts:
        part_core(rows)
    if "kernel" in parts:
        part_kernel(rows)
    if "model" in parts:
        part_model(rows, args.model_dir)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
