"""Evaluate designs on data, with statistics: every spec runs on the same examples.

Per spec: mean target NLL and exact-match accuracy (greedy == teacher-forced argmax on every
answer token), each with a bootstrap 95% interval; paired differences against the first spec
with a sign-flip permutation test; and breakdowns (accuracy by gold-document position, by
passkey depth, by reversal direction).

Tasks are generated deterministically from a seed (no downloads). An example fills segments
by name, so any spec whose segment names match the task's template applies
(`task_template(task)` gives a causal starting point). Under `torchrun --nproc_per_node=G`
examples are sharded across processes, results are written per shard (a rerun skips finished
shards) and rank 0 merges them: the numbers equal a single-process run with the same seed.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import did_you_mean
from .progress import Stopped, stopped, tick
from .spec import Spec, SpecError

ANSWER = "answer"
CANDIDATES = "candidates"  # Example.meta key: answer texts the true answer is ranked among


@dataclass
class Example:
    id: int
    texts: dict          # segment name -> text (the answer segment holds the target)
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- tasks
_WORDS = ("amber basil cedar delta ember fjord garnet harbor indigo juniper kestrel lagoon meadow "
          "nectar onyx pepper quartz raven saffron tundra umber velvet willow yarrow zephyr").split()
PEOPLE = ("Alice Bruno Chiara Dmitri Elena Farid Greta Hugo Ines Jonas Keiko Lars Mira Nadia Oscar "
          "Priya Quinn Rosa Sami Tomas Uma Viktor Wen Xavier Yara Zane").split()
_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def _kv_retrieval(rng: random.Random, i: int, docs: int = 4) -> Example:
    keys = rng.sample(_WORDS, docs)
    values = [str(rng.randint(10, 99)) for _ in keys]
    gold = i % docs  # the gold document visits every position
    texts = {"instruction": "Read the records and answer with the number only.\n"}
    texts.update({f"doc{j}": f"Record: the code for {k} is {v}.\n" for j, (k, v) in enumerate(zip(keys, values))})
    texts["question"] = f"Question: what is the code for {keys[gold]}?\nAnswer:"
    texts[ANSWER] = f" {values[gold]}"
    return Example(i, texts, {"gold_position": gold})


def _passkey(rng: random.Random, i: int, depths=(0.0, 0.25, 0.5, 0.75, 1.0), repeats: int = 6) -> Example:
    key = str(rng.randint(10000, 99999))
    depth = depths[i % len(depths)]
    before = int(round(depth * repeats))
    texts = {"instruction": "Find the pass key hidden in the text.\n",
             "context": _FILLER * before + f"The pass key is {key}. Remember it. " + _FILLER * (repeats - before),
             "question": "\nWhat is the pass key?\nThe pass key is",
             ANSWER: f" {key}"}
    return Example(i, texts, {"depth": depth})


def _multihop(rng: random.Random, i: int, docs: int = 4) -> Example:
    a, b, c, *others = rng.sample(PEOPLE, docs + 1)
    facts = [f"{a} is the mother of {b}.", f"{b} is the mother of {c}."]
    facts += [f"{x} is the mother of {y}." for x, y in zip(others[::2], others[1::2])][: docs - 2]
    while len(facts) < docs:
        facts.append(f"{rng.choice(PEOPLE)} likes {rng.choice(_WORDS)}.")
    order = list(range(docs))
    rng.shuffle(order)
    texts = {"instruction": "Use the facts to answer.\n"}
    texts.update({f"doc{j}": facts[k] + "\n" for j, k in enumerate(order)})
    texts["question"] = f"Question: who is the grandmother of {c}?\nAnswer:"
    texts[ANSWER] = f" {a}"
    return Example(i, texts, {"gold_position": order.index(0), "bridge_position": order.index(1),
                              "chain": "in order" if order.index(0) < order.index(1) else "reversed"})


def _reversal(rng: random.Random, i: int) -> Example:
    x, y = rng.sample(PEOPLE, 2)
    forward = i % 2 == 0
    texts = {"instruction": "Answer from the fact.\n", "doc0": f"Fact: {x}'s teacher is {y}.\n",
             "question": (f"Question: who is {x}'s teacher?\nAnswer:" if forward
                          else f"Question: whose teacher is {y}?\nAnswer:"),
             ANSWER: f" {y}" if forward else f" {x}"}
    return Example(i, texts, {"direction": "forward" if forward else "backward"})


TASKS = {"kv_retrieval": _kv_retrieval, "passkey": _passkey, "multihop": _multihop, "reversal": _reversal}
BREAKDOWN = {"kv_retrieval": "gold_position", "passkey": "depth", "multihop": "gold_position",
             "reversal": "direction"}


def make_examples(task: str, n: int, seed: int = 0) -> list[Example]:
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; use one of {', '.join(TASKS)} or --data FILE.jsonl")
    return [TASKS[task](random.Random(f"{task}:{seed}:{i}"), i) for i in range(n)]


def task_template(task: str) -> Spec:
    """A causal spec with the task's segments (texts filled per example at run time)."""
    ex = make_examples(task, 1)[0]
    segs = [{"name": name, "modality": "text", "text": text} for name, text in ex.texts.items()]
    segs[-1]["role"] = ["target"]
    return Spec.load({"name": f"{task} (causal)", "segments": segs})


def load_jsonl(path: str) -> list[Example]:
    """Your own examples: one JSON object per line, {"texts": {segment: text}, "target": text, "meta": {}}."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(_lines(fh, path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            except (ValueError, RecursionError):  # a huge integer, or nesting past the parser's depth
                raise ValueError(f"{path}:{line_no}: a number too long or nesting too deep for an example") from None
            if not isinstance(row, dict) or not isinstance(row.get("texts"), dict):
                raise ValueError(f'{path}:{line_no}: needs "texts": {{segment: text}} and "target": text')
            if not isinstance(row.get("target"), str) or not row["target"]:
                raise ValueError(f'{path}:{line_no}: "target" must be a non-empty string')
            bad = [k for k, v in row["texts"].items() if not isinstance(v, str)]
            if bad:
                raise ValueError(f"{path}:{line_no}: texts.{bad[0]} must be a string")
            if not isinstance(row.get("meta", {}), dict):
                raise ValueError(f'{path}:{line_no}: "meta" must be an object ({{"name": value}})')
            ranks = row.get("meta", {}).get(CANDIDATES, [])
            if not isinstance(ranks, list) or not all(isinstance(c, str) and c for c in ranks):
                raise ValueError(f'{path}:{line_no}: meta.candidates must be a list of answer texts to rank the target among')
            texts = dict(row["texts"])
            texts[ANSWER] = row["target"]
            out.append(Example(len(out), texts, dict(row.get("meta", {}))))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def _lines(fh, path):
    """The file's lines; a file that is not UTF-8 text is refused naming the file."""
    try:
        yield from fh
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; examples are JSON lines") from None


# ---------------------------------------------------------------- one example under one spec
def fill(spec: Spec, example: Example) -> Spec:
    """The spec with each segment's text taken from the example (matched by segment name)."""
    data = spec.to_dict()
    names = [s["name"] for s in data["segments"]]
    missing = [n for n in names if n not in example.texts]
    if missing:
        raise SpecError("segments", f"spec '{spec.name}' has segment(s) {', '.join(missing)} that the task does "
                                    f"not fill; name segments after the task's parts: {', '.join(example.texts)}")
    for s in data["segments"]:
        s["text"] = example.texts[s["name"]]
        s.pop("length", None)
        s.pop("frames", None)
        if s["name"] == ANSWER:
            s["role"] = sorted(set(s.get("role", [])) | {"target"})
    return Spec.load(data)


def score(spec: Spec, example: Example, lm) -> dict:
    """Target NLL (mean nats/token) and exact match for one example."""
    from .run import run

    res = run(fill(spec, example), model=lm, attentions=False)
    layout = res.layout
    i = [s["name"] for s in layout.segments].index(ANSWER)
    start, size = layout.table.starts[i], layout.table.sizes[i]
    pos = torch.arange(max(start, 1), start + size)
    hits = res.logits[pos - 1].argmax(-1) == res.input_ids[pos]
    return {"id": example.id, "nll": res.target_nll[ANSWER]["mean"], "correct": bool(hits.all()),
            "tokens": res.target_nll[ANSWER]["tokens"], "meta": example.meta}


# ---------------------------------------------------------------- ranking among candidate answers
def rivals(example: Example) -> list[Example]:
    """The example once per other candidate answer (meta CANDIDATES without its own answer), ids kept."""
    own = example.texts[ANSWER]
    return [Example(example.id, {**example.texts, ANSWER: c}, {}) for c in example.meta.get(CANDIDATES, ()) if c != own]


def logprob(row: dict) -> float:
    """The answer's total log-probability (nats) from a score row: -mean NLL x answer tokens."""
    return -row["nll"] * row["tokens"]


def ranked(row: dict, rival_rows: list[dict]) -> dict:
    """The row with its answer's rank among the candidates by total log-probability (1 = best;
    a tie counts against it), reciprocal rank and candidate count; unchanged without rivals."""
    if not rival_rows:
        return row
    own = logprob(row)
    rank = 1 + sum(logprob(r) >= own for r in rival_rows)
    return {**row, "logprob": own, "rank": rank, "rr": 1.0 / rank, "n_candidates": 1 + len(rival_rows)}


def score_ranked(spec: Spec, example: Example, lm) -> dict:
    """score(), plus the rank of the true answer among the example's candidates (when it has some)."""
    return ranked(score(spec, example, lm), [score(spec, r, lm) for r in rivals(example)])


# ---------------------------------------------------------------- statistics
def bootstrap_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    if not values:
        return (math.nan, math.nan)
    x = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (reps, len(x)), generator=g)
    means = x[idx].mean(1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def wilson_ci(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion: honest at the edges (0/128 -> [0, 0.029]), where
    a bootstrap of 0/1 values collapses to [0, 0]."""
    if n == 0:
        return (math.nan, math.nan)
    p, z2 = hits / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


EXACT_SIGN_FLIPS = 20  # up to this many pairs the sign-flip test enumerates all 2**n patterns


def sign_flip(diffs: list[float], reps: int = 10000, seed: int = 0) -> dict:
    """Two-sided sign-flip test of mean(diffs) == 0: {"p", "exact", "floor"}. Exact by enumerating
    every sign pattern when n <= EXACT_SIGN_FLIPS; else `reps` random patterns, and a p at the
    permutation floor is only a bound, p < 1/(reps + 1) ("floor": True)."""
    d = torch.tensor(diffs, dtype=torch.float64)
    if len(d) == 0 or bool((d == 0).all()):
        return {"p": 1.0, "exact": True, "floor": False}
    observed = float(d.mean().abs()) - 1e-12
    if len(d) <= EXACT_SIGN_FLIPS:
        n, hits = len(d), 0
        bits = torch.arange(n)
        for start in range(0, 1 << n, 1 << 16):
            codes = torch.arange(start, min(start + (1 << 16), 1 << n))
            signs = ((codes[:, None] >> bits) & 1).to(torch.float64) * 2 - 1
            hits += int(((signs * d).mean(1).abs() >= observed).sum())
        return {"p": hits / (1 << n), "exact": True, "floor": False}
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (reps, len(d)), generator=g, dtype=torch.float64) * 2 - 1
    hits = int(((signs * d).mean(1).abs() >= observed).sum())
    return {"p": (hits + 1) / (reps + 1), "exact": False, "floor": hits == 0}


def paired_test(diffs: list[float], reps: int = 10000, seed: int = 0) -> float:
    """The sign-flip p-value (see sign_flip)."""
    return sign_flip(diffs, reps, seed)["p"]


def p_text(test: dict) -> str:
    """p as a reader should take it: "p<1e-04" at the permutation floor, "p=0.031" otherwise."""
    return f"p<{test['p']:.0e}" if test["floor"] else f"p={test['p']:.3g}"


def _ranking(rows: list[dict]) -> dict:
    """Rank-1 share (Wilson interval), mean reciprocal rank (bootstrap interval) and what chance
    gives (a uniformly random order of k candidates: rank-1 1/k, MRR H_k / k); {} without ranks."""
    if not rows or any("rank" not in r for r in rows):
        return {}
    top, rr, k = [r["rank"] == 1 for r in rows], [r["rr"] for r in rows], [r["n_candidates"] for r in rows]
    return {"rank1": sum(top) / len(top), "rank1_ci": wilson_ci(sum(top), len(top)), "mrr": sum(rr) / len(rr),
            "mrr_ci": bootstrap_ci(rr), "chance_rank1": sum(1 / c for c in k) / len(k),
            "chance_mrr": sum(sum(1 / j for j in range(1, c + 1)) / c for c in k) / len(k)}


def _paired(rows: list[dict], base: list[dict]) -> dict:
    """Paired differences against the first spec's rows (same ids): NLL, exact match and, when
    ranked, rank-1 and reciprocal rank, each with a bootstrap interval and a sign-flip p."""
    out = {}
    keys = [("nll", lambda r: r["nll"]), ("accuracy", lambda r: float(r["correct"]))]
    if _ranking(rows) and _ranking(base):
        keys += [("rank1", lambda r: float(r["rank"] == 1)), ("mrr", lambda r: r["rr"])]
    for key, value in keys:
        d = [value(a) - value(b) for a, b in zip(rows, base)]
        t = sign_flip(d)
        out.update({f"{key}_diff": sum(d) / len(d), f"{key}_diff_ci": bootstrap_ci(d), f"{key}_p": t["p"],
                    f"{key}_p_text": p_text(t)})
    return out


def summarize(names: list[str], results: dict[str, list[dict]], breakdown: str | None) -> dict:
    """Per-spec means with intervals, paired differences vs the first spec, breakdowns; rows with
    a rank (candidates) add rank-1 and MRR, overall and per group, with chance levels."""
    out = {"specs": []}
    base = sorted(results[names[0]], key=lambda r: r["id"])
    for name in names:
        rows = sorted(results[name], key=lambda r: r["id"])
        if [r["id"] for r in rows] != [r["id"] for r in base]:
            raise ValueError(f"'{name}' was scored on other examples than '{names[0]}'; paired tests need the same ones")
        nll = [r["nll"] for r in rows]
        acc = [float(r["correct"]) for r in rows]
        entry = {"name": name, "n": len(rows), "nll": sum(nll) / len(nll), "nll_ci": bootstrap_ci(nll),
                 "accuracy": sum(acc) / len(acc), "accuracy_ci": wilson_ci(int(sum(acc)), len(acc)),
                 **_ranking(rows)}
        if name != names[0]:
            entry["vs_first"] = _paired(rows, base)
        if breakdown:
            groups: dict = {}
            for i, r in enumerate(rows):
                groups.setdefault(r["meta"].get(breakdown), []).append(i)
            entry["breakdown"] = {"by": breakdown, "groups": []}
            for k, idx in sorted(groups.items(), key=lambda kv: str(kv[0])):
                g, v = [rows[i] for i in idx], [float(rows[i]["correct"]) for i in idx]
                group = {"value": k, "n": len(v), "accuracy": sum(v) / len(v), "ci": wilson_ci(int(sum(v)), len(v)),
                         **_ranking(g)}
                if name != names[0]:
                    group["vs_first"] = _paired(g, [base[i] for i in idx])
                entry["breakdown"]["groups"].append(group)
        out["specs"].append(entry)
    return out


def report(summary: dict) -> str:
    """The summary as a table; names are shown whole (the column is as wide as the longest)."""
    w = max([28] + [len(e["name"]) for e in summary["specs"]])
    lines = [f"{'spec':{w}} {'n':>5} {'NLL':>8} {'95% CI':>17} {'acc':>6} {'95% CI':>15}  vs first"]
    for e in summary["specs"]:
        lo, hi = e["nll_ci"]
        alo, ahi = e["accuracy_ci"]
        vs = ""
        if "vs_first" in e:
            v = e["vs_first"]
            vs = f"dNLL {v['nll_diff']:+.3f} ({v['nll_p_text']}), dacc {v['accuracy_diff']:+.3f} ({v['accuracy_p_text']})"
        lines.append(f"{e['name']:{w}} {e['n']:>5} {e['nll']:8.3f} [{lo:7.3f},{hi:7.3f}] "
                     f"{e['accuracy']:6.3f} [{alo:5.3f},{ahi:5.3f}]  {vs}")
        if "rank1" in e:
            lines.append(f"{'':{w}} {_rank_text(e)}")
        if "breakdown" in e:
            cells = ", ".join(f"{g['value']}: {g['accuracy']:.2f}" for g in e["breakdown"]["groups"])
            lines.append(f"{'':{w}} accuracy by {e['breakdown']['by']}: {cells}")
            for g in e["breakdown"]["groups"]:
                if "rank1" in g:
                    lines.append(f"{'':{w}}   {g['value']} (n={g['n']}): {_rank_text(g)}")
    if summary.get("stopped"):
        lines.append(f"stopped after {summary['specs'][0]['n']} examples ({summary['stopped']}); the rows above are those")
    return "\n".join(lines)


def _rank_text(e: dict) -> str:
    """One line of ranking figures: rank-1 and MRR with intervals, chance, paired p vs the first."""
    (a, b), (c, d) = e["rank1_ci"], e["mrr_ci"]
    text = (f"rank-1 {e['rank1']:.3f} [{a:.3f},{b:.3f}], MRR {e['mrr']:.3f} [{c:.3f},{d:.3f}] "
            f"(chance {e['chance_rank1']:.3f} / {e['chance_mrr']:.3f})")
    v = e.get("vs_first", {})
    if "mrr_diff" in v:
        text += f"; drank-1 {v['rank1_diff']:+.3f} ({v['rank1_p_text']}), dMRR {v['mrr_diff']:+.3f} ({v['mrr_p_text']})"
    return text


# ---------------------------------------------------------------- running, sharded
def _dist():
    """(rank, world) from torchrun's environment; initialises torch.distributed when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    return rank, world


def evaluate(specs, task: str = "kv_retrieval", n: int = 100, model=None, seed: int = 0, data: str | None = None,
             out_dir: str | None = None, progress: bool = True, rank: int | None = None, world: int | None = None) -> dict | None:
    """Run every spec on the same examples; returns the summary (None on ranks other than 0)."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000:
        raise ValueError(f"n (examples) must be an integer from 1 to 100,000, got {n!r}")
    if task not in TASKS and data is None:
        raise ValueError(f"unknown task '{task}'{did_you_mean(task, TASKS)}; use one of {', '.join(TASKS)}")
    loaded = [s if isinstance(s, Spec) else Spec.load(s) for s in specs]
    names = [s.name if s.name != "untitled" else f"spec{i}" for i, s in enumerate(loaded)]
    if len(set(names)) != len(names):
        names = [f"{i}:{nm}" for i, nm in enumerate(names)]
    examples = load_jsonl(data) if data else make_examples(task, n, seed)
    for s in loaded:
        fill(s, examples[0])  # validate segment names before any model work
    if rank is None or world is None:
        rank, world = _dist()
    shard = examples[rank::world]
    out = Path(out_dir) if out_dir else None
    shard_file = out / f"shard-{rank}-of-{world}.json" if out else None
    if shard_file and shard_file.exists():
        mine = json.loads(shard_file.read_text())  # resumable: this shard is already done
    else:
        lm = _load(model, world)
        mine = {name: [] for name in names}
        t0 = time.perf_counter()
        bar = _bar(len(shard) * len(loaded), rank == 0 and progress)
        for i, ex in enumerate(shard):
            if tick(f"scoring example {i + 1}/{len(shard)}"):  # Stop keeps the examples scored so far
                break
            for name, spec in zip(names, loaded):
                mine[name].append(score_ranked(spec, ex, lm))
                bar.update(1)
        bar.close()
        mine["_seconds"] = time.perf_counter() - t0
        if shard_file:
            out.mkdir(parents=True, exist_ok=True)
            tmp = shard_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(mine))
            tmp.rename(shard_file)
    parts = _gather(mine, rank, world, out)
    if rank != 0:
        return None
    merged = {name: [r for p in parts for r in p[name]] for name in names}
    if not merged[names[0]]:
        raise Stopped(f"{stopped()}: no example scored yet")
    seconds = max(p.get("_seconds", 0.0) for p in parts)
    summary = summarize(names, merged, BREAKDOWN.get(task) if not data else None)
    summary.update({"task": task if not data else data, "n": len(merged[names[0]]), "seed": seed,
                    "stopped": stopped(),
                    "model": model or "SmolLM2-135M-Instruct (embedded)",
                    "world_size": world, "seconds": seconds,
                    "examples_per_second": len(examples) / seconds if seconds else None})
    return summary


def _gather(mine: dict, rank: int, world: int, out: Path | None) -> list[dict]:
    """Every shard's results: through torch.distributed when it runs, else from the shard files."""
    if world == 1:
        return [mine]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        return gathered
    if rank != 0:
        return []
    files = [out / f"shard-{r}-of-{world}.json" for r in range(world)] if out else []
    missing = [str(f) for f in files if not f.exists()] or ([] if out else ["(no out_dir)"])
    if missing:
        raise ValueError(f"shard results missing: {', '.join(missing)}; run the other ranks first")
    return [json.loads(f.read_text()) for f in files]


def _load(model, world):
    from .run import load_model

    local = int(os.environ.get("LOCAL_RANK", "0"))
    return load_model(model, device=f"cuda:{local}" if torch.cuda.is_available() and world > 1 else None)


def _bar(total, enabled):
    try:
        from tqdm import tqdm
        return tqdm(total=total, disable=not enabled, desc="evaluating", unit="run")
    except ImportError:  # pragma: no cover
        class Null:
            def update(self, *_):
                pass

            def close(self):
                pass
        return Null()


def main(args) -> int:
    """`maskstudio eval` entry point (see cli.py)."""
    summary = evaluate(args.specs, task=args.task, n=args.n, model=args.model, seed=args.seed, data=args.data,
                       out_dir=(str(Path(args.out).with_suffix("")) + ".shards") if args.out else None)
    if summary is not None:
        print(report(summary))
        if summary.get("examples_per_second"):
            print(f"{summary['examples_per_second']:.2f} examples/s on {summary['world_size']} process(es), each example under {len(summary['specs'])} specs")
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank tears down together (a rank leaving early aborted once in CI)
        torch.distributed.destroy_process_group()
    return 0


def evaluate_design(spec, task: str, n: int = 8, baseline=None, model=None, seed: int = 0, progress=None) -> dict:
    """The app's Evaluate tab: `spec` against a baseline (default: the task's causal template).

    Returns {"summary", "text", "figure"}; raises SpecError / ValueError / RunError with one line."""
    from .viz import evaluation_figure

    spec = spec if isinstance(spec, Spec) else Spec.load(spec)
    base = task_template(task) if baseline is None else (baseline if isinstance(baseline, Spec) else Spec.load(baseline))
    if base.to_dict() == spec.to_dict():
        raise ValueError("the design and the baseline are the same spec; change the design or keep another snapshot")
    a = Spec.load({**base.to_dict(), "name": f"baseline: {base.name}"})
    b = Spec.load({**spec.to_dict(), "name": f"design: {spec.name}"})
    summary = evaluate([a, b], task=task, n=n, model=model, seed=seed, progress=False, rank=0, world=1)
    return {"summary": summary, "text": report(summary), "figure": evaluation_figure(summary)}
