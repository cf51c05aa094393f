"""The reversal experiment's task and scores (#23 item 7): paraphrased facts, a share trained both
ways, questions in a held-out wording, the true answer ranked by log-probability among the same
subset's names; rank-1 / MRR with intervals and paired tests. Tiny random model, CPU, seconds."""
import json

import pytest
import torch

from maskstudio.evaluate import CANDIDATES, Example, load_jsonl, ranked, report, rivals, summarize
from maskstudio.train import compare, evaluate_model, fact_specs, tiny_lm, train
from maskstudio.train.data import (FORWARD_WORDINGS, REVERSE_WORDINGS, TRAIN_WORDINGS, _both, _reversal_examples,
                                   _reversal_questions, parent_facts)
from maskstudio.train.model import BICO_LORA, lora_options


def test_training_facts_are_paraphrased_and_one_way_facts_are_never_reversed():
    n = 9
    facts, both = parent_facts(n, 0), _both(n)
    assert both == 3
    ex = _reversal_examples(n, 0)
    assert len(ex) == both * 2 * TRAIN_WORDINGS + (n - both) * TRAIN_WORDINGS
    texts = [e.texts["fact"] for e in ex]
    assert len(set(texts)) == len(texts)
    for i, (c, p) in enumerate(facts):
        mine = [t for t in texts if c in t and p in t]
        fwd = [w.format(c=c, p=p) + f" {p}." for w in FORWARD_WORDINGS[:TRAIN_WORDINGS]]
        rev = [w.format(c=c, p=p) + f" {c}." for w in REVERSE_WORDINGS[:TRAIN_WORDINGS]]
        assert sorted(mine) == sorted(fwd + (rev if i < both else []))
        # the asking wordings are never trained, for any fact
        assert not any(t.startswith(FORWARD_WORDINGS[-1].format(c=c, p=p)) for t in texts)
        assert not any(t.startswith(REVERSE_WORDINGS[-1].format(c=c, p=p)) for t in texts)
        if i >= both:  # one-way: the parent's name never comes first, the child never last
            assert not any(t.startswith(p) or t.endswith(f"{c}.") for t in mine)
    assert [e.texts for e in _reversal_examples(n, 0)] == [e.texts for e in ex]
    assert [e.texts for e in _reversal_examples(n, 1)] != [e.texts for e in ex]


def test_questions_use_the_held_out_wording_and_rank_among_their_subset():
    n = 9
    facts, both = parent_facts(n, 0), _both(n)
    qs = _reversal_questions(n, 2 * n, 0)
    assert len(qs) == 2 * n and len({q.id for q in qs}) == 2 * n
    children = {c for c, _ in facts[:both]}, {c for c, _ in facts[both:]}
    parents = {p for _, p in facts[:both]}, {p for _, p in facts[both:]}
    for q in qs:
        c, p = facts[q.meta["fact"]]
        sub = 0 if q.meta["fact"] < both else 1
        assert q.meta["facts"] == ("both ways", "one way")[sub]
        if q.meta["direction"] == "forward":
            assert (q.texts["question"], q.texts["answer"]) == (FORWARD_WORDINGS[-1].format(c=c, p=p), f" {p}")
            pool = parents[sub]
        else:
            assert (q.texts["question"], q.texts["answer"]) == (REVERSE_WORDINGS[-1].format(c=c, p=p), f" {c}")
            pool = children[sub]
        assert sorted(q.meta[CANDIDATES]) == sorted(f" {x}" for x in pool)
        assert q.texts["answer"] in q.meta[CANDIDATES]
        assert q.meta["question"] == f"{q.meta['direction']}, facts trained {q.meta['facts']}"
        assert [r.texts["answer"] for r in rivals(q)] == [x for x in q.meta[CANDIDATES] if x != q.texts["answer"]]
    assert {q.meta["question"] for q in qs} == {f"{d}, facts trained {s}" for d in ("forward", "reverse")
                                                 for s in ("both ways", "one way")}


def _logprob(lm, question: str, answer: str) -> float:
    """Brute force: the answer's total log-probability, tokenized per segment like a run, through
    the model's own causal forward (no Mask Studio attention)."""
    q = lm.tokenizer(question, add_special_tokens=False)["input_ids"]
    a = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([q + a])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logp[len(q) + j - 1, t] for j, t in enumerate(a)))


def test_ranks_equal_brute_force_log_probabilities_packed_or_not():
    lm = tiny_lm(3)
    qs = _reversal_questions(6, 12, 0)[:6]
    spec = fact_specs("reversal_facts")["eval_causal"]
    plain = evaluate_model(spec, lm, qs)
    packed = evaluate_model(spec, lm, qs, pack_tokens=256)
    assert [r["rank"] for r in plain] == [r["rank"] for r in packed]
    for q, row, prow in zip(qs, plain, packed):
        lps = {c: _logprob(lm, q.texts["question"], c) for c in q.meta[CANDIDATES]}
        own = lps[q.texts["answer"]]
        assert row["logprob"] == pytest.approx(own, abs=1e-3) and prow["logprob"] == pytest.approx(own, abs=1e-3)
        assert row["rank"] == 1 + sum(v >= own for c, v in lps.items() if c != q.texts["answer"])
        assert row["n_candidates"] == len(q.meta[CANDIDATES]) and row["rr"] == 1 / row["rank"]


def test_memorized_statements_rank_first_and_unlearned_ones_do_not():
    """The ranking can move: a tiny model drilled on two statements puts their answers first,
    while the reverse of one of them (never trained) is not lifted with it."""
    lm = tiny_lm(0)
    names = [" Ines Keller", " Omar Sato", " Lars Weber", " Uma Rossi"]
    facts = [Example(0, {"fact": "Ada Novak's parent is Ines Keller."}), Example(1, {"fact": "Bo Costa's parent is Omar Sato."})]
    path_spec = fact_specs("reversal_facts")
    from maskstudio.train.data import encode_all
    items = encode_all(path_spec["train_causal"], facts, lm)
    fit = train(path_spec["train_causal"], lm, task=None, steps=80, batch=2, lr=1e-2, progress=False,
                _prepared=(path_spec["train_causal"], lm, facts, items))
    qs = [Example(0, {"question": "Ada Novak's parent is", "answer": " Ines Keller"}, {CANDIDATES: names}),
          Example(1, {"question": "Bo Costa's parent is", "answer": " Omar Sato"}, {CANDIDATES: names})]
    before = evaluate_model(path_spec["eval_causal"], lm, qs)
    after = evaluate_model(path_spec["eval_causal"], fit.lm, qs)
    assert [r["rank"] for r in after] == [1, 1] and all(r["correct"] for r in after)
    assert sum(r["rank"] for r in before) > 2  # not already first before training
    rev = [Example(0, {"question": "Ines Keller is the parent of", "answer": " Ada Novak"},
                   {CANDIDATES: [" Ada Novak", " Bo Costa", " Cy Olsen", " Di Ueda"]})]
    assert evaluate_model(path_spec["eval_causal"], fit.lm, rev)[0]["logprob"] < after[0]["logprob"]


def _rows(ranks, correct=None, k=4, group=None):
    return [{"id": i, "nll": 1.0, "correct": bool(correct[i]) if correct else r == 1, "rank": r, "rr": 1 / r,
             "n_candidates": k, "tokens": 2, "meta": {"g": group[i] if group else "all"}} for i, r in enumerate(ranks)]


def test_a_model_that_ignores_the_question_scores_exactly_chance():
    """One candidate set, one fixed order of names for every question: the true answers' ranks
    are a permutation, so rank-1 and MRR are exactly chance (1/k, H_k / k)."""
    k = 5
    s = summarize(["m"], {"m": _rows([3, 1, 5, 2, 4], k=k)}, None)["specs"][0]
    assert s["rank1"] == pytest.approx(1 / k) == pytest.approx(s["chance_rank1"])
    assert s["mrr"] == pytest.approx(sum(1 / j for j in range(1, k + 1)) / k) == pytest.approx(s["chance_mrr"])
    lo, hi = s["rank1_ci"]
    assert 0 < lo < 0.2 < hi < 0.7  # Wilson at 1/5, not a collapsed [0.2, 0.2]
    assert summarize(["m"], {"m": _rows([2, 2, 2, 2, 2], k=k)}, None)["specs"][0]["rank1_ci"][0] == 0.0


def test_ties_count_against_the_true_answer():
    row = {"id": 0, "nll": 1.0, "tokens": 2, "correct": True}
    assert ranked(row, [{"nll": 1.0, "tokens": 2}])["rank"] == 2  # same log-probability: not first
    # total, not mean log-probability: 5 tokens at 0.5 nats (-2.5) stay below 2 at 1.0 (-2.0)
    assert ranked(row, [{"nll": 2.0, "tokens": 2}, {"nll": 0.5, "tokens": 5}])["rank"] == 1
    assert ranked(row, [{"nll": 0.5, "tokens": 2}])["rank"] == 2
    assert ranked(row, []) == row


def test_ranking_is_paired_against_the_first_spec_overall_and_per_group():
    base = _rows([4] * 10 + [1] * 4, group=["a"] * 10 + ["b"] * 4)
    better = _rows([1] * 10 + [1] * 4, group=["a"] * 10 + ["b"] * 4)
    s = summarize(["base", "better"], {"base": base, "better": better}, "g")
    v = s["specs"][1]["vs_first"]
    assert v["rank1_diff"] == pytest.approx(10 / 14) and v["mrr_diff"] == pytest.approx(10 * 0.75 / 14)
    assert v["mrr_p"] == pytest.approx(2 / 2 ** 10)  # exact: only the 10 non-zero pairs all one sign reach it
    a, b = s["specs"][1]["breakdown"]["groups"]
    assert (a["value"], a["rank1"], a["vs_first"]["rank1_diff"]) == ("a", 1.0, 1.0)
    assert a["vs_first"]["mrr_p"] == pytest.approx(2 / 2 ** 10)
    assert (b["value"], b["vs_first"]["mrr_diff"], b["vs_first"]["mrr_p"]) == ("b", 0.0, 1.0)
    text = report(s)
    assert "drank-1 +0.714 (p=0.00195)" in text and "a (n=10): rank-1 1.000" in text
    with pytest.raises(ValueError, match="other examples"):
        summarize(["base", "x"], {"base": base, "x": base[:-1]}, None)
    plain = summarize(["m"], {"m": [{k: v for k, v in r.items() if k not in ("rank", "rr")} for r in base]}, "g")
    assert "rank1" not in plain["specs"][0] and "rank1" not in plain["specs"][0]["breakdown"]["groups"][0]


def test_compare_on_the_reversal_task_ranks_every_question(tmp_path):
    sp = fact_specs("reversal_facts")
    r = compare(sp["train_full"], "tiny-llama", task="reversal_facts", objective="bico", eval_spec=sp["eval_causal"],
                n_train=6, eval_n=12, steps=2, batch=4, lr=1e-3, lora=dict(BICO_LORA), pack_tokens=256,
                progress=False, out_dir=str(tmp_path))
    after = r["summary"]["after"]["specs"]
    assert [e["n"] for e in after] == [12, 12]
    groups = after[1]["breakdown"]["groups"]
    assert [(g["value"], g["n"]) for g in groups] == [("forward, facts trained both ways", 2),
                                                     ("forward, facts trained one way", 4),
                                                     ("reverse, facts trained both ways", 2),
                                                     ("reverse, facts trained one way", 4)]
    assert all("mrr_p" in g["vs_first"] for g in groups)
    assert [g["chance_rank1"] for g in groups] == pytest.approx([1 / 2, 1 / 4, 1 / 2, 1 / 4])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert all("rank" in row for row in scores["after"][f"design: {sp['train_full'].name}"])
    config = json.loads((tmp_path / "design" / "config.json").read_text())
    assert config["lora"] == BICO_LORA and config["objective"] == "bico"


@pytest.mark.parametrize("bad, word", [('{"rank": 8}', "'rank'"), ('{"r": 0}', "r=0"), ("[1]", "object"),
                                       ('{"lora_dropout": 1.5}', "lora_dropout"), ("not json", "JSON object"),
                                       ('{"target_modules": "everything"}', "target_modules")])
def test_bad_lora_settings_are_refused_naming_the_key(bad, word):
    with pytest.raises(ValueError, match=word.replace("[", r"\[")) as err:
        lora_options(bad)
    assert "\n" not in str(err.value)
    assert lora_options(json.dumps(BICO_LORA)) == BICO_LORA


def test_jsonl_candidates_must_be_answer_texts(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"texts": {"q": "x"}, "target": " a", "meta": {CANDIDATES: [" a", " b"]}}) + "\n")
    assert rivals(load_jsonl(str(good))[0])[0].texts["answer"] == " b"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"texts": {"q": "x"}, "target": " a", "meta": {CANDIDATES: [" a", 3]}}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: meta.candidates"):
        load_jsonl(str(bad))


def test_multihop_says_its_chain_order_and_training_breaks_down_by_it():
    from maskstudio.evaluate import make_examples
    from maskstudio.train.data import TRAIN_BREAKDOWN

    ex = make_examples("multihop", 64, 0)
    for e in ex:
        gold = e.texts[f"doc{e.meta['gold_position']}"]
        bridge = e.texts[f"doc{e.meta['bridge_position']}"]
        assert gold.startswith(e.texts["answer"].strip()) and bridge.split(" is the mother of ")[0] in gold
        assert e.meta["chain"] == ("in order" if e.meta["gold_position"] < e.meta["bridge_position"] else "reversed")
    assert {e.meta["chain"] for e in ex} == {"in order", "reversed"}
    assert TRAIN_BREAKDOWN["multihop"] == "chain" and TRAIN_BREAKDOWN["reversal_facts"] == "question"


def _fact_spec_files(tmp_path):
    for name, spec in fact_specs("reversal_facts").items():
        (tmp_path / f"{name}.json").write_text(spec.to_json())
    return tmp_path / "train_full.json", tmp_path / "eval_causal.json"


def test_cli_refuses_bad_lora_settings_in_one_line(tmp_path, capsys):
    from maskstudio.cli import main

    spec, _ = _fact_spec_files(tmp_path)
    assert main(["train", str(spec), "--task", "reversal_facts", "--model", "tiny-llama",
                 "--lora-config", '{"r": 32, "alpha": 16}']) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: LoRA config key 'alpha' is not one of r, lora_alpha, lora_dropout, target_modules"


@pytest.mark.slow
def test_cli_runs_the_documented_reversal_command_on_a_tiny_model(tmp_path, capsys):
    """docs/TRAINING.md's reversal command, at toy sizes on the tiny model."""
    from maskstudio.cli import main

    spec, ev = _fact_spec_files(tmp_path)
    out = tmp_path / "runs" / "reversal"
    assert main(["train", str(spec), "--task", "reversal_facts", "--objective", "bico", "--eval-spec", str(ev),
                 "--model", "tiny-llama", "--n-train", "6", "--eval-n", "12", "--steps", "4", "--batch", "4",
                 "--lr", "1e-3", "--warmup", "2", "--lora-config", json.dumps(BICO_LORA), "--pack-tokens", "256",
                 "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "reverse, facts trained one way (n=4): rank-1" in text and "dMRR" in text
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["lora"] == BICO_LORA and saved["eval_n"] == 12
    assert (out / "design" / "checkpoints" / "step-000004" / "adapter_config.json").is_file()
