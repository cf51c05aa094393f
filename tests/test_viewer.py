"""The attention viewer's payload (viz.attention_viewer) and its server function (studio.heads):
what the page decodes is the run's attention and the design's mask, bit for bit; the bound is
kept and said; a layer is served only to the page holding its run's key."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from maskstudio import run as R
from maskstudio.studio import heads as SH
from maskstudio.viz import attention_viewer as V
from test_runner import _tiny

SPEC = {"segments": [{"name": "sys", "text": "abc"}, {"name": "doc", "text": "hello there"},
                     {"name": "q", "text": "why?"}],
        "mask": {"base": {"pattern": "causal"}, "rules": [{"q": "doc", "k": "doc", "pattern": "full"}],
                 "overlays": [{"op": "and_not", "q": "q", "k": "sys", "pattern": "full", "layers": [1], "heads": [2]}]}}


@pytest.fixture(scope="module")
def result():
    return R.run(SPEC, _tiny("llama"))


def f16(b64: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f2").reshape(shape)


def test_payload_is_the_runs_attention_and_the_designs_mask(result):
    p = V.viewer_payload(result)
    L, H, n = result.attentions.shape[:3]
    assert (p["layers"], p["heads"], p["n"], p["mode"]) == (L, H, n, "all")
    for lay in range(L):                                                  # float16 maps, bit for bit
        assert np.array_equal(f16(p["maps"][str(lay)], (H, n, n)), result.attentions[lay].numpy())
    layout = result.layout
    for lay in range(L):                                                  # the mask of every (layer, head)
        for h in range(H):
            bits = np.unpackbits(np.frombuffer(base64.b64decode(p["masks"][p["mask_of"][lay][h]]), np.uint8))[:n * n]
            assert np.array_equal(bits.reshape(n, n).astype(bool), layout.dense_mask(lay, h).numpy())
    assert p["mask_of"][1][2] != p["mask_of"][1][0] and p["mask_of"][0][2] == p["mask_of"][0][0]
    assert len(p["masks"]) == 2                                           # distinct masks only
    att = result.attentions.float().numpy()
    assert (f16(p["maps"]["0"], (H, n, n)) * ~layout.dense_mask(0, 0).numpy()).max() == 0  # attention inside the mask
    assert p["tokens"] == V.run_token_labels(result) and len(p["tokens"]) == n
    assert [s["name"] for s in p["segments"]] == ["sys", "doc", "q"] and p["segments"][1]["start"] == 3
    thumbs = np.frombuffer(base64.b64decode(p["thumbs"]), np.uint8).reshape(L, H, p["cells"], p["cells"])
    c, f = p["cells"], -(-n // p["cells"])
    top = att[2, 1, :f, :f].max()                                         # a pooled cell: the max of its block
    assert abs(int(thumbs[2, 1, 0, 0]) - round(np.sqrt(top) * 255)) <= 1 and c <= V.THUMB_CELLS
    assert json.loads(json.dumps(p)) == p                                 # plain JSON
    assert "drawn in your browser" in p["help"]


def test_the_bound_picks_the_mode_and_says_so(result):
    L, H, n = result.attentions.shape[:3]
    per_layer = H * n * n * 2
    full = V.viewer_payload(result, budget=L * per_layer)
    one = V.viewer_payload(result, layer=1, budget=L * per_layer - 1)
    off = V.viewer_payload(result, budget=per_layer - 1)
    assert full["mode"] == "all" and len(full["maps"]) == L
    assert one["mode"] == "layer" and list(one["maps"]) == ["1"] and one["layer"] == 1
    assert "fetched from the server when you click it" in one["bound"]
    assert off["mode"] == "off" and off["maps"] == {} and "past the page's" in off["bound"]
    assert V.plan(30, 9, 176)[0] == "all" and V.plan(30, 9, 177)[0] == "layer"   # SmolLM2's 30 x 9 maps
    assert V.plan(30, 9, 965)[0] == "layer" and V.plan(30, 9, 966)[0] == "off"
    assert V.payload_bytes(full) < 1.4 * L * per_layer + 200_000


def test_server_function_serves_a_layer_to_its_runs_key_only(result):
    state = {"run_id": "k" * 32}
    SH._PAYLOADS.pop(state["run_id"])
    from maskstudio.studio import actions

    actions._RUNS.put(state["run_id"], result)
    try:
        p = SH.viewer_for_state(state)
        assert p["run"] == state["run_id"]
        got = SH.viewer_layer({"run": state["run_id"], "layer": 2})
        H, n = result.attentions.shape[1], result.attentions.shape[-1]
        assert got["layer"] == 2 and np.array_equal(f16(got["maps"]["2"], (H, n, n)), result.attentions[2].numpy())
        assert SH.viewer_layer([{"run": state["run_id"], "layer": 99}])["layer"] == 2   # clamped to the last
        for bad in ({"run": "nope", "layer": 0}, {"layer": 0}, "x", None, {"run": state["run_id"], "layer": "x"},
                    {"run": ["list"], "layer": 0}):
            assert SH.viewer_layer(bad)["maps"] == {}
        assert SH.viewer_for_state({"run_id": None}) is None and SH.viewer_for_state({}) is None
    finally:
        actions._RUNS.pop(state["run_id"])


def test_the_page_script_writes_user_text_as_text_only():
    js = V.VIEWER["js_on_load"]
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js
    assert "textContent" in js and "server.viewer_layer" in js
    css = V.VIEWER["css_template"]
    assert "${" not in css and "{{" not in css                            # Gradio templates the CSS


def test_no_attention_no_viewer():
    r = R.run(SPEC, _tiny("llama"), attentions=False)
    assert V.viewer_payload(r) is None
    assert torch.is_tensor(r.logits)
