"""The reversal curse and prefix-LM vs causal, trained under the mask with packing, on one GPU.

    python scripts/reversal_gpu.py --out results/gpu                       # random init (labelled so)
    python scripts/reversal_gpu.py --out results/gpu --gguf SmolLM2-135M-Instruct.Q4_1.gguf  # real weights
    python scripts/reversal_gpu.py --out /tmp/toy --tiny                   # CPU smoke test (~1 min)

Two experiments, each design against its causal baseline trained identically (maskstudio.train.compare:
same seed, data order, steps, lr; examples packed into rows of --pack-tokens tokens, attention
never crossing examples), both scored before and after training with bootstrap 95% intervals and
paired sign-flip tests (maskstudio.evaluate):

  reversal  generated facts "A's parent is B." Baseline: causal next-token training, causal
            questions. Design (BICO-style): the fact bidirectional, alternating causal steps with
            15% masked-key denoising steps, questions prefix-LM (question bidirectional, answer
            causal). Questions without the fact in context: forward "A's parent is" -> " B",
            reverse "B is the parent of" -> " A"; exact match, broken down by direction. A third
            row scores the design's trained model on causal questions (a diagnostic).
  prefix    kv_retrieval: the prompt bidirectional, the answer causal, against causal.

Model: the SmolLM2-135M architecture (30 layers, d=576). With --gguf (one file, or parts that are
joined in order) the real SmolLM2-135M-Instruct weights and tokenizer are loaded (needs the `gguf`
package; when it is missing, artifacts/whl/gguf-*.whl is put on sys.path). Without it the weights
are RANDOM (seeded) and the tokenizer is byte-level: every table says so.

Writes OUT/results.json (configs, timings, summaries, losses) and OUT/results.md (the tables).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T_START = time.perf_counter()

# defaults per size: (facts, reversal steps, reversal batch, prefix n_train, prefix steps, prefix batch, eval_n)
FULL = dict(facts=128, rev_steps=400, rev_batch=32, n_train=512, prefix_steps=150, prefix_batch=16, eval_n=128)
TINY = dict(facts=8, rev_steps=6, rev_batch=4, n_train=16, prefix_steps=4, prefix_batch=4, eval_n=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for results.json and results.md")
    p.add_argument("--gguf", nargs="+", help="SmolLM2 GGUF file (or its parts, joined in order): real weights")
    p.add_argument("--tiny", action="store_true", help="a 2-layer random model and toy sizes (CPU smoke test)")
    p.add_argument("--part", choices=("both", "reversal", "prefix"), default="both")
    p.add_argument("--facts", type=int, help=f"facts to memorize (default {FULL['facts']})")
    p.add_argument("--rev-steps", type=int, help=f"reversal optimizer steps (default {FULL['rev_steps']})")
    p.add_argument("--rev-batch", type=int, help=f"facts per reversal step (default {FULL['rev_batch']})")
    p.add_argument("--n-train", type=int, help=f"kv_retrieval training examples (default {FULL['n_train']})")
    p.add_argument("--prefix-steps", type=int, help=f"prefix-LM optimizer steps (default {FULL['prefix_steps']})")
    p.add_argument("--prefix-batch", type=int, help=f"kv_retrieval examples per step (default {FULL['prefix_batch']})")
    p.add_argument("--eval-n", type=int, help=f"kv_retrieval held-out examples (default {FULL['eval_n']})")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-4 with --gguf, 5e-4 random init)")
    p.add_argument("--pack-tokens", type=int, default=4096, help="tokens per packed row (0 = no packing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default cuda when present, else cpu")
    args = p.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = 1e-4 if args.gguf else (3e-3 if args.tiny else 5e-4)
    if args.tiny and args.gguf:
        p.error("--tiny uses a 2-layer random model; leave out --gguf")
    return args


def ensure_gguf() -> str:
    """Make `import gguf` work (before transformers is imported): installed, or the wheel in
    artifacts/whl put on sys.path (a pure-Python wheel imports from the zip)."""
    try:
        importlib.import_module("gguf")
        return "installed"
    except ImportError:
        pass
    wheels = sorted(glob.glob(os.path.join(ROOT, "artifacts", "whl", "gguf-*.whl")))
    if not wheels:
        sys.exit("--gguf needs the gguf package: pip install gguf (or put its wheel in artifacts/whl/)")
    sys.path.insert(0, wheels[-1])
    importlib.import_module("gguf")

    return wheels[-1]


def join_parts(paths: list[str]) -> str:
    if len(paths) == 1:
        return paths[0]
    out = os.path.join(tempfile.gettempdir(), "maskstudio-joined.gguf")
    with open(out, "wb") as fh:
        for part in paths:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    fh.write(chunk)
    return out


def load(args, device):
    """(LoadedModel, a label saying which weights)."""
    import torch

    from maskstudio.run.models import LoadedModel
    from maskstudio.train import tiny_lm

    if args.tiny:
        return tiny_lm(args.seed), "tiny random Llama (2 layers, d=64), byte tokenizer"
    if not args.gguf:
        sys.path.insert(0, ROOT)
        from benchmarks.bench_train import random_smollm2

        lm = random_smollm2(device)
        return lm, "SmolLM2-135M architecture, RANDOM weights (seeded), byte tokenizer"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = join_parts(args.gguf)
    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager")
    lm = LoadedModel(model.to(device).eval(), tok, "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
                     torch.device(device))
    return lm, "SmolLM2-135M-Instruct, real weights (GGUF Q4_1 dequantized to fp32)"


def ticker(every: int):
    """An on_step callback printing the loss every `every` steps (never stops the run). compare
    trains the baseline first, then the design."""
    t0, runs = [time.perf_counter()], []

    def on_step(record):
        if record["step"] == 1:
            t0[0] = time.perf_counter() - record["seconds"]
            runs.append(("baseline", "design")[min(len(runs), 1)])
        if record["step"] % every == 0 or record["step"] == 1:
            print(f"  {runs[-1]:<8} step {record['step']:>5} ({record['kind']}): loss {record['loss']:.4f}, "
                  f"{record.get('forwards', 1)} forward(s), {record['seconds'] * 1000:.0f} ms; "
                  f"{time.perf_counter() - t0[0]:.1f} s since step 1", flush=True)
    return on_step


def step_stats(fit) -> dict:
    steps = fit.steps
    secs = [s["seconds"] for s in steps]
    later = secs[1:] or secs
    tokens = sum(s["tokens"] for s in steps)
    return {"steps": len(steps), "first_step_s": secs[0], "median_step_s": statistics.median(later),
            "total_s": sum(secs), "target_tokens_per_step": tokens / len(steps),
            "forwards_per_step": statistics.mean(s.get("forwards", 0) for s in steps),
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"]}


def _ci(lo_hi) -> str:
    return f"[{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]"


def _direction(entry: dict, value: str) -> str:
    for g in entry.get("breakdown", {}).get("groups", []):
        if g["value"] == value:
            return f"{round(g['accuracy'] * g['n'])}/{g['n']} = {g['accuracy']:.2f} {_ci(g['ci'])}"
    return "-"


def _paired(entry: dict) -> str:
    v = entry.get("vs_first")
    if not v:
        return ""
    return (f"acc {v['accuracy_diff']:+.2f} {_ci(v['accuracy_diff_ci'])} (p={v['accuracy_p']:.4f}); "
            f"NLL {v['nll_diff']:+.2f} (p={v['nll_p']:.4f})")


def run_reversal(args, lm, res: dict) -> None:
    from maskstudio.evaluate import summarize
    from maskstudio.train import compare, evaluate_model, fact_specs, held_out

    sp = fact_specs()
    t0 = time.perf_counter()
    r = compare(sp["train_full"], lm, task="parent_facts", objective="bico", eval_spec=sp["eval_prefix"],
                n_train=args.facts, eval_n=2 * args.facts, steps=args.rev_steps, lr=args.lr, batch=args.rev_batch,
                seed=args.seed, pack_tokens=args.pack_tokens, progress=False,  # no run folder: no checkpoints
                on_step=ticker(max(1, args.rev_steps // 4)))
    wall = time.perf_counter() - t0
    # diagnostic: the BICO-trained model asked the causal questions (as the baseline is)
    t1 = time.perf_counter()
    held = held_out("parent_facts", 2 * args.facts, args.seed, args.facts)
    rows = evaluate_model(sp["eval_causal"], r["fits"]["design"].lm, held, args.pack_tokens)
    diag = summarize(["design, causal questions"], {"design, causal questions": rows}, "direction")["specs"][0]
    print(r["text"], flush=True)
    res["reversal"] = {"summary": r["summary"], "design_causal_questions": diag, "text": r["text"],
                       "losses": r["losses"], "train": {k: step_stats(f) for k, f in r["fits"].items()},
                       "seconds": wall, "diagnostic_eval_seconds": time.perf_counter() - t1,
                       "config": {"facts": args.facts, "steps": args.rev_steps, "batch": args.rev_batch,
                                  "lr": args.lr, "seed": args.seed, "pack_tokens": args.pack_tokens,
                                  "questions": len(held), "objective": "bico (design), next_token (baseline)"}}


def run_prefix(args, lm, res: dict) -> None:
    from maskstudio import Spec
    from maskstudio.evaluate import task_template
    from maskstudio.train import compare

    d = task_template("kv_retrieval").to_dict()
    d["name"] = "prefix-LM prompt"
    prompt = [s["name"] for s in d["segments"] if s["name"] != "answer"]
    d["mask"] = {"base": {"pattern": "causal"}, "rules": [{"q": "*", "k": prompt, "pattern": "full"}]}
    t0 = time.perf_counter()
    r = compare(Spec.load(d), lm, task="kv_retrieval", n_train=args.n_train, eval_n=args.eval_n,
                steps=args.prefix_steps, lr=args.lr, batch=args.prefix_batch, seed=args.seed,
                pack_tokens=args.pack_tokens, progress=False, on_step=ticker(max(1, args.prefix_steps // 3)))
    print(r["text"], flush=True)
    res["prefix"] = {"summary": r["summary"], "text": r["text"], "losses": r["losses"],
                     "train": {k: step_stats(f) for k, f in r["fits"].items()}, "seconds": time.perf_counter() - t0,
                     "config": {"task": "kv_retrieval", "n_train": args.n_train, "eval_n": args.eval_n,
                                "steps": args.prefix_steps, "batch": args.prefix_batch, "lr": args.lr,
                                "seed": args.seed, "pack_tokens": args.pack_tokens}}


def markdown(res: dict) -> str:
    lines = [f"Model: **{res['weights']}**. Device: {res['device']}; torch {res['torch']}, "
             f"transformers {res['transformers']}. Total wall time {res['seconds']['total']:.0f} s "
             f"(model load {res['seconds']['load']:.0f} s).", ""]
    if "reversal" in res:
        rv, c = res["reversal"], res["reversal"]["config"]
        lines += [f"### Reversal curse ({c['facts']} facts, {c['steps']} steps of {c['batch']} facts, lr {c['lr']}, "
                  f"seed {c['seed']}, packed rows of <= {c['pack_tokens']} tokens; {rv['seconds']:.0f} s)", "",
                  "| model | when | forward acc (95% CI) | reverse acc (95% CI) | target NLL (95% CI) | vs baseline |",
                  "|---|---|---|---|---|---|"]
        for when in ("before", "after"):
            for e in rv["summary"][when]["specs"]:
                lines.append(f"| {e['name']} | {when} | {_direction(e, 'forward')} | {_direction(e, 'backward')} | "
                             f"{e['nll']:.2f} {_ci(e['nll_ci'])} | {_paired(e)} |")
        e = rv["design_causal_questions"]
        lines.append(f"| design trained with BICO, asked causal questions | after | {_direction(e, 'forward')} | "
                     f"{_direction(e, 'backward')} | {e['nll']:.2f} {_ci(e['nll_ci'])} | |")
        lines += ["", _train_line(rv["train"]), ""]
    if "prefix" in res:
        px, c = res["prefix"], res["prefix"]["config"]
        lines += [f"### Prefix-LM vs causal on kv_retrieval ({c['n_train']} training examples, {c['steps']} steps "
                  f"of {c['batch']}, lr {c['lr']}, {c['eval_n']} held-out; {px['seconds']:.0f} s)", "",
                  "| model | when | accuracy (95% CI) | target NLL (95% CI) | vs baseline |", "|---|---|---|---|---|"]
        for when in ("before", "after"):
            for e in px["summary"][when]["specs"]:
                lines.append(f"| {e['name']} | {when} | {e['accuracy']:.2f} {_ci(e['accuracy_ci'])} | "
                             f"{e['nll']:.2f} {_ci(e['nll_ci'])} | {_paired(e)} |")
        lines += ["", _train_line(px["train"]), ""]
    return "\n".join(lines)


def _train_line(train: dict) -> str:
    return "Training: " + "; ".join(
        f"{k}: loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}, median step {s['median_step_s'] * 1000:.0f} ms "
        f"(first {s['first_step_s']:.1f} s), {s['forwards_per_step']:.1f} forwards/step" for k, s in train.items())


def main(argv=None) -> int:
    args = parse_args(argv)
    gguf_from = ensure_gguf() if args.gguf else None
    sys.path.insert(0, ROOT)
    import torch
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    lm, label = load(args, device)
    res = {"weights": label, "model": lm.name, "gguf_package": gguf_from, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
           "argv": sys.argv[1:], "seconds": {"imports": t0 - T_START, "load": time.perf_counter() - t0}}
    print(f"{label} on {res['device']}: loaded in {res['seconds']['load']:.1f} s", flush=True)
    for part, fn in (("reversal", run_reversal), ("prefix", run_prefix)):
        if args.part in ("both", part):
            t = time.perf_counter()
            fn(args, lm, res)
            res["seconds"][part] = time.perf_counter() - t
            print(f"[{part}] {res['seconds'][part]:.1f} s", flush=True)
    res["seconds"]["total"] = time.perf_counter() - T_START
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    md = markdown(res)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(md + "\n")
    print(md)
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
