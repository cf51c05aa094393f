"""Training under the mask (maskstudio.train) on a tiny random Llama: CPU, a few steps each."""
import json
import os

import pytest
from conftest import run_maskstudio
import torch

from maskstudio import RunError, Spec
from maskstudio.evaluate import task_template
from maskstudio.train import (batch_indices, bico_item, causal_twin, compare, item_loss, prepare_training, tiny_lm,
                              train)
from maskstudio.train.data import Item, encode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = ["instruction", "doc0", "doc1", "doc2", "doc3", "question"]
FAST = dict(task="kv_retrieval", batch=2, n_train=8, lr=3e-3, progress=False)


def prefix_lm() -> Spec:
    """Non-causal: the whole prompt is bidirectional (prefix-LM), the answer causal."""
    d = task_template("kv_retrieval").to_dict()
    d["name"] = "prefix lm"
    d["mask"] = {"base": {"pattern": "causal"}, "rules": [{"q": "*", "k": PROMPT, "pattern": "full"}]}
    return Spec.load(d)


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm()


@pytest.fixture(scope="module")
def prepared(tiny):
    return prepare_training(prefix_lm(), tiny, "kv_retrieval", n_train=8, seed=0)


def test_loss_decreases_under_a_non_causal_spec(tiny, prepared):
    before = [p.detach().clone() for p in tiny.model.parameters()]
    fit = train(prefix_lm(), tiny, steps=8, _prepared=prepared, **FAST)
    losses = fit.losses
    assert len(losses) == 8 and all(s["kind"] == "next_token" for s in fit.steps)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    # the model handed in is never modified (a private copy is trained)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.model.parameters()))


def _embedding_grads(lm, item: Item, backend="eager"):
    """d(loss of item's target rows) / d(input embeddings), through the training forward."""
    from maskstudio.run.attention import ATTN_NAME, attn_impl, register

    register()
    grabbed = {}

    def hook(_module, _inputs, output):
        output.retain_grad()
        grabbed["emb"] = output

    handle = lm.model.get_input_embeddings().register_forward_hook(hook)
    try:
        with attn_impl(lm.model, ATTN_NAME):
            loss = item_loss(lm.model, item, lm.num_heads, backend, lm.device, autocast=False)
            loss.backward()
    finally:
        handle.remove()
    lm.model.zero_grad(set_to_none=True)
    return grabbed["emb"].grad[0].abs().sum(-1)  # [N]


def _one_row(item: Item, row: int) -> Item:
    """The item with the loss on the single token predicted from query row `row`."""
    t = torch.zeros_like(item.targets)
    t[row + 1] = True
    return Item(item.ids, item.layout, item.pos, t, item.example, item.labels)


def test_masked_keys_get_zero_gradient_from_rows_that_may_not_see_them(tiny):
    # doc1's queries may not see doc0 (at every layer); everything else causal
    d = task_template("kv_retrieval").to_dict()
    d["mask"] = {"base": {"pattern": "causal"}, "rules": [{"q": "doc1", "k": "doc0", "pattern": "none"}]}
    spec = Spec.load(d)
    from maskstudio.train.data import train_examples

    ex = train_examples("kv_retrieval", None, 1, 0)[0]
    item = encode(spec, ex, tiny)
    t = item.layout.table
    names = [s["name"] for s in item.layout.segments]
    doc0, doc1 = t.segment_slice(names.index("doc0")), t.segment_slice(names.index("doc1"))
    row = doc1.stop - 2  # a doc1 query row (its logits predict doc1's last token)
    grads = _embedding_grads(tiny, _one_row(item, row))
    assert torch.all(grads[doc0] == 0)                    # exactly zero, not just small
    assert torch.all(grads[doc1.start:row + 1] > 0)       # the keys it may see do get gradient
    assert torch.all(grads[row + 1:] == 0)                # causal: nothing after the row
    # control: under the causal twin the same row does reach doc0
    twin = causal_twin(item.layout)
    from maskstudio.train.data import with_layout

    assert torch.all(_embedding_grads(tiny, _one_row(with_layout(item, twin, tiny), row))[doc0] > 0)


def test_bico_mask_tokens_get_zero_gradient_and_are_the_loss(tiny, prepared):
    spec, _, _, items = prepared
    item = items[0]
    corrupted = bico_item(item, step=1, seed=0, mask_id=0)
    chosen = corrupted.targets
    assert 0 < int(chosen.sum()) < len(item.ids)
    assert torch.all(corrupted.ids[chosen] == 0) and torch.equal(corrupted.labels, item.ids)
    assert corrupted.layout.dense_mask()[:, chosen].any() == False  # no query sees a mask token  # noqa: E712
    # a row whose next token is not masked and which is not masked itself: the loss from it only
    row = next(r for r in range(len(item.ids) - 2, 0, -1) if not chosen[r] and not chosen[r + 1])
    grads = _embedding_grads(tiny, _one_row(corrupted, row))
    assert torch.all(grads[chosen] == 0)
    visible = torch.ones_like(chosen)
    visible[chosen] = False
    assert grads[visible].sum() > 0
    # deterministic corruption per (seed, step, example)
    assert torch.equal(bico_item(item, 1, 0, 0).targets, chosen)
    assert not torch.equal(bico_item(item, 3, 0, 0).targets, chosen)


def test_bico_objective_alternates_causal_and_denoising_steps(tiny, prepared):
    fit = train(prefix_lm(), tiny, steps=4, objective="bico", _prepared=prepared, **FAST)
    assert [s["kind"] for s in fit.steps] == ["causal", "denoise", "causal", "denoise"]
    assert all(torch.isfinite(torch.tensor(fit.losses)))


def test_checkpoint_then_resume_gives_the_same_next_loss(tiny, prepared, tmp_path):
    full = train(prefix_lm(), tiny, steps=4, save_every=2, resumable=True, out_dir=str(tmp_path / "a"),
                 _prepared=prepared, **FAST)
    ck = tmp_path / "a" / "checkpoints" / "step-000002"
    assert {p.name for p in ck.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                              "tokenizer.json", "tokenizer_config.json", "optimizer.safetensors",
                                              "spec.json", "state.json"}
    assert Spec.load(str(ck / "spec.json")) == prefix_lm()
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert [s["loss"] for s in metrics["steps"]] == full.losses
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["seed"] == 0 and config["steps"] == 4 and config["lr"] == 3e-3
    resumed = train(prefix_lm(), tiny, steps=4, resume=str(ck), out_dir=str(tmp_path / "b"), _prepared=prepared, **FAST)
    assert resumed.losses[2:] == full.losses[2:]   # bit-identical continuation
    assert resumed.losses[:2] == full.losses[:2]   # history read from the first run's metrics
    # a run folder resumes from its newest checkpoint
    again = train(prefix_lm(), tiny, steps=5, resume=str(tmp_path / "a"), _prepared=prepared, **FAST)
    assert len(again.steps) == 5 and again.losses[:4] == full.losses


def test_on_step_sees_every_step_and_can_stop(tiny, prepared):
    seen = []
    fit = train(prefix_lm(), tiny, steps=5, eval_every=2, eval_n=2, on_step=lambda r: seen.append(r) or r["step"] == 3,
                _prepared=prepared, **FAST)
    assert [r["step"] for r in seen] == [1, 2, 3] and len(fit.steps) == 3
    assert "eval" in seen[1] and "eval" not in seen[0] and seen[1]["eval"]["n"] == 2


def test_deterministic_given_a_seed(tiny, prepared):
    a = train(prefix_lm(), tiny, steps=3, _prepared=prepared, **FAST)
    b = train(prefix_lm(), tiny, steps=3, _prepared=prepared, **FAST)
    assert a.losses == b.losses
    assert all(torch.equal(x, y) for x, y in zip(a.lm.model.parameters(), b.lm.model.parameters()))
    c = train(prefix_lm(), tiny, steps=3, seed=1, _prepared=prepared, **FAST)
    assert [s["examples"] for s in c.steps] != [s["examples"] for s in a.steps]
    # the data order is a pure function: epochs of seeded permutations
    order = [batch_indices(12, 4, s, 0) for s in range(3)]
    assert sorted(sum(order, [])) == list(range(12))


def test_baseline_and_design_share_data_order_and_one_table(tiny, tmp_path):
    out = compare(prefix_lm(), tiny, steps=2, eval_n=4, out_dir=str(tmp_path), **FAST)
    base, design = out["fits"]["baseline"], out["fits"]["design"]
    assert [s["examples"] for s in base.steps] == [s["examples"] for s in design.steps]
    assert [s["tokens"] for s in base.steps] == [s["tokens"] for s in design.steps]
    assert base.spec.mask["base"] == {"pattern": "causal"} and not base.spec.mask["rules"]
    assert design.spec.mask["rules"]
    text = out["text"]
    assert "before training" in text and "after 2 steps" in text and text.count("design: prefix lm") == 2
    after = out["summary"]["after"]["specs"]
    assert [e["n"] for e in after] == [4, 4] and "vs_first" in after[1]
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["summary"]["before"]["specs"][0]["name"] == "causal baseline"
    assert (tmp_path / "design" / "checkpoints" / "step-000002" / "model.safetensors").exists()


def test_lora_trains_adapters_only(tiny, prepared, tmp_path):
    fit = train(prefix_lm(), tiny, steps=2, lora=True, out_dir=str(tmp_path), _prepared=prepared, **FAST)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoints" / "step-000002" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    trained = dict(fit.lm.model.named_parameters())
    for name, p in tiny.model.named_parameters():  # base weights untouched
        key = name.replace("q_proj.weight", "q_proj.base_layer.weight").replace("k_proj.weight", "k_proj.base_layer.weight") \
            .replace("v_proj.weight", "v_proj.base_layer.weight").replace("o_proj.weight", "o_proj.base_layer.weight")
        assert torch.equal(trained[key], p), name


def test_refuses_with_the_memory_estimate(tiny, prepared):
    with pytest.raises(RunError, match=r"refusing to train: one step at \d+ tokens needs about [\d.]+ GiB .*"
                                       r"attention matrices \(eager\).* has 0\.00 GiB available; try lora=True"):
        train(prefix_lm(), tiny, steps=1, max_memory=1000, _prepared=prepared, **FAST)


def test_bad_arguments_say_what_to_do(tiny):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        train(prefix_lm(), tiny, steps=0)
    with pytest.raises(ValueError, match="unknown objective 'mlm'"):
        train(prefix_lm(), tiny, steps=1, objective="mlm")
    with pytest.raises(RunError, match="loss_on names segment"):
        train(prefix_lm(), tiny, steps=1, loss_on="nope", n_train=2)


def test_cli_trains_writes_a_run_folder_and_resumes(tmp_path, capsys):
    from maskstudio.cli import main

    spec_file = tmp_path / "prefix.json"
    spec_file.write_text(prefix_lm().to_json())
    out = tmp_path / "run"
    args = ["train", str(spec_file), "--model", "tiny-llama", "--batch", "2", "--n-train", "4", "--lr", "3e-3",
            "--out", str(out), "--resumable", "-q"]
    assert main(args + ["--steps", "2", "--no-baseline"]) == 0
    assert "trained prefix lm: 2 steps" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "spec.json", "metrics.json", "checkpoints"}
    assert main(args + ["--steps", "3", "--resume", str(out)]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["steps"]) == 3
    packed = tmp_path / "packed"
    assert main(args[:-4] + ["--out", str(packed), "-q", "--steps", "1", "--no-baseline", "--pack-tokens", "4096"]) == 0
    assert json.loads((packed / "config.json").read_text())["pack_tokens"] == 4096
    assert json.loads((packed / "metrics.json").read_text())["steps"][0]["forwards"] == 1
    assert main(["train", str(spec_file), "--model", "tiny-llama", "--steps", "0"]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """DDP over gloo: 2 processes x 2 examples == 1 process x 4 examples, step by step."""
    spec_file = tmp_path / "prefix.json"
    spec_file.write_text(prefix_lm().to_json())
    args = ["train", str(spec_file), "--model", "tiny-llama", "--steps", "3", "--batch", "4",
            "--n-train", "8", "--lr", "3e-3", "--no-baseline", "-q"]
    run_maskstudio([*args, "--out", str(tmp_path / "d")], processes=2)
    run_maskstudio([*args, "--out", str(tmp_path / "s")])
    dist = json.loads((tmp_path / "d" / "metrics.json").read_text())["steps"]
    single = json.loads((tmp_path / "s" / "metrics.json").read_text())["steps"]
    assert json.loads((tmp_path / "d" / "config.json").read_text())["world_size"] == 2
    assert [s["examples"] for s in dist] == [s["examples"] for s in single]
    for a, b in zip(dist, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
    # packed: each process packs its 2 examples into one row; still the one-process numbers
    run_maskstudio([*args, "--out", str(tmp_path / "p"), "--pack-tokens", "4096"], processes=2)
    packed = json.loads((tmp_path / "p" / "metrics.json").read_text())["steps"]
    assert all(s["forwards"] == 1 for s in packed)
    for a, b in zip(packed, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["tokens"] == b["tokens"]


# ---------------------------------------------------------------- packing
def _row_logits(lm, item: Item) -> torch.Tensor:
    """All-position logits of one (packed) item through the training attention path."""
    from maskstudio.run.attention import ATTN_NAME, MaskContext, attn_impl, register

    register()
    with attn_impl(lm.model, ATTN_NAME), torch.no_grad():
        ctx = MaskContext(item.layout, lm.num_heads, "eager", record=False)
        return lm.model(input_ids=item.ids[None], position_ids=item.pos[None], use_cache=False,
                        **{ATTN_NAME: ctx}).logits[0]


def test_packed_rows_give_the_unpacked_loss(tiny, prepared):
    from maskstudio.run.attention import ATTN_NAME, attn_impl, register
    from maskstudio.lower_packed import DocumentRow
    from maskstudio.train import pack_rows

    _, _, _, items = prepared
    register()
    sizes = [len(it.ids) for it in items]
    rows = pack_rows(items, 3 * max(sizes))        # 8 examples -> 3 rows of <= 3 examples
    assert [len(r.members) for r in rows] == [3, 3, 2]
    assert [m[0] for r in rows for m in r.members] == list(range(8))  # order kept
    assert torch.equal(torch.cat([r.ids for r in rows]), torch.cat([it.ids for it in items]))
    # positions restart per example; the packed layout is a row of the examples' own layouts
    assert torch.equal(rows[0].pos, torch.cat([it.pos for it in items[:3]]))
    assert isinstance(rows[0].layout, DocumentRow)
    assert rows[0].layout.specs == tuple(it.layout for it in items[:3]) and rows[0].layout.n == sum(sizes[:3])
    with attn_impl(tiny.model, ATTN_NAME), torch.no_grad():
        one = [float(item_loss(tiny.model, it, tiny.num_heads, "eager", tiny.device, False)) for it in items]
        packed = [float(item_loss(tiny.model, r, tiny.num_heads, "eager", tiny.device, False)) for r in rows]
    assert sum(packed) == pytest.approx(sum(one), rel=1e-5)
    assert packed[0] == pytest.approx(sum(one[:3]), rel=1e-5)
    # the first training step (before any update) has the same loss and target count packed or not
    a = train(prefix_lm(), tiny, steps=3, _prepared=prepared, **FAST)
    b = train(prefix_lm(), tiny, steps=3, pack_tokens=4096, _prepared=prepared, **FAST)
    assert b.steps[0]["loss"] == pytest.approx(a.steps[0]["loss"], rel=1e-5)
    assert [s["tokens"] for s in a.steps] == [s["tokens"] for s in b.steps]
    assert [s["forwards"] for s in a.steps] == [2, 2, 2] and [s["forwards"] for s in b.steps] == [1, 1, 1]
    assert b.losses == pytest.approx(a.losses, rel=1e-4)   # the same gradients, up to float rounding


def test_no_attention_or_gradient_crosses_packed_examples(tiny, prepared):
    from maskstudio.train import pack

    _, _, _, items = prepared
    row = pack(items[:3])
    (_, a0, b0), (_, a1, b1), (_, a2, b2) = row.members
    logits = _row_logits(tiny, row)
    # each example's logits are its own unpacked logits: positions restart, nothing leaks in
    for it, (_, a, b) in zip(items[:3], row.members):
        assert torch.allclose(logits[a:b], _row_logits(tiny, it), atol=1e-5)
    # perturb example 2's tokens: examples 1 and 3 are bit-for-bit unchanged, example 2 is not
    ids = row.ids.clone()
    ids[a1:b1] = (ids[a1:b1] + 7) % tiny.config.vocab_size
    other = _row_logits(tiny, Item(ids, row.layout, row.pos, row.targets, row.example, row.labels, row.members))
    assert torch.equal(other[a0:b0], logits[a0:b0]) and torch.equal(other[a2:b2], logits[a2:b2])
    assert not torch.allclose(other[a1:b1], logits[a1:b1])
    # the loss of example 1's rows sends exactly zero gradient to examples 2 and 3
    targets = torch.zeros_like(row.targets)
    targets[a0 + 1:b0] = True
    grads = _embedding_grads(tiny, Item(row.ids, row.layout, row.pos, targets, row.example, None, row.members))
    assert torch.all(grads[a1:] == 0)
    assert torch.all(grads[a0:b0 - 1] > 0)   # its own tokens do get gradient (the last one is only a label)


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_packed_baseline_and_design_share_data_order_and_resume(tiny, prepared, tmp_path):
    out = compare(prefix_lm(), tiny, steps=2, eval_n=4, pack_tokens=4096, **FAST)
    base, design = out["fits"]["baseline"], out["fits"]["design"]
    assert [s["examples"] for s in base.steps] == [s["examples"] for s in design.steps]
    assert [s["tokens"] for s in base.steps] == [s["tokens"] for s in design.steps]
    assert all(s["forwards"] == 1 for s in base.steps + design.steps)
    # deterministic, and a resumed packed run continues bit-identically (bico: packed denoising rows)
    kw = dict(FAST, objective="bico", pack_tokens=4096, resumable=True, _prepared=prepared)
    full = train(prefix_lm(), tiny, steps=4, save_every=2, out_dir=str(tmp_path / "a"), **kw)
    assert full.losses == train(prefix_lm(), tiny, steps=4, **kw).losses
    resumed = train(prefix_lm(), tiny, steps=4, resume=str(tmp_path / "a" / "checkpoints" / "step-000002"), **kw)
    assert resumed.losses == full.losses
    assert json.loads((tmp_path / "a" / "config.json").read_text())["pack_tokens"] == 4096


def test_packed_evaluation_matches_one_run_per_example(tiny):
    from maskstudio.evaluate import make_examples
    from maskstudio.train import evaluate_model

    held = make_examples("kv_retrieval", 5, 0)
    one = evaluate_model(prefix_lm(), tiny, held)
    packed = evaluate_model(prefix_lm(), tiny, held, pack_tokens=1000)
    assert [r["id"] for r in packed] == [r["id"] for r in one]
    assert [r["correct"] for r in packed] == [r["correct"] for r in one]
    assert [r["nll"] for r in packed] == pytest.approx([r["nll"] for r in one], rel=1e-5)


def test_packing_refuses_a_bad_pack_size(prepared, tiny):
    with pytest.raises(ValueError, match="pack_tokens must be 0 or a positive integer"):
        train(prefix_lm(), tiny, steps=1, pack_tokens=-1, _prepared=prepared, **FAST)