"""One engine: the runner's eager rows, KV-cache generation steps and packed rows all read the
layer's lowered expression. Random designs (per-layer and per-head steps): a KV-cached step's logits
equal a full recompute of the grown layout, and the rows the attention function reads equal the
spec's dense mask."""
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_properties import specs

from maskstudio import Spec
from maskstudio.run.attention import MaskContext, dense_rows, register
from maskstudio.run.inputs import forward_ids, model_positions
from maskstudio.run.pipeline import kv_ok
from maskstudio.train import tiny_lm

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny():
    register()
    return tiny_lm(layers=2, heads=4)


def with_generate_segment(raw: dict) -> Spec:
    raw = {**raw, "positions": {"scheme": "sequential"}}
    raw["segments"] = raw["segments"] + [{"name": "gen", "modality": "text", "length": 1, "role": "generate"}]
    return Spec.load(raw)


@SETTINGS
@given(specs(), st.integers(0, 1), st.integers(0, 3), st.integers(0, 6))
def test_attention_rows_are_the_dense_mask_from_any_query_row(raw, layer, head, q_start):
    spec = Spec.load(raw)
    q_start = min(q_start, spec.table.n - 1)
    assert torch.equal(dense_rows(spec, layer, head, q_start), spec.dense_mask(layer, head)[q_start:])


@pytest.mark.slow  # ~10-20 s of tiny-model forwards: the fast tier keeps a 50 s budget
@SETTINGS
@given(specs(), st.integers(1, 3), st.integers(0, 10_000))
def test_kv_cache_steps_equal_a_full_recompute(tiny, raw, steps, seed):
    """Prefill with a KV cache, then one token per step on top of it: each step's logits equal a
    forward of the whole grown layout without a cache (where the design allows a KV cache)."""
    from transformers import DynamicCache

    layout = with_generate_segment(raw)
    assume(kv_ok(layout, SimpleNamespace(gen=len(layout.segments) - 1), tiny.num_heads)[0])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tiny.config.vocab_size, (layout.table.n,), generator=g)
    cache = DynamicCache()
    ctx = MaskContext(layout, tiny.num_heads, "eager", record=False)
    with torch.no_grad():
        forward_ids(tiny, ctx, ids, model_positions(layout, tiny), cache)
        for _ in range(steps):
            new = torch.randint(3, tiny.config.vocab_size, (1,), generator=g)
            layout = layout.with_tokens_appended(len(layout.segments) - 1, "x", 1)
            ids = torch.cat([ids, new])
            pos = model_positions(layout, tiny)
            ctx = MaskContext(layout, tiny.num_heads, "eager", record=False)
            step = forward_ids(tiny, ctx, new, pos[..., -1:], cache)[-1]
            full = forward_ids(tiny, MaskContext(layout, tiny.num_heads, "eager", record=False), ids, pos)[-1]
            assert torch.allclose(step, full, atol=1e-4), float((step - full).abs().max())


def test_generation_region_that_sees_itself_both_ways_recomputes(tiny):
    """Block-causal by segment: generated tokens see each other both ways, which a one-token
    generate segment does not show; the KV plan checks the grown layout and recomputes instead."""
    import maskstudio.run as R

    spec = {"segments": [{"name": "p", "text": "hello"}, {"name": "g", "text": "x", "role": "generate"}],
            "mask": {"base": {"pattern": "block_causal", "by": "segment"}}}
    kv = R.run(spec, tiny, max_new_tokens=4, use_cache=True, attentions=False)
    again = R.run(spec, tiny, max_new_tokens=4, use_cache=False, attentions=False)
    assert any("KV cache not used" in n for n in kv.notes)
    assert kv.new_ids == again.new_ids


def test_attention_dropout_is_honoured_on_eager_and_refused_on_flex():
    """transformers hands the model's attention dropout to the attention function in training:
    the eager path applies it (two training forwards differ, eval forwards do not), FlexAttention has
    no dropout and says so in one line instead of silently dropping it."""
    from maskstudio.errors import RunError
    from maskstudio.run.attention import ATTN_NAME, attn_impl

    lm = tiny_lm(layers=1, heads=2)
    lm.model.config.attention_dropout = 0.5
    for layer in lm.model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    spec = Spec.load({"segments": [{"name": "a", "length": 12}]})
    ids = torch.arange(3, 15)[None]

    def logits(backend):
        ctx = MaskContext(spec, 2, backend, record=False)
        with attn_impl(lm.model, ATTN_NAME):
            return lm.model(input_ids=ids, use_cache=False, **{ATTN_NAME: ctx}).logits

    register()
    lm.model.eval()
    assert torch.equal(logits("eager"), logits("eager"))
    lm.model.train()
    torch.manual_seed(0)
    assert not torch.allclose(logits("eager"), logits("eager"))
    with pytest.raises(RunError, match="attention dropout"):
        logits("flex")
