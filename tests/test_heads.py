"""Head-level experiments (run.heads): a head knockout changes only that head's contribution and
equals a forward with the head zeroed by hand; patching a head from design B into A equals a
hand-made forward; noise bands, per-head differences, the heads field's errors.

The hand-made references use the model's own eager attention (no maskstudio code): a forward
pre-hook on the layer's o_proj zeroes or replaces the head's slice of its input, and design B's
mask goes in as an additive float mask. Tiny random-weight Llama in the fast tier, the embedded
SmolLM2-135M under the `model` marker."""
from __future__ import annotations

import pytest
import torch

from maskstudio import Spec
from maskstudio import run as R
from maskstudio.run import RunError, heads as H
from maskstudio.run.attention import HeadEdits, attn_impl, editing
from test_runner import _tiny

A = {"name": "A", "segments": [{"name": "ctx", "text": "The capital of France is Paris. The capital of Italy is"},
                               {"name": "q", "text": " Rome. And Spain has"}],
     "mask": {"base": {"pattern": "causal"}}, "positions": {"scheme": "sequential"}}
B = dict(A, name="B", mask={"base": {"pattern": "causal"},
                            "rules": [{"q": "ctx", "k": "ctx", "pattern": "full"}]})  # the context reads both ways


@pytest.fixture(scope="module")
def tiny_lm():
    return _tiny("llama")


def attn_of(lm, layer):
    return lm.model.model.layers[layer].self_attn


def head_dim(lm):
    cfg = lm.model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@torch.no_grad()
def hand_forward(lm, ids, edit=None, mask=None, capture=None):
    """The model's own eager forward of `ids`: `edit(layer, x)` rewrites o_proj inputs in place,
    `mask` bool [N, N] (True = may attend) goes in as an additive float mask, `capture` (dict)
    receives every layer's o_proj input."""
    hooks = []
    for layer in range(lm.num_layers):
        def pre(module, args, layer=layer):
            x = args[0].clone()
            if edit is not None:
                edit(layer, x)
            if capture is not None:
                capture[layer] = x.clone()
            return (x,)
        hooks.append(attn_of(lm, layer).o_proj.register_forward_pre_hook(pre))
    try:
        kw = {}
        if mask is not None:
            add = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
            kw["attention_mask"] = add[None, None]
        with attn_impl(lm.model, "eager"):
            return lm.model(input_ids=ids[None], **kw).logits[0].float()
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def studio_forward(lm, spec, edits, capture=None):
    """maskstudio's run under `edits`, capturing o_proj inputs."""
    hooks = []
    if capture is not None:
        for layer in range(lm.num_layers):
            def pre(module, args, layer=layer):
                capture[layer] = args[0].clone()
            hooks.append(attn_of(lm, layer).o_proj.register_forward_pre_hook(pre))
    try:
        with editing(edits):
            return R.run(spec, lm, attentions=False, backend="eager")
    finally:
        for h in hooks:
            h.remove()


def check_knockout_is_one_head(lm, layer, head, tol):
    D = head_dim(lm)
    intact, cut = {}, {}
    base = studio_forward(lm, A, HeadEdits(), intact)
    ko = studio_forward(lm, A, HeadEdits(zero={(layer, head)}), cut)
    sl = slice(head * D, (head + 1) * D)
    assert torch.count_nonzero(cut[layer][..., sl]) == 0                 # that head's output is gone
    assert torch.count_nonzero(intact[layer][..., sl]) > 0
    others = torch.ones(intact[layer].shape[-1], dtype=torch.bool)
    others[sl] = False
    assert torch.equal(cut[layer][..., others], intact[layer][..., others])  # every other head of the layer as it was
    for lower in range(layer):
        assert torch.equal(cut[lower], intact[lower])                      # earlier layers untouched
    assert not torch.equal(cut[layer + 1], intact[layer + 1])              # and later layers see the change

    def zero(lay, x):
        if lay == layer:
            x[..., sl] = 0
    hand = hand_forward(lm, base.input_ids, zero)
    assert (ko.logits - hand).abs().max() <= tol
    assert (ko.logits - base.logits).abs().max() > 10 * tol               # the knockout did something
    return base, ko, hand


def check_patch_equals_hand(lm, layer, head, tol):
    D = head_dim(lm)
    sl = slice(head * D, (head + 1) * D)
    layout_b = R.run(B, lm, attentions=False).layout
    keep = HeadEdits(keep={(layer, head)})
    b_run = studio_forward(lm, B, keep)
    patched = studio_forward(lm, A, HeadEdits(patch={(layer, head): keep.kept[(layer, head)]}))
    b_caps = {}
    hand_b = hand_forward(lm, b_run.input_ids, mask=layout_b.dense_mask(0, 0), capture=b_caps)
    assert (hand_b - b_run.logits).abs().max() <= tol                      # B's mask reproduced by hand

    def put(lay, x):
        if lay == layer:
            x[..., sl] = b_caps[layer][..., sl]
    hand = hand_forward(lm, b_run.input_ids, put)
    assert (patched.logits - hand).abs().max() <= tol
    plain_a = hand_forward(lm, b_run.input_ids)
    assert (patched.logits - plain_a).abs().max() > 10 * tol               # the patch moved A
    return patched


# ---------------------------------------------------------------- fast: a tiny random-weight Llama
def test_knockout_changes_only_that_head_tiny(tiny_lm):
    check_knockout_is_one_head(tiny_lm, 1, 2, 1e-5)


def test_patch_from_b_equals_hand_made_forward_tiny(tiny_lm):
    check_patch_equals_hand(tiny_lm, 0, 1, 1e-5)


def test_patch_with_a_own_outputs_changes_nothing(tiny_lm):
    keep = HeadEdits(keep={(1, 0), (2, 3)})
    base = studio_forward(tiny_lm, A, keep)
    same = studio_forward(tiny_lm, A, HeadEdits(patch=dict(keep.kept)))
    assert torch.equal(base.logits, same.logits)


def test_block_edit_is_a_mask_change(tiny_lm):
    base = studio_forward(tiny_lm, A, HeadEdits())
    n = len(base.input_ids)
    nothing = torch.zeros(n, n, dtype=torch.bool)
    assert torch.equal(studio_forward(tiny_lm, A, HeadEdits(block={0: nothing})).logits, base.logits)
    future = torch.ones(n, n, dtype=torch.bool).triu(1)      # blocking what causal masks anyway: no change
    assert torch.equal(studio_forward(tiny_lm, A, HeadEdits(block={0: future, 1: future})).logits, base.logits)
    last_reads_first = nothing.clone()
    last_reads_first[-1, 0] = True
    moved = studio_forward(tiny_lm, A, HeadEdits(block={0: last_reads_first})).logits
    assert torch.equal(moved[:-1], base.logits[:-1]) and not torch.equal(moved[-1], base.logits[-1])


def test_head_experiment_reports_and_noise(tiny_lm):
    eff = H.head_experiment(A, "1.2, 2.0", tiny_lm, noise=3, seed=1)
    assert eff.heads == [(1, 2), (2, 0)] and len(eff.per_head) == 2 and len(eff.noise) == 3
    lo, hi = H.band(eff.noise)
    assert lo <= hi
    assert "noise band" in eff.summary() and '"band"' in eff.to_json()
    again = H.head_experiment(A, "1.2, 2.0", tiny_lm, noise=3, seed=1, per_head=False)
    assert again.noise == eff.noise and again.prob == eff.prob            # seeded: the same draws
    patch = H.head_experiment(A, [(0, 1)], tiny_lm, source=B, noise=1)
    assert patch.mode == "patch" and patch.source_prob is not None and "p in B" in patch.summary()
    from maskstudio.viz.head_views import head_effect_figure

    eff.token = "$x_1^"                                                    # a token that is not math
    fig = head_effect_figure(eff)
    fig.canvas.draw()
    assert fig.axes[0].get_ylabel() == "change of p('$x_1^')"


def test_patch_needs_the_same_tokens(tiny_lm):
    other = dict(B, segments=[{"name": "ctx", "text": "something else"}, {"name": "q", "text": " entirely"}])
    with pytest.raises(RunError, match="same texts"):
        H.head_experiment(A, "0.0", tiny_lm, source=other, noise=0)


@pytest.mark.parametrize("text,msg", [("", "at least one head"), ("4", "one '.'"), ("1.9", "head 9 is outside 0-3"),
                                      ("7.0", "layer 7 is outside 0-2"), ("a.b", "not a layer number"),
                                      ("2-1.0", "outside"), ("1..2", "one '.'")])
def test_heads_field_errors_name_the_field(text, msg):
    with pytest.raises(RunError, match="^heads: ") as err:
        H.parse_heads(text, 3, 4)
    assert msg in str(err.value)


def test_heads_forms():
    assert H.parse_heads("1.*", 3, 4) == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert H.parse_heads("*.0; 0-1.1  2.1", 3, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    with pytest.raises(RunError, match="head 3 is outside 0-1"):
        H.parse_heads("*.0; 0-1.3", 3, 2)
    assert H.parse_heads("0-1.1, 0.1", 3, 2) == [(0, 1), (1, 1)]


def test_knockout_band_blocks_random_windows(tiny_lm):
    ko = R.knockout(A, "q", "ctx", window=2, model=tiny_lm)
    deltas = H.knockout_band(ko, tiny_lm, samples=4, seed=3)
    assert len(deltas) == 4 and ko.noise == deltas and any(abs(d) > 0 for d in deltas)
    assert "noise band" in ko.summary() and ko.band[0] <= ko.band[1]


def _stop_at(line: str):
    """A job that records its step lines and stops itself at the first one starting with `line`."""
    from maskstudio import progress

    lines = []
    job = progress.Job(report=lambda m: (lines.append(m), m.startswith(line) and job.stop("stopped by you")))
    return job, lines


def test_noise_bands_report_their_draws_and_stop_keeps_those_drawn(tiny_lm):
    from maskstudio import progress

    ko = R.knockout(A, "q", "ctx", window=2, model=tiny_lm)
    full = H.knockout_band(ko, tiny_lm, samples=4, seed=3)
    job, lines = _stop_at("noise band: random window 3/4")
    with progress.running(job):
        kept = H.knockout_band(ko, tiny_lm, samples=4, seed=3)
    assert lines == [f"noise band: random window {i}/4" for i in (1, 2, 3)] and kept == full[:2] and ko.noise == kept
    eff = H.head_experiment(A, "1.2, 2.0", tiny_lm, noise=3, seed=1)
    job, lines = _stop_at("noise band: random edit 2/3")
    with progress.running(job):
        cut = H.head_experiment(A, "1.2, 2.0", tiny_lm, noise=3, seed=1)
    assert lines == ["head 1/2 alone", "head 2/2 alone", "noise band: random edit 1/3", "noise band: random edit 2/3"]
    assert cut.per_head == eff.per_head and cut.noise == eff.noise[:1] and "of 1 random edits" in cut.summary()


def test_compare_many_per_head_differences(tiny_lm):
    same, other = H.compare_many(A, [A, B], tiny_lm)
    assert same.head_diff.shape == (3, 4) and float(same.head_diff.abs().max()) == 0.0
    assert float(other.head_diff.min()) > 0                               # the context reads ahead in every head
    assert "differs most" in other.summary()
    a, b = other.a.attentions.float(), other.b.attentions.float()
    assert torch.allclose(other.head_diff[1, 2], 0.5 * (b[1, 2] - a[1, 2]).abs().sum(-1).mean())


# ---------------------------------------------------------------- the embedded SmolLM2 (real weights)
@pytest.mark.model
def test_knockout_changes_only_that_head_smollm2(smollm):
    base, ko, hand = check_knockout_is_one_head(smollm, 5, 3, 2e-4)
    eff = H.head_experiment(A, "5.3", smollm, noise=0, backend="eager")
    p_hand = float(torch.softmax(hand[-1], -1)[eff.token_id])
    assert abs(eff.prob - p_hand) < 1e-5


@pytest.mark.model
def test_patch_from_b_equals_hand_made_forward_smollm2(smollm):
    check_patch_equals_hand(smollm, 4, 2, 2e-4)
