"""Flow graph and reachability: checked against the analysis and brute-force boolean powers."""
import networkx as nx
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from maskstudio import Spec, flow
from maskstudio.analysis import analyze


def vlm(**pos):
    return Spec.load({
        "name": "vlm", "segments": [
            {"name": "sys", "length": 5}, {"name": "img", "modality": "image", "grid": [4, 4]},
            {"name": "q", "length": 6}, {"name": "ans", "length": 4, "role": "target"}],
        "mask": {"base": {"pattern": "causal"},
                 "rules": [{"q": "img", "k": "img", "pattern": "full"},
                           {"q": "ans", "k": "img", "pattern": "none", "layers": [0, 1]}]},
        "positions": pos or {"scheme": "sequential"}})


def brute_reach(spec, layers):
    n = spec.n
    eye = torch.eye(n, dtype=torch.bool)
    r = eye.clone()
    for layer in layers:
        a = spec.dense_mask(layer=layer) | eye
        # r[q, j] = OR_k a[q, k] & r[k, j]   (newest layer on the left)
        r = (a[:, :, None] & r[None, :, :]).any(1)
    return r


def test_flow_graph_edges_equal_analysis_densities():
    spec = vlm()
    a = analyze(spec)
    g = flow.flow_graph(spec)
    names = spec.table.names
    assert list(g.nodes) == names
    assert g.nodes["img"]["modality"] == "image" and g.nodes["img"]["tokens"] == 16
    dens = a.segment_density
    for qi, q in enumerate(names):
        for ki, k in enumerate(names):
            if a.segment_counts[qi, ki] > 0:
                assert g.edges[k, q]["density"] == pytest.approx(float(dens[qi, ki]))
                assert g.edges[k, q]["partial"] == (float(dens[qi, ki]) < 1)
            else:
                assert not g.has_edge(k, q)
    assert g.has_edge("q", "q")            # within-segment self-loop
    assert not g.has_edge("img", "ans")    # cut at layer 0
    assert flow.flow_graph(spec, layer=2).has_edge("img", "ans")


def test_token_and_frame_levels():
    spec = Spec.load({"segments": [{"name": "t", "length": 3},
                                   {"name": "v", "modality": "video", "grid": [3, 2, 2]}],
                      "mask": {"base": {"pattern": "causal"},
                               "rules": [{"q": "v", "k": "v", "pattern": "block_causal", "by": "frame"}]}})
    g = flow.flow_graph(spec, level="frame")
    assert list(g.nodes) == ["t", "v/f0", "v/f1", "v/f2"]
    assert g.edges["v/f0", "v/f2"]["density"] == 1.0
    assert not g.has_edge("v/f2", "v/f0")
    assert g.edges["v/f1", "v/f1"]["density"] == 1.0 and not g.edges["v/f1", "v/f1"]["partial"]
    tok = flow.flow_graph(spec, level="token")
    m = spec.dense_mask()
    assert tok.number_of_edges() == int(m.sum())
    assert all(m[q, k] for k, q in tok.edges)
    big = Spec.load({"segments": [{"name": "t", "length": 300}]})
    with pytest.raises(ValueError, match="small layouts"):
        flow.flow_graph(big, level="token")


def test_pair_counts_tiled_equals_dense():
    spec = Spec.load({"segments": [{"name": "t", "length": 70},
                                   {"name": "v", "modality": "video", "grid": [5, 9, 11]},
                                   {"name": "a", "length": 45}],
                      "mask": {"base": {"pattern": "causal"},
                               "rules": [{"q": "v", "k": "v", "pattern": "block_causal", "by": "frame"}],
                               "overlays": [{"pattern": "window", "size": 40, "op": "and"}]}})
    for groups in (flow.frame_groups(spec)[0], torch.arange(spec.n) // 128, spec.table["segment"]):
        assert torch.equal(flow.pair_counts(spec, groups, dense_limit=0), flow.pair_counts(spec, groups))
    assert torch.equal(flow.pair_counts(spec, spec.table["segment"], dense_limit=0),
                       analyze(spec).segment_counts)


def test_reachability_layer_order_matters():
    """ans cannot read img at layers 0-1: after 2 layers it still sees img through q (q read img
    at layer 0, ans read q at layer 1). Reversed order (cut layers applied last) differs."""
    spec = vlm()
    img = slice(5, 21)
    ans = slice(27, 31)
    r1 = flow.reachability(spec, 1)
    assert not r1[ans, img].any()
    r2 = flow.reachability(spec, 2)
    assert r2[ans, img].all()
    assert torch.equal(r2, brute_reach(spec, [0, 1]))
    assert torch.equal(flow.reachability(spec, [2, 0]), brute_reach(spec, [2, 0]))
    # segment table agrees
    table = flow.layers_until_reach(spec, 4)
    names = table.names
    assert table.steps[names.index("ans")][names.index("img")] == 2
    assert table.steps[names.index("sys")][names.index("img")] is None
    assert table.steps[names.index("img")][names.index("img")] == 0
    assert "layers until" in table.text()


def test_receptive_field_rows_match_reachability():
    spec = vlm()
    rf = flow.receptive_field(spec, spec.n - 1, 3)
    for l in range(1, 4):
        assert torch.equal(rf[l - 1], flow.reachability(spec, l)[spec.n - 1])


def test_segment_reachability_tiled_exact_and_not_segment_composition():
    """Exact token-set propagation vs composing segment relations, which over-approximates."""
    spec = Spec.load({"segments": [{"name": "a", "length": 300}, {"name": "b", "length": 300},
                                   {"name": "c", "length": 300}],
                      "mask": {"base": {"pattern": "self"},
                               # only b's LAST token reads a; c reads only b's FIRST token
                               "rules": [{"q": "b", "k": "a", "pattern": "lookahead", "size": -599},
                                         {"q": "c", "k": "b", "pattern": "first", "size": 1, "by": "local"}]}})
    exact = flow.segment_reachability(spec, 3, every=False)
    tiled = flow.segment_reachability(spec, 3, every=False, model=flow.LayerMasks(spec, dense_limit=0))
    assert torch.equal(exact, tiled)
    seg = analyze(spec).segment_counts > 0
    assert seg[2, 1] and seg[1, 0]
    composed = (seg.float() @ seg.float()) > 0
    assert composed[2, 0]                  # composing segment relations claims c -> a ...
    assert not exact[:, 2, 0].any()        # ... but no token path exists, at any depth
    assert not flow.reachability(spec, 3)[600:, :300].any()
    assert exact[0, 1, 0] and exact[0, 2, 1]


@st.composite
def random_spec(draw):
    n_seg = draw(st.integers(1, 4))
    segs = [{"name": f"s{i}", "length": draw(st.integers(1, 7))} for i in range(n_seg)]
    names = [s["name"] for s in segs]
    pats = [{"pattern": "full"}, {"pattern": "none"}, {"pattern": "causal"}, {"pattern": "anticausal"},
            {"pattern": "window", "size": 2}, {"pattern": "self"}]
    rules = []
    for _ in range(draw(st.integers(0, 4))):
        r = dict(draw(st.sampled_from(pats)))
        r["q"], r["k"] = draw(st.sampled_from(names)), draw(st.sampled_from(names))
        if draw(st.booleans()):
            r["layers"] = sorted(set(draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))))
        rules.append(r)
    base = draw(st.sampled_from([{"pattern": "causal"}, {"pattern": "self"}, {"pattern": "none"}]))
    return Spec.load({"segments": segs, "mask": {"base": base, "rules": rules}})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_spec(), st.lists(st.integers(0, 4), max_size=5))
def test_reachability_matches_brute_force(spec, layers):
    r = flow.reachability(spec, layers)
    assert torch.equal(r, brute_reach(spec, layers))
    tiled = flow.LayerMasks(spec, dense_limit=0)   # the tile path gives the same relation
    s = len(spec.segments)
    seg = flow.segment_reachability(spec, layers, every=True, model=tiled)
    for l in range(len(layers)):
        rl = brute_reach(spec, layers[:l + 1])
        for a in range(s):
            for b in range(s):
                sa, sb = spec.table.segment_slice(a), spec.table.segment_slice(b)
                assert bool(seg[l, a, b]) == bool(rl[sa, sb].any(1).all())


def test_reachability_refuses_huge():
    spec = Spec.load({"segments": [{"name": "t", "length": 5000}]})
    with pytest.raises(ValueError, match="segment_reachability"):
        flow.reachability(spec, 1)


def test_lazy_exports():
    import maskstudio
    assert maskstudio.flow_graph is flow.flow_graph
    assert maskstudio.reachability is flow.reachability
    assert isinstance(maskstudio.flow_graph(vlm()), nx.DiGraph)
