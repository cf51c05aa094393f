"""Hostile specs: no input gives a traceback or a silently wrong result.

The corpus (tests/data/hostile_specs.jsonl, regenerate with spec_fuzz.corpus()) sets every field
of a rich spec to every hostile value and adds odd whole texts; the mutation test edits valid
presets at random. The only allowed failure is a one-line SpecError naming the field."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from maskstudio import Spec, SpecError
from maskstudio.analysis import analyze
from maskstudio.cli import main
from maskstudio.export import export_bytes
from spec_fuzz import exercise, mutate, small_presets

CORPUS = [json.loads(line) for line in
          (Path(__file__).parent / "data" / "hostile_specs.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_corpus_is_large_and_every_case_is_clean():
    assert len(CORPUS) >= 300
    outcomes = {"ok": 0, "refused": 0}
    for case in CORPUS:
        result = exercise(case["text"])  # raises on anything but a one-line SpecError
        outcomes[result.split(":")[0]] += 1
    assert outcomes["refused"] > 0.5 * len(CORPUS) and outcomes["ok"] > 10, outcomes


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_corpus_through_the_cli_check(tmp_path, capsys):
    """`maskstudio check FILE` on every corpus case: exit 0/1/2, one line on stderr, no traceback."""
    for i, case in enumerate(CORPUS):
        path = tmp_path / f"case{i}.json"
        path.write_text(case["text"], encoding="utf-8")
        code = main(["check", str(path)])
        err = capsys.readouterr().err
        assert code in (0, 1, 2), case["why"]
        assert err.count("\n") <= 1 and "\x1b" not in err and "Traceback" not in err, (case["why"], err)


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@pytest.mark.parametrize("n, seed", [(1000, 1)])
def test_random_mutations_of_presets_are_clean(n, seed):
    rng = random.Random(seed)
    bases = small_presets()
    for _ in range(n):
        exercise(mutate(rng.choice(bases), rng))


@pytest.mark.slow
def test_ten_thousand_mutations_are_clean():
    rng = random.Random(2)
    bases = small_presets()
    refused = 0
    for _ in range(10_000):
        refused += exercise(mutate(rng.choice(bases), rng)).startswith("refused")
    assert 1000 < refused < 10_000


# ---------------------------------------------------------------- results that used to be silently wrong
def two_segments(attr: str) -> dict:
    return {"segments": [{"name": "a", "length": 4, "attrs": {attr: [0, 0, 1, 1]}}, {"name": "b", "length": 4}],
            "mask": {"base": {"pattern": "same", "by": attr}}}


@pytest.mark.parametrize("attr", ["in_segments", "idx", "tok", "value"])
def test_user_attributes_named_like_internals_mean_the_attribute(attr):
    """`in_segments` (a method of the token view) and `idx` (the export's index field) are
    ordinary attribute names: density and the exported mask follow the attribute's values."""
    spec = Spec.load(two_segments(attr))
    same = torch.tensor([0, 0, 1, 1, -1, -1, -1, -1])
    assert torch.equal(spec.dense_mask(), same[:, None] == same[None, :])
    assert analyze(spec).density == pytest.approx(float((same[:, None] == same[None, :]).float().mean()))
    namespace: dict = {}
    exec(export_bytes(spec, "flex").decode(), namespace)  # our generated file
    from torch.nn.attention.flex_attention import create_mask

    assert torch.equal(create_mask(namespace["mask_mod"], None, None, 8, 8)[0, 0], spec.dense_mask())


@pytest.mark.parametrize("text, field", [
    ('{"maskstudio": true, "segments": [{"name": "a", "length": 2}]}', "maskstudio"),
    ('{"segments": [{"name": "a", "length": 2}], "segments": [{"name": "b", "length": 2}]}', "segments"),
    ('{"segments": [{"name": "a", "length": 2, "attrs": {"_x": [1, 2]}}]}', "segments[0].attrs._x"),
    ('{"segments": [{"name": "a", "length": 2}], "mask": {"rules": [{"pattern": "causal", "heads": {"start": 3, "stop": 3}}]}}',
     "mask.rules[0].heads"),
    ('{"segments": [{"name": "a", "length": 2}], "mask": {"rules": [{"pattern": "causal", "layers": {"start": 0, "stop": 100000000}}]}}',
     "mask.rules[0].layers.stop"),
])
def test_ambiguous_or_oversized_input_is_refused_by_name(text, field):
    with pytest.raises(SpecError) as err:
        Spec.load(text)
    assert err.value.path == field


def test_limits_fail_fast():
    many = {"segments": [{"name": f"s{i}", "length": 1} for i in range(5000)]}
    with pytest.raises(SpecError, match="over the limit of 4096"):
        Spec.load(many)
    with pytest.raises(SpecError, match="over the limit"):
        Spec.load({"segments": [{"name": "v", "modality": "video", "grid": [2048, 32, 32]}]})
    big = Spec.load({"segments": [{"name": "v", "modality": "video", "grid": [64, 32, 32]}]})
    with pytest.raises(ValueError, match="GiB"):
        export_bytes(big, "npy")


def test_the_editor_path_reads_no_files(tmp_path):
    """Spec.from_json takes JSON text only: a path is invalid JSON, never opened."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"segments": [{"name": "leaked", "length": 2}]}')
    for text in (str(secret), "/dev/zero", "/etc/passwd"):
        with pytest.raises(SpecError, match="invalid JSON"):
            Spec.from_json(text)
    assert Spec.load(str(secret)).segments[0]["name"] == "leaked"  # paths stay a CLI / Python feature


@pytest.mark.parametrize("text,says", [
    ('{"segments": [{"name": "a", "length": ' + "9" * 5000 + "}]}", "a number with thousands of digits"),
    ('{"segments": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ('{"segments": ' + "[" * 40 + "1" + "]" * 40 + "}", "nested more than 32 levels deep"),
])
def test_cli_refusals_name_the_file_in_one_line(tmp_path, capsys, text, says):
    from maskstudio.cli import main

    path = tmp_path / "bad.json"
    path.write_text(text)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and str(path) in err and len(err.splitlines()) == 1
    assert "set_int_max_str_digits" not in err and len(err) < 400


def test_max_tokens_past_the_ceiling_is_refused_before_any_allocation(tmp_path, capsys):
    from maskstudio import knobs
    from maskstudio.cli import main

    path = tmp_path / "huge.json"
    path.write_text('{"segments": [{"name": "a", "length": 2000000000}, {"name": "b", "length": 2000000000}]}')
    assert main(["check", str(path), "--max-tokens", "10000000000"]) == 2
    err = capsys.readouterr().err
    assert f"outside 1..{knobs.TOKENS_CEILING:,}" in err and len(err.strip().splitlines()) == 1
