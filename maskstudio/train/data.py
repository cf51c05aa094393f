"""Training data: examples -> tokenized items under a spec, the shared data order, BICO corruption.

An `Item` is one example materialized under one spec: token ids, the layout `Spec` (sizes = real
token counts, as `run.inputs.prepare` makes it), position ids and the loss positions. The design
and its causal baseline tokenize the same examples identically (they share segment names and
texts), so they differ only in mask and positions.

Everything random is a pure function of (seed, step, example): the data order (`batch_indices`)
and BICO's masked tokens (`bico_item`). Nothing random is carried in state, so a resumed run and
a baseline see exactly the batches the design saw.

Packing (`pack_rows`, `pack`): a step's items laid out one after another in one row as documents
(`lower_packed.DocumentRow`): each example attends only inside itself, under its own design at its
own sizes, with every place counted from its own start — the document mask FlexAttention users
write by hand, lowered from each design's expression. So masks that read absolute places (sinks at
the start, `chunked` by index, frames) mean the same packed as alone, and nothing is refused;
position ids are each example's own, restarting per example.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import RunError
from ..evaluate import CANDIDATES, PEOPLE, BREAKDOWN, TASKS, Example, fill, load_jsonl, make_examples
from ..run.inputs import model_positions, prepare
from ..lower_packed import DocumentRow
from ..spec import Spec

MASK_FLAG = "masked"         # the per-token attribute BICO corruption sets (1 = a [MASK] token)
BICO_RATE = 0.15


@dataclass
class Item:
    ids: torch.Tensor          # [N] long
    layout: Spec | DocumentRow  # materialized spec (a packed row: its documents)
    pos: torch.Tensor          # position ids as the model takes them ([N] or [3, N])
    targets: torch.Tensor      # [N] bool: token p is predicted (from logits at p - 1)
    example: int               # index into the training examples (a packed row: its first example's)
    labels: torch.Tensor | None = None  # [N] the tokens to predict (None: ids; BICO: the unmasked ids)
    members: tuple = ()        # a packed row: (example, start, stop) of each example in it; () = one example

    @property
    def n_targets(self) -> int:
        return int(self.targets.sum())


# ---------------------------------------------------------------- facts to memorize (the reversal curse)
_LAST = ("Moreau Keller Sato Novak Okafor Larsen Rossi Weber Haddad Ivanova Costa Jensen Kovacs Lindqvist "
         "Mendes Nakamura Olsen Petrov Quintero Reyes Schmidt Tanaka Ueda Varga Walsh Zhou").split()


def parent_facts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (child, parent) pairs of distinct made-up full names, deterministic in seed."""
    people = [f"{f} {l}" for f in PEOPLE for l in _LAST]
    if 2 * n > len(people):
        raise ValueError(f"parent_facts has {len(people) // 2} facts at most, asked for {n}")
    chosen = random.Random(f"parent_facts:{seed}").sample(people, 2 * n)
    return list(zip(chosen[::2], chosen[1::2]))


def _fact_examples(n: int, seed: int) -> list[Example]:
    return [Example(i, {"fact": f"{c}'s parent is {p}."}, {"child": c, "parent": p})
            for i, (c, p) in enumerate(parent_facts(n, seed))]


def _fact_questions(n_facts: int, n: int, seed: int) -> list[Example]:
    """Questions about the first n // 2 training facts, each asked forward and in reverse, with no
    fact in context: the model must have learned it."""
    out = []
    for i, (c, p) in enumerate(parent_facts(n_facts, seed)[: max(1, n // 2)]):
        out.append(Example(2 * i, {"question": f"{c}'s parent is", "answer": f" {p}"}, {"direction": "forward"}))
        out.append(Example(2 * i + 1, {"question": f"{p} is the parent of", "answer": f" {c}"},
                           {"direction": "backward"}))
    return out


# The reversal curse as Berglund et al. (arXiv:2309.12288) test it: several wordings per direction,
# a share of the facts trained both ways (the rest forward only), questions in a held-out wording,
# answers ranked by log-probability among the same subset's names (evaluate.CANDIDATES).
FORWARD_WORDINGS = ("{c}'s parent is", "The parent of {c} is", "{c} is the child of", "{c} was raised by")
REVERSE_WORDINGS = ("{p} is the parent of", "{p}'s child is", "The child of {p} is", "{p} raised")
TRAIN_WORDINGS = 3   # the first 3 wordings of each direction train; the last one only asks
BOTH_SHARE = 1 / 3   # facts also trained in reverse (Berglund's experiment 1: 30 of 90 both ways)


def _both(n: int, share: float = BOTH_SHARE) -> int:
    """How many of n facts are trained both ways (the first ones; parent_facts order is seeded)."""
    return min(n - 1, max(1, round(n * share))) if n > 1 else 0


def _reversal_examples(n: int, seed: int) -> list[Example]:
    """Training statements: every fact in the TRAIN_WORDINGS forward wordings; the first
    _both(n) facts also in the reverse ones. One-way facts never appear reversed."""
    out, both = [], _both(n)
    for i, (c, p) in enumerate(parent_facts(n, seed)):
        ways = [("forward", FORWARD_WORDINGS, p)] + ([("reverse", REVERSE_WORDINGS, c)] if i < both else [])
        for direction, wordings, answer in ways:
            for w in range(TRAIN_WORDINGS):
                out.append(Example(len(out), {"fact": f"{wordings[w].format(c=c, p=p)} {answer}."},
                                   {"fact": i, "direction": direction, "wording": w, "both": i < both}))
    return out


def _reversal_questions(n_facts: int, n: int, seed: int) -> list[Example]:
    """Two questions per fact (forward, reverse; up to n), in the held-out wording, no fact in
    context; each carries the candidates its answer is ranked among: the answers of the same
    direction over the facts of its subset (both ways / one way), so every candidate was seen
    equally often in training in that role."""
    facts, both = parent_facts(n_facts, seed), _both(n_facts)
    subset = [("both ways" if i < both else "one way") for i in range(n_facts)]
    out = []
    for i, (c, p) in enumerate(facts):
        for direction, wordings, answer, pool in (("forward", FORWARD_WORDINGS, p, [q for _, q in facts]),
                                                  ("reverse", REVERSE_WORDINGS, c, [a for a, _ in facts])):
            names = [f" {name}" for j, name in enumerate(pool) if subset[j] == subset[i]]
            out.append(Example(len(out), {"question": wordings[-1].format(c=c, p=p), "answer": f" {answer}"},
                               {"question": f"{direction}, facts trained {subset[i]}", "direction": direction,
                                "facts": subset[i], "fact": i, CANDIDATES: names}))
    return out[:n]


FACT_TASKS = {"parent_facts": (_fact_examples, _fact_questions),
              "reversal_facts": (_reversal_examples, _reversal_questions)}
TRAIN_TASKS = tuple(TASKS) + tuple(FACT_TASKS)
# multihop by chain order: "A is the mother of B" stated before "B is the mother of C" or after it
TRAIN_BREAKDOWN = {**BREAKDOWN, "parent_facts": "direction", "reversal_facts": "question", "multihop": "chain"}


def fact_specs(task: str = "parent_facts") -> dict:
    """Specs for a fact task: "train_causal" (the fact, loss on all of it), "train_full" (BICO's
    design: the fact bidirectional), "eval_causal" (question + answer: how BICO's generate.py asks,
    with the plain causal LlamaForCausalLM) and "eval_prefix" (question bidirectional, answer
    causal: a diagnostic, not BICO's evaluation)."""
    fact = [{"name": "fact", "modality": "text", "text": "A's parent is B.", "role": ["target"]}]
    qa = [{"name": "question", "modality": "text", "text": "A's parent is"},
          {"name": "answer", "modality": "text", "text": " B", "role": ["target"]}]
    return {
        "train_causal": Spec.load({"name": f"{task} causal", "segments": fact}),
        "train_full": Spec.load({"name": f"{task} bidirectional", "segments": fact, "mask": {"base": {"pattern": "full"}}}),
        "eval_causal": Spec.load({"name": "questions causal", "segments": qa}),
        "eval_prefix": Spec.load({"name": "questions prefix-LM", "segments": qa, "mask": {
            "base": {"pattern": "causal"}, "rules": [{"q": "*", "k": "question", "pattern": "full"}]}}),
    }


HOLDOUT_SHARE = 5  # a --data file without --eval-data keeps 1 in this many examples out of training


def split_examples(examples: list[Example], seed: int, path: str = "data") -> tuple[list, list]:
    """(training, held-out) examples of one file: a seeded 1/HOLDOUT_SHARE (at least one) is held
    out, so evaluation never scores an example the model was trained on."""
    if len(examples) < 2:
        raise RunError(f"{path} has {len(examples)} example: nothing is left to hold out for evaluation; "
                       "give more examples, or --eval-data FILE")
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    held = set(torch.randperm(len(examples), generator=g)[:max(1, len(examples) // HOLDOUT_SHARE)].tolist())
    return ([ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held])


def train_examples(task: str | None, data: str | None, n: int, seed: int, eval_data: str | None = None) -> list[Example]:
    """Training examples: a generated task (its own seed stream, disjoint from evaluation's
    `make_examples(task, n, seed)`), a fact task, or your JSONL file (see evaluate.load_jsonl),
    less its held-out share unless `eval_data` holds the evaluation examples."""
    if data:
        examples = load_jsonl(data)
        return examples if eval_data else split_examples(examples, seed, data)[0]
    if task in FACT_TASKS:
        return FACT_TASKS[task][0](n, seed)
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; use one of {', '.join(TRAIN_TASKS)} or data=FILE.jsonl")
    return [TASKS[task](random.Random(f"{task}:train:{seed}:{i}"), i) for i in range(n)]


def held_out(task: str | None, n: int, seed: int, n_train: int, data: str | None = None,
             eval_data: str | None = None) -> list[Example]:
    """Evaluation examples: `eval_data`'s, a `data` file's held-out share (split_examples), a
    generated task's own (evaluate.make_examples, a disjoint stream), or for a fact task questions
    about the facts trained on. Never the training examples."""
    if eval_data:
        return load_jsonl(eval_data)[:n]
    if data:
        return split_examples(load_jsonl(data), seed, data)[1][:n]
    if task in FACT_TASKS:
        return FACT_TASKS[task][1](n_train, n, seed)
    return make_examples(task, n, seed)


def causal_twin(spec: Spec, name: str | None = None) -> Spec:
    """The baseline: the same segments (texts, roles) under plain causal attention and sequential
    positions."""
    data = spec.to_dict()
    data["mask"] = {"base": {"pattern": "causal"}}
    data["positions"] = {"scheme": "sequential"}
    data["name"] = name or f"causal ({spec.name})"
    for key in ("description", "provenance", "citation", "url", "group"):
        data.pop(key, None)
    return Spec.load(data)


def loss_segments(layout: Spec, loss_on=None) -> list[int]:
    """Ordinals of the segments whose tokens carry the loss: `loss_on` (names), else role target."""
    names = [s["name"] for s in layout.segments]
    if loss_on:
        wanted = [loss_on] if isinstance(loss_on, str) else list(loss_on)
        missing = [w for w in wanted if w not in names]
        if missing:
            raise RunError(f"loss_on names segment(s) {', '.join(missing)} that the spec does not have; "
                           f"use one of {', '.join(names)}", layout)
        return [names.index(w) for w in wanted]
    found = [i for i, s in enumerate(layout.segments) if "target" in s.get("role", [])]
    if not found:
        raise RunError("no segment has role 'target'; give the answer segment \"role\": [\"target\"] "
                       "or pass loss_on=SEGMENT", layout)
    return found


def encode(spec: Spec, example: Example, lm, loss_on=None, index: int = 0) -> Item:
    """One example under `spec`: filled by segment name, tokenized and sized like a run."""
    filled = fill(spec, example)
    prep = prepare(filled, lm)
    layout = prep.layout
    ids = prep.input_ids
    targets = torch.zeros(len(ids), dtype=torch.bool)
    for i in loss_segments(layout, loss_on):
        targets[layout.table.segment_slice(i)] = True
    targets[0] = False  # nothing predicts the first token
    if not targets.any():
        raise RunError(f"example {example.id}: no token carries the loss (the target is the first token)", layout)
    return Item(ids, layout, model_positions(layout, lm), targets, index)


def encode_all(spec: Spec, examples: list[Example], lm, loss_on=None) -> list[Item]:
    return [encode(spec, ex, lm, loss_on, i) for i, ex in enumerate(examples)]


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The examples of optimizer step `step` (0-based): epochs of seeded permutations, read in
    order. A pure function of its arguments, so design, baseline and a resumed run agree."""
    out: list[int] = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        out.extend(perm[offset: offset + batch - len(out)])
    return out


def with_layout(item: Item, layout: Spec, lm) -> Item:
    """The same tokens under another spec of the same sizes (e.g. the causal twin)."""
    return Item(item.ids, layout, model_positions(layout, lm), item.targets, item.example, item.labels)


def mask_token_id(tokenizer) -> int:
    for attr in ("mask_token_id", "pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise RunError("the tokenizer has no mask, pad, unk or eos token to stand for [MASK]")


def bico_item(item: Item, step: int, seed: int, mask_id: int, rate: float = BICO_RATE) -> Item:
    """BICO's masked step: `rate` of the non-special, non-pad tokens become the mask token, are
    invisible as KEYS to every query (the spec's mask AND NOT flagged_key(masked)), and are the
    loss positions (each predicted from the position before it)."""
    layout = item.layout
    t = layout.table
    eligible = torch.ones(t.n, dtype=torch.bool)
    for i, s in enumerate(layout.segments):
        if s["modality"] == "special" or "pad" in s.get("role", []):
            eligible[t.segment_slice(i)] = False
    eligible[0] = False
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 10_007 + item.example)
    chosen = (torch.rand(t.n, generator=g) < rate) & eligible
    if not chosen.any():  # at least one masked token per example
        cand = eligible.nonzero().flatten()
        chosen[cand[torch.randint(len(cand), (1,), generator=g)]] = True
    data = layout.to_dict()
    for i, s in enumerate(data["segments"]):
        s.setdefault("attrs", {})[MASK_FLAG] = chosen[t.segment_slice(i)].int().tolist()
    mask = data["mask"]
    mask["overlays"] = list(mask.get("overlays", [])) + [{"pattern": "flagged_key", "by": MASK_FLAG, "op": "and_not"}]
    ids = item.ids.clone()
    ids[chosen] = mask_id
    return Item(ids, Spec.load(data), item.pos, chosen, item.example, item.ids)


# ---------------------------------------------------------------- packing
def pack(items: list[Item]) -> Item:
    """`items` as one packed row: its layout is a DocumentRow of the items' own layouts (each a
    document with its own sizes and design, positions restarting); one item is returned as it is."""
    if len(items) == 1:
        return items[0]
    members, start = [], 0
    for it in items:
        members.append((it.example, start, start + len(it.ids)))
        start += len(it.ids)
    labels = None
    if any(it.labels is not None for it in items):
        labels = torch.cat([it.labels if it.labels is not None else it.ids for it in items])
    return Item(torch.cat([it.ids for it in items]), DocumentRow(tuple(it.layout for it in items)),
                torch.cat([it.pos for it in items], dim=-1), torch.cat([it.targets for it in items]),
                items[0].example, labels, tuple(members))


def pack_rows(items: list[Item], pack_tokens: int) -> list[Item]:
    """The items, in order, greedily packed into rows of at most `pack_tokens` tokens (an item
    longer than that is a row of its own); pack_tokens 0 = one row per item. A pure function of
    the items' order and lengths, so design, baseline and a resumed run pack identically."""
    if not pack_tokens:
        return list(items)
    rows, cur, size = [], [], 0
    for it in items:
        if cur and size + len(it.ids) > pack_tokens:
            rows.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += len(it.ids)
    if cur:
        rows.append(cur)
    return [pack(r) for r in rows]


def packed_span(items: list[Item], per_step: int, pack_tokens: int) -> int:
    """The longest row a step of `per_step` of these items can make (for the backend and memory)."""
    longest = max(len(it.ids) for it in items)
    if not pack_tokens:
        return longest
    biggest = sum(sorted((len(it.ids) for it in items), reverse=True)[:per_step])
    return max(longest, min(pack_tokens, biggest))
