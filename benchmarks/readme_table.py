"""Write the README's kernel benchmark tables from benchmarks/results/kernels-*.json.

    python benchmarks/readme_table.py                 # newest GPU results -> README.md (between the markers)
    python benchmarks/readme_table.py --print         # print the block, write nothing
    python benchmarks/readme_table.py FILE [FILE ...] # these result files only (e.g. a --tiny smoke run)

Only the text between `<!-- bench:kernels:start -->` and `<!-- bench:kernels:end -->` changes.
Several files may be merged (the GPU command runs are split by N to fit the device's 10-minute
limit): per N the newest file measuring that N wins, so every figure of a row and its anchors come
from one run; the batch and recompile tables come from the newest file that has them. Files of
`--tiny` runs are skipped unless named on the command line.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import textwrap

ROOT = __file__.rsplit("/benchmarks/", 1)[0]
START, END = "<!-- bench:kernels:start -->", "<!-- bench:kernels:end -->"
REPS = 20  # figures timed fewer times (slow builds under --budget-s) show their n
NAMES = {"causal": "causal", "video_block_causal": "video block-causal", "window_sinks": "window + sinks",
         "multiverse": "Multiverse branches", "cca": "CCA"}


def load(paths: list, named: bool) -> list:
    runs = []
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        if data.get("config", {}).get("tiny") and not named:
            continue
        data["_path"] = path
        runs.append(data)
    runs.sort(key=lambda d: (d["env"].get("date", ""), d["_path"]))  # oldest first
    return runs


def med(m) -> float | None:
    return m["median_ms"] if isinstance(m, dict) else None


def ms(m) -> str:
    """A median in ms, or why there is none."""
    if isinstance(m, dict):
        v = m["median_ms"]
        text = f"{v:.3g}" if v < 100 else f"{v:.0f}"
        return text + (f" (n={m['n']})" if m.get("n", REPS) < REPS else "")
    if m is None:
        return "—"
    text = str(m)
    if "OutOfMemory" in text or text.startswith("OOM"):
        return "OOM"
    if text.startswith("skipped"):
        return "not run"
    return "n/a" if text.startswith("n/a") else "error"


def ratio(a, b, digits=2) -> str:
    a, b = med(a), med(b)
    return f"{a / b:.{digits}f}x" if a is not None and b else "—"


def compiled_build(b: dict) -> str:
    """The compiled-build figure; runs before 29 Nov 2026 compiled the tile-bound pass only (marked ²)."""
    if "lowered_compiled_build_block_mask" in b:
        return ms(b["lowered_compiled_build_block_mask"])
    old = b.get("lowered_compiled_bounds_block_mask")
    return ms(old) + " ²" if old is not None else "—"


def tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def params_text(name: str, p: dict) -> str:
    if name == "video_block_causal":
        return f"{p['prompt']} text + {p['frames']} frames of {p['frame']}"
    if name == "window_sinks":
        return f"window {p['window']} + {p['sinks']} sinks"
    if name == "multiverse":
        return f"{p['prompt']} + 4 x {p['paths'][0]} + {p['merge']}"
    if name == "cca":
        return f"{p['prefix']} + {p['side']}x{p['side']} image + {p['suffix']}"
    return "one text segment"


def pick(runs: list):
    """Per N: (row list, anchors, run) from the newest run that measured it; newest batch / recompiles."""
    by_n, batch, recompiles = {}, None, None
    for run in runs:  # oldest first, so newer ones overwrite
        for part in run.get("attention", []):
            by_n[part["n"]] = (part, run)
        if run.get("batch"):
            batch = (run["batch"], run)
        if run.get("recompiles"):
            recompiles = (run["recompiles"], run)
    return by_n, batch, recompiles


def in_order(rows: list) -> list:
    """Rows in the order of NAMES (runs measure designs in whatever order they were asked for)."""
    order = list(NAMES)
    return sorted(rows, key=lambda r: order.index(r["design"]) if r["design"] in order else len(order))


def env_line(runs: list) -> str:
    envs = {(r["env"].get("gpu") or r["env"].get("device"), r["env"]["torch"]) for r in runs}
    dates = sorted(r["env"].get("date", "")[:10] for r in runs)
    files = ", ".join(f"`{os.path.relpath(r['_path'], ROOT)}`" for r in runs)
    where = "; ".join(f"{g}, torch {t}" for g, t in sorted(envs, key=str))
    return f"{where}; measured {dates[0]}{' – ' + dates[-1] if dates[-1] != dates[0] else ''} ({files})"


def builds_table(paths: list) -> list:
    """Lines of the builds-alone table (bench_builds.py results; per N and design the newest dated
    file wins, files without a date count as the oldest)."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append((json.load(fh), os.path.basename(path)))
    newest: dict = {}  # (n, design) -> (row, file name)
    for data, name in sorted(runs, key=lambda run: (run[0].get("date", ""), run[1])):
        for r in data.get("rows", []):
            newest[(r["n"], r["design"])] = (r, name)
    if not newest:
        return []
    files = ", ".join(f"`benchmarks/results/{f}`" for f in sorted({f for _, f in newest.values()}))
    num = lambda v: f"{v:.3g}" if isinstance(v, (int, float)) else "—"  # noqa: E731
    out = ["", f"BlockMask builds alone (`bench_builds.py`, a process that builds only; {files}): ms per "
           "build, figure and anchor from the same run; *replay* = the captured CUDA graph alone (the rest "
           "of a build is host work: sizes copied in, one read of the two counts, the BlockMask object); "
           "*compiled build* = `knobs.COMPILE_BUILD` (~50 s of compile per structure and length, once):", "",
           "| N | design | compiled `create_block_mask` | lowered | **speed-up** | replay | compiled build | "
           "**speed-up** | its replay | identical blocks |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted({n for n, _ in newest}):
        for r in in_order([row for (m, _), (row, _) in newest.items() if m == n]):
            ref, fast = r["create_block_mask_compiled_ms"], r.get("compiled_build_ms")
            same = [yes(r.get("identical"))] + ([yes(r.get("compiled_build_identical"))] if fast else [])
            out.append(f"| {tokens(n)} | {NAMES.get(r['design'], r['design'])} | {num(ref)} | "
                       f"{num(r['lowered_ms'])} | **{ref / r['lowered_ms']:.1f}x** | {num(r.get('replay_ms'))} | "
                       f"{num(fast)} | " + (f"**{ref / fast:.1f}x**" if fast else "—") +
                       f" | {num(r.get('compiled_build_replay_ms'))} | " + " / ".join(same) + " |")
    return out


def block(runs: list, build_paths: list = ()) -> str:
    by_n, batch, recompiles = pick(runs)
    used = {id(r): r for _, r in by_n.values()}
    for extra in (batch, recompiles):
        if extra:
            used[id(extra[1])] = extra[1]
    used_runs = sorted(used.values(), key=lambda r: r["env"].get("date", ""))
    cfg = used_runs[-1]["config"] if used_runs else {}
    backends = {part["anchors"].get("sdpa_backend", "") for part, _ in by_n.values()}
    backend = "flash" if backends == {"flash"} else "/".join(sorted(backends)) or "—"
    out = [
        f"**Attention kernels** (`bench_kernels.py`; tables written by `benchmarks/readme_table.py` from "
        f"the results JSON; {env_line(used_runs) if used_runs else 'no results yet'}). "
        f"bf16, {cfg.get('heads', 9)} query / {cfg.get('kv_heads', 9)} KV heads x {cfg.get('head_dim', 64)}, "
        f"batch 1, one static-shape `torch.compile(flex_attention)`; each figure is the median of "
        f"{cfg.get('reps', 20)} single calls after warm-up (compile and first call never timed; p10 / p90 "
        "in the JSON), beside its anchors from the same run. *hand-written* = an attention-gym style "
        "mask_mod (arithmetic on `q_idx` / `kv_idx`, Python int constants) with compiled "
        "`create_block_mask`; *spec* = `spec.mask_mod` in `spec.block_mask` (today's path); *lowered* = "
        "`maskstudio.lower.lower(spec)`. Goal: lowered ≤ 1.1x hand-written.",
        "",
        "| N | design | layout | density | hand-written ms | spec ms | lowered ms | spec / hand | "
        f"**lowered / hand** | {backend} SDPA causal ms | {backend} SDPA full ms | lowered / (density x full) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted(by_n):
        part, _ = by_n[n]
        anchors = part["anchors"]
        for row in in_order(part["rows"]):
            a, name = row["attention"], row["design"]
            full = med(anchors["sdpa_full"])
            lo = med(a.get("lowered"))
            dens = f"{lo / (row['density'] * full):.2f}" if lo is not None and full else "—"
            out.append(f"| {tokens(n)} | {NAMES.get(name, name)} | {params_text(name, row['params'])} | "
                       f"{row['density']:.3f} | {ms(a.get('hand'))} | {ms(a.get('spec'))} | {ms(a.get('lowered'))} | "
                       f"{ratio(a.get('spec'), a.get('hand'))} | **{ratio(a.get('lowered'), a.get('hand'))}** | "
                       f"{ms(anchors['sdpa_causal'])} | {ms(anchors['sdpa_full'])} | {dens} |")
    extra_paths = ("export", "lowered_exact_div", "lowered_const_grids", "lowered_const_all")
    extra_rows = [(n, row) for n in sorted(by_n) for row in in_order(by_n[n][0]["rows"])
                  if any(isinstance(row["attention"].get(k), dict) for k in extra_paths)]
    if extra_rows:
        out += [
            "",
            "Other kernels of the same designs, same runs, as ratios to hand-written: *export* = the "
            "`export --format flex` file imported as a module (its `block_mask_for`); *exact division* = "
            "the lowered mask with `//` by sizes instead of the float-quotient division; *constant grids* = "
            "`Lowered.with_constant_grids()`; *all constants* = every size a Python constant (the hand-written "
            "form of the same expression):",
            "",
            "| N | design | export / hand | exact division / hand | constant grids / hand | all constants / hand |",
            "|---|---|---|---|---|---|",
        ]
        for n, row in extra_rows:
            a = row["attention"]
            cells = [ratio(a.get(k), a.get("hand")) if isinstance(a.get(k), dict) else "—" for k in extra_paths]
            out.append(f"| {tokens(n)} | {NAMES.get(row['design'], row['design'])} | " + " | ".join(cells) + " |")
    out += [
        "",
        "BlockMask builds on the device (ms, same runs; *speed-up* = compiled `create_block_mask` / lowered; "
        "goals: ≥ 5x at 16k, ≥ 10x at 128k; blocks checked identical to `create_block_mask`'s):",
        "",
        "| N | design | compiled `create_block_mask` | plain `create_block_mask` | `spec.block_mask` | lowered | "
        "**speed-up** | lowered, compiled build¹ | spec vs compiled | identical blocks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted(by_n):
        for row in in_order(by_n[n][0]["rows"]):
            b, name = row["block_mask"], row["design"]
            same = row.get("identical_blocks", {})
            same_txt = ", ".join(f"{k}: {'yes' if v else '**NO**'}" for k, v in same.items()) or "—"
            out.append(f"| {tokens(n)} | {NAMES.get(name, name)} | {ms(b.get('create_block_mask_compiled'))} | "
                       f"{ms(b.get('create_block_mask'))} | {ms(b.get('spec_block_mask'))} | "
                       f"{ms(b.get('lowered_block_mask'))} | "
                       f"**{ratio(b.get('create_block_mask_compiled'), b.get('lowered_block_mask'), 1)}** | "
                       f"{compiled_build(b)} | "
                       f"{ratio(b.get('create_block_mask_compiled'), b.get('spec_block_mask'), 1)} | {same_txt} |")
    out += ["", "¹ the whole static build through torch.compile before the CUDA graph is captured "
            "(`knobs.COMPILE_BUILD`); ² runs before 29 Nov 2026: only the tile-bound pass compiled."]
    out += builds_table(list(build_paths))
    if batch:
        bt = batch[0]
        out += [
            "",
            f"A batch of {bt['batch']} layouts at {tokens(bt['n'])} (one BlockMask with a batch dimension; "
            f"{bt['design']}, per-sample sizes; the hand-written mask_mod indexes per-sample starts by `b`; "
            "goal ≥ 10x):",
            "",
            f"| compiled `create_block_mask` | plain `create_block_mask` | {bt['batch']} x `spec.block_mask` | "
            "lowered `batch(...)` | **speed-up** (compiled / lowered) | identical blocks |",
            "|---|---|---|---|---|---|",
            f"| {ms(bt.get('create_block_mask_compiled'))} | {ms(bt.get('create_block_mask'))} | "
            f"{ms(bt.get('spec_block_mask_x8'))} | {ms(bt.get('lowered_batch_block_mask'))} | "
            f"**{ratio(bt.get('create_block_mask_compiled'), bt.get('lowered_batch_block_mask'), 1)}** | "
            f"spec: {yes(bt.get('spec_block_mask_x8_identical'))}, lowered: {yes(bt.get('lowered_identical'))} |",
        ]
    if recompiles:
        rows = recompiles[0]
        n = rows[0]["n"] if rows else 0
        out += [
            "",
            f"Recompiles: new dynamo graphs of the static-shape compiled `flex_attention` when a design compiled at "
            f"{tokens(n)} comes back (each path from a fresh `torch._dynamo.reset()`): rebuilt from scratch / other "
            "segment sizes at the same N / the design at N/2 (a new N is expected to compile with static shapes; "
            "first-call seconds in the JSON). *lowered* = `lower(spec).for_spec(new)`; *re-lowered* = `lower(new)`:",
            "",
            "| design | hand-written | spec | lowered | re-lowered |",
            "|---|---|---|---|---|",
        ]
        table: dict = {}
        for r in rows:
            table.setdefault(r["design"], {})[r["path"]] = r
        for name, paths in table.items():
            cells = [graphs_cell(paths.get(p)) for p in ("hand", "spec", "lowered", "lowered_relower")]
            out.append(f"| {NAMES.get(name, name)} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("Cells: new graphs when rebuilt / with other sizes at the same N / at N/2 (— = the design has "
                   "no segment sizes to change).")
    return "\n".join(out)


def yes(v) -> str:
    return "—" if v is None else ("yes" if v else "**NO**")


def graphs_cell(row) -> str:
    if row is None:
        return "—"
    if "result" in row:
        return "n/a"

    def one(c):
        x = row.get(c)
        if isinstance(x, dict):
            return str(x["new_graphs"])
        return "—" if x is None or str(x).startswith("no segment") else "error"
    return f"{one('again')} / {one('same_n')} / {one('new_n')}"


def wrap(text: str) -> str:
    """Prose lines wrapped at 100 columns like the rest of the README (tables left alone)."""
    return "\n".join(line if line.startswith("|") or len(line) <= 100 else textwrap.fill(line, 100)
                     for line in text.split("\n"))


def rewrite(readme: str, text: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README has no {START} ... {END} markers")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{text}\n{END}", readme, count=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description="README kernel tables from bench_kernels results")
    ap.add_argument("files", nargs="*", help="result files (default: every kernels-*.json in --results-dir)")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--print", action="store_true", help="print the generated block instead of writing")
    args = ap.parse_args(argv)
    paths = args.files or sorted(glob.glob(os.path.join(args.results_dir, "kernels-*.json")))
    runs = load(paths, named=bool(args.files))
    if not args.files:  # the README's tables are the GPU runs; CPU runs stay in their JSON
        runs = [r for r in runs if r["env"].get("gpu")]
    if not runs:
        raise SystemExit(f"no kernel results in {paths or args.results_dir}")
    builds = [] if args.files else glob.glob(os.path.join(args.results_dir, "h200_builds_*.json"))
    text = wrap(block(runs, builds))
    if args.print:
        print(text)
        return text
    with open(args.readme) as fh:
        old = fh.read()
    new = rewrite(old, text)
    with open(args.readme, "w") as fh:
        fh.write(new)
    print(f"{args.readme}: kernel tables from {len(runs)} file(s) {'changed' if new != old else 'unchanged'}",
          file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
