"""GPU benchmarks (run on an H200 through the device tool; figures go to README as ratios).

    python benchmarks/bench_gpu.py --model-dir DIR [--parts core,kernel,model]

DIR holds a SmolLM2-135M config and tokenizer (weights random: timing does not depend on them).
Timings: medians of >= 20 single calls after warm-up (bench_core.measure). The kernel comparison
against hand-written FlexAttention and the lowered path lives in bench_kernels.py.
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

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.bench_core import REPS, measure, same_blocks  # noqa: E402
from maskstudio import Spec, analyze  # noqa: E402

H, HKV, D = 9, 3, 64  # SmolLM2-135M attention shape


def specs(n: int, designs=None) -> dict:
    """bench_kernels' designs at n tokens (one definition): causal, video block-causal, window +
    sinks, Multiverse branches, CCA."""
    from benchmarks.bench_kernels import DESIGNS, params, spec_of
    return {name: spec_of(name, params(name, n)) for name in (designs or DESIGNS)}


def cuda_time(fn, warmup=3, iters=None) -> float:
    """Median ms of `iters` single calls after `warmup` calls (bench_core.measure: CUDA events
    between synchronize(); the first call after a compile is never timed)."""
    return measure(fn, reps=iters or ARGS_REPS[0], warmup=warmup, device="cuda")["median_ms"]


ARGS_REPS = [REPS]  # --reps
JSON_PATH = [None]  # --json: rewritten after every row (a run cut short keeps what it measured)


def emit(out: list, row: dict) -> None:
    out.append(row)
    print(json.dumps(row), flush=True)
    if JSON_PATH[0]:
        with open(JSON_PATH[0], "w") as fh:
            json.dump(out, fh, indent=1)


def part_core(out):
    from torch.nn.attention.flex_attention import create_block_mask

    compiled_cbm = torch.compile(create_block_mask)
    for n in (16384, 131072):
        spec = specs(n)["video_block_causal"]
        n = spec.n
        m = measure(lambda: spec.block_mask(device="cuda"), device="cuda")
        ours = m.pop("out")
        mod = spec.mask_mod(device="cuda")
        row = {"part": "core", "n": n, "maskstudio_ms": m["median_ms"], "maskstudio": m}
        for compiled in (False, True):
            torch.cuda.empty_cache()
            key = "create_block_mask_compiled" if compiled else "create_block_mask"
            fn = compiled_cbm if compiled else create_block_mask
            try:  # warm-up calls compile; only later calls are timed
                ref = measure(lambda: fn(mod, None, None, n, n, device="cuda"), warmup=2, device="cuda")
            except torch.OutOfMemoryError as err:
                row[key] = f"OOM: {str(err)[:60]}"
                continue
            same = same_blocks(ours, ref.pop("out"))
            row.update({f"{key}_ms": ref["median_ms"], key: ref, f"{key}_ratio": ref["median_ms"] / m["median_ms"],
                        f"{key}_identical": same})
        emit(out, row)


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
            bm, _ = flex_block_mask(spec, 0, H, torch.device("cuda"))  # n is a bucket: no padding
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
            emit(out, row)


def part_model(out, model_dir, sizes=(4096, 16384, 32768), designs=None):
    """The runner's prefill (lowered FlexAttention, static compile per bucket) vs the model's own
    SDPA; SmolLM2-135M's architecture with random weights unless --model-dir has a config."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from benchmarks.bench_train import SMOLLM2
    from maskstudio.run.attention import ATTN_NAME, MaskContext, attn_impl, register

    register()
    cfg = AutoConfig.from_pretrained(model_dir) if model_dir else LlamaConfig(**SMOLLM2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.bfloat16).cuda().eval()
    for n in sizes:
        torch.cuda.empty_cache()
        ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
        pos = torch.arange(n, device="cuda")[None]
        with torch.no_grad():
            t_causal = cuda_time(lambda: model(input_ids=ids, position_ids=pos, use_cache=False), 2)
            for name, spec in specs(n, designs).items():
                if spec.n != n:
                    continue
                ctx = MaskContext(spec, cfg.num_attention_heads, "flex", record=False)

                def ours():
                    with attn_impl(model, ATTN_NAME):
                        model(input_ids=ids, position_ids=pos, use_cache=False, **{ATTN_NAME: ctx})
                t_flex = cuda_time(ours, 2)
                row = {"part": "model", "n": n, "spec": name, "maskstudio_flex_ms": t_flex, "sdpa_causal_ms": t_causal,
                       "flex_over_causal": t_flex / t_causal, "reps": ARGS_REPS[0]}
                if n <= 16384:
                    mask = torch.zeros(1, 1, n, n, device="cuda", dtype=torch.bfloat16)
                    mask.masked_fill_(~spec.dense_mask().cuda(), torch.finfo(torch.bfloat16).min)
                    t_dense = cuda_time(lambda: model(input_ids=ids, position_ids=pos, attention_mask=mask,
                                                      use_cache=False), 2)
                    row.update(sdpa_dense_mask_ms=t_dense, dense_over_flex=t_dense / t_flex)
                    del mask
                emit(out, row)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir")
    ap.add_argument("--parts", default="core,kernel,model")
    ap.add_argument("--json")
    ap.add_argument("--sizes", default="4096,16384,32768", help="model part: prompt lengths")
    ap.add_argument("--designs", default=None, help="model part: comma list of bench_kernels designs")
    ap.add_argument("--reps", type=int, default=REPS, help="timed calls per median (default 20)")
    args = ap.parse_args()
    ARGS_REPS[0], JSON_PATH[0] = args.reps, args.json
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    rows: list = []
    parts = args.parts.split(",")
    if "core" in parts:
        part_core(rows)
    if "kernel" in parts:
        part_kernel(rows)
    if "model" in parts:
        part_model(rows, args.model_dir, [int(x) for x in args.sizes.split(",")],
                   args.designs.split(",") if args.designs else None)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
