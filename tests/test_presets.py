"""Presets: every golden from the authors' code reproduced, plus properties every preset must keep.

Goldens (tests/data/goldens.json) are reproduced by loading the preset and resizing it to the
golden's layout. Where a golden was produced with different numeric parameters than the
preset ships (LongLive's chunk/window, OmniTokenizer's window) the test sets exactly those
parameters, named in the golden's `extra`; where a golden has fewer segments than the preset
(fewer scales, paths or documents) the extra segments are dropped. Nothing else changes.

Issue 12: every preset carries a `provenance`, and the presets that differed from their authors' code
are compared, at sizes they do not ship with, with small independent re-statements of that code's rule.
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
    # easycontrol's explicit (scaled) ids cannot follow a resize: the golden is a mask, so grid ids stand in
    "EasyControl": ("easycontrol", {}, (), {"segments.text": {"length": 2}, "segments.noise": {"grid": [1, 2]},
                                            "segments.cond_subject": {"grid": [1, 2]},
                                            "segments.cond_spatial": {"grid": [1, 2]},
                                            "positions": {"scheme": "grid", "offsets": {"cond_subject": [0, 64, 0]}}}),
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
    """Set a value at 'mask.base.size', 'mask.overlays.0.size', 'positions' or 'segments.<name>' (merged)."""
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
    """SEEDS §6, S=1, R=3: after step 6 the cache holds [0, 4, 5, 6] (what query 7 reads, plus itself);
    query 6 itself reads the cache trimmed after step 5, [0, 3, 4, 5], plus its own key."""
    data = load_preset("streaming_llm", sizes={"tokens": 8}).to_dict()
    data["mask"]["base"]["size"] = 3 + 1  # window size R + 1: q - k <= R
    data["mask"]["overlays"][0]["size"] = 1
    dense = Spec.load(data).dense_mask()
    assert torch.nonzero(dense[6]).flatten().tolist() == [0, 3, 4, 5, 6]
    assert torch.nonzero(dense[7]).flatten().tolist() == [0, 4, 5, 6, 7]


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


# ---------------------------------------------------------------- issue 12: presets follow their authors' code
# Each test re-states the rule the way the authors' code computes it (repo @ commit in the preset's provenance)
# and compares it with the preset at sizes the preset does NOT ship with.
PROVENANCE_SOURCES = {"code", "paper", "inferred"}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_has_provenance(name):
    data = load_preset(name).to_dict()
    prov = data.get("provenance")
    assert prov, f"{name}: no provenance"
    assert prov["source"] in PROVENANCE_SOURCES
    desc = data["description"].lower()
    if prov["source"] == "code":
        assert re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", prov["repo"]), prov
        assert "code" in desc or "unofficial" in desc, f"{name}: code provenance, description must say so"
    else:
        assert "repo" not in prov and "commit" not in prov, prov
        assert "paper" in desc or "formula" in desc, f"{name}: say the rule comes from the paper"
        assert prov.get("note"), f"{name}: a paper/inferred provenance says what was read"
    if "commit" in prov:
        assert re.fullmatch(r"[0-9a-f]{7,40}", prov["commit"]), prov
        assert "repo" in prov


def test_provenance_is_validated():
    base = {"segments": [{"name": "t", "length": 2}]}
    ok = Spec.load({**base, "provenance": {"source": "code", "repo": "a/b", "commit": "abc1234"}})
    assert ok.to_dict()["provenance"]["repo"] == "a/b"
    for bad in ({"source": "code"}, {"source": "blog"}, {"source": "paper", "stars": "5"}, "code"):
        with pytest.raises(SpecError, match="provenance"):
            Spec.load({**base, "provenance": bad})


def _tril(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


@pytest.mark.parametrize("queries,T", [(8, 3), (32, 5)])
def test_favor_follows_kron_triu(queries, T):
    """AudioVisualLLM Qformer.py: kron(triu(ones(T, T)), ones(32, 32)) is 'may attend': frame i sees frames >= i."""
    import numpy as np

    spec = load_preset("favor_causal_qformer", sizes={"queries": queries, "frames": [32] * T})
    frames = torch.from_numpy(np.kron(np.triu(np.ones((T, T))), np.ones((32, 32))) > 0)
    n = queries + 32 * T
    want = torch.ones(n, n, dtype=torch.bool)           # queries: self-attention + cross-attention to every frame
    want[queries:, :queries] = False                     # frame features never read the queries
    want[queries:, queries:] = frames
    assert torch.equal(spec.dense_mask(), want)
    assert not spec.dense_mask()[queries + 32, queries]  # frame 1 does not see frame 0 (the code's triu)


def _streaming_rows(n, S, R):
    """eval_long_ppl.py + StartRecentKVCache: each step reads the cache plus its own key, then the cache is
    trimmed to the first S and the last R entries."""
    cache, rows = [], []
    for idx in range(n):
        keys = cache + [idx]
        rows.append(keys)
        cache = keys if len(keys) <= S + R else keys[:S] + keys[len(keys) - R:]
    want = torch.zeros(n, n, dtype=torch.bool)
    for q, keys in enumerate(rows):
        want[q, keys] = True
    return want


@pytest.mark.parametrize("n", [13, 50])
def test_streaming_llm_follows_trimmed_cache(n):
    spec = load_preset("streaming_llm", sizes={"tokens": n})
    assert torch.equal(spec.dense_mask(), _streaming_rows(n, S=4, R=8))


def test_cab_causal_cross_sees_every_source_key():
    """CAB test_cross_causal truncates the target only: every target row sees the whole source."""
    sizes = {"target": 5, "source": 9}
    spec = load_preset("cab_causal_cross", sizes=sizes)
    qi, ki = spec.cross_slices()
    assert torch.equal(spec.dense_mask()[qi][:, ki], torch.ones(5, 9, dtype=torch.bool))
    other = load_preset("cab_noncausal_cross", sizes=sizes)
    assert torch.equal(spec.dense_mask(), other.dense_mask())


def test_hymba_window_keeps_w_plus_one_keys():
    """barebones_hymba_block.py: (q - k <= W and k <= q) or (k < M and k <= q); global layers are causal."""
    M, T, W = 5, 60, 16
    spec = load_preset("hymba_meta_tokens", sizes={"meta": M, "text": T})
    n = M + T
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    swa = ((q - k <= W) & (k <= q)) | ((k < M) & (k <= q))
    for layer in (0, 1, 4, 6, 31 - 1):
        assert torch.equal(spec.dense_mask(layer=layer), swa), layer
    for layer in (5, 11, 18, 25, 31):
        assert torch.equal(spec.dense_mask(layer=layer), _tril(n)), layer
    assert int(spec.dense_mask()[n - 1, M:].sum()) == W + 1


def test_thought_anchors_suppresses_columns_for_every_row():
    """hooks.py: attn_weights[..., start:end] = min for every query row (own rows and diagonal too), all layers/heads."""
    sizes = {"prompt": 5, "s1": 3, "s2": 7, "s3": 4, "s4": 2}
    spec = load_preset("thought_anchors_suppression", sizes=sizes)
    n, start = sum(sizes.values()), 5 + 3
    want = _tril(n)
    want[:, start:start + 7] = False
    for layer, head in ((0, 0), (13, 5)):
        assert torch.equal(spec.dense_mask(layer=layer, head=head), want)
    assert not spec.dense_mask()[start + 3, start + 3]      # the sentence's own diagonal is suppressed
    assert spec.dense_mask()[start].any()                    # its first row still reads the prompt and s1


def _qwen25_vl_rope_index(tokens, grids):
    """Qwen2.5-VL get_rope_index for one unpadded sequence of 'text' / 'image' tokens (images: t = 0 since
    second_per_grid_t = 0; grid already merged)."""
    ids, st, pos, g = [], 0, 0, iter(grids)
    while st < len(tokens):
        ed = tokens.index("image", st) if "image" in tokens[st:] else len(tokens)
        ids += [[pos + i] * 3 for i in range(ed - st)]
        pos += ed - st
        if ed == len(tokens):
            break
        h, w = next(g)
        block = [[pos, pos + r, pos + c] for r in range(h) for c in range(w)]
        ids += block
        pos = max(max(b) for b in block) + 1
        st = ed + h * w
    return torch.tensor(ids).T


def test_moca_is_bidirectional_with_qwen25_vl_mrope():
    h, w, text, pad = 4, 7, 10, 3
    spec = load_preset("moca", sizes={"image": [h, w], "text": text, "pad": pad})
    n = 1 + h * w + 1 + text + pad
    want = torch.ones(n, n, dtype=torch.bool)
    want[:, n - pad:] = False                              # right padding: masked keys
    assert torch.equal(spec.dense_mask(), want)
    tokens = ["text"] + ["image"] * (h * w) + ["text"] * (1 + text)
    ids = spec.position_ids()
    assert ids.shape == (3, n)
    assert torch.equal(ids[:, :n - pad], _qwen25_vl_rope_index(tokens, [(h, w)]))


def test_bico_mask_tokens_are_invisible_keys():
    """run_mlm.py new_torch_call: attention_mask & ~masked_indices, bidirectional (do_mlm), key-only."""
    gen = torch.Generator().manual_seed(12)
    pad, text = 3, 17
    masked = (torch.rand(text, generator=gen) < 0.15)
    masked[2] = True
    data = load_preset("bico", sizes={"pad": pad}).to_dict()
    _edit(data, "segments.text", {"length": text, "attrs": {"masked": masked.long().tolist()}})
    spec = Spec.load(data)
    attention_mask = torch.cat([torch.zeros(pad, dtype=torch.bool), torch.ones(1, dtype=torch.bool), ~masked,
                                torch.ones(1, dtype=torch.bool)])
    n = attention_mask.numel()
    assert torch.equal(spec.dense_mask(), attention_mask[None, :].expand(n, n))
    assert spec.position_ids().tolist() == list(range(n))  # arange over the left-padded sequence
    with pytest.raises(SpecError, match="attrs"):
        load_preset("bico", sizes={"text": 30})


def _easycontrol_ids(text, hn, wn, hc, wc):
    """src/pipeline.py prepare_latent_image_ids_ / resize_position_encoding / prepare_latent_subject_ids (+64)."""
    def grid(h, w, sh=1.0, sw=1.0):
        ids = torch.zeros(h, w, 3)
        ids[..., 1] += torch.arange(h)[:, None] * sh
        ids[..., 2] += torch.arange(w)[None, :] * sw
        return ids.reshape(-1, 3)
    subject = grid(hc, wc)
    subject[:, 1] += 64
    spatial = grid(hc, wc, hn / hc, wn / wc)
    return torch.cat([torch.zeros(text, 3), grid(hn, wn), subject, spatial]).T


def test_easycontrol_positions_are_scaled_and_mask_follows_the_processor():
    spec = load_preset("easycontrol")
    assert torch.equal(spec.position_ids().double(), _easycontrol_ids(8, 8, 8, 4, 4).double())
    # the mask at another size (explicit ids cannot follow a resize: grid ids stand in)
    sizes = {"text": 3, "noise": [4, 6], "cond_subject": [2, 3], "cond_spatial": [2, 3]}
    data = spec.to_dict()
    for name, size in sizes.items():
        _edit(data, f"segments.{name}", {"length": size} if name == "text" else {"grid": size})
    data["positions"] = {"scheme": "grid"}
    with pytest.raises(SpecError, match="ids"):
        load_preset("easycontrol", sizes={"text": 3})
    resized = Spec.load(data)
    block, cond = 3 + 24, 6
    n = block + 2 * cond
    mask = torch.ones(n, n)                                 # layers_cache.py: 1 = masked (x -1e20)
    mask[:block, :] = 0
    for i in range(2):
        s = block + i * cond
        mask[s:s + cond, s:s + cond] = 0
    assert torch.equal(resized.dense_mask(), mask == 0)


def test_llm2vec_pads_on_the_left():
    spec = load_preset("llm2vec", sizes={"pad": 3, "text": 9})
    assert spec.segments[0]["role"] == ["pad"]
    k = torch.arange(12)[None, :].expand(12, 12)
    assert torch.equal(spec.dense_mask(), k >= 3)        # _update_causal_mask: zeros + key padding only


def test_medim_puts_the_image_before_the_text():
    sizes = {"image": [3, 3], "size_prompt": 5, "report": 7, "pad": 4}
    spec = load_preset("medim", sizes=sizes)
    names = [s["name"] for s in spec.segments]
    assert names.index("image") < names.index("report")
    # model.py forward: attention_mask = cat([1, img_mask, 1, ones(cond), txt_token (0 = pad), 1])
    attention_mask = torch.tensor([1] + [1] * 9 + [1] + [1] * 5 + [1] * 7 + [0] * 4 + [1], dtype=torch.bool)
    n = attention_mask.numel()
    assert torch.equal(spec.dense_mask(), attention_mask[None, :].expand(n, n))


def test_token_prepending_placeholder_sits_inside_the_template():
    spec = load_preset("token_prepending", sizes={"sentence": 9})
    t = spec.table
    pst = t.starts[t.names.index("pst")]
    assert pst == 1 + t.sizes[t.names.index("template_head")] and pst > 0
    assert t.names.index("pst") + 1 == t.names.index("sentence")   # '<PST> "sentence"'
    assert torch.equal(spec.dense_mask(), _tril(spec.n))


@pytest.mark.parametrize("thw", [(3, 16, 24), (1, 8, 32)])
def test_omnitokenizer_window_follows_window_partition(thw):
    T, H, W = thw
    ws = 8
    spec = load_preset("omnitokenizer_window", sizes={"video": [T, H, W]})
    # WindowAttention: window_partition(x, ws) = view(H // ws, ws, W // ws, ws).permute(0, 2, 1, 3)
    cells = torch.arange(H * W).view(H // ws, ws, W // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    window = torch.empty(H * W, dtype=torch.long)
    for i, members in enumerate(cells):
        window[members] = i
    frame = torch.arange(T).repeat_interleave(H * W)
    win = window.repeat(T)
    want = (frame[:, None] == frame[None, :]) & (win[:, None] == win[None, :])
    assert torch.equal(spec.dense_mask(), want)


def test_learned_meta_tokens_causal_and_meta_attention():
    spec = load_preset("learned_meta_tokens", sizes={"text0": 4, "text2": 3})
    n = spec.n
    meta = torch.zeros(n, dtype=torch.bool)
    for i, seg in enumerate(spec.segments):
        if "meta" in seg.get("role", []):
            meta[spec.table.segment_slice(i)] = True
    meta_attention = torch.eye(n, dtype=torch.bool) | (meta[:, None] & meta[None, :] & _tril(n))
    for layer in (0, 2, 22):
        assert torch.equal(spec.dense_mask(layer=layer), _tril(n)), layer
    for layer in (1, 3, 23):
        assert torch.equal(spec.dense_mask(layer=layer), meta_attention), layer
