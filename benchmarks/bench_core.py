"""Core benchmarks: dense masks, BlockMask construction, analysis memory.

    python benchmarks/bench_core.py            # CPU figures
    python benchmarks/bench_core.py --cuda     # adds the 128k BlockMask comparison on a GPU

Prints one line per measurement; ratios compare against torch's create_mask / create_block_mask
evaluating the very same mask_mod (so the blocks are identical, checked here too).
"""
import argparse
import subprocess
import sys
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from maskstudio import Spec  # noqa: E402


def video_text(T: int, H: int, W: int, text: int) -> Spec:
    """[system text | T x H x W video, block-causal by frame | question] + sinks on the system prompt."""
    return Spec.load({
        "name": f"video {T}x{H}x{W}",
        "segments": [{"name": "sys", "length": text}, {"name": "video", "modality": "video", "grid": [T, H, W]},
                     {"name": "q", "length": text}],
        "mask": {"base": {"pattern": "causal"},
                 "rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": "frame"}],
                 "overlays": [{"op": "or", "q": "*", "k": "sys", "pattern": "first", "size": 4}]}})


def best(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench_dense():
    spec = video_text(8, 31, 32, 128)  # 8192 tokens
    n = spec.n
    ours, dense = best(spec.dense_mask)
    ref_t, ref = best(lambda: create_mask(spec.mask_mod(), None, None, n, n)[0, 0], repeat=1)
    assert torch.equal(dense, ref)
    print(f"dense mask        N={n:6d}  maskstudio {ours * 1e3:7.1f} ms   create_mask {ref_t * 1e3:8.1f} ms   "
          f"ratio {ref_t / ours:5.1f}x")


def bench_block_mask(n_target: int, device: str, compare: bool):
    frames = n_target // 1024
    spec = video_text(frames - 1, 32, 32, 512)
    n = spec.n
    if device == "cuda":
        torch.cuda.synchronize()
    ours, bm = best(lambda: spec.block_mask(device=device), repeat=2)
    line = f"BlockMask {device:4}  N={n:6d}  maskstudio {ours * 1e3:8.1f} ms"
    if compare:
        ref_t, ref = best(lambda: create_block_mask(spec.mask_mod(device=device), None, None, n, n, device=device),
                          repeat=1)
        same = torch.equal(bm.kv_num_blocks.cpu(), ref.kv_num_blocks.cpu()) and \
            torch.equal(bm.full_kv_num_blocks.cpu(), ref.full_kv_num_blocks.cpu())
        line += f"   create_block_mask {ref_t * 1e3:9.1f} ms   ratio {ref_t / ours:6.1f}x   identical blocks: {same}"
    print(line)


def bench_analysis_memory():
    code = ("import resource, time, sys; sys.path.insert(0, %r); from benchmarks.bench_core import video_text;"
            "from maskstudio import analyze; s = video_text(127, 32, 32, 512); t = time.perf_counter(); a = analyze(s);"
            "print(s.n, round(time.perf_counter() - t, 2), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)"
            % __file__.rsplit("/benchmarks/", 1)[0])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    print(f"analysis          N={int(out[0]):6d}  {float(out[1]):.2f} s   peak RSS {float(out[2]):.2f} GB (whole process)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--quick", action="store_true", help="skip the slow create_block_mask references")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_dense()
    bench_block_mask(16384, "cpu", compare=not args.quick)
    bench_block_mask(32768, "cpu", compare=False)
    bench_analysis_memory()
    if args.cuda:
        for n in (16384, 131072):
            bench_block_mask(n, "cuda", compare=True)
