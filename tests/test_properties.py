"""Property tests: random valid specs agree across every backend; JSON round-trips exactly;
random invalid specs give one-line SpecErrors that name a path."""
import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from maskstudio import Spec, SpecError
import reference as comp  # the tests' oracle (tests/reference.py)
from maskstudio import knobs
from maskstudio.analysis import analyze
from maskstudio.patterns import PATTERNS, REQUIRED

ATTRS = ["index", "segment", "local", "frame", "t", "row", "col", "cell", "ring", "branch"]


@st.composite
def segment(draw, i):
    kind = draw(st.sampled_from(["text", "text", "image", "video", "special"]))
    seg = {"name": f"s{i}", "modality": kind}
    if kind == "image":
        seg["grid"] = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    elif kind == "video":
        seg["grid"] = [draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3))]
    else:
        seg["length"] = draw(st.integers(1, 6))
    if draw(st.booleans()) and kind == "text":
        seg["branch"] = draw(st.sampled_from(["a", "b"]))
    return seg


@st.composite
def params(draw, pat):
    out = {}
    for name, p in PATTERNS[pat].params.items():
        if p.default not in (None, REQUIRED) and draw(st.booleans()):
            continue  # sometimes rely on defaults
        if p.kind == "posint":
            out[name] = draw(st.integers(1, 5))
        elif p.kind == "int":
            out[name] = draw(st.integers(-1, 5)) if name == "size" and pat == "chunked" else draw(st.integers(0, 5))
        elif p.kind == "bool":
            out[name] = draw(st.booleans())
        elif p.kind == "attr":
            out[name] = draw(st.sampled_from(ATTRS))
        elif p.kind == "group":
            out[name] = draw(st.sampled_from(ATTRS + ["chunk"]))
            if out[name] == "chunk":
                out["size"] = draw(st.integers(1, 4))
        elif p.kind == "int_or_attr":
            out[name] = draw(st.integers(0, 4))
        elif p.kind == "pair":
            out[name] = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    return out


@st.composite
def step(draw, names, kind):
    pat = draw(st.sampled_from(sorted(PATTERNS)))
    out = {"pattern": pat, **draw(params(pat))}
    if kind != "base":
        sel = st.one_of(st.just("*"), st.sampled_from(names), st.lists(st.sampled_from(names), min_size=1, max_size=2))
        out["q"], out["k"] = draw(sel), draw(sel)
        if draw(st.integers(0, 4)) == 0:
            out["heads"] = [draw(st.integers(0, 2))]
        if draw(st.integers(0, 4)) == 0:
            out["layers"] = [draw(st.integers(0, 1))]
    if kind == "overlay":
        out["op"] = draw(st.sampled_from(["and", "or", "and_not"]))
    return out


@st.composite
def specs(draw):
    n = draw(st.integers(1, 4))
    segs = [draw(segment(i)) for i in range(n)]
    names = [s["name"] for s in segs]
    return {"name": "random", "segments": segs,
            "mask": {"base": draw(step(names, "base")),
                     "rules": draw(st.lists(step(names, "rule"), max_size=2)),
                     "overlays": draw(st.lists(step(names, "overlay"), max_size=2))},
            "positions": {"scheme": draw(st.sampled_from(["sequential", "per_segment", "branches",
                                                          "concentric", "mrope"]))}}


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tiled_dense(spec, layer, head):
    """The tiled dense path on a tiny layout: interval bounds decide 4x4 tiles, the rest is evaluated."""
    saved = knobs.DENSE_DIRECT_MAX, knobs.TILE
    knobs.DENSE_DIRECT_MAX, knobs.TILE = 0, 4
    try:
        return spec.dense_mask(layer=layer, head=head)
    finally:
        knobs.DENSE_DIRECT_MAX, knobs.TILE = saved


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@FAST
@given(specs(), st.integers(0, 1), st.integers(0, 2))
def test_every_backend_agrees(raw, layer, head):
    spec = Spec.load(raw)
    n = spec.n
    reference = create_mask(comp.mask_mod(spec, layer=layer), None, 3, n, n)[0, head]  # table-driven
    assert torch.equal(spec.dense_mask(layer=layer, head=head), reference)
    for fixed in (False, True):  # lowered: sizes read from P, or compiled in as Python ints
        assert torch.equal(create_mask(spec.mask_mod(layer=layer, sizes_in_kernel=fixed), None, 3, n, n)[0, head],
                           reference)
    assert torch.equal(tiled_dense(spec, layer, head), reference)


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@FAST
@given(specs(), st.sampled_from([4, 8]))
def test_block_mask_matches_create_block_mask(raw, block):
    spec = Spec.load(raw)
    n = spec.n
    heads = 3 if spec.varies_by_head else 1
    ours = spec.block_mask(block_size=block, num_heads=heads)
    ref = create_block_mask(comp.mask_mod(spec), None, heads, n, n, device="cpu", BLOCK_SIZE=block)
    if ours.kv_num_blocks.shape[1] == 1 and heads > 1:  # layer 0's rules never switch on the head
        ref = create_block_mask(comp.mask_mod(spec), None, 1, n, n, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(ours.to_dense(), ref.to_dense())


@FAST
@given(specs())
def test_json_round_trip_is_exact(raw):
    spec = Spec.load(raw)
    text = spec.to_json()
    again = Spec.load(text)
    assert again.to_json() == text
    assert again.to_dict() == json.loads(text) == spec.to_dict()
    assert torch.equal(again.position_ids(), spec.position_ids())


@FAST
@given(specs())
def test_tiled_analysis_equals_dense_analysis(raw):
    spec = Spec.load(raw)
    a, b = analyze(spec), analyze(spec, dense_limit=0)
    for field in ("allowed", "n_empty_rows", "n_unattended_keys", "causal", "symmetric",
                  "kv_cache_compatible", "blocks_full", "blocks_partial"):
        assert getattr(a, field) == getattr(b, field), field
    assert torch.equal(a.segment_counts, b.segment_counts)
    dense = spec.dense_mask()
    assert a.allowed == int(dense.sum())
    assert a.causal == bool((dense & ~torch.ones_like(dense).tril()).sum() == 0)
    assert a.symmetric == bool(torch.equal(dense, dense.T))


MUTATIONS = [
    (lambda d: d["segments"].append(dict(d["segments"][0])), "segments[", "duplicate"),
    (lambda d: d["segments"][0].update(modality="vidoe"), "segments[0].modality", "did you mean 'video'"),
    (lambda d: d["mask"]["base"].update(pattern="casual"), "mask.base.pattern", "did you mean 'causal'"),
    (lambda d: d["mask"].setdefault("rules", []).append({"q": "nope", "k": "*", "pattern": "full"}),
     "mask.rules[", "no segment named 'nope'"),
    (lambda d: d.update(colour=1), "colour", "unknown key"),
    (lambda d: d["positions"].update(scheme="rope"), "positions.scheme", "unknown scheme"),
    (lambda d: d["segments"][0].pop("name"), "segments[0].name", "name"),
    (lambda d: d.update(segments=[]), "segments", "non-empty"),
]


@FAST
@given(specs(), st.sampled_from(range(len(MUTATIONS))))
def test_invalid_specs_get_one_line_errors(raw, which):
    mutate, path, words = MUTATIONS[which]
    mutate(raw)
    with pytest.raises(SpecError) as info:
        Spec.load(raw)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(path), message
    assert words in message, message


@FAST
@given(specs())
def test_nonpositive_sizes_are_rejected(raw):
    seg = raw["segments"][0]
    if "grid" in seg:
        seg["grid"][0] = 0
        path = "segments[0].grid"
    else:
        seg["length"] = 0
        path = "segments[0].length"
    with pytest.raises(SpecError, match="^" + re.escape(path)):
        Spec.load(raw)


# ---------------------------------------------------------------- the tiled evaluator and its users
def with_generate_role(raw, generate_last: bool):
    raw = json.loads(json.dumps(raw))
    if generate_last:
        raw["segments"][-1]["role"] = ["generate"]
    return raw


@given(specs(), st.integers(0, 1), st.integers(0, 2), st.integers(0, 40), st.integers(1, 8))
@FAST
def test_tiled_rows_equal_dense_rows(raw, layer, head, q_start, tile):
    """TiledMask.dense(q_start) (what the runner's attention context reads while generating)
    equals the rows of the dense mask, whatever the tile edge."""
    from maskstudio.tiled import TiledMask

    spec = Spec.load(raw)
    q_start = q_start % spec.n
    full = spec.dense_mask(layer=layer, head=head)
    assert torch.equal(full, comp.dense(spec, layer, head))  # the engine vs the tests' cell-by-cell oracle
    rows = TiledMask(spec, layer, head, tile=tile).dense(q_start)
    assert torch.equal(rows, full[q_start:])
    from maskstudio import lower
    saved, lower.SPECIALIZE_MIN = lower.SPECIALIZE_MIN, 0  # every tile through expr.specialize
    try:
        rows = TiledMask(spec, layer, head, tile=tile).dense(q_start)
    finally:
        lower.SPECIALIZE_MIN = saved
    assert torch.equal(rows, full[q_start:])


@given(specs(), st.integers(0, 1), st.integers(0, 2), st.booleans())
@FAST
def test_cheap_kv_check_equals_analysis(raw, layer, head, generate_last):
    """analysis.kv_cache_compatible (tiles above the diagonal in the generation region only)
    says what the full analysis says, on the dense and the tiled analysis path."""
    from maskstudio.analysis import kv_cache_compatible

    spec = Spec.load(with_generate_role(raw, generate_last))
    expected = analyze(spec, layer=layer, head=head).kv_cache_compatible
    assert kv_cache_compatible(spec, layer, head) == expected
    assert analyze(spec, layer=layer, head=head, dense_limit=0).kv_cache_compatible == expected


@pytest.mark.parametrize("frames", [False, True])
@pytest.mark.parametrize("into", [None, 1])
def test_tokens_appended_equal_a_validated_spec(frames, into):
    """Generation grows a spec without re-validating; the result is the spec Spec.load would give."""
    text = ["ab", "cd"] if frames else "abcd"
    segs = [{"name": "p", "modality": "text", "length": 3, "text": "xyz"},
            {"name": "gen", "modality": "text", "role": ["generate"], "text": text,
             **({"frames": [2, 2]} if frames else {"length": 4})}]
    spec = Spec.load({"segments": segs, "mask": {"base": {"pattern": "causal"}}})
    grown = spec.with_tokens_appended(into, "ef", 2)
    data = spec.to_dict()
    if into is None:
        data["segments"].append({"name": "generated", "modality": "text", "length": 2, "role": ["generated"],
                                 "text": "ef"})
    elif frames:
        data["segments"][1].update(text=["ab", "cdef"], frames=[2, 4], length=6)
    else:
        data["segments"][1].update(text="abcdef", length=6)
    assert grown.to_json() == Spec.load(data).to_json()
    assert grown.n == spec.n + 2 and spec.n == 7   # the original is untouched
