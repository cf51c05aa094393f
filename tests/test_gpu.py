"""On a CUDA machine only (skipped elsewhere; run on the device machine): the device BlockMask
builder's CUDA-graph path equals the exact CPU build and torch's create_block_mask, across replays
at new sizes (more undecided tiles than a capture had room for included), and masks built one
after another never share buffers."""
import glob
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_lower import assert_blocks_equal, grown, scaled
from test_properties import specs
from torch.nn.attention.flex_attention import create_block_mask

from maskstudio import Spec
from reference import mask_mod as table_mask_mod
from maskstudio.lower import lower

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PRESETS = sorted(glob.glob("presets/*.json"))


COMPILED = ("multiverse", "cca", "ancat")  # the rest take the eager token stage (a compile per design)


def graph_vs_cpu(low, block, heads, compiled=False):
    """The CUDA builds (eager, then the graph path) equal the CPU build of the same lowering."""
    ref = low.block_mask(block_size=block, device="cpu", num_heads=heads)
    eager = low.block_mask(block_size=block, device="cuda", num_heads=heads, compiled=compiled, graph=False)
    assert_blocks_equal(eager.to("cpu"), ref)
    ours = low.block_mask(block_size=block, device="cuda", num_heads=heads, compiled=compiled, graph=True)
    assert_blocks_equal(ours.to("cpu"), ref)
    return ours


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.split("/")[-1][:-5])
def test_graph_build_equals_cpu_build_and_create_block_mask(path):
    spec = Spec.load(path)
    missing = spec.unsized_segments()
    spec = spec.with_sizes({m: 5 for m in missing}) if missing else spec
    heads = 3 if spec.varies_by_head else None
    for sp in (spec, scaled(spec, 3)):
        for block in (16, 128):
            ours = graph_vs_cpu(lower(sp), block, heads, compiled=any(c in path for c in COMPILED))
            ref = create_block_mask(table_mask_mod(sp), None, ours.kv_num_blocks.shape[1], sp.n, sp.n,
                                    device="cpu", BLOCK_SIZE=block)
            assert_blocks_equal(ours.to("cpu"), ref)


@settings(max_examples=int(os.environ.get("GPU_EXAMPLES", "25")), deadline=None, print_blob=True)  # prints a repro
@given(specs(), st.integers(0, 9))
def test_graph_replays_at_new_sizes_stay_exact(raw, extra):
    spec = Spec.load(raw)
    other = spec.with_sizes(grown(raw, extra))
    low = lower(spec)
    heads = 3 if low.uses_head else None
    graph_vs_cpu(low, 4, heads)  # captures
    graph_vs_cpu(low.for_spec(other), 4, heads)  # same structure and length: replays (or recaptures)
    graph_vs_cpu(low.batch([spec, other]), 4, heads)


def test_replays_never_overwrite_an_earlier_mask():
    spec = Spec.load("presets/multiverse.json")
    low = lower(spec).padded_to()
    first = low.block_mask(4, "cuda", length=128, compiled=False, graph=True)
    kept = first.to("cpu")
    for extra in (1, 7, 13):  # other sizes at the same padded length: the same graph replays
        sizes = {s["name"]: s["length"] + extra for s in spec.segments}
        again = low.for_sizes(sizes).block_mask(4, "cuda", length=128, compiled=False, graph=True)
        assert_blocks_equal(again.to("cpu"), low.for_sizes(sizes).block_mask(4, "cpu", length=128))
    assert_blocks_equal(first.to("cpu"), kept)


def test_exported_file_runs_compiled_flex_attention_on_cuda(tmp_path):
    """The `export --format flex` file on CUDA: its BlockMask and mask_mod drive compiled
    FlexAttention and give the lowered mask's output (its tensors live on the GPU). Imported as a
    real module, as a user would: torch.compile re-imports a mask_mod's module."""
    import importlib.util
    import sys

    from torch.nn.attention.flex_attention import flex_attention

    from maskstudio.export import flex_code

    flex = torch.compile(flex_attention, dynamic=False)
    for name in ("cca", "multiverse"):
        spec = Spec.load(f"presets/{name}.json")
        path = tmp_path / f"exported_{name}.py"
        path.write_text(flex_code(spec))
        mod_spec = importlib.util.spec_from_file_location(f"exported_{name}", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
        bm = module.block_mask_for(None, device="cuda")  # 128-token blocks: the compiled kernel's tiles
        q, k, v = (torch.randn(1, 2, spec.n, 16, device="cuda") for _ in range(3))
        ours = flex(q, k, v, block_mask=bm)
        ref = flex(q, k, v, block_mask=lower(spec).block_mask(128, "cuda"))
        assert (ours - ref).abs().max() < 1e-5, name


# ---------------------------------------------------------------- #26: the transformers export on flex_attention
def _records_on_cuda(tmp_path):
    from test_export_transformers import load, records

    from maskstudio.export import transformers_code
    from maskstudio.train import tiny_lm

    lm = tiny_lm()
    lm.model.to("cuda")
    lm.device = torch.device("cuda")
    return records(), lm, load(transformers_code(records()), tmp_path, "design_records_cuda")


def test_transformers_export_on_flex_attention_gives_the_library_logits(tmp_path):
    """The exported module's flex_attention function (transformers' own FlexAttention call with the
    design's BlockMask, per layer and head) on padded and packed batches gives the logits of Mask
    Studio's own flex path for each example (fp32)."""
    from test_export_transformers import HEADS, features

    from maskstudio.run.attention import ATTN_NAME, MaskContext, attn_impl, register

    spec, lm, design = _records_on_cuda(tmp_path)
    feats = features(design, [None, {"answer": 2, "doc1": 5}, {"question": 4}], seed=1)
    register()
    for pack in (0, 10_000):
        batch = design.Collator(pad_token_id=0, pack_tokens=pack, pad_to_multiple_of=128)(feats)
        batch = {k: v.to("cuda") for k, v in batch.items()}
        design.use(lm.model, "flex_attention")
        with torch.no_grad():
            logits = lm.model(**batch).logits
        lm.model.set_attn_implementation("eager")
        for r, row in enumerate(design.pack_in_order([len(f["input_ids"]) for f in feats], pack)):
            at = 0
            for i in row:
                ids = torch.tensor(feats[i]["input_ids"], device="cuda")
                sized = spec.with_sizes(feats[i]["sizes"] or {})
                with attn_impl(lm.model, ATTN_NAME), torch.no_grad():
                    want = lm.model(input_ids=ids[None], position_ids=sized.position_ids()[None].cuda(),
                                    use_cache=False, **{ATTN_NAME: MaskContext(sized, HEADS, "flex", record=False)})
                torch.testing.assert_close(logits[r, at:at + len(ids)], want.logits[0], atol=1e-4, rtol=1e-4)
                at += len(ids)


def test_trainer_step_with_the_exported_flex_mask_matches_maskstudio_train(tmp_path):
    """One transformers.Trainer step (bf16 autocast, as maskstudio.train on CUDA) with the exported
    flex_attention function, against maskstudio.train's flex step on the same examples and seed:
    the same loss (bf16 rounding) and the same AdamW update in nearly every weight (a first AdamW
    step moves each weight by about lr * sign(gradient); only near-zero gradients may flip)."""
    import copy

    from transformers import Trainer, TrainingArguments

    from maskstudio.train import batch_indices, prepare_training, train

    spec, lm, design = _records_on_cuda(tmp_path)
    start = copy.deepcopy(lm.model).float()
    prepared = prepare_training(spec, lm, "kv_retrieval", n_train=4, seed=0)
    lr = 1e-3
    fit = train(spec, lm, steps=1, batch=4, lr=lr, n_train=4, backend="flex", progress=False, _prepared=prepared)
    items = prepared[3]
    rows = [{"input_ids": items[i].ids.tolist(), "labels": torch.where(items[i].targets, items[i].ids, -100).tolist(),
             "sizes": {s["name"]: s["length"] for s in items[i].layout.segments}} for i in batch_indices(4, 4, 0, 0)]
    model = copy.deepcopy(start)
    design.use(model, "flex_attention")
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, max_steps=1,
                             learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                             optim="adamw_torch", bf16=True, remove_unused_columns=False, report_to=[],
                             logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=design.Collator(lm.tokenizer.pad_token_id, pad_to_multiple_of=128))
    trainer.train()
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][0]
    assert loss == pytest.approx(fit.losses[0], rel=1e-2)
    ref, init = dict(fit.lm.model.named_parameters()), dict(start.named_parameters())
    moved = torch.cat([(p.detach() - init[n]).flatten() for n, p in model.named_parameters()])
    theirs = torch.cat([(ref[n].detach() - init[n]).flatten() for n, _ in model.named_parameters()])
    same = ((moved - theirs).abs() < lr / 4).float().mean().item()
    print(f"loss {loss:.5f} vs {fit.losses[0]:.5f}; same update in {same:.4%} of weights")
    assert moved.abs().max() > lr / 2 and same > 0.98
