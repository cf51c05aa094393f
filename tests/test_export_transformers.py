"""export --format transformers (#26 item 1): the generated module plugs the design into a
transformers model. Its masks for padded and packed batches of random designs at random sizes equal
the library's document mask (`lower_packed.DocumentRow`) at every layer and head; a tiny Llama on
the exported eager / sdpa path gives the logits of Mask Studio's own attention path, and really
masks (a hidden token changes nothing it must not reach; the model's own causal mask would let it);
a fresh interpreter with maskstudio blocked trains a step with it; bad input is one line."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_export_sizes import new_size, resizable_specs
from torch.nn.attention.flex_attention import create_block_mask

from maskstudio import Spec
from maskstudio.cli import main
from maskstudio.export import FORMATS, flex_code, transformers_code
from maskstudio.lower_packed import DocumentRow
from maskstudio.run.attention import ATTN_NAME, MaskContext, attn_impl, register
from maskstudio.train import tiny_lm

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
HEADS = 4


def load(code: str, folder, name="design_module"):
    """The generated module, imported from its file."""
    path = folder / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as a user's import: torch.compile re-imports a mask_mod's module
    spec.loader.exec_module(module)
    return module


def records() -> Spec:
    """kv_isolated_docs (records isolated from each other, shared start positions) with a layer-1
    rule and a head-1 overlay: per-layer and per-head masks."""
    d = json.loads((ROOT / "examples" / "kv_isolated_docs.json").read_text())
    d["name"] = "isolated records"
    d["mask"]["rules"] = [{"q": "question", "k": "question", "pattern": "full", "layers": [1]}]
    d["mask"]["overlays"].append({"op": "and_not", "q": "answer", "k": "instruction", "pattern": "full",
                                  "heads": [1]})
    return Spec.load(d)


@pytest.fixture(scope="module")
def code():
    return transformers_code(records())


@pytest.fixture(scope="module")
def design(code, tmp_path_factory):
    return load(code, tmp_path_factory.mktemp("design"))


def features(module, sizes_list, seed=0):
    """Examples of random token ids at these sizes (None: the shipped sizes)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for sizes in sizes_list:
        n = sum(module.segment_size(s) for s in module.layout_for(sizes))
        out.append({"input_ids": torch.randint(0, 200, (n,), generator=g).tolist(), "sizes": sizes})
    return out


def reference_rows(spec: Spec, feats, pack_tokens, module):
    """The library's DocumentRow of each collated row."""
    rows = module.pack_in_order([len(f["input_ids"]) for f in feats], pack_tokens)
    return [DocumentRow(tuple(spec.with_sizes(module._sizes_of(feats[i]["sizes"]) or {}) for i in row))
            for row in rows], rows


# ---------------------------------------------------------------- the file
def test_the_file_is_the_flex_export_plus_the_transformers_section(design):
    spec = Spec.load({"name": "prefix", "segments": [{"name": "p", "length": 3}, {"name": "t", "length": 2}],
                      "mask": {"rules": [{"q": "*", "k": "p", "pattern": "full", "layers": [1]}]}})
    code, flex = transformers_code(spec), flex_code(spec)
    body = flex[flex.index('\n"""\n') + 5:flex.rindex('\nif __name__ == "__main__":')]
    assert body in code  # the mask, sizes and positions keep their one definition
    assert code.endswith(flex[flex.rindex('\nif __name__ == "__main__":'):])
    assert "transformers" in FORMATS
    assert "import maskstudio" not in code and "from maskstudio" not in code
    assert design.register("sdpa") == "design_isolated_records_sdpa"


def test_a_name_with_flash_is_not_read_as_flash_attention(tmp_path):
    spec = Spec.load({"name": "flash attention demo", "segments": [{"name": "a", "length": 3}]})
    module = load(transformers_code(spec), tmp_path)
    assert "flash" not in module.register("eager")


# ---------------------------------------------------------------- masks: equal to the library's document mask
@st.composite
def batches(draw):
    """(spec dict, sizes of 1-4 examples, pack_tokens): random designs (grids, frames, branches,
    per-layer / per-head steps, per-token attrs, every position scheme) at random sizes."""
    raw = draw(resizable_specs())
    resizable = [s for s in raw["segments"] if "attrs" not in s]
    spec = Spec.load(raw)
    sizes = []
    for _ in range(draw(st.integers(1, 4))):
        chosen = draw(st.lists(st.sampled_from(resizable), max_size=2, unique_by=lambda s: s["name"])) \
            if resizable and "share" not in raw["positions"] and raw["positions"]["scheme"] != "explicit" else []
        one = {s["name"]: draw(new_size(s)) for s in chosen}
        try:
            spec.with_sizes(one)
        except ValueError:
            one = {}
        sizes.append(one or None)
    return raw, sizes, draw(st.sampled_from([0, 1, 40]))


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(batches())
def test_batches_equal_the_library_document_mask_and_positions(tmp_path_factory, case):
    raw, sizes, pack = case
    spec = Spec.load(raw)
    module = load(transformers_code(spec), tmp_path_factory.mktemp("prop"))
    feats = features(module, sizes)
    batch = module.Collator(pad_token_id=0, pack_tokens=pack)(feats)
    docs, rows = reference_rows(spec, feats, pack, module)
    length = batch["input_ids"].shape[1]
    for layer in ([0, 1, 2] if spec.varies_by_layer else [0]):
        dense = batch["design"].dense(layer, HEADS)
        for r, row in enumerate(docs):
            for h in range(HEADS):
                want = row.packed(layer, length=length).dense(h)
                assert torch.equal(dense[r, h % dense.shape[1]], want), (layer, r, h)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            want = spec.with_sizes(module._sizes_of(feats[i]["sizes"]) or {}).position_ids()
            got = batch["position_ids"][..., r, at:at + want.shape[-1]]
            assert torch.equal(got, want), (r, i)
            at += want.shape[-1]


def test_a_video_design_packs_at_new_sizes_as_the_library_does(tmp_path):
    """Images, a t-h-w video with block-causal frames, a branch, per-layer and per-head overlays and
    M-RoPE positions ([3, B, L]): three examples at other grid sizes, padded and packed."""
    from test_cli_export import SPEC

    spec = Spec.load(SPEC)
    module = load(transformers_code(spec), tmp_path)
    feats = features(module, [None, {"img": [2, 4], "video": [2, 3, 2]}, {"video": [3, 1, 1], "q": 2}])
    for pack in (0, 10_000):
        batch = module.Collator(pad_token_id=0, pack_tokens=pack)(feats)
        assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
        docs, rows = reference_rows(spec, feats, pack, module)
        for layer in (0, 1):
            dense = batch["design"].dense(layer, HEADS)
            for r, row in enumerate(docs):
                for h in range(HEADS):
                    want = row.packed(layer, length=batch["input_ids"].shape[1]).dense(h)
                    assert torch.equal(dense[r, h % dense.shape[1]], want), (pack, layer, r, h)
        if pack:  # one row: the examples' own position ids, one after another
            want = torch.cat([spec.with_sizes(f["sizes"] or {}).position_ids() for f in feats], -1)
            assert torch.equal(batch["position_ids"][:, 0, :want.shape[-1]], want)


def test_packed_labels_never_cross_examples(design):
    feats = features(design, [None, {"answer": 3}, {"doc0": 2}])
    for f in feats:
        f["labels"] = list(f["input_ids"])
    out = design.Collator(pad_token_id=7, pack_tokens=10_000)(feats)
    assert out["input_ids"].shape[0] == 1
    starts = [0, len(feats[0]["input_ids"]), len(feats[0]["input_ids"]) + len(feats[1]["input_ids"])]
    assert (out["labels"][0, starts] == -100).all()  # no example's first token is predicted from the previous one
    assert int((out["labels"] != -100).sum()) == sum(len(f["input_ids"]) - 1 for f in feats)
    assert out["position_ids"][0, starts].tolist() == [0, 0, 0]


# ---------------------------------------------------------------- a tiny Llama: the same logits, and it really masks
@pytest.fixture(scope="module")
def lm():
    return tiny_lm(layers=2, heads=HEADS)


def library_logits(lm, spec: Spec, ids: torch.Tensor) -> torch.Tensor:
    """Mask Studio's own attention path (run.attention, eager rows) for one example."""
    register()
    pos = spec.position_ids()
    with attn_impl(lm.model, ATTN_NAME), torch.no_grad():
        return lm.model(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                        **{ATTN_NAME: MaskContext(spec, HEADS, "eager", record=False)}).logits[0]


@pytest.mark.parametrize("backend, pack", [("eager", 10_000), ("sdpa", 0), pytest.param("eager", 0, marks=pytest.mark.slow),
                                           pytest.param("sdpa", 10_000, marks=pytest.mark.slow)])
def test_exported_path_gives_the_library_logits(design, lm, backend, pack):
    feats = features(design, [None, {"answer": 2, "doc1": 5}, {"question": 4}], seed=1)
    batch = design.Collator(pad_token_id=0, pack_tokens=pack)(feats)
    old = lm.model.config._attn_implementation
    design.use(lm.model, backend)
    try:
        with torch.no_grad():
            logits = lm.model(**batch).logits
    finally:
        lm.model.set_attn_implementation(old)
    rows = design.pack_in_order([len(f["input_ids"]) for f in feats], pack)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids = torch.tensor(feats[i]["input_ids"])
            want = library_logits(lm, records().with_sizes(feats[i]["sizes"] or {}), ids)
            torch.testing.assert_close(logits[r, at:at + len(ids)], want, atol=2e-5, rtol=1e-4)
            at += len(ids)


BLOCK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def assert_same_blocks(ours, theirs):
    for name in BLOCK_FIELDS:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


@pytest.mark.parametrize("pack", [0, 10_000])
def test_packed_block_mask_equals_create_block_mask(design, pack):
    """A batch's BlockMask (built band by band from the mask's rows, never L x L at once and never
    compiled) equals torch's create_block_mask over the same mask_mod: per layer, per head, on rows
    whose length is not a multiple of the block."""
    feats = features(design, [None, {"answer": 2, "doc1": 5}, {"question": 4}], seed=2)
    db = design.Collator(pad_token_id=0, pack_tokens=pack, pad_to_multiple_of=7)(feats)["design"]
    assert db.length % 16
    for layer in (0, 1):
        ours = db.block_mask(layer, HEADS, block_size=16)
        theirs = create_block_mask(ours.mask_mod, len(db.doc), HEADS, db.length, db.length, device="cpu",
                                   BLOCK_SIZE=16)
        assert_same_blocks(ours, theirs)


def test_block_mask_from_rows_in_bands_equals_create_block_mask():
    """The band builder on a random mask, one query block per band (a tiny chunk), several heads and
    rows, a length not a multiple of the block: torch's blocks, full blocks included."""
    from maskstudio.lower_blocks import block_mask_from_rows

    g = torch.Generator().manual_seed(0)
    table = torch.rand(2, 3, 70, 70, generator=g) < 0.5
    table[:, :, :40, :40] = True          # full blocks
    table[:, :, 50:, :] = False           # empty rows

    def mask_mod(b, h, q, k):
        return table[b, h, q, k]
    ours = block_mask_from_rows(lambda b, q: table[b][:, q], 2, 3, 70, mask_mod, "cpu", block_size=8, chunk=1)
    assert_same_blocks(ours, create_block_mask(mask_mod, 2, 3, 70, 70, device="cpu", BLOCK_SIZE=8))
    assert int(ours.full_kv_num_blocks.sum()) > 0


@pytest.mark.slow  # transformers compiles FlexAttention (inductor, CPU)
def test_flex_attention_path_gives_the_sdpa_logits_on_cpu(design, lm):
    """The flex_attention function (transformers' own compiled FlexAttention with the design's
    BlockMask) on a packed batch: the sdpa path's logits. Compiled FlexAttention on CPU once
    miscomputed `params[b, doc][..., slot]` in a mask_mod (0.6 off); the file indexes in one step."""
    feats = features(design, [None, {"answer": 2, "doc1": 5}], seed=3)
    batch = design.Collator(pad_token_id=0, pack_tokens=10_000, pad_to_multiple_of=128)(feats)
    n = sum(len(f["input_ids"]) for f in feats)
    try:
        with torch.no_grad():
            design.use(lm.model, "sdpa")
            want = lm.model(**batch).logits[0, :n]
            design.use(lm.model, "flex_attention")
            got = lm.model(**batch).logits[0, :n]
    finally:
        lm.model.set_attn_implementation("eager")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_exported_path_really_masks(design, lm, backend):
    """Counterfactual: changing record doc0 (and the packed neighbour) leaves doc1's logits as they
    were under the design (the records are isolated at every layer); under the model's own causal
    mask the same change moves them, so the equality is the mask's doing."""
    feats = features(design, [None, None], seed=2)
    other = [dict(f) for f in feats]
    layout = design.layout_for(None)
    start = {s["name"]: sum(design.segment_size(x) for x in layout[:i]) for i, s in enumerate(layout)}
    doc0 = slice(start["doc0"], start["doc1"])
    doc1 = slice(start["doc1"], start["doc2"])
    other[0] = {**feats[0], "input_ids": list(feats[0]["input_ids"])}
    other[0]["input_ids"][doc0] = [(t + 1) % 200 for t in other[0]["input_ids"][doc0]]
    other[1] = {**feats[1], "input_ids": [(t + 3) % 200 for t in feats[1]["input_ids"]]}  # the packed neighbour
    old = lm.model.config._attn_implementation

    def logits(fs, impl):
        batch = design.Collator(pad_token_id=0, pack_tokens=10_000)(fs)
        lm.model.set_attn_implementation(impl)
        try:
            with torch.no_grad():
                if impl == design.register(backend):
                    return lm.model(**batch).logits[0]
                return lm.model(input_ids=batch["input_ids"]).logits[0]  # the model's own causal mask
        finally:
            lm.model.set_attn_implementation(old)
    mine = design.register(backend)
    a, b = logits(feats, mine), logits(other, mine)
    assert torch.equal(a[doc1], b[doc1])  # not a single bit moves
    assert not torch.allclose(a[doc0], b[doc0], atol=1e-4)  # the change itself is seen where allowed
    a, b = logits(feats, backend), logits(other, backend)
    assert not torch.allclose(a[doc1], b[doc1], atol=1e-4)


# ---------------------------------------------------------------- the CLI, a fresh interpreter, bad input
CHILD = r'''
import sys
class NoMaskStudio:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "maskstudio":
            raise ImportError("the exported module imported maskstudio")
sys.meta_path.insert(0, NoMaskStudio())
sys.path.insert(0, ".")
import torch
import design_attention as design
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
model = LlamaForCausalLM(cfg)
model.set_attn_implementation(design.register("eager"))
ex = [design.example({s: [5] * n for s, n in zip(design.SEGMENTS, [3, 2, 4])}, loss_on=["c"]),
      design.example({s: [6] * n for s, n in zip(design.SEGMENTS, [1, 5, 2])})]
loss = model(**design.Collator(pad_token_id=0, pack_tokens=64)(ex)).loss
loss.backward()
assert torch.isfinite(loss) and not [m for m in sys.modules if m.startswith("maskstudio")]
print("loss", float(loss))
'''


@pytest.mark.slow  # a fresh interpreter imports transformers (~10 s on a loaded machine)
def test_cli_export_trains_in_a_fresh_interpreter_without_maskstudio(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "prefix lm", "segments": [{"name": "a", "length": 3}, {"name": "b", "length": 2},
                                                                  {"name": "c", "length": 4}],
                                "mask": {"base": {"pattern": "causal"},
                                         "rules": [{"q": "*", "k": ["a", "b"], "pattern": "full", "layers": [0]}]}}))
    assert main(["export", str(spec), "--format", "transformers", "-o", str(tmp_path / "design_attention.py")]) == 0
    res = subprocess.run([sys.executable, "-I", "-c", CHILD], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("loss ")


@pytest.mark.parametrize("feature, message", [
    ({"input_ids": [1, 2]}, "has no 'sizes': the trainer dropped the column; set remove_unused_columns=False"),
    ({"input_ids": [1, 2], "sizes": None}, "example 0: sizes make 56 tokens, input_ids has 2"),
    ({"input_ids": [1] * 56, "sizes": [8, 8]}, "example 0: sizes: 2 values for 7 segments"),
    ({"input_ids": [1] * 56, "sizes": {"answer": 0}}, "example 0: sizes.answer: text segments take a length > 0"),
    ({"input_ids": [[1]], "sizes": None}, "example 0: input_ids must be a flat list of token ids"),
])
def test_bad_examples_get_one_line_naming_the_fix(design, feature, message):
    with pytest.raises(ValueError) as err:
        design.Collator()([feature])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_forward_without_the_collator_says_what_to_do(design, lm):
    design.use(lm.model, "eager")
    try:
        with pytest.raises(ValueError, match="no 'design' in the forward's inputs: feed the model this module's"):
            lm.model(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        lm.model.set_attn_implementation("eager")
