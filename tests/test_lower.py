"""The spec compiler (lower.py): the lowered, lookup-free mask_mod equals the dense mask on every
preset and on random specs (per-layer and per-head rules, other sizes, batches); its BlockMask
equals torch's create_block_mask; sizes change tensor values, not the expression."""
import glob

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import FAST, specs
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from maskstudio import Spec, SpecError, expr
from reference import mask_mod as table_mask_mod  # the tests' oracle (tests/reference.py)
from maskstudio.lower import lower

PRESETS = sorted(glob.glob("presets/*.json"))


def sized(spec):
    missing = spec.unsized_segments()
    return spec.with_sizes({name: 5 for name in missing}) if missing else spec


def layers_of(spec):
    return sorted({x for layers in spec.layer_sets() for x in layers} | {0})[:3]


def assert_blocks_equal(ours, ref):
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    for name in ("kv_indices", "full_kv_indices", "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name  # the backward's too
    assert torch.equal(ours.to_dense(), ref.to_dense())


def scaled(spec, factor):
    """The preset at other sizes: every segment `factor` times longer (grids: every side).
    Explicit position ids cannot follow a resize, so those presets get sequential ones."""
    data = spec.to_dict()
    if data["positions"].get("scheme") == "explicit":
        data["positions"] = {"scheme": "sequential"}
        spec = Spec.load(data)
    sizes = {}
    for seg in spec.segments:
        if "attrs" in seg or "frames" in seg:
            continue
        sizes[seg["name"]] = [g * factor for g in seg["grid"]] if "grid" in seg else seg["length"] * factor
    return spec.with_sizes(sizes)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.split("/")[-1][:-5])
def test_lowered_equals_dense_on_every_preset(path):
    spec = sized(Spec.load(path))
    for layer in layers_of(spec):
        low = lower(spec, layer)
        for head in (range(3) if spec.varies_by_head else [0]):
            assert torch.equal(low.dense(head), spec.dense_mask(layer, head)), (layer, head)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.split("/")[-1][:-5])
def test_presets_at_sizes_they_do_not_ship_with(path):
    """Lowered once at the shipped size, used at 3x: equal to the resized spec's dense mask."""
    spec = sized(Spec.load(path))
    big = scaled(spec, 3)
    low = lower(spec).for_spec(big)
    assert torch.equal(low.dense(), big.dense_mask())
    assert low.n == big.n


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@FAST
@given(specs(), st.integers(0, 1), st.integers(0, 2))
def test_lowered_mask_mod_agrees_with_dense_under_vmap(raw, layer, head):
    spec = Spec.load(raw)
    n = spec.n
    ours = create_mask(lower(spec, layer).mask_mod, None, 3, n, n)[0, head]
    assert torch.equal(ours, spec.dense_mask(layer, head))


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@FAST
@given(specs(), st.sampled_from([4, 8]), st.integers(0, 1))
def test_lowered_block_mask_equals_create_block_mask(raw, block, layer):
    spec = Spec.load(raw)
    n = spec.n
    heads = 3 if spec.varies_by_head else 1
    low = lower(spec, layer)
    ours = low.block_mask(block_size=block, num_heads=heads)
    ref = create_block_mask(table_mask_mod(spec, layer), None, heads, n, n, device="cpu", BLOCK_SIZE=block)
    if ours.kv_num_blocks.shape[1] == 1 and heads > 1:  # the rules never switch on h at this layer
        ref = create_block_mask(table_mask_mod(spec, layer), None, 1, n, n, device="cpu", BLOCK_SIZE=block)
    assert_blocks_equal(ours, ref)


def grown(raw, extra):
    """The same structure with other sizes: `extra` tokens more per 1-D segment, one more row."""
    sizes = {}
    for seg in raw["segments"]:
        if "grid" in seg:
            sizes[seg["name"]] = [g + (1 if i == 0 else 0) for i, g in enumerate(seg["grid"])]
        else:
            sizes[seg["name"]] = seg["length"] + extra
    return sizes


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@FAST
@given(specs(), st.integers(0, 5), st.integers(0, 2))
def test_batches_of_layouts_equal_each_layout(raw, extra, head):
    """Two size assignments of one spec as ONE batched mask: each row equals its own layout."""
    spec = Spec.load(raw)
    other = spec.with_sizes(grown(raw, extra))
    batch = lower(spec).batch([spec, other])
    n = batch.n
    dense = create_mask(batch.mask_mod, 2, 3, n, n)
    for b, sp in enumerate([spec, other]):
        m = sp.n
        assert torch.equal(dense[b, head, :m, :m], sp.dense_mask(0, head))
        assert not dense[b, head, m:].any() and not dense[b, head, :, m:].any()  # padding masked
    heads = 3 if spec.varies_by_head else 1
    ours = batch.block_mask(block_size=4, num_heads=heads)
    ref = create_block_mask(batch.mask_mod, 2, ours.kv_num_blocks.shape[1], n, n, device="cpu", BLOCK_SIZE=4)
    assert_blocks_equal(ours, ref)


@FAST
@given(specs(), st.integers(0, 5), st.integers(0, 40), st.integers(0, 40), st.sampled_from([4, 8, 16]))
def test_static_capacity_builds_are_exact_or_say_they_overflowed(raw, extra, cap, cap_left, block):
    """The CUDA-graph build runs with fixed rooms for undecided tiles and for those the probe
    leaves (no host sync): with room enough it equals the exact build, bit for bit; short of room
    its counts say so."""
    from maskstudio.lower_blocks import token_stage as _token_stage, block_states

    spec = Spec.load(raw)
    batch = lower(spec).batch([spec, spec.with_sizes(grown(raw, extra))])
    heads = [torch.tensor(h) for h in range(3 if batch.uses_head else 1)]
    stage = _token_stage(batch, block, compiled=False)
    args = (batch, batch.params, dict(batch.tables), block, batch.n, heads, stage)
    full, partial, count = block_states(*args)
    s_full, s_partial, s_count = block_states(*args, capacity=(cap, cap_left))
    assert int(s_count[0]) == int(count[0])
    if cap >= int(count[0]):
        assert int(s_count[1]) == int(count[1])
        if cap_left >= int(count[1]):
            assert torch.equal(s_full, full) and torch.equal(s_partial, partial)
    # fewer tiles than slots, or exactly as many: tight rooms are exact too
    t_full, t_partial, _ = block_states(*args, capacity=tuple(int(c) for c in count))
    assert torch.equal(t_full, full) and torch.equal(t_partial, partial)


def test_sizes_change_values_not_the_expression():
    spec = Spec.load("presets/multiverse.json")
    low = lower(spec)
    other = low.for_sizes({"path1": 40, "prefix": 3})
    assert other.root is low.root and other.structure_key == low.structure_key
    assert not torch.equal(other.params, low.params)
    video = Spec.load("presets/nfd.json")
    a, b = lower(video), lower(video).for_sizes({"video": [9, 5, 7]})
    assert a.structure_key == b.structure_key
    assert expr.source(a.root) == "(_div(kv, P[('hw', 0)]) <= _div(q, P[('hw', 0)]))"


def test_new_sizes_reuse_the_walked_expression_and_padding_does_not():
    """A training loop builds a mask per step at new sizes: the tape, the guarded expression and
    its text are carried over (not re-walked); a padded or batched variant guards differently and
    walks its own. The same device, named with or without an index, is not a copy."""
    low = lower(Spec.load("presets/multiverse.json"))
    _ = low.mask_mod, low.uses_head
    other = low.for_sizes({"path1": 40, "prefix": 3})
    assert other.steps is low.steps and other.text is low.text and other.guarded is low.guarded
    assert torch.equal(other.dense(), other.spec.dense_mask())
    padded, batched = low.padded_to(True), low.batch([{"path1": 40}, {}])
    for variant in (padded, batched):
        assert variant.steps is not low.steps and "start" in variant.text
    assert low.on("cpu") is low
    if torch.cuda.is_available():
        on = low.on("cuda")
        assert on.on("cuda") is on and on.on(f"cuda:{torch.cuda.current_device()}") is on


@FAST
@given(st.integers(-(1 << 21) + 1, (1 << 21) - 1), st.integers(1, 1 << 22))
def test_float_quotient_division_is_exact_below_its_bound(a, d):
    """Divisions by a size run through a float32 quotient and one correction (GPUs have no integer
    divider); exact for every dividend below FAST_DIVIDEND, negative ones included."""
    x = torch.tensor([a, -a, a // 2, a - 1], dtype=torch.int32)
    assert torch.equal(expr.floordiv_by_size(x, torch.tensor(d, dtype=torch.int32)), x // d)


def test_large_layouts_keep_exact_division():
    """Dividends that can reach FAST_DIVIDEND (a 1,500 x 1,500 image) keep `//`; a small lowering
    asked for those sizes is lowered again rather than reused."""
    def cca(side):
        return Spec.load({"segments": [{"name": "t", "length": 7},
                                       {"name": "img", "modality": "image", "grid": [side, side]}],
                          "mask": {"rules": [{"q": "img", "k": "img", "pattern": "block_causal", "by": "ring"}]}},
                         max_tokens=1 << 22)
    small, big = lower(cca(40)), cca(1500)
    assert "fdiv" in {nd.op for nd in expr.nodes(small.root)}
    for low in (lower(big), small.for_spec(big), small.batch([cca(40), big])):
        ops = {nd.op for nd in expr.nodes(low.root)}
        assert "floordiv" in ops and "fdiv" not in ops


def test_sizes_never_change_the_kernel():
    """A window between segments: all-allowed when `a` has one token, partly allowed when long.
    Nothing is folded by size, so both use the same expression and stay exact."""
    spec = Spec.from_json('{"name": "t", "segments": [{"name": "a", "modality": "text", "length": 4},'
                          '{"name": "b", "modality": "text", "length": 4}], "mask": {"base": {"pattern":'
                          ' "causal"}, "rules": [{"q": "b", "k": "a", "pattern": "window", "size": 3,'
                          ' "causal": false}]}}')
    low = lower(spec)
    for size in (1, 40):
        other = low.for_sizes({"a": size})
        assert other.structure_key == low.structure_key
        assert torch.equal(other.dense(), spec.with_sizes({"a": size}).dense_mask())


def test_no_lookups_for_closed_form_attributes():
    for path in ["presets/multiverse.json", "presets/cca.json", "presets/nfd.json", "presets/streaming_llm.json",
                 "presets/tc_llava.json", "presets/vid_gpt.json", "presets/omnitokenizer_window.json"]:
        assert lower(Spec.load(path)).uses_lookups() == [], path
    assert lower(Spec.load("presets/ancat.json")).uses_lookups() == ["lookahead"]  # per-token data


def test_products_of_sizes_switch_to_int64():
    low = lower(Spec.load("presets/video_ccam.json"))
    assert low.params.dtype == torch.int64
    assert lower(Spec.load("presets/nfd.json")).params.dtype == torch.int32


def test_padding_masks_keys_and_queries_past_the_end():
    spec = Spec.load("presets/prefix_lm.json")
    low = lower(spec)
    n = spec.n
    bm = low.block_mask(block_size=8, length=n + 13)
    dense = bm.to_dense()
    assert bm.seq_lengths == (n + 13, n + 13)
    full = create_mask(low.padded_to().mask_mod, None, 1, n + 13, n + 13)[0, 0]
    assert torch.equal(full[:n, :n], spec.dense_mask()) and not full[n:].any() and not full[:, n:].any()
    ref = create_block_mask(low.padded_to().mask_mod, None, 1, n + 13, n + 13, device="cpu", BLOCK_SIZE=8)
    assert torch.equal(dense, ref.to_dense())


def test_other_designs_are_refused_with_a_message():
    low = lower(Spec.load("presets/multiverse.json"))
    with pytest.raises(SpecError, match="same segments and rules"):
        low.for_spec(Spec.load("presets/prefix_lm.json"))
    with pytest.raises(ValueError, match="shorter"):
        low.block_mask(block_size=8, length=3)


def test_symbolic_values_refuse_python_truth():
    with pytest.raises(TypeError, match="truth value"):
        bool(expr.var("q") < 3)


class _Layer:
    def __init__(self, idx):
        self.layer_idx = idx


@pytest.mark.parametrize("mask, kernel", [({}, "causal"), ({"base": {"pattern": "full"}}, "full"),
                                          ({"rules": [{"q": "b", "k": "a", "pattern": "full"}]}, None)])
def test_plain_causal_and_full_layers_run_sdpa_on_the_flex_backend(mask, kernel):
    """A layer whose lowered mask is exactly kv <= q (or all true) runs transformers' SDPA on the flex
    backend: no BlockMask is built, and the output equals the eager rows of the same mask (GQA heads,
    a length off the block grid); any other mask still runs FlexAttention."""
    from maskstudio.run.attention import MaskContext, masked_attention

    spec = Spec.load({"segments": [{"name": "a", "length": 90}, {"name": "b", "length": 110}], "mask": mask})
    assert spec.lowered(0).dense_kernel == kernel
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 200, 16), torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    layer = _Layer(0)
    layer.num_key_value_groups = 2
    outs = {}
    for backend in ("eager", "flex"):
        ctx = MaskContext(spec, 4, backend, record=False)
        outs[backend], _ = masked_attention(layer, q, k, v, None, maskstudio=ctx)
        if backend == "flex":
            assert bool(ctx._blocks) == (kernel is None)
    assert torch.allclose(outs["eager"], outs["flex"], atol=1e-5)


def test_a_causal_layer_without_known_head_groups_stays_on_flex():
    """Grouped key heads on a module that does not say its group size (no num_key_value_groups):
    SDPA could not repeat the key heads, so the causal layer runs FlexAttention, equal to eager."""
    from maskstudio.run.attention import MaskContext, masked_attention

    spec = Spec.load({"segments": [{"name": "a", "length": 200}]})
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 200, 16), torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    outs = {}
    for backend in ("eager", "flex"):
        ctx = MaskContext(spec, 4, backend, record=False)
        outs[backend], _ = masked_attention(_Layer(0), q, k, v, None, maskstudio=ctx)
    assert ctx._blocks
    assert torch.allclose(outs["eager"], outs["flex"], atol=1e-5)


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.integers(0, 1))
def test_runner_eager_and_flex_attention_agree_on_random_specs(raw, layer):
    """The runner's two attention paths on one random spec (per-layer / per-head rules; flex pads to
    a bucket and runs the lowered mask): equal outputs, rows that see nothing give zeros."""
    from maskstudio.run.attention import MaskContext, masked_attention

    spec = Spec.load(raw)  # (12 examples: CPU FlexAttention traces each new mask_mod, ~0.7 s)
    n, heads = spec.n, 3
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 16) for _ in range(3))
    outs = {}
    for backend in ("eager", "flex"):
        ctx = MaskContext(spec, heads, backend, record=False)
        outs[backend], _ = masked_attention(_Layer(layer), q, k, v, None, maskstudio=ctx)
    assert torch.allclose(outs["eager"], outs["flex"], atol=1e-5)


@pytest.mark.slow
def test_compiled_kernel_is_reused_for_new_sizes_and_recompiled_for_a_new_length():
    """torch.compile(flex_attention, dynamic=False) on the lowered mask: other segment sizes at the
    same (padded) length reuse the kernel (0 new graphs); a new length compiles once more."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    spec = Spec.load("presets/multiverse.json").with_sizes({"path1": 300, "conclusion": 100})
    low = lower(spec).padded_to()

    def graphs_after(sizes, length):
        other = low.for_sizes(sizes)
        q = torch.randn(1, 2, length, 16)
        out = flex(q, q, q, block_mask=other.block_mask(128, length=length))
        assert out.shape == q.shape
        return counters["stats"]["unique_graphs"]

    first = graphs_after({"path1": 200}, 512)
    assert graphs_after({"path1": 250, "prefix": 40}, 512) == first  # new sizes, same length: reused
    assert graphs_after({"conclusion": 7}, 512) == first
    assert graphs_after({"path1": 600}, 1024) == first + 1  # a new length: one new kernel
    assert low.for_sizes({"path1": 600}).structure_key == low.structure_key


@pytest.mark.slow
def test_compiled_build_compiles_without_fallback_and_equals_the_exact_build(monkeypatch):
    """knobs.COMPILE_BUILD: the whole static build through torch.compile (it compiled: the cached
    build is the compiled one, not the eager fallback) equals the exact build, also at new sizes."""
    import torch._dynamo

    from maskstudio import knobs, lower_blocks

    monkeypatch.setattr(knobs, "COMPILE_BUILD", True)
    torch._dynamo.utils.counters.clear()
    for path, resized in [("presets/cca.json", {"image": [6, 6], "prefix": 32}),
                         ("presets/multiverse.json", {"path1": 10, "path2": 8})]:
        spec = Spec.load(path)
        low = lower(spec)
        assert_blocks_equal(low.block_mask(8, "cpu", graph=True), low.block_mask(8, "cpu"))
        entry = next(reversed(lower_blocks._GRAPHS.values()))
        assert hasattr(entry.build, "_torchdynamo_orig_callable"), "fell back to the eager build"
        other = low.for_sizes(resized)  # same length: the compiled graph is replayed
        assert other.n == low.n
        assert_blocks_equal(other.block_mask(8, "cpu", graph=True), other.block_mask(8, "cpu"))
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.slow
def test_compiled_block_builder_equals_create_block_mask():
    for path in ["presets/multiverse.json", "presets/cca.json", "presets/ancat.json"]:
        spec = Spec.load(path)
        low = lower(spec)
        ours = low.block_mask(8, compiled=True)
        ref = create_block_mask(table_mask_mod(spec), None, 1, spec.n, spec.n, device="cpu", BLOCK_SIZE=8)
        assert_blocks_equal(ours, ref)


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_layouts_of_many_segments_lower_to_the_table_form():
    """40 mixed segments with per-head rules: a closed form per segment pair would cost thousands
    of operations per score, so the layer lowers to the table form (attributes and segment
    selections read per token): one engine, equal to the dense mask, its BlockMask equal to
    create_block_mask's, and its size independent of the number of segments."""
    from maskstudio import knobs
    from maskstudio.run.attention import flex_block_mask

    def layout(count):
        segs = [{"name": f"s{i}", "modality": "image", "grid": [2, 3]} if i % 2 else
                {"name": f"s{i}", "modality": "text", "length": 3, "branch": f"b{i % 3}"} for i in range(count)]
        return Spec.load({"segments": segs, "mask": {"base": {"pattern": "causal"}, "rules": [
            {"q": "modality:image", "k": "modality:image", "pattern": "block_causal", "by": "ring", "heads": [1]},
            {"q": ["s3", "s4"], "k": "s0", "pattern": "none"}],
            "overlays": [{"op": "and", "pattern": "branch_isolated"},
                         {"op": "or", "q": "s5", "k": "*", "pattern": "block_causal", "by": "chunk", "size": 2}]}})

    spec = layout(40)
    assert len(spec.segments) > knobs.LOWER_MAX_SEGMENTS
    low = spec.lowered(0)
    assert low.form == "tables" and low.tables and len(low.steps) < 80
    assert len(layout(80).lowered(0).steps) == len(low.steps)  # size free of the segment count
    n = spec.n
    for h in (0, 1):
        assert torch.equal(create_mask(spec.mask_mod(), None, 2, n, n)[0, h], spec.dense_mask(0, h))
        assert torch.equal(low.dense(h), spec.dense_mask(0, h))
    bm, length = flex_block_mask(spec, 0, 2, "cpu")
    assert length == 256 > n and getattr(bm.mask_mod, "lowered", False)
    ref = create_block_mask(low.padded_to(length=length).mask_mod, None, 2, length, length, device="cpu")
    assert_blocks_equal(bm, ref)
    small = lower(Spec.load("presets/multiverse.json"))
    assert not small.too_big and small.form == "closed" and not small.tables
    mid = Spec.load({"segments": spec.segments[:30], "mask": spec.mask})  # few segments, too many nodes
    assert lower(mid).too_big and mid.lowered(0).form == "tables"
    assert torch.equal(create_mask(mid.mask_mod(), None, 2, mid.n, mid.n)[0, 1], mid.dense_mask(0, 1))


def test_a_design_compiles_its_first_layouts_sizes_in_then_reads_sizes_at_run_time(monkeypatch):
    """Spec.mask_mod / Spec.block_mask hold the first knobs.SIZES_IN_KERNEL layouts' sizes as Python
    constants (hand-written speed, a kernel each), and those layouts again; a later layout gets the
    mask_mod that reads sizes from a tensor (one kernel for all of them); a batch always reads them.
    Either way the mask is the spec's, and an explicit sizes_in_kernel wins."""
    from maskstudio import knobs, lower as lowering

    monkeypatch.setattr(knobs, "SIZES_IN_KERNEL", 2)
    monkeypatch.setattr(lowering, "_COMPILED_IN", {})
    spec = Spec.load("presets/cca.json")
    layouts = [spec.with_sizes({"image": [side, side]}) for side in (4, 5, 6)]
    fixed = [sp.block_mask(block_size=16).mask_mod.sizes_in_kernel for sp in layouts + layouts[:1]]
    assert fixed == [True, True, False, True]
    assert [sp.mask_mod().sizes_in_kernel for sp in layouts] == [True, True, False]
    assert not layouts[0].mask_mod(sizes_in_kernel=False).sizes_in_kernel
    assert layouts[2].block_mask(block_size=16, sizes_in_kernel=True).mask_mod.sizes_in_kernel
    other = Spec.load("presets/multiverse.json")  # another design has its own count
    assert other.mask_mod().sizes_in_kernel
    for sp in layouts:
        for mm in (sp.mask_mod(sizes_in_kernel=True), sp.mask_mod(sizes_in_kernel=False)):
            assert torch.equal(create_mask(mm, None, None, sp.n, sp.n)[0, 0], sp.dense_mask())
    batch = lower(spec).batch([{"image": [4, 4]}, {"image": [5, 5]}])
    assert not lowering.compiles_sizes_in(batch)
    with pytest.raises(ValueError, match="layouts: a batch reads its sizes at run time"):
        batch.fixed_mask_mod
    seen = {}
    assert [lowering.claims_a_kernel(seen, "d", x, 2) for x in "abcab"] == [True, True, False, True, True]
    monkeypatch.setattr(lowering, "LOWERED_KEPT", 2)  # designs remembered: bounded, the oldest forgotten
    assert Spec.load("presets/prefix_lm.json").mask_mod().sizes_in_kernel and len(lowering._COMPILED_IN) == 2
    assert layouts[2].mask_mod().sizes_in_kernel  # CCA was forgotten: its count starts again


@pytest.mark.slow
def test_sizes_compiled_in_cost_one_kernel_per_layout_until_the_run_time_kernel_takes_over(monkeypatch):
    """torch.compile(flex_attention, dynamic=False) at one length: the first layout (sizes compiled
    in) compiles a kernel, the next compiles the kernel that reads sizes, which every later layout
    reuses (0 new graphs); outputs equal attention under the dense mask."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from maskstudio import knobs, lower as lowering

    monkeypatch.setattr(knobs, "SIZES_IN_KERNEL", 1)
    monkeypatch.setattr(lowering, "_COMPILED_IN", {})
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    base = Spec.load("presets/cca.json")
    graphs = []
    for side, prefix in ((6, 10), (5, 21), (4, 30)):
        sp = base.with_sizes({"image": [side, side], "prefix": prefix})
        q = torch.randn(1, 2, sp.n, 16)
        out = flex(q, q, q, block_mask=sp.block_mask(block_size=16))
        additive = torch.zeros(sp.n, sp.n).masked_fill(~sp.dense_mask(), float("-inf"))
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=additive)
        assert torch.allclose(out, ref, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0] + 1 and graphs[2] == graphs[1]


def test_grid_tables_form_reads_grid_coordinates_instead_of_dividing():
    """Form "grid tables": CCA's ring comes from a per-token table (no division by a size per score),
    text segments stay closed-form, the mask is unchanged; an unknown form names the choices."""
    spec = Spec.load("presets/cca.json")
    closed, grid = lower(spec), lower(spec, form="grid tables")
    assert "_div" in closed.text and "_div" not in grid.text and "ring[kv]" in grid.text
    assert [k for k, _ in grid.tables] == ["ring"] and grid.form == "grid tables"
    assert torch.equal(grid.dense(0), spec.dense_mask())
    with pytest.raises(ValueError, match="form: 'rows' is not one of closed, grid tables, tables"):
        lower(spec, form="rows")


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@FAST
@given(specs(), st.integers(0, 1), st.integers(0, 2), st.sampled_from([4, 8]), st.sampled_from(["tables", "grid tables"]))
def test_table_forms_equal_the_dense_mask_on_random_specs(raw, layer, head, block, form):
    """The table forms on random designs (every attribute a lookup, what layouts of many segments
    lower to; grid coordinates only, no division per score): mask_mod and BlockMask equal the
    dense mask and create_block_mask."""
    spec = Spec.load(raw)
    low = lower(spec, layer, form=form)
    n = spec.n
    assert torch.equal(low.dense(head), spec.dense_mask(layer, head))
    ours = low.block_mask(block, num_heads=3 if low.uses_head else None)
    ref = create_block_mask(low.mask_mod, None, ours.kv_num_blocks.shape[1], n, n, device="cpu", BLOCK_SIZE=block)
    assert_blocks_equal(ours, ref)


def assert_document_mask(packed, docs, head):
    """Each document's block of the packed mask equals its own dense mask, nothing crosses
    documents or reaches the padding, and the device BlockMask equals create_block_mask's."""
    n = len(packed.doc)
    dense = create_mask(packed.mask_mod, None, 3, n, n)[0, head].clone()
    start = 0
    for sp in docs:
        end = start + sp.n
        assert torch.equal(dense[start:end, start:end], sp.dense_mask(0, head))
        dense[start:end, start:end] = False
        start = end
    assert not dense.any()
    ours = packed.block_mask(4, num_heads=3 if packed.low.uses_head else None)
    ref = create_block_mask(packed.mask_mod, None, ours.kv_num_blocks.shape[1], n, n, device="cpu", BLOCK_SIZE=4)
    assert_blocks_equal(ours, ref)


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@FAST
@given(specs(), st.integers(0, 5), st.integers(0, 7), st.integers(0, 2))
def test_packed_layouts_are_a_document_mask(raw, extra, pad, head):
    """Two layouts of one random design packed into one row (+ padding)."""
    from maskstudio.lower_packed import pack

    spec = Spec.load(raw)
    layouts = [spec, spec.with_sizes(grown(raw, extra))]
    assert_document_mask(pack(lower(spec), layouts, length=sum(s.n for s in layouts) + pad), layouts, head)


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@FAST
@given(specs(), specs(), st.integers(0, 5), st.integers(0, 7), st.integers(0, 2))
def test_documents_of_different_designs_pack_into_one_row(raw_a, raw_b, extra, pad, head):
    """Documents of two random designs (and a resized copy of the first) in one row."""
    from maskstudio.lower_packed import pack_designs

    a, b = Spec.load(raw_a), Spec.load(raw_b)
    docs = [a, b, a.with_sizes(grown(raw_a, extra))]
    assert_document_mask(pack_designs(docs, length=sum(s.n for s in docs) + pad), docs, head)


def test_packing_refuses_other_designs_and_overflow():
    from maskstudio.lower_packed import pack

    low = lower(Spec.load("presets/multiverse.json"))  # API misuse: ValueError (SpecError is for spec paths)
    with pytest.raises(ValueError, match="same|design") as err:
        pack(low, [Spec.load("presets/prefix_lm.json")])
    assert not isinstance(err.value, SpecError)
    with pytest.raises(ValueError, match="do not fit"):
        pack(low, [{}, {}], length=10)
    with pytest.raises(ValueError, match="document slots"):
        pack(low, [{}, {}, {}], capacity=2)


def test_per_token_tables_and_spare_document_slots_pack():
    """Designs that read per-token attributes (ANCAT's attrs, frames lists) pack: their tables are
    laid along the row; spare document slots (capacity rounded up) hold no token."""
    from maskstudio.lower_packed import capacity_for, pack_designs

    ancat = Spec.load("presets/ancat.json")
    assert lower(ancat).tables
    frames = Spec.load({"segments": [{"name": "v", "modality": "text", "length": 6, "frames": [2, 4]},
                                     {"name": "t", "modality": "text", "length": 3}],
                        "mask": {"base": {"pattern": "block_causal", "by": "frame"}}})
    docs = [Spec.load("presets/multiverse.json"), ancat, frames, ancat]
    assert [capacity_for(d) for d in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    packed = pack_designs(docs, length=sum(s.n for s in docs) + 5, capacity=capacity_for(len(docs) + 1))
    assert packed.documents == 8 and packed.n == sum(s.n for s in docs)
    assert_document_mask(packed, docs, 0)


def test_constant_grids_fold_the_sides_and_stay_exact():
    """CCA with its image sides compiled in: no division by a size from P, equal to the dense mask;
    other text lengths reuse it, another image size lowers afresh, batches must keep the sides."""
    spec = Spec.load("presets/cca.json")
    low = lower(spec).with_constant_grids()
    assert ("w", 1) not in low.keys and low.baked
    text = expr.source(low.root)
    assert "P[('w', 1)]" not in text and "// 8" in text
    assert torch.equal(low.dense(), spec.dense_mask())
    longer = low.for_sizes({"suffix": 30})
    assert longer.structure_key == low.structure_key and torch.equal(longer.dense(), spec.with_sizes({"suffix": 30}).dense_mask())
    other = low.for_sizes({"image": [5, 7]})
    assert other.structure_key != low.structure_key and torch.equal(other.dense(), spec.with_sizes({"image": [5, 7]}).dense_mask())
    with pytest.raises(ValueError, match="grid sides compiled in"):
        low.batch([{}, {"image": [5, 7]}])
    assert low.batch([{}, {"suffix": 9}]).block_mask(8).shape[0] == 2


def int32_dense(mask_mod, n, head=0):
    """The mask_mod on int32 index grids, as FlexAttention's GPU kernel hands them."""
    idx = torch.arange(n, dtype=torch.int32)
    zero = torch.tensor(0, dtype=torch.int32)
    return mask_mod(zero, torch.tensor(head, dtype=torch.int32), idx[:, None], idx[None, :]).expand(n, n)


@FAST
@given(specs(), st.integers(0, 2))
def test_lowered_mask_mod_is_exact_on_int32_indices(raw, head):
    spec = Spec.load(raw)
    assert torch.equal(int32_dense(lower(spec).mask_mod, spec.n, head), spec.dense_mask(0, head))


@pytest.mark.parametrize("step", [{"pattern": "lookahead", "size": 2 ** 31 - 1},
                                  {"pattern": "window", "size": 2 ** 31 - 1, "causal": False},
                                  {"pattern": "chunked", "chunk": 2 ** 31 - 1, "lookahead": 2 ** 31 - 1},
                                  {"pattern": "first", "size": -(2 ** 31 - 1)}])
def test_huge_numbers_never_overflow_int32_indices(step, tmp_path):
    """Constants near the int32 range switch the kernel to int64 (indices widened first): the
    lowered, packed and exported masks stay exact on int32 indices."""
    import runpy

    from maskstudio.export import flex_code
    from maskstudio.lower_packed import pack

    spec = Spec.load({"segments": [{"name": "a", "length": 20}, {"name": "b", "modality": "image", "grid": [3, 3]}],
                      "mask": {"base": step}})
    low = lower(spec)
    assert low.params.dtype == torch.int64 or low.root.is_const  # (first < -huge folds to False)
    assert torch.equal(int32_dense(low.mask_mod, spec.n), spec.dense_mask())
    packed = pack(low, [spec, spec])
    both = torch.block_diag(spec.dense_mask(), spec.dense_mask())
    assert torch.equal(int32_dense(packed.mask_mod, 2 * spec.n), both)
    path = tmp_path / "huge.py"
    path.write_text(flex_code(spec))
    ns = runpy.run_path(str(path))
    assert torch.equal(int32_dense(ns["mask_mod_for"](None), spec.n), spec.dense_mask())


def test_static_build_index_tensors_start_at_16_byte_boundaries():
    """The graph build hands out views of one buffer: each index tensor must start 16-byte aligned
    (compiled kernels specialise on aligned pointers, and copy or recompile for others)."""
    spec = Spec.load("presets/multiverse.json")
    bm = lower(spec).block_mask(4, "cpu", graph=True)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert getattr(bm, name).data_ptr() % 16 == 0, name
    assert_blocks_equal(bm, lower(spec).block_mask(4, "cpu"))


def test_unravel_equals_torch_unravel_index():
    """The build's own unravel (CUDA-graph capturable: no strides copied from the host)."""
    from maskstudio.lower_blocks import unravel

    flat = torch.arange(2 * 3 * 5 * 7)
    assert torch.equal(unravel(flat, (2, 3, 5, 7)), torch.stack(torch.unravel_index(flat, (2, 3, 5, 7)), 1))


@FAST
@given(specs(), st.integers(0, 9))
def test_exported_dividend_bound_covers_every_division(tmp_path_factory, raw, extra):
    """The exported file's bound on |dividend| (plain Python on its P and n, which picks the float
    quotient) is never below the interval analysis' exact-range bound of any division by a size."""
    import runpy

    from maskstudio.export import flex_code
    from maskstudio.lower import _division_bounds

    spec = Spec.load(raw).with_sizes(grown(raw, extra))
    low = lower(spec)
    sized = {nd for nd in expr.nodes(low.root) if expr.divides_by_size(nd)}
    exact = _division_bounds(expr.with_fast_divisions(low.root, sized), low.keys, [spec]).values()
    path = tmp_path_factory.mktemp("div") / "exported.py"
    path.write_text(flex_code(spec))
    ns = runpy.run_path(str(path))
    bound = ns["_variant"](0)[2](ns["params_for"](None)[0].tolist(), spec.n)
    assert bound >= max(exact, default=0)


@FAST
@given(specs(), st.integers(0, 9))
def test_graph_path_replays_at_new_sizes_stay_exact_on_cpu(raw, extra):
    """The cached-graph path (off CUDA: the same static build, cached per structure and length,
    its rooms sized by the first build): replays at new sizes and in batches equal the exact build."""
    spec = Spec.load(raw)
    low = lower(spec)
    heads = 3 if low.uses_head else None
    for one in (low, low.for_spec(spec.with_sizes(grown(raw, extra))), low.batch([spec, spec.with_sizes(grown(raw, extra))])):
        assert_blocks_equal(one.block_mask(4, "cpu", num_heads=heads, graph=True),
                            one.block_mask(4, "cpu", num_heads=heads))


def test_graph_path_recaptures_when_a_room_overflows():
    """At one padded length, a layout with more undecided tiles than the first one's rooms held is
    rebuilt with bigger rooms (never a silently truncated mask)."""
    from maskstudio import lower_blocks

    spec = Spec.load("presets/cca.json")
    low = lower(spec).padded_to()
    small = low.for_sizes({s["name"]: ([2, 2] if "grid" in s else 2) for s in spec.segments})
    big = low.for_sizes({s["name"]: ([9, 9] if "grid" in s else 9) for s in spec.segments})
    assert_blocks_equal(small.block_mask(4, "cpu", length=160, graph=True), small.block_mask(4, "cpu", length=160))
    rooms = [e.capacity for e in lower_blocks._GRAPHS.values()][-1]
    assert_blocks_equal(big.block_mask(4, "cpu", length=160, graph=True), big.block_mask(4, "cpu", length=160))
    grown_rooms = [e.capacity for e in lower_blocks._GRAPHS.values()][-1]
    assert grown_rooms[0] > rooms[0]


def test_a_compiled_build_that_fails_or_differs_warns_and_keeps_the_eager_build(monkeypatch):
    """knobs.COMPILE_BUILD never costs a build: a compiler error or a compiled result that differs
    from the eager one leaves the eager build in place, with a warning naming the cause."""
    from maskstudio import lower_blocks

    def eager():
        return torch.arange(4), []

    def broken(fn, dynamic=False):
        def run():
            raise RuntimeError("no backend here\nsecond line")
        return run

    def wrong(fn, dynamic=False):
        return lambda: (torch.zeros(4, dtype=torch.int64), [])

    fallback = lambda: eager()  # noqa: E731
    for fake, cause in [(broken, "RuntimeError: no backend here"), (wrong, "differs")]:
        monkeypatch.setattr(torch, "compile", fake)
        with pytest.warns(RuntimeWarning, match=cause):
            assert lower_blocks._compiled_build(eager, fallback=fallback) is fallback
        with pytest.warns(RuntimeWarning):
            assert lower_blocks._compiled_build(eager) is eager
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=False: lambda: (torch.arange(4), []))
    assert lower_blocks._compiled_build(eager) is not eager  # an equal compiled build is taken


def test_mask_mods_are_named_after_the_design_and_layer(tmp_path):
    """Compile logs and profiles say which design a kernel is: mask_<spec>_L<layer>, in the
    library and in the exported file."""
    import importlib.util

    from maskstudio.export import export_bytes
    from maskstudio.lower_packed import pack_designs

    spec = Spec.load({"name": "Video: block-causal (8 frames)!", "segments": [{"name": "a", "length": 4}],
                      "mask": {"base": {"pattern": "causal"},
                               "rules": [{"q": "*", "k": "*", "pattern": "full", "layers": [2]}]}})
    assert spec.mask_mod(0).__name__ == "mask_video_block_causal_8_frames_L0"
    assert spec.mask_mod(2).__name__ == "mask_video_block_causal_8_frames_L2"
    assert pack_designs([spec, spec]).mask_mod.__name__ == "mask_packed_video_block_causal_8_frames"
    assert Spec.load({**spec.to_dict(), "name": "<>"}).mask_mod(0).__name__ == "mask_spec_L0"
    path = tmp_path / "exported.py"
    path.write_bytes(export_bytes(spec, "flex"))
    module_spec = importlib.util.spec_from_file_location("exported", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert module.mask_mod_for(None, layer=2).__name__ == "mask_video_block_causal_8_frames_L2"


def test_block_mask_has_the_heads_asked_for_even_when_a_head_step_changes_nothing():
    """A head-restricted step with no effect (causal again on head 1 of a causal design) leaves the
    mask equal on every head; block_mask(num_heads=2) still has 2 heads, as create_block_mask(H=2)
    does."""
    spec = Spec.load({"segments": [{"name": "a", "length": 300}],
                      "mask": {"base": {"pattern": "causal"},
                               "rules": [{"q": "*", "k": "*", "pattern": "causal", "heads": [1]}]}})
    assert spec.varies_by_head and not spec.lowered(0).uses_head
    bm = spec.block_mask(128, num_heads=2)
    ref = create_block_mask(spec.mask_mod(), None, 2, spec.n, spec.n, device="cpu")
    assert bm.kv_num_blocks.shape[1] == 2
    assert_blocks_equal(bm, ref)
