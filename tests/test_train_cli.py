"""`maskstudio train` as a user drives it: resume keeps the run's own settings and folder, a flag
that contradicts the run is refused (or overrides on purpose), the documented commands run as
written (tiny model), and damaged run folders, bad data files and bad numbers get one line."""
import json
import shutil

import pytest

from maskstudio.cli import main
from maskstudio.evaluate import task_template

pytestmark = pytest.mark.slow  # a few tiny-model trainings each: seconds


def _spec_file(tmp_path):
    d = task_template("kv_retrieval").to_dict()
    d["name"] = "prefix lm"
    d["mask"] = {"base": {"pattern": "causal"}, "rules": [{"q": "*", "k": ["doc0", "doc1"], "pattern": "full"}]}
    path = tmp_path / "design.json"
    path.write_text(json.dumps(d))
    return path


RUN = ["--model", "tiny-llama", "--batch", "2", "--lr", "1e-3", "--n-train", "8", "--seed", "3", "--resumable", "-q"]


@pytest.fixture
def run(tmp_path):
    """A 2-step run folder trained with non-default settings."""
    spec = _spec_file(tmp_path)
    folder = tmp_path / "runs" / "design"
    assert main(["train", str(spec), *RUN, "--steps", "2", "--no-baseline", "--out", str(folder)]) == 0
    return spec, folder


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())["steps"]


def test_resume_continues_the_run_as_configured_into_its_own_folder(run, tmp_path, capsys):
    spec, folder = run
    # the documented forms: no spec, no settings; and `design.json --resume FOLDER --steps N`
    assert main(["train", "--resume", str(folder), "--steps", "3", "-q"]) == 0
    assert main(["train", str(spec), "--resume", str(folder), "--steps", "4", "-q"]) == 0
    steps = _metrics(folder)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(s["lr"] == pytest.approx(1e-3) for s in steps)
    config = json.loads((folder / "config.json").read_text())
    assert (config["batch"], config["lr"], config["n_train"], config["seed"], config["model_id"]) == \
        (2, 1e-3, 8, 3, "tiny-llama")
    assert config["resumed_from"].endswith("step-000003")
    # bit-identical to the uninterrupted run of the same settings
    whole = tmp_path / "whole"
    assert main(["train", str(spec), *RUN, "--steps", "4", "--no-baseline", "--out", str(whole)]) == 0
    assert [s["loss"] for s in _metrics(whole)] == [s["loss"] for s in steps]
    assert "run folder" in capsys.readouterr().out


def test_resume_refuses_a_contradicting_flag_unless_override(run, capsys):
    spec, folder = run
    assert main(["train", "--resume", str(folder), "--steps", "4", "--batch", "8", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--batch 8 contradicts the run's 2" in err and len(err.splitlines()) == 1
    assert main(["train", "--resume", str(folder), "--steps", "3", "--batch", "4", "--override", "-q"]) == 0
    assert json.loads((folder / "config.json").read_text())["batch"] == 4
    other = json.loads(spec.read_text())
    other["mask"] = {"base": {"pattern": "causal"}}
    spec.write_text(json.dumps(other))
    assert main(["train", str(spec), "--resume", str(folder), "--steps", "5", "-q"]) == 2
    assert "differs from the run's" in capsys.readouterr().err
    assert main(["train", "--resume", str(folder), "--steps", "2", "-q"]) == 2
    assert "already at step 3" in capsys.readouterr().err


def test_readme_resume_of_a_compared_design(tmp_path):
    """README: `maskstudio train --resume runs/kv/design` after a compare run (default steps)."""
    spec = _spec_file(tmp_path)
    kv = tmp_path / "runs" / "kv"
    assert main(["train", str(spec), *RUN, "--steps", "2", "--eval-n", "4", "--out", str(kv)]) == 0
    assert main(["train", "--resume", str(kv / "design"), "-q"]) == 0
    assert len(_metrics(kv / "design")) == 100


def test_a_run_saved_without_resumable_is_refused_in_one_line(tmp_path, capsys):
    """Checkpoints hold the model only unless --resumable (AdamW's state is twice the weights)."""
    folder = tmp_path / "plain"
    plain = [a for a in RUN if a != "--resumable"]
    assert main(["train", str(_spec_file(tmp_path)), *plain, "--steps", "1", "--no-baseline", "--out", str(folder)]) == 0
    assert not list(folder.rglob("optimizer.safetensors"))
    assert main(["train", "--resume", str(folder), "--steps", "2", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no optimizer state" in err and "--resumable" in err and len(err.splitlines()) == 1


def _craft(folder, name):
    ck = folder / "checkpoints" / "step-000002"
    crafted = {
        "state_not_object": lambda: (ck / "state.json").write_text("[]"),
        "state_without_step": lambda: (ck / "state.json").write_text("{}"),
        "state_step_text": lambda: (ck / "state.json").write_text('{"step": "x"}'),
        "state_step_huge": lambda: (ck / "state.json").write_text('{"step": 1e400}'),
        "state_step_negative": lambda: (ck / "state.json").write_text('{"step": -5}'),
        "state_bad_json": lambda: (ck / "state.json").write_text("{"),
        "weights_garbage": lambda: (ck / "model.safetensors").write_bytes(b"garbage" * 10),
        "weights_missing": lambda: (ck / "model.safetensors").unlink(),
        "optimizer_garbage": lambda: (ck / "optimizer.safetensors").write_bytes(b"\0" * 100),
        "metrics_list": lambda: (folder / "metrics.json").write_text("[1, 2]"),
        "metrics_bad_rows": lambda: (folder / "metrics.json").write_text('{"steps": [1, {"x": 1}]}'),
        "config_bad_json": lambda: (folder / "config.json").write_text("{{"),
        "config_not_object": lambda: (folder / "config.json").write_text('"x"'),
        "checkpoint_is_a_file": lambda: (shutil.rmtree(ck), ck.write_text("x")),
    }
    crafted[name]()


CRAFTED = ["state_not_object", "state_without_step", "state_step_text", "state_step_huge", "state_step_negative",
           "state_bad_json", "weights_garbage", "weights_missing", "optimizer_garbage", "metrics_list",
           "metrics_bad_rows", "config_bad_json", "config_not_object", "checkpoint_is_a_file"]


@pytest.mark.parametrize("damage", CRAFTED)
def test_damaged_run_folders_get_one_line(run, damage, capsys):
    spec, folder = run
    _craft(folder, damage)
    assert main(["train", str(spec), "--resume", str(folder), "--steps", "3", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


BAD_DATA = {
    "binary": (b"\xff\xfe\x00garbage\n", "not UTF-8"),
    "meta_list": (b'{"texts": {"question": "q"}, "target": "a", "meta": [1]}\n', '"meta" must be an object'),
    "meta_text": (b'{"texts": {"question": "q"}, "target": "a", "meta": "x"}\n', '"meta" must be an object'),
    "huge_number": (b'{"texts": {}, "target": "a", "meta": {"x": ' + b"9" * 5000 + b"}}\n", "too long"),
    "deep_nesting": (b'{"texts": {}, "target": "a", "meta": {"x": ' + b"[" * 100000 + b"]" * 100000 + b"}}\n",
                     "too deep"),
    "not_examples": (b"[1, 2]\n", "needs \"texts\""),
    "empty": (b"", "no examples"),
}


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_bad_data_files_get_one_line_naming_the_file(tmp_path, kind, capsys):
    content, says = BAD_DATA[kind]
    data = tmp_path / f"{kind}.jsonl"
    data.write_bytes(content)
    assert main(["train", str(_spec_file(tmp_path)), "--model", "tiny-llama", "--data", str(data), "--steps", "1",
                 "--no-baseline", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and str(data) in err and len(err.splitlines()) == 1
    assert "set_int_max_str_digits" not in err


@pytest.mark.parametrize("flag,value,says", [
    ("--save-every", "-1", "save_every must be 0 or a positive integer"),
    ("--eval-every", "-1", "eval_every must be 0 or a positive integer"),
    ("--warmup", "-2", "warmup must be 0 or a positive integer"),
    ("--eval-n", "0", "eval_n must be a positive integer"),
    ("--pack-tokens", "-5", "pack_tokens must be 0 or a positive integer"),
    ("--model", "tiny-qwen2-vl", "training a vision-language model (tiny-qwen2-vl) is not supported"),
])
def test_bad_settings_and_vision_models_are_refused(tmp_path, flag, value, says, capsys):
    argv = ["train", str(_spec_file(tmp_path)), "--steps", "1", "--no-baseline", "-q", flag, value]
    if flag != "--model":
        argv += ["--model", "tiny-llama"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_save_every_saves_only_every_kth_step(tmp_path):
    out = tmp_path / "r"
    assert main(["train", str(_spec_file(tmp_path)), *RUN, "--steps", "5", "--save-every", "2", "--no-baseline",
                 "--keep", "0", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000005"]
    kept = tmp_path / "kept"  # the default keeps the two newest
    assert main(["train", str(_spec_file(tmp_path)), *RUN, "--steps", "5", "--save-every", "2", "--no-baseline",
                 "--out", str(kept)]) == 0
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    assert json.loads((kept / "config.json").read_text())["keep"] == 2
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))


def _data_file(tmp_path, n=10):
    path = tmp_path / "data.jsonl"
    rows = [{"texts": {f"doc{j}": f"key {i}.{j} is {i * j}" for j in range(4)} |
             {"instruction": "Answer.", "question": f"key {i}.1?"},
             "target": str(i)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_data_files_hold_out_a_seeded_share_that_training_never_sees(tmp_path):
    from maskstudio.train.data import held_out, train_examples

    data = str(_data_file(tmp_path))
    trained = {ex.id for ex in train_examples(None, data, 256, seed=3)}
    held = {ex.id for ex in held_out(None, 64, 3, len(trained), data)}
    assert held and trained and not (held & trained) and held | trained == set(range(10)) and len(held) == 2
    assert {ex.id for ex in train_examples(None, data, 256, seed=3, eval_data=data)} == set(range(10))
    one = tmp_path / "one.jsonl"
    one.write_text(_data_file(tmp_path, 1).read_text())
    with pytest.raises(ValueError, match="nothing is left to hold out"):
        train_examples(None, str(one), 256, 0)


def test_cli_compare_on_data_scores_held_out_examples_and_saves_them(tmp_path):
    data = _data_file(tmp_path)
    out = tmp_path / "cmp"
    assert main(["train", str(_spec_file(tmp_path)), *RUN, "--steps", "1", "--data", str(data), "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    ids = {r["id"] for rows in scores["after"].values() for r in rows}
    assert len(ids) == 2 and json.loads((out / "design" / "config.json").read_text())["examples"] == 8
    evals = tmp_path / "evals.jsonl"
    evals.write_text(data.read_text())
    out2 = tmp_path / "cmp2"
    assert main(["train", str(_spec_file(tmp_path)), *RUN, "--steps", "1", "--data", str(data), "--eval-data",
                 str(evals), "--eval-n", "3", "--out", str(out2)]) == 0
    assert json.loads((out2 / "design" / "config.json").read_text())["examples"] == 10
    assert {r["id"] for r in json.loads((out2 / "scores.json").read_text())["after"]["causal baseline"]} == {0, 1, 2}


def test_a_design_that_is_the_causal_baseline_trains_once_and_says_so(tmp_path, capsys):
    d = json.loads(_spec_file(tmp_path).read_text())
    d["mask"] = {"base": {"pattern": "causal"}}
    d["name"] = "plain causal, edited"
    path = tmp_path / "causal.json"
    path.write_text(json.dumps(d))
    assert main(["train", str(path), *RUN, "--steps", "1", "--eval-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "has the causal baseline's mask and positions; it was trained once" in out
    assert "plain causal, edited" in out
