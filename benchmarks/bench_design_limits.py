"""Bounded design work (issue #24 item 2): the worst cases the limits in knobs.py still accept, and
the cases they refuse, each with its wall time and peak memory.

    .venv/bin/python benchmarks/bench_design_limits.py [--case NAME] [--space]

Every case runs in its own process (peak RSS is that process's, the interpreter and imports
included) and draws what the app draws for a design edit: `studio.design_views` (five pictures in
this process's threads, the checks, the density table), or the FlexAttention export. --space sets
SPACE_ID first, so DESIGN_MAX_TOKENS is the Space's (65,536). Limits (MASKSTUDIO_* overrides):
FLOW_MAX_NODES 256, SEGMENT_TABLE_MAX 64, MAX_STEPS 1024, EXPORT_MAX_WORK 2 M, DESIGN_MAX_TOKENS
(65,536 on a Space), DESIGN_MAX_WORK (tokens x steps: 1 M on a Space, 4 M locally). Cases named space-* always
run as on a Space.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def segments(n: int, length: int, rules: int = 0, overlays: int = 0, name: str = "many") -> dict:
    """n text segments of `length` tokens under a causal base; `rules` windows on single segments
    (each reads every key), `overlays` sinks on every pair."""
    return {"name": f"{name}{n}", "segments": [{"name": f"s{i}", "length": length} for i in range(n)],
            "mask": {"base": {"pattern": "causal"},
                     "rules": [{"q": [f"s{i % n}"], "k": "*", "pattern": "window", "size": 2 + i % 5, "causal": True}
                               for i in range(rules)],
                     "overlays": [{"pattern": "first", "op": "or", "q": "*", "k": "*", "size": 1 + i % 7, "by": "index"}
                                  for i in range(overlays)]}}


def streaming(tokens: int) -> dict:
    """streaming_llm (window 9 + 4 sinks, the checks' slowest preset shape) at `tokens` tokens."""
    from maskstudio.presets import load_preset

    data = load_preset("streaming_llm").to_dict()
    data["segments"] = [{"name": "text", "length": tokens}]
    return data


CASES = {  # name: (what, spec builder, "pictures" | "export")
    "issue-1024-segments": ("the issue's 31 KB spec: 1,024 segments x 8 tokens (flow refused, rest drawn)",
                            lambda: segments(1024, 8), "pictures"),
    "flow-256-nodes": ("the largest flow graph drawn: 256 segments x 8 tokens, causal (32,896 edges)",
                       lambda: segments(256, 8), "pictures"),
    "max-segments": ("MAX_SEGMENTS: 4,096 segments x 1 token", lambda: segments(4096, 1), "pictures"),
    "max-steps": ("MAX_STEPS: 512 rules + 511 overlays on 64 segments x 64 tokens (4.2 M work: the local limit)",
                  lambda: segments(64, 64, 512, 511), "pictures"),
    "space-max-work": ("DESIGN_MAX_WORK on a Space: 255 rules on 64 segments x 64 tokens (1 M work)",
                       lambda: segments(64, 64, 255), "pictures"),
    "space-max-tokens": ("DESIGN_MAX_TOKENS on a Space: streaming_llm at 65,536 tokens", lambda: streaming(1 << 16),
                         "pictures"),
    "export-256-segments": ("flex export: 256 segments, 7 rules (524k of 2 M work)",
                            lambda: segments(256, 8, 7), "export"),
    "export-at-the-limit": ("flex export: 128 segments, 120 rules (1.98 M of 2 M work: the worst accepted)",
                            lambda: segments(128, 8, 120), "export"),
    "export-refused": ("flex export refused: 256 segments, 128 rules (8.5 M work)",
                       lambda: segments(256, 8, 128), "export"),
    "steps-refused": ("load refused: 20,000 rules (MAX_STEPS)", lambda: segments(8, 8, 20_000), "load"),
}


def run_case(name: str) -> dict:
    """One case in this process: {"case", "seconds", "peak_mb", "said"}."""
    what, build, kind = CASES[name]
    text = json.dumps(build())
    from maskstudio.errors import SpecError
    from maskstudio.spec import Spec

    t0 = time.perf_counter()
    said = ""
    try:
        spec = Spec.from_json(text)
        if kind == "export":
            from maskstudio.export_flex import flex_code

            said = f"{len(flex_code(spec)) / 1e6:.2f} MB of Python"
        elif kind == "pictures":
            from maskstudio import studio
            from maskstudio.studio.pictures import design_refusal

            out = studio.design_views(spec, {"flow_level": "segment"})
            said = (design_refusal(spec) or out["options"]["warnings"].get("flow_level", "")
                    or "every view drawn")
    except SpecError as err:
        said = f"refused: {err}"
    took = time.perf_counter() - t0
    return {"case": name, "what": what, "spec_bytes": len(text), "seconds": round(took, 2),
            "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "said": said}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=list(CASES))
    ap.add_argument("--space", action="store_true", help="as on a Hugging Face Space (SPACE_ID set)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(args.case)))
        return
    env = dict(os.environ, MASKSTUDIO_RENDER_PROCESSES="0", **({"SPACE_ID": "bench/space"} if args.space else {}))
    for name in [args.case] if args.case else list(CASES):
        if name.startswith("space-") and not args.space:
            env_case = dict(env, SPACE_ID="bench/space")   # the Space's limit is the case
        else:
            env_case = env
        out = subprocess.run([sys.executable, __file__, "--child", "--case", name], env=env_case,
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{name:22} FAILED: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:22} {r['seconds']:7.2f} s  {r['peak_mb']:6d} MB peak  {r['spec_bytes']:>9,} B spec  "
              f"{r['what']}\n{'':22} -> {r['said'][:160]}")


if __name__ == "__main__":
    main()
