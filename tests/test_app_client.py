"""The app through its public API (gradio_client), against `python app.py` in a subprocess.

Every named endpoint is called; the model endpoints are marked `model` too.
"""
import json
import os
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTS = (0, 0, 4, "", None, "segment")  # layer, head, reach layers, reach token, distance query, flow level
PICS = slice(7, 12)                     # mask, positions, distance, flow, reach in a design response
ENDPOINTS = {"/load_preset", "/new_blank", "/undo", "/edit_tables", "/edit_json", "/import_spec", "/render", "/reach",
             "/export", "/run_model", "/attention_map", "/knockout", "/keep_snapshot", "/compare_masks",
             "/compare_runs", "/eval_template", "/evaluate", "/image_overlay", "/train_template", "/train", "/audit",
             "/block_grid", "/download_run", "/redo", "/edit_text", "/adopt_run_sizes", "/stop"}

pytestmark = pytest.mark.slow


@pytest.fixture
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def spec_json(out) -> dict:
    return json.loads(out[0])


def test_every_endpoint_is_named(client):
    assert set(client.view_api(return_format="dict")["named_endpoints"]) == ENDPOINTS


def test_audit_tab_compares_the_design_with_a_models_own_masks(client):
    client.predict("prefix_lm", *OPTS, api_name="/load_preset")
    error, text, pictures, spec = client.predict("tiny-gemma2", api_name="/audit")
    assert error == "" and text.startswith("audit: tiny-gemma2 (gemma2, 4 layers) on 'prefix_lm'")
    assert "layers 0, 2 (sliding_attention)" in text and "verdict: your design differs" in text
    assert [p["caption"] for p in pictures] == ["every layer against your design", "layer 0: the model's own mask",
                                                "the position ids the model uses"]
    assert all(os.path.exists(p["image"]) for p in pictures)
    assert json.loads(spec)["mask"]["overlays"][0]["layers"] == [0, 2]
    error, text, pictures, spec = client.predict("/etc", api_name="/audit")
    assert "names a path on this server" in error and text == "" and spec == ""


def test_preset_edit_undo_and_error_keeps_pictures(client):
    out = client.predict("prefix_lm", *OPTS, api_name="/load_preset")
    assert spec_json(out)["name"] == "prefix_lm" and out[6] == ""
    assert all(os.path.exists(p) for p in out[PICS])
    assert "Raffel" in out[23]                          # the card (after 16 picture outputs)
    pics = out[PICS]
    segs, rules, overlays = out[1], out[2], out[3]
    rules["data"][1][3] = "none"                       # the rule '* -> prefix: full' becomes 'none'
    edited = client.predict(segs, rules, overlays, out[4], out[5], *OPTS, api_name="/edit_tables")
    assert spec_json(edited)["mask"]["rules"][0]["pattern"] == "none" and edited[6] == ""
    assert spec_json(edited)["name"] == "prefix_lm-edited"          # the name and the gallery follow the edit
    assert (edited[24] or {}).get("value") is None and (out[24] or {}).get("value") == "prefix_lm"
    assert edited[PICS][0] != pics[0]                  # a new mask picture
    bad = json.loads(edited[0])
    bad["mask"]["rules"][0]["k"] = "prefx"
    err = client.predict(json.dumps(bad), *OPTS, api_name="/edit_json")
    assert "mask.rules[0].k: no segment named 'prefx'" in err[6]
    assert not isinstance(err[0], str)                  # editor left as typed, pictures not replaced
    assert all(not isinstance(p, str) for p in err[PICS])
    again = client.predict(*OPTS, api_name="/render")   # the session still holds the last good design
    assert again[5] == edited[12] and again[0] == edited[7]
    back = client.predict(*OPTS, api_name="/undo")      # Undo drops only the invalid edit (#25 item 5)
    assert spec_json(back)["mask"]["rules"][0]["pattern"] == "none" and back[6] == ""
    back = client.predict(*OPTS, api_name="/undo")      # then the valid one before it
    assert spec_json(back)["mask"]["rules"][0]["pattern"] == "full"
    again = client.predict(*OPTS, api_name="/redo")
    assert spec_json(again)["mask"]["rules"][0]["pattern"] == "none" and again[PICS][0] == edited[PICS][0]
    blank = client.predict(*OPTS, api_name="/new_blank")
    assert spec_json(blank)["name"] == "untitled"


def test_render_options_and_export(client, tmp_path):
    out = client.predict("multiverse", *OPTS, api_name="/load_preset")
    pics = client.predict(0, 0, 6, "conclusion[0]", "conclusion", "segment", api_name="/render")
    assert all(os.path.exists(p) for p in pics[:5]) and pics[0] == out[7]
    canonical = out[0]
    path, error = client.predict("json", 0, 0, api_name="/export")
    from maskstudio import Spec
    from maskstudio.export import export_bytes
    assert error == "" and Path(path).read_bytes() == export_bytes(Spec.load(canonical), "json")
    assert Path(path).read_text().rstrip("\n") == canonical.rstrip("\n")   # the editor shows the same text
    path, _ = client.predict("flex", 0, 0, api_name="/export")
    assert "def mask_mod" in Path(path).read_text()
    path, _ = client.predict("npy", 0, 0, api_name="/export")
    import numpy as np
    assert np.load(path).shape == (44, 44)


def test_import_and_compare(client, tmp_path):
    from gradio_client import handle_file

    client.predict("prefix_lm", *OPTS, api_name="/load_preset")
    assert "Snapshot kept" in client.predict(api_name="/keep_snapshot")
    spec = {"name": "uploaded", "segments": [{"name": "prefix", "length": 8}, {"name": "target", "length": 8}],
            "mask": {"base": {"pattern": "causal"}}}
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(spec))
    out = client.predict(handle_file(str(f)), *OPTS, api_name="/import_spec")
    assert spec_json(out)["name"] == "uploaded"
    error, text, diff = client.predict("snapshot", [], api_name="/compare_masks")
    assert error == "" and "A: uploaded" in text and os.path.exists(diff)
    error, text, diff = client.predict("snapshot", ["prefix_lm", "causal2vec"], api_name="/compare_masks")
    assert error == "" and "C: prefix_lm" in text and "D: causal2vec" in text and os.path.exists(diff)
    path, msg = client.predict(16, 0, 0, api_name="/block_grid")
    assert os.path.exists(path) and msg == ""
    files, msg = client.predict(api_name="/download_run")
    assert not files and "run the design first" in msg
    f.write_text("{oops")
    out = client.predict(handle_file(str(f)), *OPTS, api_name="/import_spec")
    assert out[6].startswith("⚠ invalid JSON")
    assert client.predict(4, "mean", "", api_name="/attention_map")[0] is None   # no run yet


def test_eight_sessions_edit_different_specs_at_once(app_url):
    from gradio_client import Client

    results, errors = {}, []

    def session(i):
        try:
            c = Client(app_url, verbose=False)
            spec = {"name": f"user{i}", "segments": [{"name": "a", "length": 5 + i}, {"name": "b", "length": 7}],
                    "mask": {"base": {"pattern": "causal"},
                             "overlays": [{"op": "or", "q": "*", "k": "a", "pattern": "first", "size": 1 + i % 3}]}}
            out = c.predict(json.dumps(spec), *OPTS, api_name="/edit_json")
            again = c.predict(*OPTS, api_name="/render")   # the session's own state, read back
            results[i] = (spec_json(out)["name"], again[5])
        except Exception as err:  # noqa: BLE001
            errors.append(repr(err))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    for i in range(8):
        name, checks = results[i]
        assert name == f"user{i}" and checks.startswith(f"user{i}")
        assert f"tokens            {12 + i}" in checks


@pytest.mark.model
def test_run_knockout_and_compare_on_the_model(client):
    spec = {"name": "qa", "segments": [{"name": "context", "text": "The capital of France is Paris."},
                                       {"name": "question", "text": " The capital of France is"}],
            "mask": {"base": {"pattern": "causal"}}}
    client.predict(json.dumps(spec), *OPTS, api_name="/edit_json")
    client.predict(api_name="/keep_snapshot")
    out = client.predict("", 3, api_name="/run_model")
    error, summary, tokens, top_k, continuation = out[:5]
    assert error == "" and continuation and "SmolLM2" in summary
    assert tokens["data"][0][0] == "context"
    assert os.path.exists(out[6]) and os.path.exists(out[9])
    att, focus, grid, rollout, msg = client.predict(2, "0", "question[1]", api_name="/attention_map")
    assert all(os.path.exists(p) for p in (att, focus, grid, rollout)) and msg == ""
    files, _ = client.predict(api_name="/download_run")
    assert sorted(Path(f["path"] if isinstance(f, dict) else f).suffix for f in files) == [".json", ".npz"]
    error, text, curve = client.predict("question", "context", 28, "", "", api_name="/knockout")
    assert error == "" and "knockout" in text and os.path.exists(curve)
    error, text, _ = client.predict("question", "context", 28, "", " Rome", api_name="/knockout")
    assert error == "" and '" Rome"' in text  # the named target, not the top-1
    error, text, _ = client.predict("question", "context", 28, "", "", "1.2", "knockout", 2, "snapshot",
                                    api_name="/knockout")   # all 9 inputs: heads, mode, noise draws, design B
    assert error == "" and "heads 1.2 knocked out in qa" in text and "of 2 random edits" in text
    error, text, kl, mdiff = client.predict("snapshot", "", 0, api_name="/compare_runs")
    assert error == "" and "KL(a||b)" in text and os.path.exists(kl)


@pytest.mark.model
def test_evaluate_tab_scores_design_against_the_template(client):
    out = client.predict("kv_retrieval", *OPTS, api_name="/eval_template")
    assert [s["name"] for s in spec_json(out)["segments"]][-1] == "answer"
    error, text, img = client.predict("kv_retrieval", 2, "template", "", api_name="/evaluate")
    assert "same spec" in error and text == ""            # nothing to compare yet, said in one line
    isolated = (ROOT / "examples" / "kv_isolated_docs.json").read_text()
    client.predict(isolated, *OPTS, api_name="/edit_json")
    error, text, img = client.predict("kv_retrieval", 2, "template", "", api_name="/evaluate")
    assert error == "" and "design: kv isolated docs" in text and "accuracy by gold_position" in text
    assert os.path.exists(img)


def test_train_tab_trains_the_template_on_tiny_llama(client):
    out = client.predict("kv_retrieval", *OPTS, api_name="/train_template")
    assert [s["name"] for s in spec_json(out)["segments"]][-1] == "answer"
    error, text, curve = client.predict("kv_retrieval", 2, 1e-3, False, "next_token", True, "tiny-llama",
                                        api_name="/train")
    assert error == "" and "after 2 steps" in text and "causal baseline" in text and os.path.exists(curve)
    error, text, curve = client.predict("kv_retrieval", 2, 5, False, "next_token", False, "tiny-llama",
                                        api_name="/train")   # (steps outside the slider: refused by gradio)
    assert "learning rate" in error and "\n" not in error and text == ""   # one line
