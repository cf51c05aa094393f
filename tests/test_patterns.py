"""Golden tests: every core pattern and position scheme on tiny layouts written out by hand."""
import pytest
import torch

from maskstudio import Spec


def grid(rows: str) -> torch.Tensor:
    """'110/111' -> bool matrix (rows = queries)."""
    return torch.tensor([[c == "1" for c in r] for r in rows.split("/")])


def one(pattern: dict, segments=None, rules=(), overlays=()):
    segments = segments or [{"name": "x", "length": 4}]
    return Spec.load({"segments": segments, "mask": {"base": pattern, "rules": list(rules),
                                                     "overlays": list(overlays)}})


TEXT4 = None
CASES = {
    "full": ({"pattern": "full"}, TEXT4, "1111/1111/1111/1111"),
    "none+self": ({"pattern": "self"}, TEXT4, "1000/0100/0010/0001"),
    "causal": ({"pattern": "causal"}, TEXT4, "1000/1100/1110/1111"),
    "anticausal": ({"pattern": "anticausal"}, TEXT4, "1111/0111/0011/0001"),
    "window": ({"pattern": "window", "size": 2}, TEXT4, "1000/1100/0110/0011"),
    "window bidirectional": ({"pattern": "window", "size": 2, "causal": False}, TEXT4, "1100/1110/0111/0011"),
    "lookahead": ({"pattern": "lookahead", "size": 1}, TEXT4, "1100/1110/1111/1111"),
    "dilated": ({"pattern": "dilated", "size": 2, "dilation": 2}, TEXT4, "1000/0100/1010/0101"),
    "first": ({"pattern": "first", "size": 1}, TEXT4, "1000/1000/1000/1000"),
    "block_causal chunk": ({"pattern": "block_causal", "by": "chunk", "size": 2}, TEXT4, "1100/1100/1111/1111"),
    "block_causal strict": ({"pattern": "block_causal", "by": "chunk", "size": 2, "strict": True}, TEXT4,
                            "0000/0000/1100/1100"),
    "same chunk": ({"pattern": "same", "by": "chunk", "size": 2}, TEXT4, "1100/1100/0011/0011"),
    "chunked left0": ({"pattern": "chunked", "chunk": 2, "size": 2}, TEXT4, "1100/1100/0011/0011"),
    "chunked lookahead": ({"pattern": "chunked", "chunk": 2, "lookahead": 1}, TEXT4, "1110/1110/1111/1111"),
}


@pytest.mark.parametrize("name", CASES)
def test_pattern_golden(name):
    pattern, segments, expected = CASES[name]
    assert torch.equal(one(pattern, segments).dense_mask(), grid(expected))


def test_none_masks_everything():
    spec = one({"pattern": "causal"}, rules=[{"q": "*", "k": "*", "pattern": "none"}])
    assert not spec.dense_mask().any()


def test_block_causal_by_frame_on_video():
    # video 2 frames of 1x2 then one text token: frame-wise block causal
    spec = one({"pattern": "block_causal", "by": "frame"},
               [{"name": "v", "modality": "video", "grid": [2, 1, 2]}, {"name": "t", "length": 1}])
    assert torch.equal(spec.dense_mask(), grid("11000/11000/11110/11110/11111"))


def test_same_by_row_and_local2d_and_tile():
    img = [{"name": "img", "modality": "image", "grid": [2, 2]}]
    assert torch.equal(one({"pattern": "same", "by": "row"}, img).dense_mask(), grid("1100/1100/0011/0011"))
    assert torch.equal(one({"pattern": "local2d", "radius": 0}, img).dense_mask(), grid("1000/0100/0010/0001"))
    assert torch.equal(one({"pattern": "tile", "size": [1, 2]}, img).dense_mask(), grid("1100/1100/0011/0011"))


def test_branch_patterns():
    segs = [{"name": "p", "length": 1}, {"name": "a", "length": 1, "branch": "a"},
            {"name": "b", "length": 1, "branch": "b"}, {"name": "c", "length": 1}]
    assert torch.equal(one({"pattern": "branch_isolated"}, segs).dense_mask(), grid("1111/1101/1011/1111"))
    assert torch.equal(one({"pattern": "other_branch"}, segs).dense_mask(), grid("0000/0010/0100/0000"))


def test_sparse_causal_and_spread_causal():
    video = [{"name": "v", "modality": "video", "grid": [4, 1, 1]}]
    assert torch.equal(one({"pattern": "sparse_causal"}, video).dense_mask(), grid("1000/1000/1100/1010"))
    # 4 queries over 2 frames of 2 patches (Video-CCAM golden: 1100/1100/1111/1111)
    segs = [{"name": "q", "length": 4}, {"name": "v", "modality": "video", "grid": [2, 1, 2]}]
    spec = one({"pattern": "spread_causal"}, segs)
    assert torch.equal(spec.dense_mask()[:4, 4:], grid("1100/1100/1111/1111"))


def test_lookahead_per_token_attribute():
    segs = [{"name": "x", "length": 4, "attrs": {"la": [0, 2, 0, 1]}}]
    assert torch.equal(one({"pattern": "lookahead", "size": "la"}, segs).dense_mask(), grid("1000/1111/1110/1111"))


def test_rules_override_in_order_and_overlays_compose():
    segs = [{"name": "a", "length": 2}, {"name": "b", "length": 2}]
    spec = one({"pattern": "causal"}, segs,
               rules=[{"q": "b", "k": "*", "pattern": "full"}, {"q": "b", "k": "b", "pattern": "self"}],
               overlays=[{"op": "or", "q": "a", "k": "a", "pattern": "full"},
                         {"op": "and_not", "q": "b", "k": "a", "pattern": "first", "size": 1},
                         {"op": "and", "q": "*", "k": "*", "pattern": "window", "size": 3, "causal": False}])
    assert torch.equal(spec.dense_mask(), grid("1100/1100/0110/0101"))


def test_selectors_by_modality_and_role():
    segs = [{"name": "t", "length": 1}, {"name": "img", "modality": "image", "grid": [1, 2]},
            {"name": "pad", "length": 1, "role": ["pad"]}]
    spec = one({"pattern": "full"}, segs, overlays=[{"op": "and_not", "k": "role:pad", "pattern": "full"},
                                                     {"op": "and_not", "q": "modality:image", "k": "t", "pattern": "full"}])
    assert torch.equal(spec.dense_mask(), grid("1110/0110/0110/1110"))


def test_layers_and_heads_restrict_rules():
    spec = one({"pattern": "causal"}, overlays=[
        {"op": "and_not", "q": "*", "k": "*", "pattern": "first", "size": 1, "layers": [1], "heads": [2]}])
    causal = grid("1000/1100/1110/1111")
    assert spec.varies_by_layer and spec.varies_by_head
    assert torch.equal(spec.dense_mask(layer=0, head=2), causal)
    assert torch.equal(spec.dense_mask(layer=1, head=0), causal)
    assert torch.equal(spec.dense_mask(layer=1, head=2), grid("0000/0100/0110/0111"))
    ranged = one({"pattern": "causal"}, overlays=[{"op": "or", "pattern": "full", "layers": {"start": 1, "stop": 6, "step": 2}}])
    assert [bool(ranged.dense_mask(layer=l).all()) for l in range(6)] == [False, True, False, True, False, True]


# ------------------------------------------------------------------ positions
def pos(scheme: dict, segments):
    return Spec.load({"segments": segments, "positions": scheme}).position_ids().tolist()


def test_sequential_and_per_segment():
    segs = [{"name": "a", "length": 2}, {"name": "b", "length": 3}]
    assert pos({"scheme": "sequential", "start": 5}, segs) == [5, 6, 7, 8, 9]
    assert pos({"scheme": "per_segment"}, segs) == [0, 1, 0, 1, 2]


def test_branches_multiverse_golden():
    segs = [{"name": "pre", "length": 5}, {"name": "p1", "length": 3, "branch": "a"},
            {"name": "p2", "length": 4, "branch": "b"}, {"name": "post", "length": 4}]
    assert pos({"scheme": "branches"}, segs) == [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10, 11, 12]


def test_branches_stacked_pine_golden():
    segs = [{"name": "pre", "length": 2}, {"name": "A", "length": 2, "branch": "A"},
            {"name": "B", "length": 3, "branch": "B"}, {"name": "suf", "length": 2}]
    assert pos({"scheme": "branches", "align": "end", "span": "sum"}, segs) == [0, 1, 5, 6, 4, 5, 6, 7, 8]


def test_concentric_cca_golden():
    segs = [{"name": "pre", "length": 1}, {"name": "img", "modality": "image", "grid": [4, 4]},
            {"name": "suf", "length": 1}]
    assert pos({"scheme": "concentric"}, segs) == [0, 1, 1, 1, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1, 1, 1, 1, 3]


def test_mrope_qwen2vl_golden():
    segs = [{"name": "txt", "length": 2}, {"name": "vid", "modality": "video", "grid": [2, 1, 2]},
            {"name": "end", "length": 2}]
    assert pos({"scheme": "mrope"}, segs) == [[0, 1, 2, 2, 3, 3, 4, 5], [0, 1, 2, 2, 2, 2, 4, 5],
                                              [0, 1, 2, 3, 2, 3, 4, 5]]


def test_attr_explicit_and_share():
    segs = [{"name": "t", "length": 1}, {"name": "v", "modality": "video", "grid": [2, 1, 2]}]
    assert pos({"scheme": "attr", "attr": "frame"}, segs) == [0, 1, 1, 2, 2]
    assert pos({"scheme": "explicit", "ids": [4, 3, 2, 1, 0]}, segs) == [4, 3, 2, 1, 0]
    copies = [{"name": "clean", "length": 2}, {"name": "noisy", "length": 2}]
    assert pos({"scheme": "sequential", "share": {"noisy": "clean"}}, copies) == [0, 1, 0, 1]


def test_text_frames_group_tokens():
    spec = Spec.load({"segments": [{"name": "x", "frames": [2, 1]}, {"name": "y", "length": 1}],
                      "mask": {"base": {"pattern": "block_causal", "by": "frame"}}})
    assert spec.token_table()["frame"].tolist() == [0, 0, 1, 2]
    assert torch.equal(spec.dense_mask(), grid("1100/1100/1110/1111"))
