"""Before/after benchmark of the mask engine (dense masks, analysis, flow, reachability, block
states), both checkouts in ONE run, turns interleaved so that load on a shared machine hits both.

    git worktree add /tmp/ms-before <old commit>
    .venv/bin/python benchmarks/bench_engine.py --before /tmp/ms-before [--rounds 3]

Each figure is measured in a fresh process per checkout and round (median of its repeats); the
131k analysis also reports the process's peak RSS (VmHWM)."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CASES = r"""
import statistics, sys, time
sys.path.insert(0, CHECKOUT)
from maskstudio import Spec, analyze, flow_graph, list_presets, load_preset, reachability
from maskstudio.flow import layers_until_reach


def video_text(T, H, W, text):
    return Spec.load({"name": f"video {T}x{H}x{W}",
        "segments": [{"name": "sys", "length": text}, {"name": "video", "modality": "video", "grid": [T, H, W]},
                     {"name": "q", "length": text}],
        "mask": {"base": {"pattern": "causal"},
                 "rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": "frame"}],
                 "overlays": [{"op": "or", "q": "*", "k": "sys", "pattern": "first", "size": 4}]}})


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


presets = [load_preset(p["name"]) for p in list_presets()]
presets = [p for p in presets if not p.unsized_segments()]
case = CASE
if case == "dense_8k":
    s = video_text(8, 31, 32, 128); print(timed(s.dense_mask, 5))
elif case == "presets_all":
    def every():
        for p in presets:
            p.dense_mask(); analyze(p); flow_graph(p); reachability(p, 4)
    print(timed(every, 2))
elif case == "pictures_16k":
    s = video_text(16, 31, 32, 128)
    print(timed(lambda: (analyze(s), flow_graph(s), layers_until_reach(s)), 2))
elif case == "analysis_131k":
    analyze(video_text(127, 32, 32, 512))
    t = timed(lambda: analyze(video_text(127, 32, 32, 512)), 2)
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
    print(t, int(hwm) / 1e6)
"""


def measure(checkout: str, case: str) -> list[float]:
    code = CASES.replace("CHECKOUT", repr(checkout)).replace("CASE", repr(case))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=checkout)
    if out.returncode:
        raise SystemExit(f"{checkout} {case}: {out.stderr[-2000:]}")
    return [float(x) for x in out.stdout.split()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="dense_8k,presets_all,pictures_16k,analysis_131k")
    args = ap.parse_args()
    sides = {"before": os.path.abspath(args.before), "after": ROOT}
    for case in args.cases.split(","):
        got = {k: [] for k in sides}
        for _ in range(args.rounds):
            for name, path in sides.items():
                got[name].append(measure(path, case))
        med = {k: [statistics.median(col) for col in zip(*v)] for k, v in got.items()}
        line = f"{case:14s} before {med['before'][0]:7.3f} s  after {med['after'][0]:7.3f} s  " \
               f"after/before {med['after'][0] / med['before'][0]:5.2f}"
        if len(med["after"]) > 1:
            line += f"   peak RSS before {med['before'][1]:.2f} GB after {med['after'][1]:.2f} GB"
        print(line, flush=True)


if __name__ == "__main__":
    main()
