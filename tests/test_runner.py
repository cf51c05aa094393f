"""Live runs: maskstudio.run on tiny random-weight models (fast) and on the embedded SmolLM2 (`model`).

Tiny models use a byte tokenizer defined here, so fast tests download and load nothing."""
from __future__ import annotations

import json

import pytest
import torch

from maskstudio.tiled import block_states
from maskstudio import Spec
from maskstudio import run as R
from maskstudio.run import LoadedModel, RunError


# ---------------------------------------------------------------- tiny models
class ByteTokenizer:
    """One token per UTF-8 byte (ids 3..258); enough of the tokenizer API for the R."""

    eos_token_id = None
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


def _tiny(arch: str) -> LoadedModel:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    cfg = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=6),
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**common, head_dim=8, sliding_window=5, attn_logit_softcapping=5.0),
    }[arch]()
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    return LoadedModel(model, ByteTokenizer(), f"tiny-{arch}", torch.device("cpu"))


ARCHS = ["llama", "qwen2", "mistral", "gemma", "gemma2"]


@pytest.fixture(scope="module")
def tiny():
    cache = {}

    def get(arch="llama"):
        if arch not in cache:
            cache[arch] = _tiny(arch)
        return cache[arch]
    return get


def two_seg(a="hello there", b="general kenobi", **extra):
    return {"segments": [{"name": "a", "text": a}, {"name": "b", "text": b}], **extra}


@torch.no_grad()
def plain_logits(lm, ids):
    return lm.model(input_ids=ids[None]).logits[0].float()


# ---------------------------------------------------------------- equality with the model's own forward
@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@pytest.mark.parametrize("arch", ARCHS)
def test_causal_spec_equals_plain_forward(tiny, arch):
    lm = tiny(arch)
    r = R.run(two_seg(), lm)
    assert r.attentions.shape == (3, 4, 25, 25) and r.attentions.dtype == torch.float16
    assert (r.logits - plain_logits(lm, r.input_ids)).abs().max() <= 1e-5


def test_sliding_window_is_honoured(tiny):
    """Mistral's own window (6) still applies inside our attention function."""
    r = R.run(two_seg(), tiny("mistral"))
    first_layer = r.attentions[0, 0].float()
    assert first_layer[20, :15].sum() == 0 and first_layer[20, 15:21].sum() > 0.99


# ---------------------------------------------------------------- per-layer and per-head rules
def test_head_rule_changes_only_that_head(tiny):
    lm = tiny("llama")
    base = R.run(two_seg(), lm)
    cut = R.run(two_seg(mask={"rules": [{"q": "b", "k": "a", "pattern": "none", "layers": [0],
                                              "heads": [1]}]}), lm)
    d = (cut.attentions[0].float() - base.attentions[0].float()).abs().flatten(1).amax(1)
    assert d[1] > 0.01 and d[[0, 2, 3]].max() == 0
    assert cut.attentions[0, 1, 11:, :11].float().sum() == 0  # head 1: b no longer sees a


def test_layer_rule_changes_only_that_layer_and_later(tiny):
    lm = tiny("qwen2")
    base = R.run(two_seg(), lm)
    cut = R.run(two_seg(mask={"overlays": [{"op": "and_not", "q": "b", "k": "a", "pattern": "full",
                                                 "layers": [1]}]}), lm)
    diff = (cut.attentions.float() - base.attentions.float()).abs().flatten(1).amax(1)
    assert diff[0] == 0 and diff[1] > 0.01
    assert cut.attentions[1, :, 11:, :11].float().sum() == 0


# ---------------------------------------------------------------- layout, results
def test_layout_is_materialized_with_frames(tiny):
    spec = {"segments": [{"name": "ctx", "text": "abc", "length": 99},
                         {"name": "clips", "text": ["xy", "zzzz", "w"]}],
            "mask": {"rules": [{"q": "clips", "k": "clips", "pattern": "block_causal", "by": "frame"}]}}
    r = R.run(spec, tiny())
    segs = r.layout.segments
    assert segs[0]["length"] == 3 and segs[1]["frames"] == [2, 4, 1] and r.layout.n == 10
    assert any("declared 99" in n for n in r.notes)
    assert r.tokens == {"ctx": list("abc"), "clips": list("xyzzzzw")}
    # a frame sees its whole frame (bidirectional) and earlier frames only
    att = r.attentions[0, 0].float()
    assert att[5, 8] > 0 and att[5, 9] == 0
    assert Spec.load(r.layout.to_json()) == r.layout


def test_segment_mass_and_rollout_rows_sum_to_one(tiny):
    r = R.run(two_seg(), tiny())
    assert r.segment_mass.shape == (3, 2, 2)
    assert torch.allclose(r.segment_mass.sum(-1), torch.ones(3, 2), atol=1e-2)
    assert r.segment_mass[:, 0, 1].abs().max() == 0  # causal: a never sees b
    assert torch.allclose(r.rollout.sum(-1), torch.ones(25), atol=1e-3)
    assert torch.allclose(r.rollout[0], torch.eye(25)[0])


def test_summary_and_json(tiny):
    spec = {"segments": [{"name": "p", "text": "abc"}, {"name": "t", "text": "def", "role": "target"}]}
    r = R.run(spec, tiny(), max_new_tokens=3)
    text = r.summary()
    for word in ("tokens", "top-k", "continuation", "target NLL", "t:"):
        assert word in text
    d = json.loads(r.to_json())
    assert d["layout"]["segments"][1]["length"] == 3 and len(d["top_k"]) == 10
    assert d["target_nll"]["t"]["tokens"] == 3 and len(d["new_ids"]) == 3


def test_target_nll_is_teacher_forced(tiny):
    spec = {"segments": [{"name": "p", "text": "abc"}, {"name": "t", "text": "de", "role": "target"}]}
    r = R.run(spec, tiny())
    logp = torch.log_softmax(r.logits, -1)
    ids = r.input_ids
    want = -(logp[2, ids[3]] + logp[3, ids[4]]) / 2
    assert abs(r.target_nll["t"]["mean"] - float(want)) < 1e-5


# ---------------------------------------------------------------- generation
def test_generation_kv_cache_equals_recompute(tiny):
    spec = {"segments": [{"name": "p", "text": "hello"}, {"name": "g", "text": " w", "role": "generate"}],
            "mask": {"overlays": [{"op": "or", "q": "p", "k": "p", "pattern": "full"}]}}
    lm = tiny("gemma2")
    kv = R.run(spec, lm, max_new_tokens=6, use_cache=True, attentions=False)
    re = R.run(spec, lm, max_new_tokens=6, use_cache=False, attentions=False)
    assert kv.new_ids == re.new_ids and len(kv.new_ids) == 6
    assert not any("KV cache not used" in n for n in kv.notes)
    assert kv.generated_layout.segments[1]["length"] == 8


def test_generation_recomputes_when_not_kv_compatible(tiny):
    """The prompt attends the generate segment (full overlay): new tokens change the prefix."""
    spec = {"segments": [{"name": "p", "text": "hello"}, {"name": "g", "text": " w", "role": "generate"}],
            "mask": {"overlays": [{"op": "or", "q": "p", "k": "g", "pattern": "full"}]}}
    r = R.run(spec, tiny(), max_new_tokens=3, use_cache=True, attentions=False)
    assert any("KV cache not used" in n for n in r.notes)


def test_generated_tokens_obey_the_rules(tiny):
    """The generate segment may not see `secret`: its continuation ignores what the secret says."""
    def spec(secret):
        return {"segments": [{"name": "intro", "text": "abc"}, {"name": "secret", "text": secret},
                             {"name": "g", "text": "x", "role": "generate"}],
                "mask": {"rules": [{"q": "g", "k": "secret", "pattern": "none"}]}}
    lm = tiny("mistral")
    a = R.run(spec("1111"), lm, max_new_tokens=5, attentions=False)
    b = R.run(spec("9876"), lm, max_new_tokens=5, attentions=False)
    assert a.new_ids == b.new_ids
    assert torch.equal(a.logits[-1], b.logits[-1])


# ---------------------------------------------------------------- compare and knockout
def test_compare_same_spec_has_zero_kl(tiny):
    lm = tiny()
    c = R.compare(two_seg(), two_seg(), lm)
    assert c.kl.abs().max() < 1e-6 and c.mass_diff.abs().max() == 0
    c = R.compare(two_seg(), two_seg(mask={"rules": [{"q": "b", "k": "a", "pattern": "none"}]}), lm)
    assert c.kl[:11].abs().max() < 1e-6 and c.kl[11:].max() > 0
    assert "KL" in c.summary() and json.loads(c.to_json())["kl"]


def test_knockout_is_a_per_layer_overlay(tiny):
    lm = tiny()
    ko = R.knockout(two_seg(), q="b", k="a", window=2, model=lm)
    assert ko.windows == [(0, 1), (1, 2)] and len(ko.probs) == 2
    direct = R.run(two_seg(mask={"overlays": [{"op": "and_not", "q": "b", "k": "a", "pattern": "full",
                                                    "layers": [1, 2]}]}), lm, attentions=False)
    assert abs(float(torch.softmax(direct.logits[-1], -1)[ko.token_id]) - ko.probs[1]) < 1e-6
    assert "knockout" in ko.summary() and json.loads(ko.to_json())["deltas"]


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_run_error(tiny, monkeypatch):
    lm = tiny()
    cases = [
        ({"segments": [{"name": "a", "text": "hi"}, {"name": "img", "modality": "image", "grid": [2, 2]}]},
         "text-only"),
        ({"segments": [{"name": "a", "text": "hi"}, {"name": "b", "text": ""}]}, "empty text"),
        ({"segments": [{"name": "a", "text": ["hi", ""]}]}, "empty text"),
        ({"segments": [{"name": "a", "length": 4}]}, "no text"),
        ({"segments": [{"name": "a", "text": "hi"}], "positions": {"scheme": "mrope"}}, "1-D"),
    ]
    for spec, words in cases:
        with pytest.raises(RunError, match=words) as info:
            R.run(spec, lm)
        assert "\n" not in str(info.value) and info.value.spec is not None
    with pytest.raises(RunError, match="backend"):
        R.run(two_seg(), lm, backend="cuda-magic")


def test_offline_hub_id_is_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunError, match="not downloaded") as info:
        R.load_model("maskstudio-test/no-such-model")
    assert "\n" not in str(info.value)


def test_without_the_gguf_wheel_the_default_is_the_hub_model(monkeypatch):
    """A hosted Space installs requirements.txt only: the default then loads SmolLM2 from the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(R.models, "_embedded_folder", lambda: None)
    monkeypatch.setattr(R.models, "_MODELS", {})
    with pytest.raises(RunError, match="HuggingFaceTB/SmolLM2-135M-Instruct"):
        R.load_model()


def test_out_of_memory_is_a_run_error(tiny, monkeypatch):
    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
    monkeypatch.setattr(R.TextAdapter, "forward", boom)
    with pytest.raises(RunError, match="out of memory"):
        R.run(two_seg(), tiny())


def test_long_input_switches_to_no_maps_mode(tiny, monkeypatch):
    monkeypatch.setattr(R.pipeline, "MAX_CAPTURE", 8)
    r = R.run(two_seg(), tiny())
    assert r.attentions is None and r.segment_mass is None and r.rollout is None
    assert any("no-maps" in n for n in r.notes)


# ---------------------------------------------------------------- FlexAttention path
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_flex_backend_matches_eager(tiny, arch):
    lm = tiny(arch)
    text = "the quick brown fox jumps over the lazy dog " * 4
    spec = {"segments": [{"name": "a", "text": text[:70]}, {"name": "b", "text": text[70:150]},
                         {"name": "c", "text": text[150:]}],
            "mask": {"rules": [{"q": "c", "k": "a", "pattern": "none", "heads": [2]},
                               {"q": "b", "k": "b", "pattern": "window", "size": 9, "layers": [1]}],
                     "overlays": [{"op": "or", "q": "a", "k": "a", "pattern": "full"}]}}
    eager = R.run(spec, lm, attentions=False, backend="eager")
    flex = R.run(spec, lm, attentions=False, backend="flex")
    assert flex.backend == "flex" and len(flex.input_ids) > 128  # spans more than one block
    assert (flex.logits - eager.logits).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_flex_matches_eager_on_cpu_past_one_block(tiny, arch):
    """Layouts of several 128-token blocks with full blocks (causal below the diagonal, a
    bidirectional prefix, per-head and per-layer steps): uncompiled CPU flex == eager."""
    lm = tiny(arch)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi " * 12
    spec = {"segments": [{"name": "a", "text": words[:400]}, {"name": "b", "text": words[400:900]},
                         {"name": "c", "text": words[900:]}],
            "mask": {"rules": [{"q": "a", "k": "a", "pattern": "full"},
                               {"q": "c", "k": "a", "pattern": "none", "heads": [1]},
                               {"q": "b", "k": "b", "pattern": "window", "size": 200, "layers": [0]}]}}
    eager = R.run(spec, lm, attentions=False, backend="eager")
    flex = R.run(spec, lm, attentions=False, backend="flex")
    n = len(flex.input_ids)
    full, _ = block_states(Spec.load(flex.layout.to_dict()), 128, 0, 0)
    assert n > 3 * 128 and int(full.sum()) >= 3
    assert (flex.logits - eager.logits).abs().max() < 1e-4


def test_flex_block_masks_match_dense():
    """The runner's FlexAttention masks, closed form and table form (padded to a length bucket,
    padded keys masked): full blocks + the mask_mod inside partial blocks reproduce the dense
    mask, and the mask_mod alone is right at EVERY (q, k)."""
    from maskstudio.lower import lower

    spec = Spec.load({"segments": [{"name": "a", "length": 150}, {"name": "b", "length": 200}],
                      "mask": {"rules": [{"q": "b", "k": "a", "pattern": "window", "size": 40, "causal": False,
                                          "heads": [1]}]}})
    lowered, length = R.flex_block_mask(spec, 0, 2, "cpu")
    assert length == 512 and lowered.seq_lengths == (512, 512)
    tables = lower(spec, 0, form="tables").padded_to(length=512).block_mask(128, "cpu", num_heads=2, length=512)
    for bm, size in ((lowered, 512), (tables, 512)):
        q, k = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        dense = bm.to_dense()[0]
        for h in range(2):
            got = torch.vmap(torch.vmap(lambda a, b: bm.mask_mod(0, torch.tensor(h), a, b)))(q, k)
            up = dense[h].repeat_interleave(128, 0).repeat_interleave(128, 1)[:size, :size].bool()
            want = torch.zeros(size, size, dtype=torch.bool)
            want[:350, :350] = spec.dense_mask(head=h)
            assert torch.equal(got, want)
            assert torch.equal(up & got, want)  # the kernel visits every allowed pair
    assert not torch.equal(spec.dense_mask(head=0), spec.dense_mask(head=1))


def test_model_window_is_folded_into_the_lowered_mask():
    spec = Spec.load({"segments": [{"name": "a", "length": 300}], "mask": {"base": {"pattern": "causal"}}})
    bm, length = R.flex_block_mask(spec, 0, 2, "cpu", window=100)
    dense = bm.to_dense()[0, 0]
    assert length == 512 and int(dense[2, 0]) == 0  # query block 2 skips key block 0 (all > 100 back)
    q, k = torch.meshgrid(torch.arange(300), torch.arange(300), indexing="ij")
    got = torch.vmap(torch.vmap(lambda a, b: bm.mask_mod(0, torch.tensor(0), a, b)))(q, k)
    assert torch.equal(got, (k <= q) & (q - k < 100))


# ---------------------------------------------------------------- the real model
PROMPT = "The capital of France is"


@pytest.mark.model
def test_model_causal_spec_equals_plain_forward(smollm):
    r = R.run({"segments": [{"name": "q", "text": "Q: What is the capital of France?"},
                                 {"name": "a", "text": " A:"}]}, smollm)
    assert (r.logits - plain_logits(smollm, r.input_ids)).abs().max() <= 1e-4
    assert r.attentions.shape == (30, 9, len(r.input_ids), len(r.input_ids))


def _reach(spec: Spec, layers: int) -> torch.Tensor:
    """Transitive closure over `layers` attention steps: (M | I)^L, on booleans."""
    m = spec.dense_mask() | torch.eye(spec.n, dtype=torch.bool)
    r = m.clone()
    for _ in range(layers - 1):
        r = (r.float() @ m.float()) > 0
    return r


@pytest.mark.model
def test_model_counterfactual_unreachable_segment_cannot_matter(smollm):
    def spec(b, blocked=True):
        rules = [{"q": ["mid", "last"], "k": "B", "pattern": "none"}] if blocked else []
        return {"segments": [{"name": "ctx", "text": "My favourite colour is"}, {"name": "B", "text": b},
                             {"name": "mid", "text": ". The colour I like is"}, {"name": "last", "text": " called"}],
                "mask": {"rules": rules}}
    a = R.run(spec(" green"), smollm, attentions=False)
    b = R.run(spec(" purple"), smollm, attentions=False)
    assert a.layout.segments[1]["length"] == b.layout.segments[1]["length"]
    assert not torch.equal(a.input_ids, b.input_ids)
    lay = a.layout
    t = lay.table
    last = t.segment_slice(3)
    reach = _reach(lay, smollm.num_layers)
    assert not reach[last, t.segment_slice(1)].any()  # the analysis: B cannot reach `last`
    assert (a.logits[last] - b.logits[last]).abs().max() == 0
    ca = R.run(spec(" green", False), smollm, attentions=False)
    cb = R.run(spec(" purple", False), smollm, attentions=False)
    assert (ca.logits[last] - cb.logits[last]).abs().max() > 0.1


@pytest.mark.model
def test_model_positions_reach_the_model(smollm):
    base = {"segments": [{"name": "p", "text": PROMPT}]}
    r0 = R.run(base, smollm, attentions=False)
    shifted = R.run({**base, "positions": {"scheme": "sequential", "start": 7}}, smollm, attentions=False)
    zeros = R.run({**base, "positions": {"scheme": "attr", "attr": "row"}}, smollm, attentions=False)
    assert torch.equal(zeros.layout.position_ids(), torch.zeros(len(r0.input_ids), dtype=torch.long))
    assert (shifted.logits - r0.logits).abs().max() < 1e-2  # RoPE: relative positions unchanged
    assert (zeros.logits - r0.logits).abs().max() > 0.5


@pytest.mark.model
def test_model_chat_generation_and_visible_template(smollm):
    r = R.run({"segments": [{"name": "q", "text": "What is the capital of France?"}]}, smollm,
                   max_new_tokens=8, chat=True)
    assert "Paris" in r.text
    specials = [s for s in r.layout.segments if s["modality"] == "special"]
    assert len(specials) == 2 and "<|im_start|>" in specials[0]["text"]
    assert "".join("".join(v) for v in r.tokens.values()).count("<|im_start|>") == 3


@pytest.mark.model
def test_model_target_nll_and_knockout(smollm):
    good = R.run({"segments": [{"name": "p", "text": PROMPT}, {"name": "t", "text": " Paris", "role": "target"}]},
                      smollm, attentions=False)
    bad = R.run({"segments": [{"name": "p", "text": PROMPT}, {"name": "t", "text": " Tokyo", "role": "target"}]},
                     smollm, attentions=False)
    assert good.target_nll["t"]["mean"] + 2 < bad.target_nll["t"]["mean"]
    ko = R.knockout({"segments": [{"name": "p", "text": "The capital of"}, {"name": "c", "text": " France"},
                                       {"name": "l", "text": " is"}]}, q="l", k="c", window=10, model=smollm)
    assert len(ko.windows) == 21 and ko.token.strip() == "Paris"
    assert min(ko.deltas) < -0.05  # blocking is -> France somewhere in depth hurts " Paris"


def test_kv_check_probes_one_layer_per_distinct_mask():
    """Layers 5 and 6 share a rule, layers 0 and 6 another: layer 6 is the only one where both
    apply, and it is probed (the old probe set {0, firsts, max + 1} missed it)."""
    spec = Spec.load({"segments": [{"name": "a", "length": 3}, {"name": "g", "length": 2, "role": ["generate"]}],
                      "mask": {"overlays": [{"op": "or", "q": "a", "k": "g", "pattern": "full", "layers": [5, 6]},
                                            {"op": "and_not", "q": "a", "k": "g", "pattern": "full", "layers": [0, 6]}]}})
    layers = R.pipeline.distinct_layers(spec)
    keys = {spec.layer_key(l) for l in range(12)}
    assert len(layers) == len(keys) and {spec.layer_key(l) for l in layers} == keys and 6 in layers
