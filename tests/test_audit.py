"""Model audit: the masks and positions a transformers model really builds, as a spec, and a
design's differences from them.

Oracles are independent of the audit: transformers' masking primitives called directly
(`sdpa_mask` with `causal_mask_function`, `sliding_window_causal_mask_function`,
`chunked_causal_mask_function`), Gemma 3's image-block rule written out by hand, Qwen2-VL's
M-RoPE ids by hand and from the model's own `get_rope_index`. Tiny local configs only (no hub).
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers.masking_utils import (causal_mask_function, chunked_causal_mask_function, sdpa_mask,
                                        sliding_window_causal_mask_function)

from maskstudio import Spec, knobs
from maskstudio.audit import TINY_CONFIGS, audit, load_config, shrunk
from maskstudio.audit.capture import build_model, model_inputs
from maskstudio.errors import RunError, SpecError

TEXT = {"name": "text layout", "segments": [{"name": "sys", "length": 3}, {"name": "doc", "length": 7},
                                            {"name": "q", "length": 6}]}
VLM = {"name": "vlm layout", "segments": [{"name": "sys", "length": 3},
                                          {"name": "img", "modality": "image", "grid": [2, 3]},
                                          {"name": "q", "length": 7}]}
N_TEXT, N_VLM, W = 16, 16, 4  # tokens; the tiny configs' sliding window and chunk size


def transformers_mask(fn, n: int) -> torch.Tensor:
    return sdpa_mask(batch_size=1, q_length=n, kv_length=n, mask_function=fn, allow_is_causal_skip=False)[0, 0]


def causal(n):
    return transformers_mask(causal_mask_function, n)


def sliding(n):
    return transformers_mask(sliding_window_causal_mask_function(W), n)


def chunked(n):
    return transformers_mask(chunked_causal_mask_function(W, torch.zeros(1, dtype=torch.long)), n)


def gemma3_image(n, window: bool):
    """Gemma 3 (create_masks_for_vision_model): full layers OR(causal, same image block); sliding
    layers AND(key > query - W, OR(causal, same image block)). The image is tokens 3..8."""
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    image = (torch.arange(n) >= 3) & (torch.arange(n) < 9)
    allow = (k <= q) | (image[:, None] & image[None, :])
    return allow & (k > q - W) if window else allow


EXPECTED = {  # name -> (layout, per-layer oracle masks)
    "tiny-llama": (TEXT, [causal(N_TEXT)] * 2),
    "tiny-mistral": (TEXT, [sliding(N_TEXT)] * 2),
    "tiny-gemma2": (TEXT, [sliding(N_TEXT), causal(N_TEXT)] * 2),
    "tiny-gemma3": (TEXT, [sliding(N_TEXT)] * 5 + [causal(N_TEXT)]),
    "tiny-gemma3-vision": (VLM, [gemma3_image(N_VLM, True)] * 5 + [gemma3_image(N_VLM, False)]),
    "tiny-qwen2-vl": (VLM, [causal(N_VLM)] * 2),
    "tiny-llama4": (TEXT, [chunked(N_TEXT)] * 3 + [causal(N_TEXT)]),
}


def test_every_tiny_config_is_tested():
    assert set(EXPECTED) == set(TINY_CONFIGS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_model_spec_equals_transformers_own_mask_at_every_layer(name):
    layout, expected = EXPECTED[name]
    report = audit(name, layout)
    assert report.model.num_layers == len(expected)
    for layer, want in enumerate(expected):  # what the model recorded is transformers' own mask
        assert torch.equal(report.model.masks[layer], want), f"{name} layer {layer}"
    assert report.expressed.exact == [True] * len(expected)
    again = Spec.from_json(report.model_spec.to_json())  # the spec as written, read back
    for layer, want in enumerate(expected):
        assert torch.equal(again.dense_mask(layer), want), f"{name} layer {layer}: the spec is not the model"


def test_layers_really_differ_where_the_model_says_so():
    """Counterfactual for the per-layer reading: Gemma 2 alternates, so adjacent layers differ."""
    report = audit("tiny-gemma2", TEXT)
    assert report.model.layer_types == ["sliding_attention", "full_attention"] * 2
    assert not torch.equal(report.model.masks[0], report.model.masks[1])
    assert torch.equal(report.model.masks[0], report.model.masks[2])


@pytest.mark.parametrize("name, overlays, rules", [
    ("tiny-mistral", [{"pattern": "window", "size": W}], []),
    ("tiny-gemma2", [{"pattern": "window", "size": W, "layers": [0, 2]}], []),
    ("tiny-gemma3", [{"pattern": "window", "size": W, "layers": [0, 1, 2, 3, 4]}], []),
    ("tiny-llama4", [{"pattern": "chunked", "chunk": W, "size": W, "layers": [0, 1, 2]}], []),
    ("tiny-gemma3-vision", [{"pattern": "lookahead", "size": -W, "op": "and_not", "layers": [0, 1, 2, 3, 4]}],
     [{"q": "img", "k": "img", "pattern": "full"}]),
    ("tiny-llama", [], []),
])
def test_the_spec_names_the_models_patterns(name, overlays, rules):
    """The spec is the model's rule in the pattern language (transformers' window convention:
    key > query - W is window size W; with image blocks, whose later keys the window keeps, the
    same rule as 'drop keys <= query - W'), not a table of cells."""
    report = audit(name, EXPECTED[name][0])
    mask = report.model_spec.mask
    assert mask["base"]["pattern"] == "causal"
    assert [{k: o[k] for k in want} for o, want in zip(mask["overlays"], overlays)] == overlays
    assert len(mask["overlays"]) == len(overlays)
    assert [{k: r[k] for k in want} for r, want in zip(mask["rules"], rules)] == rules
    assert len(mask["rules"]) == len(rules)


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-gemma2", "tiny-llama4", "tiny-gemma3-vision"])
def test_the_spec_holds_at_other_sizes(name):
    """The extracted rule, resized, is what the model builds on the larger layout too."""
    layout, _ = EXPECTED[name]
    sizes = {"q": 19} if layout is TEXT else {"img": [3, 4], "q": 11}
    bigger = Spec.load(layout).with_sizes(sizes)
    resized = audit(name, layout).model_spec.with_sizes(sizes)
    model = audit(name, bigger).model
    for layer in range(model.num_layers):
        assert torch.equal(resized.dense_mask(layer), model.masks[layer]), f"layer {layer}"


# ---------------------------------------------------------------- positions
def test_qwen2_vl_positions_are_its_get_rope_index():
    """The ids the rotary embedding receives are get_rope_index's, and are M-RoPE by hand: text
    (p, p, p); the 2x3 image at start 3 gets (3, 3 + row, 3 + col); text after it at 3 + max(2, 3)."""
    report = audit("tiny-qwen2-vl", VLM)
    ids = report.model.positions
    t = [0, 1, 2] + [3] * 6 + list(range(6, 13))
    h = [0, 1, 2] + [3, 3, 3, 4, 4, 4] + list(range(6, 13))
    w = [0, 1, 2] + [3, 4, 5, 3, 4, 5] + list(range(6, 13))
    assert ids.tolist() == [t, h, w]
    config, _ = load_config("tiny-qwen2-vl")
    model = build_model(shrunk(config))
    inputs, _, _ = model_inputs(Spec.load(VLM), model, config)
    rope, _ = model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                   image_grid_thw=inputs["image_grid_thw"])
    assert torch.equal(rope[:, 0], ids)
    assert report.expressed.positions == {"scheme": "mrope", "after": "hw"}
    assert torch.equal(report.model_spec.position_ids(), ids)


def test_qwen2_vl_video_positions_pick_transformers_convention():
    """A 4-frame 2x2 video: 'max' would start the text at 2 + 3 + 1, transformers at 2 + 2."""
    layout = {"segments": [{"name": "a", "length": 2}, {"name": "v", "modality": "video", "grid": [4, 2, 2]},
                           {"name": "b", "length": 3}], "positions": {"scheme": "mrope", "after": "max"}}
    report = audit("tiny-qwen2-vl", layout)
    assert report.model.positions[:, 18].tolist() == [4, 4, 4]
    assert report.expressed.positions == {"scheme": "mrope", "after": "hw"}
    assert report.positions_differ == 3 and "b[0]: yours (6, 6, 6), model's (4, 4, 4)" in report.positions_line
    assert not report.matches and all(d.same for d in report.layers)


def test_one_dimensional_positions_against_mrope_are_named():
    report = audit("tiny-qwen2-vl", VLM)  # the design's positions are sequential
    assert report.positions_differ == 12
    assert "3-D M-RoPE" in report.positions_line and "img[1]: yours 4, model's (3, 3, 4)" in report.positions_line


# ---------------------------------------------------------------- a design against the model
def window_design(layout, size, layers=None) -> dict:
    overlay = {"pattern": "window", "size": size, "op": "and", **({"layers": layers} if layers else {})}
    return {**layout, "mask": {"base": {"pattern": "causal"}, "overlays": [overlay]}}


def test_a_window_one_key_too_wide_is_named_with_layer_and_cells():
    report = audit("tiny-gemma2", window_design(TEXT, W + 1, [0, 2]))
    d0, d1 = report.layers[0], report.layers[1]
    assert d0.message.startswith("layer 0 (sliding_attention): your window is 1 key wider than the model's (5 vs 4 keys)")
    assert (d0.cells, d0.yours_only, d0.model_only) == (N_TEXT - W, N_TEXT - W, 0)
    assert "doc[1] -> sys[0]" in d0.message  # q = 4 sees k = 0 in the design only
    assert d1.same and report.layers[3].same and not report.layers[2].same
    assert not report.matches
    assert "layers 0, 2 (sliding_attention): your window is 1 key wider" in report.summary()
    assert "verdict: your design differs from the model at 2 of 4 layers" in report.summary()


def test_a_narrower_window_and_a_window_on_a_global_layer():
    report = audit("tiny-gemma2", window_design(TEXT, W - 1))
    assert "your window is 1 key narrower than the model's (3 vs 4 keys)" in report.layers[0].body
    assert report.layers[0].model_only == N_TEXT - (W - 1) and report.layers[0].yours_only == 0
    assert report.layers[1].body.startswith("the model sees every earlier key; your window of 3 cuts some of them")


def test_a_causal_design_misses_gemma3_image_blocks():
    report = audit("tiny-gemma3-vision", {**VLM, "mask": {"base": {"pattern": "causal"}}})
    full = report.layers[5]
    assert "the model lets img tokens see each other both ways (a bidirectional block); your design does not" in full.body
    assert (full.cells, full.model_only) == (15, 15) and "img[0] -> img[1]" in full.body
    assert "the model's layer is a sliding window of 4 keys" in report.layers[0].body


def test_the_models_own_spec_as_design_matches_and_one_extra_cell_is_found():
    report = audit("tiny-gemma3-vision", VLM)
    design = report.model_spec
    again = audit("tiny-gemma3-vision", design)
    assert again.matches and all(d.same for d in again.layers) and again.positions_differ == 0
    assert "verdict: your design is what the model does" in again.summary()
    data = design.to_dict()
    data["mask"]["rules"].append({"q": "q", "k": "sys", "pattern": "none", "layers": [5]})  # q stops seeing sys
    cut = audit("tiny-gemma3-vision", data)
    assert [d.layer for d in cut.layers if not d.same] == [5]
    assert cut.layers[5].model_only == 7 * 3 and "q[0] -> sys[0]" in cut.layers[5].body


def test_a_bidirectional_gemma3_is_a_full_base_with_a_two_sided_window():
    """EmbeddingGemma-style use_bidirectional_attention: full layers see everything, sliding layers
    keep |q - k| < W // 2 + 1 (the config halves its window)."""
    config = dict(TINY_CONFIGS["tiny-gemma3"], use_bidirectional_attention=True)
    report = audit(config, TEXT)
    q, k = torch.arange(N_TEXT)[:, None], torch.arange(N_TEXT)[None, :]
    assert torch.equal(report.model.masks[0], (q - k).abs() < W // 2 + 1)
    assert bool(report.model.masks[5].all()) and report.expressed.exact == [True] * 6
    assert report.model_spec.mask["base"] == {"pattern": "full"}
    assert report.expressed.descriptions[0] == "bidirectional, two-sided window (|query - key| < 3)"


def test_design_notes_heads_and_layers_past_the_model():
    data = {**TEXT, "mask": {"base": {"pattern": "causal"},
                             "overlays": [{"pattern": "first", "size": 1, "op": "or", "heads": [1], "layers": [9]}]}}
    notes = audit("tiny-llama", data).notes
    assert any("head 0 is compared" in n for n in notes) and any("names layer 9 but the model has 2" in n for n in notes)


# ---------------------------------------------------------------- inputs and refusals
def test_adjacent_images_one_gemma3_block_and_refused_by_qwen2_vl():
    """Gemma 3 groups image tokens by contiguity: two images with nothing between them are one
    bidirectional block (one rule over both). Qwen2-VL's get_rope_index would read them as one image
    of the wrong size, so the audit refuses the layout in one line instead of auditing something else."""
    layout = {"segments": [{"name": "a", "length": 2}, {"name": "i1", "modality": "image", "grid": [1, 2]},
                           {"name": "i2", "modality": "image", "grid": [1, 3]}, {"name": "b", "length": 2},
                           {"name": "i3", "modality": "image", "grid": [2, 2]}, {"name": "c", "length": 3}]}
    report = audit("tiny-gemma3-vision", layout)
    assert report.expressed.exact == [True] * 6
    assert [r["q"] for r in report.model_spec.mask["rules"]] == [["i1", "i2"], "i3"]
    assert bool(report.model.masks[5][2, 6]) and not bool(report.model.masks[5][2, 9])  # i1 sees i2, not i3
    with pytest.raises(RunError, match="'i1' and 'i2' are adjacent image segments: qwen2_vl's get_rope_index"):
        audit("tiny-qwen2-vl", layout)


def test_a_text_model_reads_an_image_segment_as_text():
    report = audit("tiny-llama", VLM)
    assert any("llama takes no image input: segment 'img' is audited as text tokens" in n for n in report.model.notes)


def test_config_file_folder_and_json_text(tmp_path):
    config = dict(TINY_CONFIGS["tiny-mistral"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    for source in (str(tmp_path / "config.json"), str(tmp_path), json.dumps(config), config):
        report = audit(source, TEXT)
        assert torch.equal(report.model.masks[0], sliding(N_TEXT))
    with pytest.raises(RunError, match="names a path on this server"):
        audit(str(tmp_path), TEXT, allow_paths=False)


@pytest.mark.parametrize("source, words", [
    ("not a model!", "is not a model"), ('{"hidden_size": 8}', 'with a "model_type"'),
    ('{"model_type": "no-such-family"}', "no-such-family"), ("{not json", "model config JSON: invalid"),
    ("../x", "is not a model"),
])
def test_bad_models_are_one_line(source, words):
    with pytest.raises(RunError, match=words) as err:
        audit(source, TEXT, allow_paths=False)
    assert "\n" not in str(err.value)


def test_a_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunError, match="not downloaded and the Hugging Face hub is unreachable") as err:
        audit("someone/not-a-cached-model", TEXT)
    assert "tiny-gemma3" in str(err.value)


def test_a_config_that_does_not_shrink_is_refused_before_it_is_built(monkeypatch):
    from maskstudio.audit import capture

    monkeypatch.setattr(capture, "MAX_PARAMS", 1000)
    with pytest.raises(RunError, match=r"llama model from this config has [\d,]+ parameters even with tiny widths \(limit 1,000\)"):
        audit("tiny-llama", TEXT)


def test_layout_limits(monkeypatch):
    with pytest.raises(SpecError, match="have text but no length"):
        audit("tiny-llama", {"segments": [{"name": "t", "text": "hello there"}]})
    monkeypatch.setattr(knobs, "AUDIT_MAX_TOKENS", 8)
    with pytest.raises(RunError, match="over the audit's limit of 8"):
        audit("tiny-llama", TEXT)


@pytest.mark.slow
def test_full_size_configs_shrink_and_keep_their_attention():
    """A hub-sized config (transformers' defaults: Gemma 3 4B-like, Qwen2-VL 7B-like) is built with
    tiny widths but its layers, layer types, window, head size and M-RoPE sections kept."""
    from transformers import Gemma3Config, Qwen2VLConfig

    gemma = Gemma3Config().to_dict()
    report = audit(gemma, VLM)
    kinds = Gemma3Config().text_config.layer_types
    assert report.model.layer_types == kinds and len(kinds) > 20
    assert report.expressed.exact == [True] * len(kinds)
    sliding_layers = [i for i, k in enumerate(kinds) if k == "sliding_attention"]
    overlay = report.model_spec.mask["overlays"][0]  # the window is kept though this layout is shorter
    assert (overlay["pattern"], overlay["size"], overlay["op"]) == ("lookahead", -4096, "and_not")
    assert report.model_spec.mask["overlays"][0]["layers"] == sliding_layers
    assert torch.equal(report.model.masks[kinds.index("full_attention")], gemma3_image(N_VLM, False))
    config, _ = load_config(gemma)
    small = shrunk(config)
    assert small.text_config.head_dim == Gemma3Config().text_config.head_dim
    assert small.text_config.vocab_size <= 1024 and small.image_token_id < 1024
    from transformers import Gemma3nTextConfig, Llama4Config

    gemma3n = audit(Gemma3nTextConfig().to_dict(), TEXT)  # per-layer MLP sizes and per-layer embeddings shrink too
    assert gemma3n.expressed.exact == [True] * Gemma3nTextConfig().num_hidden_layers
    llama4 = audit(Llama4Config().to_dict(), TEXT)  # its multimodal wrapper fails in 5.24: the text model is audited
    assert any("its text model llama4_text was audited" in n for n in llama4.model.notes)
    assert llama4.model.layer_types[:4] == ["chunked_attention"] * 3 + ["full_attention"]
    assert any("use no rotary positions (NoPE)" in n for n in llama4.model.notes)
    qwen = audit(Qwen2VLConfig().to_dict(), VLM)
    assert qwen.expressed.positions == {"scheme": "mrope", "after": "hw"}
    assert qwen.model.positions[:, 3:9].tolist() == audit("tiny-qwen2-vl", VLM).model.positions[:, 3:9].tolist()


# ---------------------------------------------------------------- CLI, pictures, app handler
def test_cli_audit_exit_codes_files_and_a_round_trip(tmp_path, capsys):
    from maskstudio.cli import main

    design = tmp_path / "design.json"
    design.write_text(json.dumps(window_design(TEXT, W + 1, [0, 2])))
    out = tmp_path / "audit"
    assert main(["audit", "tiny-gemma2", "--layout", str(design), "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert "layers 0, 2 (sliding_attention): your window is 1 key wider than the model's" in printed.out
    assert sorted(p.name for p in out.iterdir()) == ["layer_0.png", "layers.png", "model_spec.json", "positions.png"]
    assert main(["audit", "tiny-gemma2", "--layout", str(out / "model_spec.json"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["matches"] and data["exact"] == [True] * 4 and data["layer_types"][1] == "full_attention"
    assert main(["audit", "no such model", "--layout", str(design)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_audit_pictures_say_what_they_show():
    from maskstudio.viz.audit_views import audit_layer_figure, audit_layers_figure, audit_positions_figure, diff_rgb

    report = audit("tiny-gemma2", window_design(TEXT, W + 1))
    fig = audit_layers_figure(report)
    assert fig.maskstudio["audit_layers"]["groups"] == [[0, 2], [1, 3]]
    layer = audit_layer_figure(report, 2).maskstudio
    assert layer["audit_layer"] == {"layer": 2, "cells": 12, "yours_only": 12, "model_only": 0}
    assert layer["mask"]["allowed"] == int(report.model.masks[2].sum())  # the studio's mask view drew the model's mask
    with pytest.raises(ValueError, match="layers 0..3"):
        audit_layer_figure(report, 4)
    rgb = diff_rgb(torch.tensor([[True, True], [False, True]]), torch.tensor([[True, False], [True, True]]))
    assert rgb[0, 1].tolist() == [59, 111, 182] and rgb[1, 0].tolist() == [200, 66, 74]  # blue yours, red model's
    big = torch.zeros(2000, 2000, dtype=torch.bool)
    big[1999, 0] = True  # one differing cell survives pooling to 800 pixels
    assert diff_rgb(big, torch.zeros_like(big))[-1, 0].tolist() == [59, 111, 182]
    assert audit_positions_figure(audit("tiny-qwen2-vl", VLM)).maskstudio["positions"]["three_d"]


@pytest.mark.slow  # draws every picture of the audit (CI runs this tier)
def test_app_handler_draws_and_refuses_server_paths(tmp_path):
    from maskstudio import studio
    from maskstudio.studio.audit import audit_for_state

    state = studio.new_state()
    out = audit_for_state(state, "tiny-gemma3-vision")
    assert out["error"] == "" and out["summary"].startswith("audit: tiny-gemma3-vision")
    assert [c for _, c in out["pictures"]] == ["every layer against your design", "layer 0: the model's own mask",
                                               "the position ids the model uses"]
    assert all(p.endswith(".png") for p, _ in out["pictures"])
    assert Spec.from_json(out["spec"]).name == "tiny-gemma3-vision: attention"
    assert audit_for_state(state, "tiny-gemma2", layer=99)["pictures"][1][1] == "layer 3: the model's own mask"
    assert audit_for_state(state, json.dumps(TINY_CONFIGS["tiny-llama"]))["error"] == ""
    refused = audit_for_state(state, str(tmp_path))
    assert "names a path on this server" in refused["error"] and refused["pictures"] == []
    assert studio.current(state).name == state["spec"].name  # the design stays


@pytest.mark.slow  # draws every picture of the audit (CI runs this tier)
def test_readme_audit_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's "Audit a model" commands, as written (from a folder holding the repo's examples and
    presets, so --out lands there), with the output lines it quotes."""
    import re
    import shlex
    from pathlib import Path

    from maskstudio.cli import main

    root = Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("## Audit a model", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0] for line in block.splitlines() if line.startswith("maskstudio audit")]
    quoted = [re.sub(r"\s+", " ", line.lstrip("# ")) for line in block.splitlines() if line.startswith("#   layer")]
    assert len(commands) == 2 and quoted
    for name in ("examples", "presets"):
        (tmp_path / name).symlink_to(root / name)
    monkeypatch.chdir(tmp_path)
    codes = [main(shlex.split(command)[1:]) for command in commands]
    assert codes == [1, 0]
    out = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert all(q.rstrip(". ") in out for q in quoted if "..." not in q)
    assert (tmp_path / "audit" / "model_spec.json").exists()


@pytest.mark.browser
def test_audit_tab_in_the_browser(app_url):
    """The Audit tab as a visitor uses it: the default tiny model, one click, the text and three pictures."""
    from conftest import app_page

    with app_page(app_url, height=1000, width=1400) as page:
        page.set_default_timeout(120_000)
        page.get_by_role("tab", name="Audit").click()
        page.click("#audit-btn")
        text = page.locator("#audit-text textarea")
        page.wait_for_function("document.querySelector('#audit-text textarea').value.includes('verdict:')")
        assert text.input_value().startswith("audit: tiny-gemma3-vision (gemma3, 6 layers)")
        page.wait_for_function("document.querySelectorAll('.gallery img, [data-testid=\"gallery\"] img').length >= 3 ||"
                               " document.querySelectorAll('button.thumbnail-item img').length >= 3")
