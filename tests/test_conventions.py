"""Conventions users bring from other libraries, checked against small copies of their rules.

attention-gym `generate_sliding_window(w)`: causal & q - kv <= w  -> window{size: w + 1}
transformers `sliding_window_overlay(w)` (Mistral/Gemma causal SWA): kv > q - w -> window{size: w}
transformers `sliding_window_bidirectional_overlay(w)`: |q - kv| <= w -> window{size: w + 1, causal: false}
Gemma3's bidirectional overlay keeps |q - kv| < w                 -> window{size: w, causal: false}
NATTEN neighbourhood attention clamps the window at borders       -> neighborhood{radius}
Qwen2-VL M-RoPE text after a grid: original / vLLM at max + 1 (mrope after "max"),
transformers 5.24 get_rope_index at start + max(h, w) (mrope after "hw")."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from maskstudio import Spec

N = 17


def reference(mask_mod, n=N) -> torch.Tensor:
    return create_mask(mask_mod, None, None, n, n)[0, 0]


def window_spec(size: int, causal: bool) -> Spec:
    base = {"pattern": "window", "size": size, "causal": causal}
    return Spec.load({"segments": [{"name": "x", "length": N}], "mask": {"base": base}})


@pytest.mark.parametrize("w", [1, 3, 8])
def test_attention_gym_sliding_window(w):
    def sliding_window(b, h, q_idx, kv_idx):  # attention-gym: causal & windowed
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)

    assert torch.equal(window_spec(w + 1, True).dense_mask(), reference(sliding_window))


@pytest.mark.parametrize("w", [1, 3, 8])
def test_transformers_causal_sliding_window(w):
    def mistral(b, h, q_idx, kv_idx):  # and_masks(sliding_window_overlay(w), causal_mask_function)
        return (kv_idx > q_idx - w) & (kv_idx <= q_idx)

    assert torch.equal(window_spec(w, True).dense_mask(), reference(mistral))


@pytest.mark.parametrize("w", [1, 3, 8])
def test_transformers_and_gemma3_bidirectional_windows(w):
    def transformers_bidirectional(b, h, q_idx, kv_idx):
        return abs(q_idx - kv_idx) <= w

    def gemma3(b, h, q_idx, kv_idx):
        return abs(q_idx - kv_idx) < w

    assert torch.equal(window_spec(w + 1, False).dense_mask(), reference(transformers_bidirectional))
    assert torch.equal(window_spec(w, False).dense_mask(), reference(gemma3))


def natten(h: int, w: int, r: int) -> torch.Tensor:
    """NATTEN's rule restated: the window centre is the query clamped into [r, size-1-r]."""
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    centre_r = rows.clamp(min(r, h - 1), max(h - 1 - r, 0)) if h > 2 * r else None
    centre_c = cols.clamp(min(r, w - 1), max(w - 1 - r, 0)) if w > 2 * r else None
    ok_r = torch.ones(h * w, h * w, dtype=torch.bool) if centre_r is None else \
        (rows[None, :] - centre_r[:, None]).abs() <= r
    ok_c = torch.ones(h * w, h * w, dtype=torch.bool) if centre_c is None else \
        (cols[None, :] - centre_c[:, None]).abs() <= r
    return ok_r & ok_c


@pytest.mark.parametrize("h, w, r", [(5, 5, 1), (7, 4, 1), (6, 9, 2), (2, 2, 1), (9, 9, 3)])
def test_natten_neighborhood_sees_full_windows(h, w, r):
    spec = Spec.load({"segments": [{"name": "img", "modality": "image", "grid": [h, w]}],
                      "mask": {"base": {"pattern": "neighborhood", "radius": r}}})
    assert torch.equal(spec.dense_mask(), natten(h, w, r))
    truncating = Spec.load({"segments": [{"name": "img", "modality": "image", "grid": [h, w]}],
                            "mask": {"base": {"pattern": "local2d", "radius": r}}})
    assert truncating.dense_mask().sum() <= spec.dense_mask().sum()


@pytest.mark.parametrize("after, text_start", [("max", 2 + 5 + 1), ("hw", 2 + 3)])
def test_mrope_text_after_a_video(after, text_start):
    """A 6-frame 2x3 video after 2 text tokens: its ids reach t = 2 + 5; the next text starts at
    8 (Qwen2-VL's own code, vLLM) or at 2 + max(2, 3) = 5 (transformers 5.24)."""
    spec = Spec.load({"segments": [{"name": "a", "length": 2}, {"name": "v", "modality": "video", "grid": [6, 2, 3]},
                                   {"name": "b", "length": 2}],
                      "positions": {"scheme": "mrope", "after": after}})
    ids = spec.position_ids()
    assert ids[:, -2].tolist() == [text_start] * 3 and ids[:, -1].tolist() == [text_start + 1] * 3


def test_mrope_variants_agree_on_images():
    layout = {"segments": [{"name": "a", "length": 2}, {"name": "i", "modality": "image", "grid": [3, 5]},
                           {"name": "b", "length": 2}]}
    ids = [Spec.load({**layout, "positions": {"scheme": "mrope", "after": a}}).position_ids() for a in ("max", "hw")]
    assert torch.equal(ids[0], ids[1])
