"""The exported transformers module in the stacks people train with (#26 item 2), on a tiny Llama
on CPU: `transformers.Trainer` (eager and sdpa) and TRL's `SFTTrainer` with packing give the losses
and weights of `maskstudio.train` on the same data, seed and steps; the accelerate example on 2
processes (torchrun, gloo) gives the 1-process run for the same global batch; the README's commands
run as written. A Trainer run with the model's own causal attention does not match (so the
tolerance tells designs apart)."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, free_port
from test_export_transformers import load, records

from maskstudio.export import transformers_code
from maskstudio.train import batch_indices, prepare_training, tiny_lm, train

pytestmark = pytest.mark.slow
STEPS, BATCH, LR, SEED, N = 3, 4, 3e-3, 0, 8
PACK = 600  # two examples (~240 tokens each) a row
WEIGHTS_ATOL = 5e-5  # float rounding through Adam; the causal-attention run differs by > 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    spec = records()
    lm = tiny_lm(seed=SEED)
    prepared = prepare_training(spec, lm, "kv_retrieval", n_train=N, seed=SEED)
    design = load(transformers_code(spec), tmp_path_factory.mktemp("design"), "design_records")
    rows = []  # the examples maskstudio.train's steps take, in its order: the trainers read them in sequence
    items = prepared[3]
    for step in range(STEPS):
        for i in batch_indices(len(items), BATCH, step, SEED):
            it = items[i]
            rows.append({"input_ids": it.ids.tolist(), "labels": torch.where(it.targets, it.ids, -100).tolist(),
                         "sizes": {s["name"]: s["length"] for s in it.layout.segments}})
    return spec, lm, prepared, design, rows


@pytest.fixture(scope="module")
def library(setup):
    """maskstudio.train's runs: unpacked and packed (pack_tokens=PACK)."""
    spec, lm, prepared, _, _ = setup
    return {pack: train(spec, lm, task="kv_retrieval", steps=STEPS, batch=BATCH, lr=LR, seed=SEED, n_train=N,
                        progress=False, _prepared=prepared, pack_tokens=pack) for pack in (0, PACK)}


def arguments(cls, out, **extra):
    """The library's optimiser settings: AdamW (no weight decay), constant lr, clip 1.0, fp32,
    the dataset read in order."""
    return cls(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
               lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
               train_sampling_strategy="sequential", remove_unused_columns=False, report_to=[], logging_steps=1,
               save_strategy="no", seed=SEED, use_cpu=True, disable_tqdm=True, **extra)


def fresh_model(lm, design, backend):
    model = copy.deepcopy(lm.model).float().train()
    if backend in ("eager", "sdpa") and design is None:
        model.set_attn_implementation(backend)  # the model's own causal attention
    else:
        design.use(model, backend)
    return model


def losses_of(trainer) -> list:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def weight_gap(model, fit) -> float:
    ref = dict(fit.lm.model.named_parameters())
    return max((p.detach() - ref[n].detach()).abs().max().item() for n, p in model.named_parameters())


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_trainer_equals_maskstudio_train(setup, library, tmp_path, backend):
    from transformers import Trainer, TrainingArguments

    _, lm, _, design, rows = setup
    model = fresh_model(lm, design, backend)
    trainer = Trainer(model=model, args=arguments(TrainingArguments, tmp_path), train_dataset=rows,
                      data_collator=design.Collator(pad_token_id=lm.tokenizer.pad_token_id))
    trainer.train()
    fit = library[0]
    assert losses_of(trainer) == pytest.approx(fit.losses, rel=1e-5)
    assert weight_gap(model, fit) < WEIGHTS_ATOL
    if backend == "sdpa":  # the same run under the model's own causal attention: far off
        causal = fresh_model(lm, None, "sdpa")
        trainer = Trainer(model=causal, args=arguments(TrainingArguments, tmp_path / "causal"), train_dataset=rows,
                          data_collator=design.Collator(pad_token_id=lm.tokenizer.pad_token_id))  # same positions
        trainer.train()
        assert weight_gap(causal, fit) > 20 * WEIGHTS_ATOL


def test_sft_trainer_with_packing_equals_maskstudio_train(setup, library, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    _, lm, _, design, rows = setup
    model = fresh_model(lm, design, "sdpa")
    collator = design.Collator(pad_token_id=lm.tokenizer.pad_token_id, pack_tokens=PACK)
    assert len(collator(rows[:BATCH])["input_ids"]) == 2  # packed: 4 examples in 2 rows
    config = arguments(SFTConfig, tmp_path, packing=False, max_length=None, bf16=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=lm.tokenizer, data_collator=collator)
    trainer.train()
    fit = library[PACK]
    assert all(s["forwards"] == 2 for s in fit.steps)  # maskstudio.train packed the same way
    assert losses_of(trainer) == pytest.approx(fit.losses, rel=1e-5)
    assert weight_gap(model, fit) < WEIGHTS_ATOL


# ---------------------------------------------------------------- the examples: 2 processes, the README
def run(cmd: list, cwd, timeout=600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "", "PET_MASTER_PORT": str(free_port())}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, (cmd, res.stderr[-3000:])
    return res.stdout


def bin_of(name: str) -> str:
    """A console script next to this Python (python itself for "python")."""
    return sys.executable if name == "python" else shutil.which(name, path=os.path.dirname(sys.executable))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding design_attention.py (kv_isolated_docs exported) and a link to examples/."""
    folder = tmp_path_factory.mktemp("work")
    (folder / "examples").symlink_to(ROOT / "examples")
    run([sys.executable, "-m", "maskstudio", "export", "examples/kv_isolated_docs.json", "--format", "transformers",
         "-o", "design_attention.py"], folder)
    return folder


def test_two_processes_equal_one_for_the_same_global_batch(workdir):
    from safetensors.torch import load_file

    args = ["examples/train_accelerate.py", "--design", "design_attention.py", "--steps", "3", "--batch", "4"]
    one = json.loads(run([sys.executable, *args, "--out", "one"], workdir).strip().splitlines()[-1])
    two = run([bin_of("torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", *args, "--out", "two"],
              workdir)
    two = json.loads([line for line in two.splitlines() if line.startswith("{")][-1])
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    a, b = load_file(str(workdir / "one" / "model.safetensors")), load_file(str(workdir / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHTS_ATOL


def readme_commands() -> list:
    """The shell commands of README's "Train your design in your own trainer" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Train your design in your own trainer", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split() for line in block.splitlines() if line.strip()]


def test_readme_commands_run_as_written(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    commands = readme_commands()
    assert [c[0] for c in commands] == ["maskstudio", "python", "python", "torchrun"]
    run([bin_of(commands[0][0]), *commands[0][1:]], tmp_path)
    for cmd in commands[1:]:
        out = run([bin_of(cmd[0]), *cmd[1:]], tmp_path)
        losses = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])["losses"]
        assert losses and all(l == l for l in losses) and losses[-1] < losses[0], (cmd, losses)
