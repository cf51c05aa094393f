"""One sizing in the app (#23 item 1, app half): a text segment whose text is longer than its
declared length is said in one line on the picture, the checks and the export; one action adopts
the run's sizes (the chosen model's tokenizer), after which pictures, checks and files match the
run; a run's materialized layout exports as a spec. tiny-llama's byte tokenizer: no model load."""
import json

import pytest

from maskstudio import Spec, studio
from maskstudio.run.models import load_tokenizer
from maskstudio.run.inputs import sized_by_tokenizer

LONG = "The quick brown fox jumps over the lazy dog, twice over, and then once more."


def _design(**extra):
    return Spec.load({"name": "declared", "segments": [
        {"name": "doc", "modality": "text", "length": 8, "text": LONG},
        {"name": "question", "modality": "text", "length": 8, "text": "Who jumps?"},
        {"name": "answer", "modality": "text", "length": 4, "role": ["generate"]}], **extra})


def _state(model="tiny-llama"):
    state = studio.new_state(_design())
    state["sizes_by"] = model
    return state


def test_declared_sizes_that_differ_from_the_run_are_said_once_on_picture_checks_and_export():
    run = len(load_tokenizer("tiny-llama").encode(LONG, add_special_tokens=False))
    assert run > 8
    diffs = studio.size_differences(_design(), "tiny-llama")
    assert diffs == [("doc", 8, run), ("question", 8, 10)]
    out = studio.design_views(_design(), {"sizes_by": "tiny-llama"})
    assert out["sizes_differ"] and out["note"].count("Declared sizes differ") == 1
    assert f"doc 8 → {run}" in out["note"] and "tiny-llama's tokenizer" in out["note"]
    assert out["checks"].splitlines()[0].startswith("Declared sizes differ")
    path, note = studio.export_for_state(_state(), "npy", 0, 0)
    assert path and note.startswith("Declared sizes differ") and f"doc 8 → {run}" in note
    # segments without text, or whose text has the declared count, say nothing
    plain = Spec.load({"segments": [{"name": "x", "length": 5}]})
    assert studio.size_line(plain, "tiny-llama") == "" and not studio.design_views(plain)["sizes_differ"]
    exact = Spec.load({"segments": [{"name": "x", "length": 10, "text": "Who jumps?"}]})
    assert studio.size_line(exact, "tiny-llama") == ""


def test_adopting_the_run_sizes_makes_the_design_the_run_layout():
    state, error = studio.adopt_run_sizes(_state(), "tiny-llama")
    assert not error and state["sizes_by"] == "tiny-llama"
    adopted = studio.current(state)
    expected, _ = sized_by_tokenizer(_design(), load_tokenizer("tiny-llama"))
    assert adopted.to_dict() == expected.to_dict() and adopted.n == expected.n > _design().n
    out = studio.design_views(adopted, {"sizes_by": "tiny-llama"})
    assert not out["sizes_differ"] and "Declared sizes differ" not in out["note"] + out["checks"]
    assert f"{adopted.n} tokens" in out["checks"] or str(adopted.n) in out["checks"]
    path, note = studio.export_for_state(state, "npy", 0, 0)
    import numpy as np

    assert np.load(path).shape == (adopted.n, adopted.n) and "differ" not in note
    # undo gives the declared design back; a design without text has nothing to adopt
    back, _ = studio.undo(state)
    assert studio.current(back).n == _design().n
    none, error = studio.adopt_run_sizes(studio.new_state(Spec.load({"segments": [{"name": "x", "length": 3}]})), "")
    assert "no segment has text" in error


def test_an_unknown_model_is_one_line_and_the_design_stays(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub probe: the same one line, at once
    state = _state()
    new, error = studio.adopt_run_sizes(state, "no-such-org/no-such-model")
    assert error.startswith("model box: ") and len(error.splitlines()) == 1 and new is state


def test_the_last_run_layout_exports_as_a_spec(monkeypatch):
    state = _state()
    path, error = studio.export_for_state(state, "run_layout", 0, 0)
    assert path is None and "no run yet" in error
    layout, _ = sized_by_tokenizer(_design(), load_tokenizer("tiny-llama"))

    class Run:  # what the run cache holds: the materialized layout
        pass
    run = Run()
    run.layout = layout
    monkeypatch.setattr(studio.actions, "get_run", lambda s: run)
    path, note = studio.export_for_state(state, "run_layout", 0, 0)
    saved = Spec.load(json.loads(open(path, encoding="utf-8").read()))
    assert saved.name == "declared (run layout)" and saved.n == layout.n and "token counts" in note
    assert saved.segments == layout.segments and saved.mask == layout.mask


@pytest.mark.model
def test_the_embedded_tokenizer_is_the_default():  # the GGUF tokenizer only, not the weights
    line = studio.size_line(_design())
    assert "the embedded SmolLM2's tokenizer" in line and "doc 8 → " in line


def test_megabytes_of_text_are_not_tokenized_on_every_edit(monkeypatch):
    """Past SIZE_CHECK_MAX_CHARS the size line says the check waits for the button (each edit of a
    2 MB text used to tokenize it: seconds per edit, 464 s for the 100-edit undo test in CI); the
    button still sizes it."""
    import time

    from maskstudio import knobs

    monkeypatch.setattr(knobs, "SIZE_CHECK_MAX_CHARS", 1000)
    big = Spec.load({"segments": [{"name": "doc", "length": 8, "text": "x " * 5000}]})
    t = time.perf_counter()
    line = studio.size_line(big, "tiny-llama")
    assert time.perf_counter() - t < 0.05 and "10,000 characters" in line and "Use the run's sizes" in line
    new, error = studio.adopt_run_sizes(studio.new_state(big), "tiny-llama")
    assert not error and new["spec"].n == len(load_tokenizer("tiny-llama").encode("x " * 5000, add_special_tokens=False))
