"""Packed training rows are the document mask (lower_packed.DocumentRow): for random designs,
absolute-place patterns included, a packed row's loss and every gradient equal the unpacked
examples', in training steps and in packed evaluation."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import specs

from maskstudio import Spec
from maskstudio.lower_packed import DocumentRow
from maskstudio.run.attention import ATTN_NAME, MaskContext, attn_impl, register
from maskstudio.run.inputs import model_positions
from maskstudio.train import item_loss, pack, tiny_lm, train
from maskstudio.train.data import Item

# absolute places: sinks at the start (StreamingLLM), chunks by index, a block-causal frames list
STREAMING = {"segments": [{"name": "p", "modality": "text", "length": 9}, {"name": "a", "modality": "text", "length": 5}],
             "mask": {"base": {"pattern": "causal"},
                      "overlays": [{"pattern": "window", "size": 3, "op": "and"},
                                   {"pattern": "first", "size": 2, "op": "or"}]}}
CHUNKED = {"segments": [{"name": "x", "modality": "text", "length": 11}],
           "mask": {"base": {"pattern": "chunked", "by": "index", "chunk": 4, "size": 3}}}
FRAMES = {"segments": [{"name": "v", "modality": "text", "length": 6, "frames": [2, 4]},
                       {"name": "t", "modality": "text", "length": 3}],
          "mask": {"base": {"pattern": "block_causal", "by": "frame"}}}
ABSOLUTE = [Spec.load(d) for d in (STREAMING, CHUNKED, FRAMES)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm(layers=2, heads=4)


def _item(spec: Spec, lm, seed: int, example: int) -> Item:
    g = torch.Generator().manual_seed(seed)
    n = spec.table.n
    targets = torch.rand(n, generator=g) < 0.5
    targets[-1] = True
    targets[0] = False  # nothing predicts a document's first token (as data.encode)
    ids = torch.randint(3, lm.config.vocab_size, (n,), generator=g)
    if spec.positions.get("scheme") == "mrope":  # 3-D ids: not for a 1-D RoPE model
        spec = Spec.load({**spec.to_dict(), "positions": {"scheme": "sequential"}})
    return Item(ids, spec, model_positions(spec, lm), targets, example)


def _loss_and_grads(lm, items: list, backend: str = "eager"):
    register()
    lm.model.zero_grad(set_to_none=True)
    total = 0.0
    with attn_impl(lm.model, ATTN_NAME):
        for it in items:
            loss = item_loss(lm.model, it, lm.num_heads, backend, lm.device, autocast=False)
            loss.backward()
            total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in lm.model.named_parameters() if p.grad is not None}
    lm.model.zero_grad(set_to_none=True)
    return total, grads


def assert_packed_equals_unpacked(lm, items: list):
    row = pack(items)
    assert isinstance(row.layout, DocumentRow) and row.layout.n == len(row.ids)
    one, g_one = _loss_and_grads(lm, items)
    packed, g_packed = _loss_and_grads(lm, [row])
    assert packed == pytest.approx(one, rel=1e-5, abs=1e-5)
    assert g_packed.keys() == g_one.keys()
    for name, g in g_one.items():
        assert torch.allclose(g_packed[name], g, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow  # seconds of tiny-model forwards and backwards: the fast tier keeps a 50 s budget
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(specs(), st.sampled_from(ABSOLUTE)), min_size=2, max_size=4), st.integers(0, 1000))
def test_packed_row_of_random_designs_has_the_unpacked_loss_and_gradients(tiny, docs, seed):
    """Documents of random designs (per-layer and per-head steps, sinks, chunks, frames) in one
    row: the same summed loss and the same gradient of every parameter as one forward each."""
    layouts = [d if isinstance(d, Spec) else Spec.load(d) for d in docs]
    items = [_item(sp, tiny, seed + j, j) for j, sp in enumerate(layouts)]
    assert_packed_equals_unpacked(tiny, items)


def test_rows_mix_designs_and_read_each_documents_own_places(tiny):
    """Sinks are each document's first tokens, not the row's: the packed mask is the block
    diagonal of the documents' own masks at every layer and head."""
    items = [_item(sp, tiny, 7 + j, j) for j, sp in enumerate(ABSOLUTE * 2)]
    row = pack(items)
    ctx = MaskContext(row.layout, tiny.num_heads, "eager", record=False)
    want = torch.block_diag(*[sp.dense_mask(0, 0) for sp in ABSOLUTE * 2])
    assert torch.equal(ctx.dense(0, 0, "cpu")[0], want)
    assert torch.equal(ctx.dense(1, 5, "cpu")[0], want[5:])  # rows past a KV prefix
    assert_packed_equals_unpacked(tiny, items)


def test_training_and_evaluation_pack_absolute_place_designs(tiny):
    """StreamingLLM (sinks at each example's start) trains packed with the unpacked losses step
    for step, and packed evaluation scores it with the unpacked NLL (both used to be refused or
    wrong: the old packer renamed segments and read sinks at the row's start)."""
    from maskstudio.evaluate import make_examples, task_template
    from maskstudio.train import evaluate_model

    d = task_template("kv_retrieval").to_dict()
    d["name"] = "streaming"
    d["mask"] = {"base": {"pattern": "causal"}, "overlays": [{"pattern": "window", "size": 8, "op": "and"},
                                                             {"pattern": "first", "size": 4, "op": "or"}]}
    spec = Spec.load(d)
    kw = dict(task="kv_retrieval", batch=4, n_train=8, lr=3e-3, progress=False)
    plain = train(spec, tiny, steps=3, **kw)
    packed = train(spec, tiny, steps=3, pack_tokens=4096, **kw)
    assert all(s["forwards"] == 1 for s in packed.steps) and all(s["forwards"] == 4 for s in plain.steps)
    assert packed.losses == pytest.approx(plain.losses, rel=1e-4)
    held = make_examples("kv_retrieval", 5, 1)
    one = evaluate_model(spec, tiny, held)
    rows = evaluate_model(spec, tiny, held, pack_tokens=1000)
    assert [r["nll"] for r in rows] == pytest.approx([r["nll"] for r in one], rel=1e-5)
    assert [r["correct"] for r in rows] == [r["correct"] for r in one]


def test_bico_denoising_rows_pack_with_their_per_token_flags(tiny):
    """BICO's masked tokens are a per-token attribute: packed, each document's flags are read
    along the row, and the loss equals the unpacked step's."""
    from maskstudio.train import bico_item

    items = [_item(sp, tiny, 3 + j, j) for j, sp in enumerate(ABSOLUTE)]
    noisy = [bico_item(it, step=1, seed=0, mask_id=1) for it in items]
    assert all(it.layout.table.attrs.get("masked") is not None for it in noisy)
    assert_packed_equals_unpacked(tiny, noisy)


def test_rows_of_one_design_reuse_one_expression(tiny):
    """A training loop packs new rows every step: rows of the same designs share the lowered
    expression (its tape, so a compiled kernel) whatever their sizes and document counts."""
    spec = Spec.load(STREAMING)
    rows = [pack([_item(spec.with_sizes({"p": 4 + k, "a": 2 + j}), tiny, k, k) for k in range(docs)])
            for j, docs in enumerate((2, 3, 4, 2))]
    packed = [r.layout.packed(0) for r in rows]
    assert len({id(p.low) for p in packed}) == 1
    assert [p.documents for p in packed] == [2, 4, 4, 2]  # slots rounded up to a power of two
