"""Picture benchmarks (issue #4). Prints numbers; run with

    .venv/bin/python benchmarks/bench_viz.py [--out DIR] [--big-only | --small-only]

Targets, in-process on 2 CPU cores:
  * all views of a ~2k-token layout (render + savefig PNG) in < 1 s total,
  * the mask view of a 131072-token video layout in < 10 s with < 2 GB peak memory
    (the block view: 128 x 128 blocks shaded by the fraction allowed, no N^2 memory).
Peak memory is the process's max RSS growth during the step (ru_maxrss, Linux).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from maskstudio import Spec  # noqa: E402
from maskstudio import viz  # noqa: E402


def video_spec(frames: int, h: int, w: int, text: int = 64, scheme: str = "mrope") -> Spec:
    """A video QA layout: system prompt, video (block-causal by frame), question, answer."""
    return Spec.load({
        "name": f"video-qa-{frames}x{h}x{w}",
        "segments": [{"name": "system", "length": text},
                     {"name": "video", "modality": "video", "grid": [frames, h, w]},
                     {"name": "question", "length": text},
                     {"name": "answer", "length": 32, "role": "target"}],
        "mask": {"base": {"pattern": "causal"},
                 "rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": "frame"},
                           {"q": "answer", "k": "video", "pattern": "none", "layers": [0, 1]}]},
        "positions": {"scheme": scheme}})


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_small(out: str) -> float:
    spec = video_spec(8, 15, 16)  # 64 + 1920 + 64 + 32 = 2080 tokens
    spec.table
    viz.save(viz.render(spec, "mask"), os.path.join(out, "warmup.png"))  # imports, font cache
    total = cpu_total = 0.0
    print(f"small layout: {spec.n} tokens, {len(spec.segments)} segments   (wall s; cpu s of this process)")
    for view in viz.VIEWS:
        c0, t0 = time.process_time(), time.perf_counter()
        fig = viz.render(spec, view)
        t1 = time.perf_counter()
        viz.save(fig, os.path.join(out, f"small_{view}.png"))
        t2, c2 = time.perf_counter(), time.process_time()
        total += t2 - t0
        cpu_total += c2 - c0
        print(f"  {view:10s} render {t1 - t0:6.3f}   savefig {t2 - t1:6.3f}   cpu {c2 - c0:6.3f}")
    print(f"  every view, one figure each: wall {total:.3f} s, cpu {cpu_total:.3f} s  (target < 1 s)")
    c0, t0 = time.process_time(), time.perf_counter()
    fig = viz.render(spec, "all")
    t1 = time.perf_counter()
    viz.save(fig, os.path.join(out, "small_all.png"))
    t2, c2 = time.perf_counter(), time.process_time()
    print(f"  render(spec, 'all') render {t1 - t0:6.3f}   savefig {t2 - t1:6.3f}   wall {t2 - t0:.3f}   "
          f"cpu {c2 - c0:.3f}")
    print(f"  load average during the run: {os.getloadavg()[0]:.1f} (numbers are noisy when other work shares the cores)")
    return total


def bench_big(out: str) -> float:
    spec = video_spec(32, 64, 64)  # 64 + 131072 + 64 + 32 tokens; 32-frame 64x64 video
    spec = spec.with_sizes({"video": [32, 64, 63], "system": 1952})  # N = 131072 exactly
    before = max_rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    spec.table
    fig = viz.render(spec, "mask")
    t1 = time.perf_counter()
    viz.save(fig, os.path.join(out, "big_mask.png"))
    t2, c2 = time.perf_counter(), time.process_time()
    peak = max_rss_mb() - before
    print(f"big layout: {spec.n} tokens, mode {fig.maskstudio['mask']['mode'] if hasattr(fig, 'maskstudio') else '?'}")
    print(f"  mask view  render {t1 - t0:6.3f} s   savefig {t2 - t1:6.3f} s   total {t2 - t0:.3f} s "
          f"cpu {c2 - c0:.3f} s (target < 10 s)   peak RSS growth {peak:,.0f} MB (target < 2048 MB)")
    return t2 - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: a temp folder)")
    parser.add_argument("--big-only", action="store_true")
    parser.add_argument("--small-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = args.out or tempfile.mkdtemp(prefix="maskstudio-bench-")
    os.makedirs(out, exist_ok=True)
    print(f"torch threads {torch.get_num_threads()}, PNGs in {out}")
    if not args.big_only:
        bench_small(out)
    if not args.small_only:
        bench_big(out)


if __name__ == "__main__":
    main()
