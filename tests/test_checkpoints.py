"""Checkpoints a researcher can use (#23 item 8): the model in save_pretrained form (a peft adapter
with LoRA), the optimizer state only for resumable runs, the K newest kept, a run folder whose
size does not grow with the steps, per-example scores saved. Tiny random Llama on CPU."""
import json

import pytest
import torch

from maskstudio import RunError
from maskstudio.evaluate import summarize
from maskstudio.train import checkpoint_bytes, prepare_training, tiny_lm, train
from test_train import FAST, prefix_lm

slow = pytest.mark.slow  # a few tiny trainings each: seconds (the fast tier keeps its budget)

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "spec.json", "state.json"}


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm()


@pytest.fixture(scope="module")
def prepared(tiny):
    return prepare_training(prefix_lm(), tiny, "kv_retrieval", n_train=8, seed=0)


def _ids(tiny):
    return torch.tensor([tiny.tokenizer.encode("key 3 is 41. key 3?")])


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _steps(folder):
    return sorted(p.name for p in (folder / "checkpoints").iterdir())


@slow
def test_the_model_loads_with_from_pretrained_and_gives_the_trained_logits(tiny, prepared, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fit = train(prefix_lm(), tiny, steps=2, out_dir=str(tmp_path / "bf16"), _prepared=prepared, **FAST)
    ck = tmp_path / "bf16" / "checkpoints" / "step-000002"
    assert {p.name for p in ck.iterdir()} == MODEL_FILES  # no optimizer state unless asked
    assert json.loads((ck / "config.json").read_text())["dtype"] == "bfloat16"
    ids = _ids(tiny)
    trained = fit.lm.model
    rounded = {k: v.to(torch.bfloat16).float() for k, v in trained.state_dict().items()}
    loaded = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32, attn_implementation="eager")
    assert loaded.dtype == torch.float32 and AutoModelForCausalLM.from_pretrained(str(ck)).dtype == torch.bfloat16
    ref = tiny_lm().model
    ref.load_state_dict(rounded)
    assert torch.equal(_logits(loaded, ids), _logits(ref, ids))  # the trained weights, rounded to bfloat16
    assert AutoTokenizer.from_pretrained(str(ck)).encode("key 3") == tiny.tokenizer.encode("key 3")
    # float32: exactly the trained model
    fit32 = train(prefix_lm(), tiny, steps=2, save_dtype="float32", out_dir=str(tmp_path / "f32"), _prepared=prepared,
                  **FAST)
    exact = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32" / "checkpoints" / "step-000002"),
                                                 attn_implementation="eager")
    assert exact.dtype == torch.float32
    assert torch.equal(_logits(exact, ids), _logits(fit32.lm.model, ids))
    assert not torch.equal(_logits(exact, ids), _logits(tiny.model, ids))  # and training changed them


@slow
def test_lora_checkpoints_are_peft_adapters(tiny, prepared, tmp_path):
    from peft import PeftModel

    fit = train(prefix_lm(), tiny, steps=2, lora=True, out_dir=str(tmp_path), _prepared=prepared, **FAST)
    ck = tmp_path / "checkpoints" / "step-000002"
    names = {p.name for p in ck.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    ids = _ids(tiny)
    base = tiny_lm().model  # the same seeded random weights the run started from
    loaded = PeftModel.from_pretrained(base, str(ck))
    assert torch.equal(_logits(loaded, ids), _logits(fit.module, ids))
    assert not torch.equal(_logits(loaded, ids), _logits(tiny_lm().model, ids))


@slow
def test_keep_the_k_newest_checkpoints(tiny, prepared, tmp_path):
    for keep, expected in ((2, ["step-000004", "step-000005"]), (1, ["step-000005"]),
                           (0, [f"step-00000{i}" for i in range(1, 6)])):
        out = tmp_path / f"keep{keep}"
        train(prefix_lm(), tiny, steps=5, save_every=1, keep=keep, out_dir=str(out), _prepared=prepared, **FAST)
        assert _steps(out) == expected, keep
    with pytest.raises(ValueError, match="keep must be 0 or a positive integer"):
        train(prefix_lm(), tiny, steps=1, keep=-1, _prepared=prepared, **FAST)
    with pytest.raises(ValueError, match="save_dtype must be one of bfloat16, float32"):
        train(prefix_lm(), tiny, steps=1, save_dtype="float16", _prepared=prepared, **FAST)


@slow
def test_run_folder_size_is_bounded_whatever_the_steps(tiny, prepared, tmp_path):
    """With the defaults (bfloat16, keep 2) a folder holds two models of 2 bytes a parameter and
    small files, after 2 steps as after 8; for SmolLM2-135M that is ~0.55 GB (model test below)."""
    params = sum(p.numel() for p in tiny.model.parameters())
    sizes = {}
    for steps in (2, 8):
        out = tmp_path / f"s{steps}"
        train(prefix_lm(), tiny, steps=steps, save_every=1, out_dir=str(out), _prepared=prepared, **FAST)
        models = sum(p.stat().st_size for p in out.rglob("model.safetensors"))
        assert 2 * 2 * params <= models <= 2 * 2 * params + 2 * 4096, models  # two bf16 copies + headers
        sizes[steps] = checkpoint_bytes(out) - (out / "metrics.json").stat().st_size
    assert abs(sizes[8] - sizes[2]) < 64, sizes  # only step numbers in state.json differ
    out = tmp_path / "resumable"
    train(prefix_lm(), tiny, steps=2, resumable=True, out_dir=str(out), _prepared=prepared, **FAST)
    state = (out / "checkpoints" / "step-000002" / "optimizer.safetensors").stat().st_size
    assert 3 * 4 * params <= state <= 3 * 4 * params + 16384  # fp32 weights + two AdamW moments, asked for


@slow
def test_resume_needs_a_resumable_run_and_continues_it_exactly(tiny, prepared, tmp_path):
    plain = tmp_path / "plain"
    train(prefix_lm(), tiny, steps=2, out_dir=str(plain), _prepared=prepared, **FAST)
    with pytest.raises(RunError, match=r"no optimizer state to continue from .* train with --resumable") as err:
        train(prefix_lm(), tiny, steps=3, resume=str(plain), _prepared=prepared, **FAST)
    assert len(str(err.value).splitlines()) == 1
    full = train(prefix_lm(), tiny, steps=4, resumable=True, _prepared=prepared, **FAST)
    part = tmp_path / "part"
    train(prefix_lm(), tiny, steps=2, resumable=True, out_dir=str(part), _prepared=prepared, **FAST)
    resumed = train(prefix_lm(), tiny, steps=4, resume=str(part), resumable=True, _prepared=prepared, **FAST)
    assert resumed.losses == full.losses


@slow
def test_a_resume_from_an_older_checkpoint_drops_the_abandoned_ones(tiny, prepared, tmp_path):
    out = tmp_path / "r"
    train(prefix_lm(), tiny, steps=4, save_every=1, keep=0, resumable=True, out_dir=str(out), _prepared=prepared,
          **FAST)
    train(prefix_lm(), tiny, steps=3, resume=str(out / "checkpoints" / "step-000002"), out_dir=str(out),
          resumable=True, keep=0, _prepared=prepared, **FAST)
    assert _steps(out) == ["step-000001", "step-000002", "step-000003"]  # step 4 was another trajectory's


@slow
def test_evaluations_save_every_example_so_intervals_can_be_recomputed(tiny, prepared, tmp_path):
    fit = train(prefix_lm(), tiny, steps=4, eval_every=2, eval_n=3, out_dir=str(tmp_path), _prepared=prepared, **FAST)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert sorted(scores) == ["2", "4"] and all(len(rows) == 3 for rows in scores.values())
    for entry in fit.evals:
        again = summarize(["model"], {"model": scores[str(entry["step"])]}, None)["specs"][0]
        assert again["nll"] == pytest.approx(entry["nll"]) and again["accuracy_ci"] == entry["accuracy_ci"]
        assert again["nll_ci"] == pytest.approx(entry["nll_ci"])


@pytest.mark.model
def test_a_smollm2_run_folder_stays_under_one_gigabyte(smollm, tmp_path):
    """SmolLM2-135M with the defaults (bfloat16 models, keep 2): under 1 GB after 3 checkpoints."""
    from transformers import AutoModelForCausalLM

    train(prefix_lm(), smollm, task="kv_retrieval", steps=3, save_every=1, batch=1, n_train=1, lr=1e-5,
          out_dir=str(tmp_path), progress=False)
    size = checkpoint_bytes(tmp_path)
    assert _steps(tmp_path) == ["step-000002", "step-000003"]
    assert 0.5e9 < size < 1e9, size
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "checkpoints" / "step-000003"))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in smollm.model.parameters())
