"""Presets: every golden from the authors' code reproduced, plus properties every preset must keep.

Goldens (tests/data/goldens.json) are reproduced by loading the preset and resizing it to the
golden's layout. Where a golden was produced with different numeric parameters than the
preset ships (LongLive's chunk/window, OmniTokenizer's window) the test sets exactly those
parameters, named in the golden's `extra`; where a golden has fewer segments than the preset
(fewer scales, paths or documents) the extra segments are dropped. Nothing else changes.
"""
from __future__ import annotations

import ast
import re

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from maskstudio import Spec, SpecError, list_presets, load_preset
from maskstudio.presets import GROUPS, presets_dir

# golden -> (preset, sizes, drop segments, parameter edits {"mask.path": value})
GOLDEN_LAYOUTS = {
    "CCA_4x4": ("cca", {"prefix": 1, "image": [4, 4], "suffix": 1}, (), {}),
    "AKI_MMA": ("aki_mma", {"prompt": 2, "image": [1, 3], "query": 4, "answer": 1}, (), {}),
    "ACDiT_SCAM_T3_B2": ("acdit_scam", {"clean": [3, 1, 2], "noisy": [3, 1, 2]}, (), {}),
    "Multiverse": ("multiverse", {"prefix": 1, "goal": 4, "path1": 3, "path2": 4, "conclusion": 4},
                   ("path3",), {}),
    "LongLive_train_F1_chunk1_W3": ("longlive_train", {"video": [6, 1, 1]}, (),
                                    {"mask.base.chunk": 1, "mask.base.size": 3}),
    "LongLive_infer_sink1_W3": ("longlive_infer", {"video": [6, 1, 1]}, (),
                                {"mask.base.chunk": 1, "mask.base.size": 2,  # W - S = 3 - 1
                                 "mask.overlays.0.size": 1, "mask.overlays.1.chunk": 1}),
    "ARDiff_temporal_causal": ("ar_diffusion_temporal_causal", {"context": 3, "video": [4, 1, 2]}, (), {}),
    "ARDiff_video_temporal_causal": ("ar_diffusion_video_temporal_causal",
                                     {"context": 3, "video": [4, 1, 2]}, (), {}),
    "RecGPT_item4": ("recgpt_items", {"items": 12}, (), {}),
    "CogVLA_CAtten": ("cogvla_catten", {"bos": 1, "vision": [1, 2], "prompt": 2, "actions": 2, "stop": 1,
                                        "pad": 1}, (), {}),
    "iLLaMA_soft_r0.0": ("illama", {"patches": [1, 3], "cls": 1}, (), {}),
    "EasyControl": ("easycontrol", {"text": 2, "noise": [1, 2], "cond_spatial": [1, 2],
                                    "cond_subject": [1, 2]}, (), {}),
    "WeNet_chunk2_left1": ("chunked_asr", {"audio": 8}, (), {}),
    "Chunk2_left1_lookahead1": ("chunked_asr_lookahead", {"audio": 8}, (), {}),
    "Qwen2VL_mrope": ("qwen2_vl_mrope", {"system": 1, "vision_start": 1, "video": [2, 1, 2], "vision_end": 1,
                                         "question": 1}, (), {}),
    "TaH_duo": ("tah_duo_causal", {}, (), {"segments.depth0": {"length": 3, "attrs": {"p": [0, 1, 2]}},
                                            "segments.depth1": {"length": 2, "attrs": {"p": [1, 2]}}}),
    "TuneAVideo_sparse_causal_4frames": ("tune_a_video", {"video": [4, 1, 1]}, (), {}),
    "OmniTok_spatial_window_ws2": ("omnitokenizer_window", {"video": [2, 2, 4]}, (), {"mask.base.size": [2, 2]}),
    "OmniTok_temporal_causal": ("omnitokenizer_temporal", {"video": [2, 2, 4]}, (), {}),
    "Hita_tok_encoder_stage2": ("hita_tokenizer", {"carriers": 2, "patches": [1, 4]}, (), {}),
    "Hita_recon_vfm": ("hita_recon_vfm", {"slots": 2, "latents": [1, 4]}, (), {}),
    "Hita_AR": ("hita_ar", {"cond": 1, "slots": 2, "image": [1, 3]}, (), {}),
    "NFD_blockcausal": ("nfd", {"video": [3, 1, 2]}, (), {}),
    "Phenaki_spatial": ("phenaki_spatial", {"video": [3, 1, 2]}, (), {}),
    "Phenaki_temporal_causal": ("phenaki_temporal", {"video": [3, 1, 2]}, (), {}),
    "HieraTok_scale_causal": ("hieratok", {"scale0": [1, 1], "scale1": [2, 2]}, ("scale2", "scale3"), {}),
    "VideoCCAM_cross": ("video_ccam", {"queries": 4, "video": [2, 1, 2]}, (), {}),
    "TCLLaVA_framewise_block_causal": ("tc_llava", {"system": 1, "video": [2, 1, 2], "question": 1}, (), {}),
    "PrefixLM_P3": ("prefix_lm", {"prefix": 3, "target": 3}, (), {}),
    "Adaptive_lookahead_example": ("ancat", {}, (), {}),
    "PINE": ("pine", {"prefix": 2, "doc_a": 2, "doc_b": 3, "suffix": 2}, ("doc_c",), {}),
}
# iLLaMA r=0.5 is a soft (multiplied) mask, checked against the formula in the description below.
SOFT_GOLDENS = {"iLLaMA_soft_r0.5": ("illama", {"patches": [1, 3], "cls": 1}, 0.5)}


def _edit(data: dict, path: str, value) -> None:
    """Set a value at 'mask.base.size', 'mask.overlays.0.size' or 'segments.<name>' (merged)."""
    parts = path.split(".")
    if parts[0] == "segments":
        seg = next(s for s in data["segments"] if s["name"] == parts[1])
        for key in ("length", "grid", "frames", "attrs"):
            if key in value:
                seg.pop(key, None)
        seg.update(value)
        return
    node = data
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node[p]
    node[parts[-1]] = value


def golden_spec(name: str) -> Spec:
    preset, sizes, drop, edits = GOLDEN_LAYOUTS[name]
    spec = load_preset(preset, sizes=sizes or None)
    data = spec.to_dict()
    data["segments"] = [s for s in data["segments"] if s["name"] not in drop]
    share = data["positions"].get("share", {})
    data["positions"]["share"] = {k: v for k, v in share.items() if k not in drop and v not in drop}
    if not data["positions"]["share"]:
        data["positions"].pop("share")
    for path, value in edits.items():
        _edit(data, path, value)
    return Spec.load(data)


def _extra_list(extra: str, key: str):
    match = re.search(key + r"=(\[[^\]]*\])", extra or "")
    return ast.literal_eval(match.group(1)) if match else None


@pytest.mark.parametrize("name", sorted(GOLDEN_LAYOUTS))
def test_golden_mask_and_positions(goldens, name):
    gold = goldens[name]
    spec = golden_spec(name)
    if "matrix" in gold:
        want = torch.tensor(gold["matrix"]).bool()
        got = spec.dense_mask()
        if spec.mask.get("cross"):
            qi, ki = spec.cross_slices()
            got = got[qi][:, ki]
        assert got.shape == want.shape, f"{name}: layout gives {tuple(got.shape)}, golden {tuple(want.shape)}"
        assert torch.equal(got, want), f"{name}: mask differs from the golden\n{got.int()}\n{want.int()}"
    pos = _extra_list(gold.get("extra"), "position_ids") or gold.get("base_pos")
    if pos is not None:
        assert spec.position_ids().tolist() == pos
    if "position_ids_thw" in gold:
        assert spec.position_ids().tolist() == gold["position_ids_thw"]


def test_every_golden_is_covered(goldens):
    assert set(goldens) == set(GOLDEN_LAYOUTS) | set(SOFT_GOLDENS)


@pytest.mark.parametrize("name", sorted(SOFT_GOLDENS))
def test_illama_soft_mask_formula(goldens, name):
    """The description's soft mask M = r + (1 - r) * (boolean preset mask) matches the golden."""
    preset, sizes, r = SOFT_GOLDENS[name]
    dense = load_preset(preset, sizes=sizes).dense_mask().double()
    assert torch.allclose(r + (1 - r) * dense, torch.tensor(goldens[name]["matrix"]).double())


def test_tah_positions_are_p(goldens):
    assert golden_spec("TaH_duo").position_ids().tolist() == [0, 1, 2, 1, 2]


def test_streaming_llm_step6_keeps_sink_and_window():
    """SEEDS §6: S=1, R=3, query at step 6 keeps keys [0, 4, 5, 6]."""
    data = load_preset("streaming_llm", sizes={"tokens": 7}).to_dict()
    data["mask"]["base"]["size"] = 3
    data["mask"]["overlays"][0]["size"] = 1
    row = Spec.load(data).dense_mask()[6]
    assert torch.nonzero(row).flatten().tolist() == [0, 4, 5, 6]


# ---------------------------------------------------------------- properties of every preset
PRESETS = [p["name"] for p in list_presets()]


def test_gallery_is_complete_and_described():
    assert len(PRESETS) >= 50
    for p in list_presets():
        assert p["group"] in GROUPS, p["name"]
        assert re.fullmatch(r"[a-z0-9_]+", p["name"])
        assert len(p["citation"]) > 20 and re.search(r"(19|20)\d\d", p["citation"]), p["name"]
        desc = p["description"].lower()
        provenance = ("taken from the authors' code", "inferred from the paper", "unofficial",
                      "standard formula", "from the paper")
        assert any(tag in desc for tag in provenance), f"{p['name']}: say where the rule comes from"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_compiles_and_round_trips(name):
    spec = load_preset(name)
    assert spec.name == name
    assert 0 < spec.n <= 600
    assert Spec.load(spec.to_json()) == spec
    ids = spec.position_ids()
    assert ids.shape[-1] == spec.n


def _layers(spec):
    layers = {0}
    for ls in spec.layer_sets():
        layers |= set(ls)
    return sorted(layers)


@pytest.mark.parametrize("name", PRESETS)
def test_no_empty_rows(name):
    """Every query row attends somewhere, in the full matrix and in the cross view if there is one."""
    spec = load_preset(name)
    for layer in _layers(spec):
        dense = spec.dense_mask(layer=layer)
        views = [dense]
        if spec.mask.get("cross"):
            qi, ki = spec.cross_slices()
            views.append(dense[qi][:, ki])
        for view in views:
            empty = torch.nonzero(~view.any(1)).flatten().tolist()
            assert not empty, f"{name} layer {layer}: empty rows {empty}"


@pytest.mark.parametrize("name", PRESETS)
def test_dense_equals_mask_mod_and_block_mask(name):
    spec = load_preset(name)
    n = spec.n
    for layer in _layers(spec)[:3]:
        dense = spec.dense_mask(layer=layer)
        mod = spec.mask_mod(layer=layer)
        assert torch.equal(create_mask(mod, None, None, n, n, device="cpu")[0, 0], dense)
        ours = spec.block_mask(block_size=32, layer=layer)
        ref = create_block_mask(mod, None, None, n, n, device="cpu", BLOCK_SIZE=32)
        assert torch.equal(ours.to_dense(), ref.to_dense())
        assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)


def test_load_preset_names_and_errors():
    assert load_preset("CCA") == load_preset("cca")
    assert load_preset("Tune-A-Video") == load_preset("tune_a_video")
    with pytest.raises(SpecError, match="did you mean"):
        load_preset("cca2")
    with pytest.raises(SpecError, match="attrs"):
        load_preset("ancat", sizes={"audio": 12})


def test_presets_dir_env(tmp_path, monkeypatch):
    (tmp_path / "mine.json").write_text('{"name": "mine", "segments": [{"name": "t", "length": 3}]}')
    monkeypatch.setenv("MASKSTUDIO_PRESETS", str(tmp_path))
    assert presets_dir() == tmp_path
    assert [p["name"] for p in list_presets()] == ["mine"]
    assert load_preset("mine").n == 3


# ---------------------------------------------------------------- rescaling keeps the rule
def _ring(h, w):
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.minimum(torch.minimum(r, c), torch.minimum(h - 1 - r, w - 1 - c)).flatten()


@pytest.mark.parametrize("hw", [(5, 5), (6, 4), (24, 24)])
def test_cca_rescaled_follows_ring_formula(hw):
    h, w = hw
    p, s = 3, 2
    spec = load_preset("cca", sizes={"prefix": p, "image": [h, w], "suffix": s})
    n = p + h * w + s
    idx = torch.arange(n)
    want = idx[None, :] <= idx[:, None]
    ring = _ring(h, w)
    img = slice(p, p + h * w)
    want[img, img] = ring[None, :] <= ring[:, None]
    assert torch.equal(spec.dense_mask(), want)
    rings = (min(h, w) + 1) // 2
    pos = list(range(p)) + (p + ring).tolist() + [p + rings + m for m in range(s)]
    assert spec.position_ids().tolist() == pos


@pytest.mark.parametrize("n,chunk_left", [(20, None), (33, None)])
def test_chunked_asr_rescaled_follows_wenet(n, chunk_left):
    spec = load_preset("chunked_asr", sizes={"audio": n})
    C, left = 2, 1
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    start = ((q // C - left) * C).clamp(min=0)
    want = (k >= start) & (k < torch.clamp((q // C + 1) * C, max=n))
    assert torch.equal(spec.dense_mask(), want)


@pytest.mark.parametrize("items", [8, 40])
def test_recgpt_rescaled(items):
    spec = load_preset("recgpt_items", sizes={"items": items})
    q, k = torch.arange(items)[:, None], torch.arange(items)[None, :]
    assert torch.equal(spec.dense_mask(), (k <= q) | (q // 4 == k // 4))


@pytest.mark.parametrize("T,hw", [(2, (2, 2)), (5, (1, 3))])
def test_acdit_rescaled_follows_scam(T, hw):
    B = hw[0] * hw[1]
    spec = load_preset("acdit_scam", sizes={"clean": [T, *hw], "noisy": [T, *hw]})
    b = torch.arange(2 * T * B) // B
    bq, bk = b[:, None], b[None, :]
    want = ((bq < T) & (bk < T) & (bk <= bq)) | ((bq >= T) & (bk < T) & (bk < bq - T)) | (bq == bk)
    assert torch.equal(spec.dense_mask(), want)
    ids = spec.position_ids()
    assert torch.equal(ids[:, :T * B], ids[:, T * B:])


def test_longlive_infer_rescaled_matches_sink_window():
    """keys = frames [0, S) U [max(S, e - (W - S)), e), e = end of the query's chunk (shipped S=3, W=12, chunk 3)."""
    F, S, W, c = 20, 3, 12, 3
    spec = load_preset("longlive_infer", sizes={"video": [F, 1, 1]})
    q, k = torch.arange(F)[:, None], torch.arange(F)[None, :]
    e = (q // c + 1) * c
    want = (k < e) & ((k < S) | (k >= torch.clamp(e - (W - S), min=S)))
    assert torch.equal(spec.dense_mask(), want)


# ---------------------------------------------------------------- mechanisms added for presets
def test_grid_positions_scheme():
    """FLUX/EasyControl ids: text (0,0,0); grid tokens (t, row, col) + per-segment offset."""
    spec = Spec.load({"segments": [{"name": "txt", "length": 2},
                                   {"name": "z", "modality": "image", "grid": [1, 2]},
                                   {"name": "c", "modality": "image", "grid": [2, 1]}],
                      "positions": {"scheme": "grid", "offsets": {"c": [0, 64, 0]}}})
    assert spec.position_ids().tolist() == [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 64, 65], [0, 0, 0, 1, 0, 0]]
    with pytest.raises(SpecError, match="positions.offsets.x"):
        Spec.load({"segments": [{"name": "t", "length": 2}], "positions": {"scheme": "grid", "offsets": {"x": [0, 0, 0]}}})


def test_group_is_a_spec_field():
    spec = Spec.load({"name": "g", "group": "video", "segments": [{"name": "t", "length": 2}]})
    assert spec.to_dict()["group"] == "video"
    with pytest.raises(SpecError):
        Spec.load({"group": 3, "segments": [{"name": "t", "length": 2}]})
