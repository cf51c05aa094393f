"""Evaluation: deterministic tasks, statistics, data validation, sharding and resuming."""
import json
import os

import pytest
from conftest import run_maskstudio

from maskstudio import Spec, SpecError
from maskstudio.evaluate import (TASKS, bootstrap_ci, evaluate, fill, load_jsonl, make_examples, paired_test,
                                 summarize, task_template)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAUSAL = os.path.join(ROOT, "examples", "kv_causal.json")
ISOLATED = os.path.join(ROOT, "examples", "kv_isolated_docs.json")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_are_deterministic_and_fill_their_template(task):
    a, b = make_examples(task, 10, seed=3), make_examples(task, 10, seed=3)
    assert [e.texts for e in a] == [e.texts for e in b]
    assert [e.texts for e in a] != [e.texts for e in make_examples(task, 10, seed=4)]
    template = task_template(task)
    for ex in a:
        filled = fill(template, ex)
        assert [s["text"] for s in filled.segments] == list(ex.texts.values())
        assert "target" in filled.segments[-1]["role"]


def test_gold_document_visits_every_position():
    golds = [e.meta["gold_position"] for e in make_examples("kv_retrieval", 8)]
    assert sorted(set(golds)) == [0, 1, 2, 3]
    depths = {e.meta["depth"] for e in make_examples("passkey", 10)}
    assert depths == {0.0, 0.25, 0.5, 0.75, 1.0}


def test_fill_names_missing_segments():
    spec = Spec.load({"segments": [{"name": "context", "length": 3}, {"name": "answer", "length": 1}]})
    with pytest.raises(SpecError, match="context"):
        fill(spec, make_examples("kv_retrieval", 1)[0])


def test_bootstrap_and_paired_test_behave():
    lo, hi = bootstrap_ci([1.0] * 50 + [0.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.3
    assert paired_test([0.5] * 30) < 0.001            # a consistent difference is significant
    assert paired_test([1.0, -1.0] * 15) > 0.5        # a balanced one is not
    assert paired_test([0.0] * 10) == 1.0


def test_summary_pairs_examples_by_id_and_breaks_down():
    base = [{"id": i, "nll": 1.0, "correct": i % 2 == 0, "meta": {"gold_position": i % 2}} for i in range(20)]
    better = [{"id": i, "nll": 0.5, "correct": True, "meta": {"gold_position": i % 2}} for i in reversed(range(20))]
    out = summarize(["a", "b"], {"a": base, "b": better}, "gold_position")
    b = out["specs"][1]
    assert b["vs_first"]["nll_diff"] == pytest.approx(-0.5)
    assert b["vs_first"]["accuracy_diff"] == pytest.approx(0.5)
    assert b["vs_first"]["nll_p"] < 0.01
    groups = {g["value"]: g["accuracy"] for g in out["specs"][0]["breakdown"]["groups"]}
    assert groups == {0: 1.0, 1: 0.0}


def test_jsonl_validation_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"texts": {"question": "2+2="}, "target": " 4"}\n{"texts": {"question": 3}, "target": "x"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: texts.question must be a string"):
        load_jsonl(str(path))
    path.write_text('{"texts": {"question": "2+2="}}\n')
    with pytest.raises(ValueError, match=r":1: \"target\" must be a non-empty string"):
        load_jsonl(str(path))
    path.write_text('{"texts": {"question": "2+2="}, "target": " 4"}\n')
    assert load_jsonl(str(path))[0].texts == {"question": "2+2=", "answer": " 4"}


@pytest.mark.model
def test_evaluate_real_model_sharded_equals_single_and_resumes(smollm, tmp_path):
    specs = [CAUSAL, ISOLATED]
    single = evaluate(specs, task="kv_retrieval", n=4, model=smollm, progress=False)
    assert [e["name"] for e in single["specs"]] == ["kv causal", "kv isolated docs"]
    assert all(e["n"] == 4 for e in single["specs"])
    assert single["specs"][0]["nll"] != single["specs"][1]["nll"]  # the masks change the model's answer
    out = tmp_path / "shards"
    # what two ranks do, one after the other: rank 1 writes its shard, rank 0 merges the files
    assert evaluate(specs, task="kv_retrieval", n=4, model=smollm, progress=False, out_dir=str(out),
                    rank=1, world=2) is None
    merged = evaluate(specs, task="kv_retrieval", n=4, model=smollm, progress=False, out_dir=str(out),
                      rank=0, world=2)
    for a, b in zip(merged["specs"], single["specs"]):
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-6) and a["accuracy"] == b["accuracy"]
    # resumable: with both shard files present no example is scored again (model=None would load it)
    again = evaluate(specs, task="kv_retrieval", n=4, model="not/a-model-id", progress=False,
                     out_dir=str(out), rank=0, world=2)
    assert again["specs"] == merged["specs"]


@pytest.mark.model
@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path):
    out = tmp_path / "dist.json"
    args = ["eval", "--specs", CAUSAL, ISOLATED, "--task", "kv_retrieval", "-n", "4"]
    run_maskstudio([*args, "--out", str(out)], processes=2)
    dist = json.loads(out.read_text())
    single_out = tmp_path / "single.json"
    run_maskstudio([*args, "--out", str(single_out)])
    single = json.loads(single_out.read_text())
    assert dist["world_size"] == 2 and single["world_size"] == 1
    for a, b in zip(dist["specs"], single["specs"]):
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-5)
        assert a["accuracy"] == b["accuracy"]
    # a rerun finds every shard done and skips the model work
    res = run_maskstudio([*args, "--out", str(out)], processes=2)
    assert "Loading weights" not in res.stderr


def test_evaluation_figure_shows_every_spec_and_group():
    from maskstudio.viz import evaluation_figure

    base = [{"id": i, "nll": 1.0 + i % 3, "correct": i % 2 == 0, "meta": {"gold_position": i % 4}} for i in range(16)]
    summary = summarize(["causal", "isolated"], {"causal": base, "isolated": base}, "gold_position")
    summary.update(task="kv_retrieval", n=16)
    fig = evaluation_figure(summary)
    bars, nll = fig.axes
    assert len(bars.patches) == 2 * 4                      # 2 specs x 4 gold positions
    assert [t.get_text() for t in bars.get_xticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in nll.get_yticklabels()] == ["causal", "isolated"]


# ---------------------------------------------------------------- statistics at the edges
def test_proportions_get_wilson_intervals_that_do_not_collapse_at_zero():
    from maskstudio.evaluate import wilson_ci

    lo, hi = wilson_ci(0, 128)
    assert lo == 0.0 and 0.028 < hi < 0.03          # the exact 95% upper bound is 2.8%
    lo, hi = wilson_ci(128, 128)
    assert hi == 1.0 and 0.97 < lo < 0.972
    lo, hi = wilson_ci(32, 64)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.2378, abs=2e-3)


def test_sign_flip_is_exact_by_enumeration_for_small_n_and_a_bound_at_the_floor():
    import itertools

    from maskstudio.evaluate import p_text, sign_flip

    diffs = [0.3, -0.1, 0.5, 0.2, 0.0, 0.7, -0.2, 0.4]
    want = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= abs(sum(diffs)) - 1e-9
               for signs in itertools.product((-1, 1), repeat=len(diffs))) / 2 ** len(diffs)
    test = sign_flip(diffs)
    assert test["exact"] and test["p"] == pytest.approx(want)
    assert p_text(test).startswith("p=")
    big = sign_flip([1.0] * 40)                      # no random pattern reaches it: only a bound
    assert not big["exact"] and big["floor"] and p_text(big) == "p<1e-04"
    assert sign_flip([0.0, 0.0]) == {"p": 1.0, "exact": True, "floor": False}


def test_report_shows_whole_names_and_honest_p_values():
    from maskstudio.evaluate import report, summarize

    rows = lambda acc: [{"id": i, "nll": 1.0 - 0.01 * a, "correct": bool(a), "meta": {}} for i, a in enumerate(acc)]
    long = "design: a name much longer than twenty-eight characters"
    text = report(summarize(["base", long], {"base": rows([0] * 30), long: rows([1] * 30)}, None))
    assert long in text and "p<1e-04" in text and "[0.000,0.114]" in text
