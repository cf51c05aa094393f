"""Where a training step's time goes: torch.profiler over maskstudio.train.loop.fit steps.

    python benchmarks/profile_train_step.py [--tokens 4096] [--design causal] [--steps 4]

The SmolLM2-135M architecture with random weights (as gpu_train_check.py), one example of N tokens a
step, bf16 autocast, AdamW. Fits once unprofiled (compiles and warms up), then profiles a second fit.
Prints every step's seconds of both fits (one-time work shows as outliers) and one JSON line with the
top operations by device time and by host time. On a machine without CUDA: eager, small model.
"""
import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from bench_train import layouts, random_item, random_smollm2  # noqa: E402

from maskstudio.train import trainable_copy  # noqa: E402
from maskstudio.train.loop import fit  # noqa: E402


def top(events, key, n=12):
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [(e.key[:90], round(getattr(e, key) / 1e3, 2), e.count) for e in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--design", default="causal", choices=["causal", "prefix_lm", "isolated_docs"])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    src = random_smollm2("cuda" if cuda else "cpu", small=not cuda)
    spec = layouts(args.tokens)[args.design]
    item = random_item(spec, src.model.config.vocab_size, 0)
    backend = "flex" if cuda else "eager"

    def run(steps):
        lm, module = trainable_copy(src, False, 0)
        return fit(spec, lm, module, [item], steps=steps, lr=1e-5, seed=0, batch=1, backend=backend, progress=False)

    warm = run(args.steps)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        profiled = run(args.steps)
    events = prof.key_averages()
    device_key = "device_time_total" if cuda else "cpu_time_total"
    print(json.dumps({"design": args.design, "tokens": args.tokens,
                      "card": torch.cuda.get_device_name() if cuda else "cpu",
                      "warm_fit_step_s": [round(s["seconds"], 4) for s in warm.steps],
                      "profiled_fit_step_s": [round(s["seconds"], 4) for s in profiled.steps],
                      "top_device_ms": top(events, device_key), "top_host_self_ms": top(events, "self_cpu_time_total")}))


if __name__ == "__main__":
    main()
