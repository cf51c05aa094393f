"""The app's handlers without a browser or gradio (maskstudio/studio/)."""
import json
import os

import numpy as np
import pytest
import torch

from maskstudio import Spec, studio
from maskstudio.presets import list_presets, load_preset


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    """Draw in threads here, the library default (one test below covers the worker processes)."""
    monkeypatch.setenv("MASKSTUDIO_RENDER_PROCESSES", "0")


def small_video() -> dict:
    return {"name": "vid", "segments": [
        {"name": "sys", "modality": "text", "length": 4},
        {"name": "video", "modality": "video", "grid": [3, 2, 2]},
        {"name": "q", "modality": "text", "length": 5, "role": ["target"], "text": "what happens next?"}],
        "mask": {"base": {"pattern": "causal"},
                 "rules": [{"q": "video", "k": "video", "pattern": "block_causal", "by": "frame"}],
                 "overlays": [{"op": "or", "q": "*", "k": "sys", "pattern": "first", "size": 2,
                               "layers": {"start": 0, "stop": 4, "step": 2}}]},
        "positions": {"scheme": "mrope"}}


# ---------------------------------------------------------------- cells
@pytest.mark.parametrize("seg", [
    {"length": 12}, {"grid": [24, 24]}, {"grid": [8, 16, 16]}, {"frames": [4, 4, 4]}, {}])
def test_size_round_trip(seg):
    assert studio.parse_size(studio.format_size(seg), "x") == seg


def test_size_errors_name_the_field():
    with pytest.raises(studio.SpecError) as err:
        studio.parse_size("12a", "segments[1].size")
    assert err.value.path == "segments[1].size" and "24x24" in str(err.value)


@pytest.mark.parametrize("params", [
    {}, {"size": 4, "causal": False}, {"by": "frame", "strict": True}, {"size": [2, 2]},
    {"by": "chunk", "size": 3}, {"size": "lookahead_attr"}, {"offsets": {"cond": [0, 64, 0]}},
    {"share": {"copy": "noisy"}}, {"label": "two words"}, {"x": "true"}])
def test_params_round_trip(params):
    assert studio.parse_params(studio.format_params(params), "p") == params


def test_params_accepts_json_and_loose_text():
    assert studio.parse_params('{"size": 4}', "p") == {"size": 4}
    assert studio.parse_params("size = 4 , causal=False, by='frame'", "p") == {"size": 4, "causal": False,
                                                                               "by": "frame"}
    with pytest.raises(studio.SpecError):
        studio.parse_params("size 4", "mask.rules[0]")


@pytest.mark.parametrize("value", [None, [0, 1, 5], {"start": 0, "stop": 12, "step": 2},
                                   {"start": 3, "stop": 9, "step": 1}])
def test_ints_round_trip(value):
    assert studio.parse_ints(studio.format_ints(value), "layers") == value


def test_selectors_and_text():
    assert studio.parse_selector("video") == "video"
    assert studio.parse_selector("a, b") == ["a", "b"]
    assert studio.parse_selector("") == "*"
    assert studio.parse_text(studio.format_text(["f0", "f1"])) == ["f0", "f1"]
    assert studio.parse_text("[not json") == "[not json"


# ---------------------------------------------------------------- tables <-> spec
@pytest.mark.parametrize("name", [p["name"] for p in list_presets()])
def test_every_preset_round_trips_through_the_tables(name):
    spec = load_preset(name)
    t = studio.spec_to_tables(spec)
    # unchanged rows keep their exact JSON: the canonical spec comes back byte for byte
    same = Spec.load(studio.tables_to_spec_dict(spec.to_dict(), t["segments"], t["rules"], t["overlays"],
                                                (t["scheme"], t["position_params"])))
    assert same.to_json() == spec.to_json()
    # parsed afresh (no old rows to reuse) the mask and positions are identical
    old = spec.to_dict()
    old["segments"] = [dict(s, name=s["name"] + "~") for s in old["segments"]]  # nothing matches
    old["mask"] = {"base": {"pattern": "causal"}, "rules": [], "overlays": []}
    fresh_raw = studio.tables_to_spec_dict(old, t["segments"], t["rules"], t["overlays"],
                                           (t["scheme"], t["position_params"]))
    for seg, orig in zip(fresh_raw["segments"], spec.segments):
        if "attrs" in orig:
            seg["attrs"] = orig["attrs"]
    fresh = Spec.load(fresh_raw)
    if spec.unsized_segments():
        return
    assert fresh.n == spec.n
    if spec.n <= 2048:
        layers = sorted({0} | {x for s in spec.layer_sets() for x in s})
        for layer in layers[:4]:
            assert torch.equal(fresh.dense_mask(layer=layer), spec.dense_mask(layer=layer)), (name, layer)
    assert torch.equal(fresh.position_ids(), spec.position_ids())


def test_table_edit_changes_the_json_and_pushes_history():
    state = studio.new_state(small_video())
    t = studio.spec_to_tables(state["spec"])
    t["rules"][1][4] = "by=t, strict=true"
    t["segments"][0][2] = "6"
    state2, error = studio.apply_table_edit(state, t["segments"], t["rules"], t["overlays"],
                                            (t["scheme"], t["position_params"]))
    assert error == ""
    spec = studio.current(state2)
    assert spec.mask["rules"][0]["by"] == "t" and spec.mask["rules"][0]["strict"] is True
    assert spec.segments[0]["length"] == 6
    assert spec.mask["overlays"][0]["layers"] == {"start": 0, "stop": 4, "step": 2}  # untouched row kept
    assert state2["history"] == [state["spec"]]
    back, error = studio.undo(state2)
    assert error == "" and back["spec"] == state["spec"]
    assert studio.undo(back)[1] == "nothing to undo"


def test_table_edit_adds_rows_and_accepts_pandas_like_values():
    state = studio.new_state(small_video())
    t = studio.spec_to_tables(state["spec"])
    segs = t["segments"] + [["answer", "text", "3", "", "generate", ""], ["", "", "", "", "", ""]]
    overlays = {"headers": studio.OVERLAY_COLUMNS,
                "data": t["overlays"] + [["and_not", "answer", "video", "full", "", "0, 1", "2"]]}
    state2, error = studio.apply_table_edit(state, segs, t["rules"], overlays, "per_segment")
    assert error == "", error
    spec = studio.current(state2)
    assert [s["name"] for s in spec.segments][-1] == "answer"
    assert spec.mask["overlays"][-1] == {"pattern": "full", "op": "and_not", "q": "answer", "k": "video",
                                         "layers": [0, 1], "heads": [2]}
    assert spec.positions == {"scheme": "per_segment"}
    assert spec.varies_by_head


def kept(new: dict, old: dict) -> bool:
    """A refused edit: the same design and undo stack, and the invalid edit noted as pending (Undo drops it first)."""
    return (studio.current(new) is studio.current(old) and new["history"] == old["history"]
            and new.get("unapplied") is True)


@pytest.mark.parametrize("cell,where,expect", [
    ((1, 2), "segments", "segments[1]"),            # size 'abc'
    ((1, 3), "rules", "mask.rules[0].pattern"),     # unknown pattern
    ((1, 2), "rules", "mask.rules[0].k"),           # unknown segment
    ((1, 5), "rules", "mask.rules[0].layers"),      # bad layers
])
def test_invalid_table_edit_keeps_the_last_good_state(cell, where, expect):
    state = studio.new_state(small_video())
    t = studio.spec_to_tables(state["spec"])
    bad = {"segments": "abc", "rules": {3: "blok_causal", 2: "vidoe", 5: "1-2"}}
    r, c = cell
    t[where][r][c] = bad[where] if where == "segments" else bad[where][c]
    state2, error = studio.apply_table_edit(state, t["segments"], t["rules"], t["overlays"],
                                            (t["scheme"], t["position_params"]))
    assert kept(state2, state)
    assert error.startswith(expect) and "\n" not in error


def test_json_edit_error_is_one_line_with_the_path():
    state = studio.new_state(small_video())
    data = small_video()
    data["mask"]["rules"][0]["k"] = "vidoe"
    state2, error = studio.apply_json_edit(state, json.dumps(data))
    assert kept(state2, state)
    assert error == "mask.rules[0].k: no segment named 'vidoe' (did you mean 'video'?)"
    assert studio.apply_json_edit(state, "{ nope")[1].startswith("invalid JSON at line 1")
    assert studio.apply_json_edit(state, "")[1]
    ok, error = studio.apply_json_edit(state, json.dumps(dict(data, mask={"base": {"pattern": "full"}})))
    assert error == "" and studio.current(ok).mask["base"] == {"pattern": "full"}


def test_presets_blank_and_sessions_are_independent():
    a = studio.new_state()
    b = studio.new_state()
    a2, err = studio.load_preset_into_state(a, "prefix_lm")
    assert err == "" and studio.current(a2).name == "prefix_lm"
    b2, err = studio.load_blank(b)
    assert err == "" and studio.current(b2).name == "untitled"
    assert studio.current(a2).name == "prefix_lm" and a["spec"] == b["spec"]
    assert studio.load_preset_into_state(a, "prefx_lm")[1].startswith("no preset named")
    choices = studio.preset_choices()
    assert ("other · prefix_lm", "prefix_lm") in choices
    card = studio.preset_card("prefix_lm")
    assert "Raffel" in card and "Prefix-LM" in card
    md = studio.gallery_markdown()
    assert "#### video" in md and "`multiverse`" in md


# ---------------------------------------------------------------- pictures and checks
@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_render_views_draws_every_picture_and_caches_by_dependency():
    spec = Spec.load(small_video())
    out = studio.render_views(spec, {"layer": 0})
    for view in studio.VIEWS:
        assert os.path.exists(out[view]) and out[view].endswith(".png")
        assert open(out[view], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "density" in out["checks"] and "KV-cache safe" in out["checks"]
    assert out["density"]["headers"] == ["q \\ k", "sys", "video", "q"]
    assert studio.render_views(spec, {"layer": 0}) == out                 # cached
    data = small_video()
    data["mask"]["rules"][0]["by"] = "t"
    edited = studio.render_views(Spec.load(data), {"layer": 0})
    assert edited["positions"] == out["positions"] and edited["distance"] == out["distance"]
    assert edited["mask"] != out["mask"] and edited["reach"] != out["reach"]
    layer1 = studio.render_views(spec, {"layer": 1})
    assert layer1["mask"] != out["mask"]                                  # the overlay is off on layer 1


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_render_views_in_worker_processes(monkeypatch):
    monkeypatch.setenv("MASKSTUDIO_RENDER_PROCESSES", "2")
    data = small_video()
    data["name"] = "processes"
    out = studio.render_views(Spec.load(data))
    assert all(os.path.exists(out[v]) for v in studio.VIEWS)


def test_text_only_segments_get_estimated_sizes_for_pictures(monkeypatch):
    monkeypatch.setattr(studio.pictures, "tokenizer_at_hand", lambda: None)  # as before any model is loaded
    spec = Spec.load({"segments": [{"name": "a", "text": "one two three four"}, {"name": "b", "length": 3}]})
    out = studio.render_views(spec)
    assert "estimated" in out["note"] and os.path.exists(out["mask"])
    assert "estimated" in studio.design_views(spec)["note"]       # the app's view of it too


def test_controls_and_tokens():
    spec = Spec.load(small_video())
    c = studio.controls(spec)
    assert c["varies_by_layer"] and not c["varies_by_head"] and c["segments"] == ["sys", "video", "q"]
    assert studio.parse_token(spec, "") == spec.n - 1
    assert studio.parse_token(spec, "video") == 4 + 12 - 1
    assert studio.parse_token(spec, "video[0]") == 4
    assert studio.parse_token(spec, "-1") == spec.n - 1
    assert studio.parse_token(spec, 999) == spec.n - 1
    with pytest.raises(studio.SpecError):
        studio.parse_token(spec, "vid")


def test_check_text_reports_problems():
    spec = Spec.load({"segments": [{"name": "a", "length": 4}], "mask": {"base": {"pattern": "none"}}})
    text = studio.check_text(spec)
    assert "ERROR" in text and "attend no key" in text


# ---------------------------------------------------------------- export / import / compare
@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@pytest.mark.parametrize("fmt", list(studio.EXPORT_FORMATS))
def test_export_files(fmt, tmp_path):
    spec = Spec.load(small_video())
    path = studio.export_file(spec, fmt)
    assert os.path.basename(path).startswith("vid")
    data = open(path, "rb").read()
    if fmt == "json":
        assert data.decode() == spec.to_json()
    elif fmt == "npy":
        assert np.array_equal(np.load(path), spec.dense_mask().numpy())
    elif fmt == "positions":
        assert np.array_equal(np.load(path), spec.position_ids().numpy())
    elif fmt == "flex":
        assert b"def mask_mod" in data
    else:
        import zipfile
        assert sorted(zipfile.ZipFile(path).namelist()) == sorted(f"vid_{v}.png" for v in studio.VIEWS)
    with pytest.raises(ValueError):
        studio.export_file(spec, "gif")


def test_import_file(tmp_path):
    state = studio.new_state()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(small_video()))
    state2, error = studio.import_file(state, str(good))
    assert error == "" and studio.current(state2).name == "vid"
    bad = tmp_path / "bad.json"
    bad.write_text('{"segments": []}')
    state3, error = studio.import_file(state2, str(bad))
    assert kept(state3, state2) and error.startswith("segments: needs a non-empty list")
    assert studio.import_file(state, None)[1] == "no file uploaded"


def test_compare_static():
    state = studio.new_state(small_video())
    assert studio.compare_static(state, "snapshot")["error"].startswith("compare: no snapshot")
    state = studio.set_snapshot(state)
    data = small_video()
    data["mask"]["rules"] = []
    state, _ = studio.apply_json_edit(state, json.dumps(data))
    out = studio.compare_static(state, "snapshot")
    assert out["error"] == "" and os.path.exists(out["diff"]) and "A: vid" in out["summary"]
    other = studio.compare_static(state, "prefix_lm")
    assert other["error"] == "" and os.path.exists(other["diff"])   # different token counts: side by side
    assert "B: another token count" in other["summary"]


# ---------------------------------------------------------------- the model
@pytest.mark.model
def test_run_model_on_the_embedded_default(smollm):
    state = studio.new_state({"name": "qa", "segments": [
        {"name": "context", "text": "The capital of France is Paris."},
        {"name": "question", "text": " Q: What is the capital of France? A:", "role": ["generate"]}],
        "mask": {"base": {"pattern": "causal"}}})
    seen = []
    state2, out = studio.run_model(state, "", 4, progress=lambda f, desc="": seen.append(desc))
    assert out["error"] == "", out["error"]
    assert out["continuation"] and out["top_k"] and out["tokens"][0][0] == "context"
    for key in ("attention", "mass", "curves", "rollout"):
        assert os.path.exists(out[key])
    assert studio.get_run(state2) is not None and studio.get_run(state) is None
    assert os.path.exists(studio.attention_for_state(state2, 3, "1"))
    bad, out = studio.run_model(state, "no-such/model-anywhere-xyz", 0)
    assert out["error"] and "\n" not in out["error"] and bad is state


@pytest.mark.model
def test_knockout_and_compare_runs(smollm):
    data = {"name": "qa", "segments": [
        {"name": "context", "text": "Paris is in France."},
        {"name": "question", "text": " Paris is in"}], "mask": {"base": {"pattern": "causal"}}}
    state = studio.set_snapshot(studio.new_state(data))
    ko = studio.knockout_sweep(state, "question", "context", window=28)  # 3 windows of 30 layers
    assert ko["error"] == "" and os.path.exists(ko["curve"]) and "knockout" in ko["summary"]
    named = studio.knockout_sweep(state, "question", "context", window=28, target=" Rome")
    assert named["error"] == "" and '" Rome"' in named["summary"] and named["summary"] != ko["summary"]
    data["mask"]["rules"] = [{"q": "question", "k": "context", "pattern": "none"}]
    state, _ = studio.apply_json_edit(state, json.dumps(data))
    cmp = studio.compare_runs(state, "snapshot", "", 0)
    assert cmp["error"] == "" and os.path.exists(cmp["kl"]) and os.path.exists(cmp["mass_diff"])
    assert "KL(a||b)" in cmp["summary"]


# ---------------------------------------------------------------- vision-language runs (tiny local VLMs)
def _png(path, w=40, h=30, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(path)
    return str(path)


def test_uploads_are_assigned_to_image_and_video_segments(tmp_path):
    spec = Spec.load({"segments": [{"name": "a", "modality": "image", "grid": [2, 2]},
                                   {"name": "clip", "modality": "video", "grid": [2, 2, 2]},
                                   {"name": "b", "modality": "image", "grid": [2, 2]},
                                   {"name": "q", "text": "?"}]})
    files = [_png(tmp_path / n) for n in ("x.png", "b.png", "f1.png", "f2.png", "clip_09.png")]
    images, lines = studio.assign_images(spec, files)
    assert images["b"].endswith("b.png") and images["a"].endswith("x.png")
    assert [os.path.basename(p) for p in images["clip"]] == ["clip_09.png"]
    assert any(line.startswith("unused uploads") for line in lines)  # f1, f2: clip already has its named frame
    images, _ = studio.assign_images(spec, files[:1] + files[2:4])  # x, f1, f2: in order
    assert images["a"].endswith("x.png") and images["b"].endswith("f1.png")
    assert [os.path.basename(p) for p in images["clip"]] == ["f2.png"]


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
@pytest.mark.parametrize("model", ["tiny-qwen2-vl", "tiny-idefics3"])
def test_vlm_run_with_uploads_and_overlay(tmp_path, model):
    state = studio.new_state({"name": "vqa", "segments": [
        {"name": "img", "modality": "image", "grid": [2, 2]}, {"name": "q", "text": " what is this?"}]})
    state2, out = studio.run_model(state, model, 2, images=[_png(tmp_path / "photo.png")])
    assert out["error"] == "", out["error"]
    assert "upload -> img: photo.png" in out["notes"]
    assert [row[0] for row in out["tokens"]] == ["img_start", "img", "img_end", "q"]
    overlay, share, error = studio.overlay_for_state(state2, 0, "1", "q")
    assert error == "" and os.path.exists(overlay) and os.path.exists(share)
    assert studio.overlay_for_state(state2, None, "mean", "", "nope")[2]  # unknown segment: one error line
    text_run = studio.new_state({"segments": [{"name": "q", "text": "hi"}]})
    assert studio.overlay_for_state(text_run) == (None, None, "")


@pytest.mark.model
def test_pictures_use_the_loaded_tokenizer_for_sizes_and_labels(smollm):
    """Once a model is loaded, unsized text segments get their real token counts and the mask
    view is labelled with the real tokens (issue: 'the real tokens when a tokenizer is at hand')."""
    from maskstudio.run import prepare

    spec = Spec.load({"segments": [{"name": "ctx", "text": "Paris is lovely."},
                                   {"name": "q", "text": " Where?"}]})
    sized, note = studio.picture_spec(spec)
    ran = prepare(spec, smollm)
    assert [s["length"] for s in sized.segments] == [s["length"] for s in ran.layout.segments]
    assert "tokenizer" in note
    o = studio.view_options(sized, {})
    assert o["token_labels"] is not None and len(o["token_labels"]) == sized.n
    assert "Paris" in "".join(o["token_labels"])


# ---------------------------------------------------------------- trust: paths, temp files, memory
def test_the_json_editor_never_opens_a_server_path(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"segments": [{"name": "leaked_secret", "length": 2}]}')
    state = studio.new_state()
    for text in (str(secret), "/dev/zero", "/etc/passwd", " " + str(secret)):
        new, error = studio.apply_json_edit(state, text)
        assert error.startswith("invalid JSON") and "leaked_secret" not in error
        assert kept(new, state)  # the design is kept


def test_an_oversized_upload_is_refused_before_parsing(tmp_path):
    from maskstudio import knobs

    big = tmp_path / "big.json"
    big.write_text('{"name": "' + "x" * (knobs.MAX_SPEC_BYTES + 10) + '"}')
    state = studio.new_state()
    new, error = studio.import_file(state, str(big))
    assert "MiB" in error and new is state


def test_undo_history_is_bounded():
    from maskstudio import knobs

    state = studio.new_state()
    for i in range(knobs.HISTORY + 15):
        state, error = studio.apply_json_edit(state, json.dumps(
            {"segments": [{"name": "a", "length": 2 + i}], "mask": {"base": {"pattern": "causal"}}}))
        assert not error
    assert len(state["history"]) == knobs.HISTORY


def test_temp_files_are_removed(tmp_path):
    """Pictures the cache lets go are deleted at once; one-off run pictures and exports after
    knobs.WORKDIR_MAX_AGE_S; cached pictures stay."""
    import os
    import time

    from maskstudio.studio import pictures

    cache = pictures.Cache(2, on_evict=pictures.remove_if_ours)
    paths = []
    for i in range(3):
        path = os.path.join(pictures.WORKDIR, f"evict-test-{i}.png")
        open(path, "wb").close()
        paths.append(cache.put(i, path))
    assert not os.path.exists(paths[0]) and os.path.exists(paths[1]) and os.path.exists(paths[2])
    old = os.path.join(pictures.WORKDIR, "old-run-picture.png")
    open(old, "wb").close()
    os.utime(old, (time.time() - 10_000, time.time() - 10_000))
    kept = pictures._CACHE.put("png:sweep-test", os.path.join(pictures.WORKDIR, "kept.png"))
    open(kept, "wb").close()
    os.utime(kept, (time.time() - 10_000, time.time() - 10_000))
    assert pictures.sweep_workdir() >= 1
    assert not os.path.exists(old) and os.path.exists(kept)


# ---------------------------------------------------------------- issue 15: every handler total, no dead ends
def _tables(state):
    return {k: [list(r) for r in v] if isinstance(v, list) else v for k, v in
            studio.spec_to_tables(studio.current(state)).items()}


def test_stale_picker_values_are_clamped_and_said_next_to_their_control():
    hymba, _ = studio.load_preset_into_state(studio.new_state(), "hymba_meta_tokens")
    cca = studio.current(studio.load_preset_into_state(hymba, "cca")[0])
    o = studio.view_options(cca, {"layer": 15, "head": 3})          # a hidden slider left at 15 (item 2)
    c = studio.controls(cca)
    assert o["layer"] <= c["layer_max"] and o["head"] <= c["head_max"]
    views = studio.design_views(cca, {"layer": 15, "head": 3, "reach_token": "path2[3]", "query": "goal"})
    assert views["options"]["layer"] <= views["layer_max"]
    assert "no segment named 'path2'" in views["options"]["warnings"]["reach_token"]   # item 1: said, not raised
    assert "goal" in views["options"]["warnings"]["query"] and views["options"]["query"] in views["segments"]
    assert all(os.path.exists(views[v]) for v in studio.VIEWS)
    assert studio.view_options(cca, {"layer": "x", "reach_layers": None})["layer"] == 0
    assert studio.view_options(cca)["query"] in views["segments"]   # the distance picker shows its default (item 13)


def test_table_edits_keep_leading_spaces_of_texts():
    state = studio.new_state({"name": "qa", "segments": [
        {"name": "context", "text": "Paris is in France."}, {"name": "question", "text": " Paris is in"}],
        "mask": {"base": {"pattern": "causal"}}})
    t = _tables(state)
    assert t["segments"][1][5] == " Paris is in"
    t["rules"].append(["rule", "question", "context", "none", "", "", ""])   # only a rule changes (item 3)
    new, err = studio.apply_tables(state, t["segments"], t["rules"], t["overlays"], t["scheme"], t["position_params"])
    assert err == "" and studio.current(new).segments[1]["text"] == " Paris is in"
    t["segments"][0][5] = "  two spaces"                                   # an edited text keeps them too
    new, err = studio.apply_tables(new, t["segments"], t["rules"], t["overlays"], t["scheme"], t["position_params"])
    assert studio.current(new).segments[0]["text"] == "  two spaces"


def test_a_pattern_change_drops_the_old_parameters_and_errors_name_the_table_row():
    state, _ = studio.load_preset_into_state(studio.new_state(), "prefix_lm")
    t = _tables(state)
    t["rules"][1][3:5] = ["window", "size=3"]
    state, err = studio.apply_tables(state, t["segments"], t["rules"], t["overlays"], t["scheme"], t["position_params"])
    assert err == ""
    t = _tables(state)
    t["rules"][1][3] = "full"                                     # params cell still "size=3, ..." (item 8)
    new, err = studio.apply_tables(state, t["segments"], t["rules"], t["overlays"], t["scheme"], t["position_params"])
    assert err == "" and studio.current(new).mask["rules"][0] == {"pattern": "full", "q": "*", "k": "prefix"}
    assert studio.tables_need_refresh(studio.current(state), studio.current(new))
    t["rules"][1][3] = "dilated"
    _, err = studio.apply_tables(state, t["segments"], t["rules"], t["overlays"], t["scheme"], t["position_params"])
    assert err.startswith("rules table, row 2 (mask.rules[0].dilation)")
    t = _tables(state)
    t["segments"][1][2] = "8q"
    _, err = studio.apply_tables(state, t["segments"], t["rules"], t["overlays"], t["scheme"], t["position_params"])
    assert err.startswith("segments table, row 2 (segments[1].size)")


def test_edited_presets_are_renamed_and_the_gallery_follows():
    state, _ = studio.load_preset_into_state(studio.new_state(), "prefix_lm")
    assert studio.preset_of(studio.current(state)) == "prefix_lm"
    t = _tables(state)
    t["rules"][1][3] = "none"
    new, err = studio.apply_tables(state, t["segments"], t["rules"], t["overlays"], t["scheme"], t["position_params"])
    spec = studio.current(new)
    assert spec.name == "prefix_lm-edited" and studio.preset_of(spec) is None    # item 9
    assert "Edited from" in studio.design_card(spec) and "Raffel" in studio.design_card(spec)
    b = studio.set_snapshot(state)
    b = dict(b, spec=studio.current(state))
    assert "(the design)" in studio.compare_static(b, "snapshot")["summary"]   # same names told apart
    assert "own design" in studio.design_card(Spec.load(studio.BLANK))


def test_examples_fit_every_runnable_preset_and_refusals_come_before_loading():
    import sys

    for p in list_presets():
        spec = load_preset(p["name"])
        blocker = studio.run_blocker(spec)
        mods = {s["modality"] for s in spec.segments}
        if mods & {"image", "video", "audio"}:
            assert blocker and ("text-only model" in blocker or "audio" in blocker), p["name"]
            continue
        assert blocker is None, p["name"]
        filled, names = studio.with_examples(spec)            # no tokenizer: estimated from words
        assert names == studio.needs_examples(spec) and not studio.needs_examples(filled)
        assert [s.get("length") for s in filled.segments] == [s.get("length") for s in spec.segments]
    assert studio.run_blocker(load_preset("cca"), "tiny-qwen2-vl") is None
    assert "tiny-qwen2-vl" in studio.run_blocker(load_preset("cca"))   # names what would take it
    state, _ = studio.load_preset_into_state(studio.new_state(), "tc_llava")
    _, out = studio.run_model(state, "", 0)
    assert "text-only model" in out["error"]
    if "maskstudio.run.models" in sys.modules:   # nothing was loaded for the refusal (item 6)
        from maskstudio.run import loaded_models
        assert not any("video" in m.name for m in loaded_models())


def test_messages_fit_the_app():
    msg = studio.app_message("model 'x/y' is not downloaded and the Hugging Face hub is unreachable; connect to "
                             "the network once to download it, or leave out --model to use the embedded model", "x/y")
    assert "--model" not in msg and "model box" in msg
    gone = studio.app_message("model 'HuggingFaceTB/SmolLM2-135M-Instruct' is not downloaded and the Hugging "
                              "Face hub is unreachable; or leave out --model", None)
    assert "not installed here" in gone and "--model" not in gone


def test_export_of_a_design_sized_by_the_tokenizer_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(studio.actions, "tokenizer_at_hand", lambda: None)
    state = studio.new_state({"name": "qa", "segments": [{"name": "a", "text": "one two three"}],
                              "mask": {"base": {"pattern": "causal"}}})
    path, err = studio.export_for_state(state, "flex")
    assert path is None and "run the design once" in err
    path, note = studio.export_for_state(state, "json")
    assert path and note == ""


@pytest.fixture
def app_module(monkeypatch):
    monkeypatch.setenv("MASKSTUDIO_RENDER_PROCESSES", "0")
    import app
    return app


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_app_edit_handlers_are_total(app_module):
    """Item 1 and 2 as the app's handlers see them: the design switches, the message goes next to
    the control, nothing raises; a broken edit keeps the last good design and marks the pictures."""
    app = app_module
    opts = (0, 0, 4, "path2[3]", None, "segment")
    h = app.edit_handler(studio.load_preset_into_state, 1, "preset")
    out = h(studio.new_state(), "prefix_lm", *opts)
    pics = out[8:8 + app.N_PICTURE_OUTPUTS]
    assert studio.current(out[0]).name == "prefix_lm" and out[7] == ""
    assert "no segment named 'path2'" in pics[13]                # next to the token box
    out = h(out[0], "hymba_meta_tokens", *opts)
    out = h(out[0], "cca", 15, 3, 4, "", None, "segment")
    layer = out[8 + 7]
    assert layer["value"] <= layer["maximum"]

    def broken(state, *_):
        raise RuntimeError("boom")
    out2 = app.edit_handler(broken, 0, "json")(out[0], 0, 0, 4, "", None, "segment")
    assert out2[0] is out[0] and "boom" in out2[7] and "last valid design" in out2[8 + app.NOTE]
    bad = app.edit_handler(studio.apply_json_edit, 1, "json")(out[0], "{oops", 0, 0, 4, "", None, "segment")
    assert bad[7].startswith("⚠") and studio.current(bad[0]) is studio.current(out[0])
    assert "last valid design" in bad[8 + app.NOTE]
    assert app.on_view_options(out[0], 99, 99, 4, "nope[1]", "nope", "token")[13].startswith("⚠")


@pytest.mark.model
def test_every_preset_runs_on_the_embedded_model_or_is_refused_up_front(smollm):
    """Item 5: text presets get example text of exactly their declared sizes (so the run's layout
    is the design the pictures show); the rest are refused before any model is loaded."""
    from maskstudio.run.inputs import prepare

    refused = []
    for p in list_presets():
        spec = load_preset(p["name"])
        if studio.run_blocker(spec):
            refused.append(p["name"])
            continue
        filled, _ = studio.with_examples(spec, smollm.tokenizer)
        assert prepare(filled, smollm).layout.n == spec.n, p["name"]
    assert "cca" in refused and "prefix_lm" not in refused
    for name in ("prefix_lm", "hymba_meta_tokens", "multiverse"):   # real one-click runs
        state, _ = studio.load_preset_into_state(studio.new_state(), name)
        state2, out = studio.run_model(state, "", 2)
        assert out["error"] == "", (name, out["error"])
        assert "example text used for" in out["summary"] and out["continuation"]
        assert studio.get_run(state2).layout.n == studio.current(state).n


@pytest.mark.model
def test_designs_sized_by_the_tokenizer_export_the_last_run(smollm):
    state = studio.new_state({"name": "qa", "segments": [
        {"name": "context", "text": "Paris is in France."}, {"name": "question", "text": " Paris is in"}],
        "mask": {"base": {"pattern": "causal"}}})
    state2, out = studio.run_model(state, "", 0)
    assert out["error"] == ""
    path, note = studio.export_for_state(state2, "npy")
    n = studio.get_run(state2).layout.n
    assert np.load(path).shape == (n, n) and "last run" in note
    path, note = studio.export_for_state(state, "positions")      # no run of it: the loaded tokenizer
    assert path and "tokenizer" in note


# ---------------------------------------------------------------- the Train tab (tiny random Llama)
def _prefix_lm_kv() -> dict:
    state, error = studio.load_task_template(studio.new_state(), "kv_retrieval")
    assert error == ""
    d = studio.current(state).to_dict()
    d["name"] = "kv prefix lm"
    d["mask"] = {"base": {"pattern": "causal"}, "rules": [{"q": "*", "k": ["instruction", "doc0", "doc1", "doc2",
                                                                          "doc3", "question"], "pattern": "full"}]}
    return d


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_train_design_on_tiny_llama_draws_the_loss_curve_and_the_table():
    from PIL import Image

    state = studio.new_state(_prefix_lm_kv())
    seen = []
    out = studio.train_design(state, "kv_retrieval", 3, 1e-3, False, "next_token", "tiny-llama", True,
                              progress=lambda f, desc="": seen.append(desc))
    assert out["error"] == ""
    assert Image.open(out["curve"]).format == "PNG"
    assert "before training" in out["summary"] and "after 3 steps" in out["summary"]
    assert "causal baseline" in out["summary"] and "design: kv prefix lm" in out["summary"]
    assert [d.split(":")[0] for d in seen] == ["causal baseline"] * 3 + ["design"] * 3   # step / loss, live
    assert "step 3/3, loss" in seen[-1]
    files = set(os.listdir(out["run_dir"]))
    assert {"config.json", "metrics.json", "summary.txt", "loss_curve.png"} <= files
    losses = json.load(open(os.path.join(out["run_dir"], "metrics.json")))["losses"]
    assert [len(v) for v in losses.values()] == [3, 3]
    alone = studio.train_design(state, "kv_retrieval", 2, 1e-3, True, "bico", "tiny-llama", False)
    assert alone["error"] == "" and "no baseline" in alone["summary"] and os.path.exists(alone["curve"])


@pytest.mark.parametrize("bad, words", [
    ({"steps": 0}, "steps must be"), ({"steps": "many"}, "must be numbers"), ({"task": "nope"}, "unknown task"),
    ({"lr": 5}, "learning rate"), ({"objective": "mlm"}, "unknown objective")])
def test_train_design_bad_input_is_one_line_and_keeps_the_design(bad, words):
    state = studio.new_state(_prefix_lm_kv())
    before = studio.current(state).to_json()
    kw = dict(task="kv_retrieval", steps=2, lr=1e-3, lora=False, objective="next_token", model_id="tiny-llama",
              baseline=False)
    out = studio.train_design(state, **{**kw, **bad})
    assert words in out["error"] and "\n" not in out["error"]
    assert out["curve"] is None and out["summary"] == "" and studio.current(state).to_json() == before


def test_train_design_says_the_design_is_not_the_task():
    state, _ = studio.load_preset_into_state(studio.new_state(), "multiverse")
    out = studio.train_design(state, "kv_retrieval", 2, 1e-3, False, "next_token", "tiny-llama", False)
    assert "not parts of the task" in out["error"] and "template" in out["error"] and "\n" not in out["error"]


# ---------------------------------------------------------------- issue 15: reading a run, blocks, A/B/C, gallery
def _fake_result():
    """A real RunResult from random attention (no model): what the run views and downloads read."""
    from maskstudio.run.measures import rollout, segment_mass
    from maskstudio.run.pipeline import RunResult

    layout = Spec.load({"name": "fake run", "segments": [{"name": "ctx", "length": 5}, {"name": "q", "length": 3}],
                        "mask": {"base": {"pattern": "causal"}}})
    causal = torch.triu(torch.full((8, 8), float("-inf")), 1)
    att = torch.softmax(torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1)) + causal, -1)
    return RunResult(layout=layout, input_ids=torch.arange(8), logits=torch.zeros(8, 10), top_k=[("x", 0.5)],
                     tokens={"ctx": ["A", " b", " c", " d", " e"], "q": [" f", " g", "?"]}, text="", target_nll={},
                     attentions=att, segment_mass=segment_mass(att, layout), rollout=rollout(att), model="fake")


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_focus_token_pictures_and_run_download(tmp_path):
    result = _fake_result()
    state = dict(studio.new_state(), run_id=studio.actions._keep_run(result))
    out = studio.focus_for_state(state, 1, "0", "ctx[2]")
    assert out["error"] == "" and out["token"] == 2
    assert all(os.path.exists(out[k]) for k in ("attention", "focus", "grid", "rollout"))
    typo = studio.focus_for_state(state, 99, "7", "nope[1]")        # every value stale or wrong: answered
    assert typo["token"] == 7 and "no segment named 'nope'" in typo["error"] and os.path.exists(typo["attention"])
    assert studio.focus_for_state(studio.new_state(), 0, "mean", "3")["attention"] is None   # no run yet
    choices = studio.token_choices(result)
    assert len(choices) == 8 and choices[5][1] == 5 and "q[0]" in choices[5][0]
    files, note = studio.run_download(state)
    npz = np.load(next(f for f in files if f.endswith(".npz")))
    assert npz["attentions"].dtype == np.float16 and npz["attentions"].shape == (3, 2, 8, 8)
    assert np.allclose(npz["attentions"], result.attentions.numpy(), atol=1e-3)
    assert npz["layers"].tolist() == [0, 1, 2] and npz["heads"].tolist() == [0, 1] and npz["tokens"][1] == " b"
    run = json.loads(open(next(f for f in files if f.endswith(".json"))).read())
    assert run["spec"]["segments"][0]["name"] == "ctx" and run["input_tokens"][6]["segment"] == "q[1]"
    assert run["attention_file"]["shape"] == [3, 2, 8, 8] and run["top_k"][0]["token"] == "x"
    none, why = studio.run_download(studio.new_state())
    assert none is None and "run the design first" in why


def test_block_view_snaps_sizes_and_says_so():
    spec = Spec.load({"segments": [{"name": "a", "length": 300}], "mask": {"base": {"pattern": "causal"}}})
    path, msg = studio.block_view(spec, 64)
    assert os.path.exists(path) and msg == ""
    assert studio.block_view(spec, 64)[0] == path                      # cached
    path2, msg = studio.block_view(spec, "100")
    assert os.path.exists(path2) and "showing 128" in msg
    _, msg = studio.block_view(spec, "oops")
    assert msg == ""                                                    # unreadable: the default size
    big = Spec.load({"segments": [{"name": "a", "length": 20000}], "mask": {"base": {"pattern": "causal"}}})
    path, msg = studio.block_view(big, 16)
    assert os.path.exists(path) and "showing 64-token blocks" in msg    # 20000 / 64 <= 512 blocks a side
    assert studio.block_view(big, 16, live=False) == (None, studio.block_view(big, 16, live=False)[1])
    assert "pick a block size" in studio.block_view(big, 16, live=False)[1]


def test_compare_three_designs_marks_differences():
    state = studio.set_snapshot(studio.new_state(small_video()))
    data = small_video()
    data["mask"]["base"] = {"pattern": "full"}
    state, _ = studio.apply_json_edit(state, json.dumps(data))
    out = studio.compare_static(state, "snapshot", ["prefix_lm", "snapshot"])
    assert out["error"] == "" and os.path.exists(out["diff"])
    label, head = out["summary"].splitlines()[:2]
    assert label.startswith("Comparison of ") and studio.read_label(label)["version"] == studio.version(studio.current(state))
    assert "A: vid" in head and "B: vid" in head and "C: prefix_lm" in head and "D: vid" in head
    assert any(line.startswith("≠") and "density" in line for line in out["summary"].splitlines())
    assert "C: another token count" in out["summary"]
    bad = studio.compare_static(state, "snapshot", ["no_such_preset"])
    assert bad["error"] and bad["diff"] is None


def test_token_flow_graph_past_readable_size_falls_back_with_a_message():
    spec = Spec.load({"segments": [{"name": "a", "length": 40}]})
    o = studio.view_options(spec, {"flow_level": "token"})
    assert o["flow_level"] == "segment" and "readable up to 32 tokens" in o["warnings"]["flow_level"]
    small = Spec.load({"segments": [{"name": "a", "length": 12}]})
    assert studio.view_options(small, {"flow_level": "token"})["flow_level"] == "token"


def test_gallery_rows_are_compact_and_a_row_names_its_preset():
    rows = studio.gallery_rows()
    assert len(rows) == len(list_presets()) and all(len(r[2]) <= 140 for r in rows)
    assert studio.gallery_pick(rows[0]) == rows[0][0]
    assert studio.gallery_pick(["not a preset", "x"]) is None and studio.gallery_pick(None) is None


@pytest.mark.slow  # seconds per run: the fast tier keeps a 50 s budget
def test_app_run_handlers_are_total_before_and_after_a_run(app_module):
    app = app_module
    state = studio.new_state()
    att, focus, grid, roll, msg = app.on_attention(state, 3, "mean", "q")
    assert att is None and msg == ""                                   # no run: nothing, no error badge
    files, msg = app.on_run_download(state)
    assert files is None and msg.startswith("⚠")
    run_state = dict(state, run_id=studio.actions._keep_run(_fake_result()))
    att, focus, grid, roll, msg = app.on_attention(run_state, "x", None, "zz[0]")
    assert os.path.exists(att) and msg.startswith("⚠")
    path, msg = app.on_blocks(state, 48, 0, 0)
    assert os.path.exists(path) and "showing 32" in msg or "showing 64" in msg


def test_user_text_in_cards_and_error_lines_is_literal_markdown():
    """A shared spec named `<img src=...>` or `![x](http://...)` shows as text: no tag, no image
    or link syntax survives into the Markdown the browser renders (#24 item 4)."""
    from maskstudio import Spec, studio

    hostile = 'evil <img src="http://attacker.example/a.png"> ![x](http://attacker.example/b.png) [l](http://a)'
    card = studio.design_card(Spec.load({"name": hostile, "segments": [{"name": "a", "length": 2}]}))
    for text in (card, studio.markdown_text(f"no segment named '{hostile}'")):
        assert "<img" not in text and "&lt;img" in text    # the tag shows as text
        assert "](" not in text and "![x]&#40;http" in text  # the image and link joints are broken
