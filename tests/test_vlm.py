"""Vision-language runs on tiny random-weight VLMs of each family (Qwen2-VL: 3-D M-RoPE; Idefics3 /
SmolVLM: 1-D), built from configs with locally constructed tokenizers and image processors: no downloads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskstudio import run as R
from maskstudio.viz.run_views import image_overlay, visual_share_figure
from maskstudio.run import RunError

FAMILIES = ["tiny-qwen2-vl", "tiny-idefics3"]


@pytest.fixture(scope="module")
def tiny():
    return lambda name: R.load_model(name, device="cpu")


def picture(w=48, h=32, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def img_spec(**extra):
    return {"segments": [{"name": "sys", "text": "look at"},
                         {"name": "img", "modality": "image", "grid": [2, 2]},
                         {"name": "q", "text": " what is it?"}], **extra}


@torch.no_grad()
def own_forward(lm, prep):
    """The model's own forward on the same inputs (its own position ids, its own attention)."""
    extra = {}
    if lm.is_3d:
        ids = prep.input_ids[None]
        extra["mm_token_type_ids"] = ((ids == lm.token_id("<|image_pad|>")).int()
                                      + 2 * (ids == lm.token_id("<|video_pad|>")).int())
    return lm.model(input_ids=prep.input_ids[None], **prep.inputs, **extra).logits[0].float()


# ---------------------------------------------------------------- layout
def test_qwen_grid_is_the_merged_patch_grid_and_markers_are_visible(tiny):
    lm = tiny("tiny-qwen2-vl")
    prep = R.prepare_vlm(img_spec(), lm, {"img": picture(48, 32)})
    segs = prep.layout.segments
    assert [s["name"] for s in segs] == ["sys", "img_start", "img", "img_end", "q"]
    # 32x48 px, patch 4 -> 8x12 patches, 2x2 merge -> 4x6 tokens
    assert segs[2]["grid"] == [4, 6] and prep.inputs["image_grid_thw"].tolist() == [[1, 8, 12]]
    assert segs[1]["modality"] == "special" and segs[1]["text"] == "<|vision_start|>"
    assert "vision_marker" in segs[3]["role"]
    assert any("declared grid [2, 2]" in n for n in prep.notes)
    ids = prep.input_ids
    assert int((ids == lm.token_id("<|image_pad|>")).sum()) == 24


def test_idefics_grid_is_one_tile_after_pixel_shuffle(tiny):
    lm = tiny("tiny-idefics3")
    prep = R.prepare_vlm(img_spec(), lm, {"img": picture(40, 30)})
    segs = prep.layout.segments
    assert segs[2]["grid"] == [4, 4]  # image 32 / patch 4 / scale 2
    assert segs[1]["text"] == "<fake_token_around_image><global-img>" and segs[1]["length"] == 2
    assert segs[3]["text"] == "<fake_token_around_image>"
    assert tuple(prep.inputs["pixel_values"].shape) == (1, 1, 3, 32, 32)


def test_idefics_ids_match_the_processor(tiny):
    """Our layout gives the very input ids Idefics3Processor builds for the same prompt."""
    from transformers import Idefics3Processor

    lm = tiny("tiny-idefics3")
    try:
        proc = Idefics3Processor(image_processor=lm.image_processor, tokenizer=lm.tokenizer, image_seq_len=16)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"Idefics3Processor cannot be built here: {err}")
    prep = R.prepare_vlm(img_spec(), lm, {"img": picture()})
    enc = proc(text=["look at<image> what is it?"], images=[[picture()]], do_image_splitting=False,
               return_tensors="pt")
    assert enc["input_ids"][0].tolist() == prep.input_ids.tolist()
    assert torch.equal(enc["pixel_values"], prep.inputs["pixel_values"])


def test_video_segments_take_frames(tiny):
    frames = [picture(seed=i) for i in range(4)]
    q = R.prepare_vlm({"segments": [{"name": "v", "modality": "video", "grid": [1, 1, 1]},
                                      {"name": "q", "text": "ok"}]}, tiny("tiny-qwen2-vl"), {"v": frames})
    assert q.layout.segments[1]["grid"] == [2, 4, 6]  # 4 frames / temporal patch 2
    assert q.inputs["video_grid_thw"].tolist() == [[2, 8, 12]]
    i = R.prepare_vlm({"segments": [{"name": "v", "modality": "video", "grid": [1, 1, 1]}]},
                        tiny("tiny-idefics3"), {"v": frames[:3]})
    assert i.layout.segments[1]["grid"] == [3, 4, 4] and i.inputs["pixel_values"].shape[1] == 3


def test_images_from_paths_arrays_and_upload_dicts(tmp_path):
    path = tmp_path / "a.png"
    picture().save(path)
    got = R.as_frames([str(path), {"path": str(path)}, np.zeros((4, 5, 3))])
    assert [f.size for f in got] == [(48, 32), (48, 32), (5, 4)]
    with pytest.raises(RunError, match="cannot open"):
        R.as_frames(str(tmp_path / "missing.png"))


# ---------------------------------------------------------------- equality with the model's own forward
@pytest.mark.parametrize("name", FAMILIES)
def test_plain_spec_equals_the_models_own_forward(tiny, name):
    lm = tiny(name)
    spec = img_spec(positions={"scheme": "mrope" if lm.is_3d else "sequential"})
    r = R.run(spec, lm, images={"img": picture()})
    prep = R.prepare_vlm(spec, lm, {"img": picture()})
    assert torch.equal(r.input_ids, prep.input_ids)
    assert (r.logits - own_forward(lm, prep)).abs().max() <= 1e-5
    assert r.attentions.shape[:2] == (lm.num_layers, lm.num_heads)
    same = R.run(img_spec(), lm, images={"img": picture()}, positions="model")
    assert (same.logits - r.logits).abs().max() == 0


def test_qwen_video_plain_spec_equals_own_forward(tiny):
    lm = tiny("tiny-qwen2-vl")
    spec = {"segments": [{"name": "a", "text": "clip"}, {"name": "v", "modality": "video", "grid": [2, 4, 6]},
                         {"name": "q", "text": " what happens?"}], "positions": {"scheme": "mrope"}}
    frames = [picture(seed=i) for i in range(4)]
    r = R.run(spec, lm, images={"v": frames})
    assert (r.logits - own_forward(lm, R.prepare_vlm(spec, lm, {"v": frames}))).abs().max() <= 1e-5
    assert not any("differ" in n for n in r.notes)


def test_mrope_scheme_equals_qwen2_vl_rope_index(tiny):
    lm = tiny("tiny-qwen2-vl")
    spec = {"segments": [{"name": "a", "text": "one"}, {"name": "i1", "modality": "image", "grid": [1, 1]},
                         {"name": "b", "text": "two"}, {"name": "i2", "modality": "image", "grid": [1, 1]},
                         {"name": "v", "modality": "video", "grid": [1, 1, 1]}, {"name": "c", "text": "end"}],
            "positions": {"scheme": "mrope"}}
    prep = R.prepare_vlm(spec, lm, {"i1": picture(48, 32), "i2": picture(24, 40, 1),
                                      "v": [picture(seed=i) for i in range(6)]})
    ours = prep.layout.position_ids()
    assert ours.shape == (3, len(prep.input_ids))
    assert torch.equal(ours, R.model_rope_index(lm, prep))


def test_mrope_difference_after_a_long_video_is_reported(tiny):
    """Qwen2-VL starts text after a video at max(h, w); with t > max(h, w) our mrope differs: say so."""
    lm = tiny("tiny-qwen2-vl")
    spec = {"segments": [{"name": "v", "modality": "video", "grid": [1, 1, 1]}, {"name": "q", "text": "x"}],
            "positions": {"scheme": "mrope"}}
    frames = [picture(8, 8, seed=i) for i in range(8)]  # 4 x 1 x 1 after merging
    r = R.run(spec, lm, images={"v": frames}, attentions=False)
    assert r.layout.segments[1]["grid"] == [4, 1, 1]
    assert any("differ from Qwen2-VL" in n for n in r.notes)


# ---------------------------------------------------------------- counterfactual invariance
@pytest.mark.parametrize("name", FAMILIES)
def test_an_unreachable_image_cannot_matter(tiny, name):
    lm = tiny(name)
    # nothing outside the image sees it (the markers don't exist before the run: "*" covers them)
    blocked = img_spec(mask={"rules": [{"q": "*", "k": "img", "pattern": "none"},
                                       {"q": "img", "k": "img", "pattern": "causal"}]})
    a = R.run(blocked, lm, images={"img": picture(seed=1)}, attentions=False)
    b = R.run(blocked, lm, images={"img": picture(seed=2)}, attentions=False)
    assert torch.equal(a.input_ids, b.input_ids)
    q = a.layout.table.segment_slice(4)
    assert (a.logits[q] - b.logits[q]).abs().max() == 0
    img = a.layout.table.segment_slice(2)
    assert (a.logits[img] - b.logits[img]).abs().max() > 0  # the image itself did change
    ca = R.run(img_spec(), lm, images={"img": picture(seed=1)}, attentions=False)
    cb = R.run(img_spec(), lm, images={"img": picture(seed=2)}, attentions=False)
    assert (ca.logits[q] - cb.logits[q]).abs().max() > 1e-4


# ---------------------------------------------------------------- positions
@pytest.mark.parametrize("name", FAMILIES)
def test_positions_reach_the_model(tiny, name):
    lm = tiny(name)
    img = {"img": picture()}
    runs = {s: R.run(img_spec(positions={"scheme": s}), lm, images=img, attentions=False)
            for s in ["sequential", "concentric"] + (["mrope"] if lm.is_3d else [])}
    assert (runs["sequential"].logits - runs["concentric"].logits).abs().max() > 1e-4
    # explicit ids equal to a scheme's ids give exactly that scheme's output
    ref = "mrope" if lm.is_3d else "concentric"
    ids = runs[ref].layout.position_ids().tolist()
    ex = R.run(img_spec(positions={"scheme": "explicit", "ids": ids}), lm, images=img, attentions=False)
    assert (ex.logits - runs[ref].logits).abs().max() == 0
    cca = runs["concentric"]
    want = cca.layout.position_ids()
    assert torch.equal(cca.positions, want.expand(3, -1) if lm.is_3d else want)  # what the forward got
    assert len(set(want[cca.layout.table.segment_slice(2)].tolist())) == 2  # a 4-wide grid has 2 rings
    if lm.is_3d:
        assert (runs["mrope"].logits - runs["sequential"].logits).abs().max() > 1e-4
        assert runs["sequential"].positions.shape[0] == 3  # 1-D ids reach M-RoPE on all three axes


def test_refusals_say_why(tiny):
    lm = tiny("tiny-idefics3")
    with pytest.raises(RunError, match="1-D RoPE"):
        R.run(img_spec(positions={"scheme": "mrope"}), lm)
    with pytest.raises(RunError, match="diffusion"):
        R.run(img_spec(positions={"scheme": "grid"}), tiny("tiny-qwen2-vl"))
    with pytest.raises(RunError, match="no segment of that name"):
        R.run(img_spec(), lm, images={"imag": picture()})
    with pytest.raises(RunError, match="one image"):
        R.run(img_spec(), lm, images={"img": [picture(), picture()]})
    with pytest.raises(RunError, match="audio"):
        R.run({"segments": [{"name": "s", "modality": "audio", "length": 3}]}, lm)


# ---------------------------------------------------------------- attention over the image
@pytest.mark.parametrize("name", FAMILIES)
def test_image_attention_overlay_and_visual_share(tiny, name):
    lm = tiny(name)
    r = R.run(img_spec(), lm, images={"img": picture()})
    grid = r.layout.segments[2]["grid"]
    att = R.image_attention(r, "img", query=-1, layer=1, head=2)
    assert att.shape == (1, *grid)
    sl = r.layout.table.segment_slice(2)
    assert torch.allclose(att.flatten(), r.attentions[1, 2, -1, sl].float())
    mean = R.image_attention(r, "img")  # last layer, mean of heads
    assert torch.allclose(mean.flatten(), r.attentions[-1, :, -1, sl].float().mean(0))
    fig = image_overlay(r, "img", query="q", layer=0)
    assert len(fig.axes) >= 1
    share, label, fraction = R.visual_share(r)
    assert share.shape == (lm.num_layers,) and ((share >= 0) & (share <= 1)).all()
    assert torch.allclose(share, r.attentions[:, :, -1, sl].float().mean(1).sum(-1), atol=1e-3)
    assert label == "q[11]" and 0 < fraction < 1 and len(visual_share_figure(r).axes) >= 1
    all_share, _, _ = R.visual_share(r, query="all")
    assert all_share.shape == (lm.num_layers,)
    with pytest.raises(RunError, match="layer"):
        R.image_attention(r, "img", layer=9)


def test_video_overlay_has_a_panel_per_frame(tiny):
    lm = tiny("tiny-idefics3")
    r = R.run({"segments": [{"name": "v", "modality": "video", "grid": [3, 4, 4]}, {"name": "q", "text": "?"}]},
                    lm, images={"v": [picture(seed=i) for i in range(3)]})
    assert R.image_attention(r, "v").shape == (3, 4, 4)
    fig = image_overlay(r, "v")
    assert len([a for a in fig.axes if a.get_title().startswith("frame")]) == 3


# ---------------------------------------------------------------- through run, generation, knockout
def test_run_dispatches_to_the_vision_adapter_by_name(tiny):
    r = R.run(img_spec(), "tiny-idefics3", images={"img": picture()}, max_new_tokens=3)
    assert r.visual_segments == ["img"] and r.model == "tiny-idefics3"
    assert r.generated_layout.segments[-1]["name"] == "generated"
    assert r.generated_layout.segments[-1]["length"] == len(r.new_ids) <= 3
    assert "img" in r.summary()


def test_generation_matches_recomputing_from_pixels(tiny):
    """Generated tokens come from the cached merged embeddings; a fresh run on the grown text agrees."""
    lm = tiny("tiny-qwen2-vl")
    spec = {"segments": [{"name": "img", "modality": "image", "grid": [2, 2]},
                         {"name": "g", "text": "a", "role": "generate"}], "positions": {"scheme": "mrope"}}
    r = R.run(spec, lm, images={"img": picture()}, max_new_tokens=4, attentions=False)
    assert len(r.new_ids) >= 2
    # recompute the grown sequence from the pixels (no cached embeddings): same next token
    prep = R.prepare_vlm(spec, lm, {"img": picture()})
    grown = R.inputs.grow(prep, r.new_ids[:-1], lm.tokenizer)
    again = R.VLPrepared(grown.layout, grown.seg_ids, [], grown.gen, prep.visuals, prep.inputs)
    ctx = R.MaskContext(grown.layout, lm.num_heads, "eager", record=False)
    logits = R.VisionAdapter(lm).forward(ctx, again, R.inputs.model_positions(grown.layout, lm))
    assert int(logits[-1].argmax()) == r.new_ids[-1]
    assert r.generated_layout.segments[-1]["length"] == 1 + len(r.new_ids)


def test_knockout_on_a_vlm_layout_keeps_its_markers(tiny):
    lm = tiny("tiny-idefics3")
    ko = R.knockout(img_spec(), q="q", k="img", window=1, model=lm, images={"img": picture()})
    assert len(ko.windows) == 2
    assert [s["name"] for s in ko.layout.segments] == ["sys", "img_start", "img", "img_end", "q"]


def test_text_model_with_images_is_refused():
    from tests.test_runner import _tiny

    with pytest.raises(RunError, match="text-only"):
        R.run(img_spec(), _tiny("llama"), images={"img": picture()})


def test_offline_hub_vlm_is_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert R.is_vlm_name("Qwen/Qwen2-VL-2B-Instruct") and not R.is_vlm_name("gpt2")
    with pytest.raises(RunError, match="not downloaded") as info:
        R.load_model("maskstudio-test/SmolVLM-nope")
    assert "tiny-qwen2-vl" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- the app, end to end
@pytest.mark.slow
def test_app_run_with_an_uploaded_image_and_overlay(tmp_path):
    """python app.py: /run_model with an uploaded picture on tiny-qwen2-vl, then /image_overlay."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from gradio_client import Client, handle_file

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PORT=str(port), HOST="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "gradio_api/info", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, "app.py exited"
                time.sleep(0.5)
        client = Client(url, verbose=False)
        spec = img_spec(positions={"scheme": "mrope"})
        client.predict(json.dumps(spec), 0, 0, 4, "", None, "segment", api_name="/edit_json")
        path = tmp_path / "photo.png"
        picture(64, 40).save(path)
        out = client.predict("tiny-qwen2-vl", 2, [handle_file(str(path))], api_name="/run_model")
        error, summary, tokens = out[:3]
        assert error == "" and "tiny-qwen2-vl" in summary
        assert [row[0] for row in tokens["data"]] == ["sys", "img_start", "img", "img_end", "q"]
        assert tokens["data"][2][1] == 40  # 40x64 px -> 10x16 patches -> 5x8 tokens
        overlay, share, err = client.predict(1, "mean", "q", "img", api_name="/image_overlay")
        assert err == "" and os.path.exists(overlay) and os.path.exists(share)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize("name", FAMILIES)
def test_every_image_and_video_preset_runs_or_is_refused_with_a_reason(tiny, name):
    """Presets with image/video segments run on test-pattern pictures (texts filled in); the only
    refusals are position schemes the model cannot take, and explicit ids written for the preset's
    own token count (a VLM's markers and merged grids change it)."""
    from maskstudio.presets import list_presets, load_preset

    lm = tiny(name)
    ran, refused = 0, []
    for preset in list_presets():
        data = load_preset(preset["name"]).to_dict()
        if not any(s["modality"] in R.VISUAL for s in data["segments"]):
            continue
        for s in data["segments"]:
            if s["modality"] in ("text", "special") and "text" not in s:
                s["text"] = "x" * s.get("length", 1)
        try:
            r = R.run(data, lm, attentions=False)
        except RunError as err:
            refused.append((preset["name"], data["positions"]["scheme"], str(err)))
            continue
        assert torch.isfinite(r.logits).all(), preset
        ran += 1
    assert ran >= 18
    for preset, scheme, why in refused:
        model_cannot = scheme in ("grid", "mrope") and ("1-D RoPE" in why or "diffusion" in why)
        ids_do_not_fit = scheme == "explicit" and "positions.ids" in why
        assert model_cannot or ids_do_not_fit, (preset, why)


def test_oversized_images_are_refused_from_their_header_before_decoding(tmp_path):
    """`maskstudio run --image` and the library: a small PNG that would decode to hundreds of MB is
    refused by its header (knobs.IMAGE_MAX_PIXELS), in one line naming the limit."""
    import tracemalloc

    from PIL import Image

    from maskstudio import knobs
    from maskstudio.run.vision import as_frames

    path = tmp_path / "bomb.png"
    Image.new("L", (9400, 9400)).save(path, optimize=True)
    Image.MAX_IMAGE_PIXELS = knobs.IMAGE_MAX_PIXELS  # as the app sets it: PIL's own header check fires first
    assert path.stat().st_size < 400_000
    tracemalloc.start()
    with pytest.raises(RunError, match=f"over the limit of {knobs.IMAGE_MAX_PIXELS:,} pixels") as err:
        as_frames(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20 and len(str(err.value).splitlines()) == 1
    assert len(as_frames(Image.new("RGB", (64, 48)))) == 1
