"""The interactive attention viewer: a run's recorded attention, sent to the browser once, explored
there with the mouse (no server trip per look), as BertViz and CircuitsVis do.

`viewer_payload(result)` packs what the page needs as plain JSON: token labels and segments, every
layer x head as float16 (base64, little-endian [H, N, N] per layer), thumbnails of every map for
the layers x heads grid (uint8, sqrt scale, max-pooled), and the design's mask of each (layer,
head) as packed bits, so the page outlines it on the same view. Bounded by knobs.VIEWER_MAX_BYTES:
every layer when they fit ("all"), else one layer per request ("layer": the page asks for
another layer when it is clicked), past one layer's heads no maps ("off": the pictures below
still show them); `bound` says which in words.

`attention_viewer.js` (beside this file) draws it: hover or click a token / cell to focus it (its
row and column), lines between tokens coloured by head (heads toggled), the layers x heads grid
(click a map), the text coloured by attention from / to the focus token, the mask outlined on the
map. `VIEWER` holds the strings an HTML block needs (template, CSS, script); in "layer" mode the
page asks the server function `viewer_layer` (studio.heads) for a layer: `layer_request`.
"""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from ..knobs import VIEWER_LINES_MAX, VIEWER_MAX_BYTES
from .figures import segment_colors
from .run_views import run_token_labels

HERE = Path(__file__).resolve().parent
THUMB_CELLS = 24  # thumbnails of the grid: at most this many cells a side
HELP = (  # shown in the viewer ("How to read this viewer"), in the README and the app's help
    "Everything here is drawn in your browser: hovering and clicking ask nothing of the server. "
    "GRID: every layer (columns) x head (rows) as a thumbnail; click one to show that layer and head. "
    "HEAD CHIPS: toggle heads; the map shows the mean of the heads that are on (shift-click: that head alone); each "
    "head keeps its colour in the grid outline and in the lines. MAP: query tokens are rows, key tokens columns, "
    "colour = square root of the attention probability; grey cells are masked by the design and a teal line outlines "
    "the design's mask, so all attention falls inside it. Hover a cell to focus its query (cyan row) and its key "
    "(green column); click to pin the focus, click again to release it. LINES: the left column reads (queries), the "
    "right column is read (keys); hover a left token for what it attends to, a right token for what attends to it; "
    "line opacity = attention, one colour per head. TEXT: the tokens shaded by the focus row (what the focus token "
    "attends to) or by its column (what attends to it), as the two buttons choose; hover or click a token to focus "
    "it. The line at the top says how much of the run is in the page; past that bound a layer is fetched from the "
    "server when you click it.")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb[:3])


def plan(layers: int, heads: int, n: int, budget: int = VIEWER_MAX_BYTES) -> tuple[str, str]:
    """(mode, the bound in words): "all" layers at once, one "layer" per request, or "off"."""
    total, one = layers * heads * n * n * 2, heads * n * n * 2
    mb = budget / 2 ** 20
    if total <= budget:
        return "all", (f"all {layers} layers x {heads} heads of {n} tokens are in the page ({total / 2**20:.1f} MB "
                       f"float16, bound {mb:.0f} MB): every look is drawn in the browser")
    if one <= budget:
        return "layer", (f"{layers} x {heads} maps of {n} tokens pass the page's {mb:.0f} MB bound: one layer "
                         f"({one / 2**20:.1f} MB float16) is in the page at a time; another layer is fetched "
                         f"from the server when you click it (heads, tokens and cells stay in the browser)")
    return "off", (f"one layer of {heads} maps of {n} tokens is {one / 2**20:.0f} MB, past the page's {mb:.0f} MB "
                   f"bound: the grid is shown, the maps are in the pictures below and the run's .npz download")


def thumbnails(att, cells: int = THUMB_CELLS) -> tuple[np.ndarray, int]:
    """uint8 [L, H, c, c]: every map max-pooled to c <= cells a side (thin diagonals stay visible),
    sqrt scale; one layer at a time (no float copy of the whole tensor)."""
    L, H, n = att.shape[0], att.shape[1], att.shape[-1]
    f = max(1, -(-n // cells))
    c = -(-n // f)
    out = np.zeros((L, H, c, c), np.uint8)
    for lay in range(L):
        m = att[lay].float().numpy()
        pad = np.zeros((H, c * f, c * f), np.float32)
        pad[:, :n, :n] = m
        pooled = pad.reshape(H, c, f, c, f).max((2, 4))
        out[lay] = np.clip(np.sqrt(np.clip(pooled, 0, 1)) * 255 + 0.5, 0, 255).astype(np.uint8)
    return out, c


def masks(layout, layers: int, heads: int, n: int) -> tuple[list[str], list[list[int]]]:
    """The design's mask of every (layer, head) as packed bits (row-major [N, N], np.packbits order),
    one entry per distinct mask, and the index of each layer's heads' mask."""
    by_head = layout.varies_by_head
    keys: dict = {}      # (layer key, head) -> index: each distinct rule set evaluated once
    packed: dict = {}    # packed bits -> index: each distinct mask sent once
    index = []
    for lay in range(layers):
        row = []
        for h in range(heads):
            key = (layout.layer_key(lay), h if by_head else 0)
            if key not in keys:
                m = layout.dense_mask(lay, h if by_head else 0)[:n, :n].numpy().astype(bool)
                keys[key] = packed.setdefault(_b64(np.packbits(m.reshape(-1))), len(packed))
            row.append(keys[key])
        index.append(row)
    return list(packed), index


def layer_maps(att, layers) -> dict:
    """{str(layer): base64 float16 little-endian [H, N, N]} of the given layers."""
    return {str(lay): _b64(att[lay].numpy().astype("<f2")) for lay in layers}


def viewer_payload(result, layer: int | None = None, budget: int = VIEWER_MAX_BYTES) -> dict | None:
    """The viewer's JSON for a run (None when the run recorded no attention); `layer`: the one
    shown first (default the last) and, in "layer" mode, the one sent."""
    att = getattr(result, "attentions", None)
    if att is None:
        return None
    L, H, n = int(att.shape[0]), int(att.shape[1]), int(att.shape[-1])
    lay = L - 1 if layer is None else min(max(int(layer), 0), L - 1)
    mode, bound = plan(L, H, n, budget)
    layout = result.layout
    t = layout.table
    segs = [{"name": name, "start": int(start), "size": int(size), "color": _hex(col)}
            for name, start, size, col in zip(t.names, t.starts, t.sizes, segment_colors(layout))]
    thumbs, c = thumbnails(att)
    packed, mask_of = masks(layout, L, H, n)
    maps = layer_maps(att, range(L) if mode == "all" else [lay] if mode == "layer" else [])
    return {"v": 1, "model": result.model, "design": layout.name, "n": n, "layers": L, "heads": H,
            "tokens": run_token_labels(result)[:n], "segments": segs, "mode": mode, "bound": bound, "layer": lay,
            "maps": maps, "thumbs": _b64(thumbs), "cells": c, "masks": packed, "mask_of": mask_of,
            "lines_max": VIEWER_LINES_MAX, "help": HELP}


def layer_request(result, layer) -> dict:
    """{"layer", "maps"}: one layer's maps, what the page asks for in "layer" mode (one server trip
    per layer change); a layer out of range is clamped, one that is no number gives no maps."""
    L = int(result.attentions.shape[0])
    try:
        lay = min(max(int(layer), 0), L - 1)
    except (TypeError, ValueError, OverflowError):
        return {"layer": None, "maps": {}}
    return {"layer": lay, "maps": layer_maps(result.attentions, [lay])}


def payload_bytes(payload: dict | None) -> int:
    """The payload's size as sent (its strings dominate)."""
    import json

    return len(json.dumps(payload)) if payload else 0


VIEWER = {
    "html_template": '<div class="av-root" data-empty="1"></div>',
    "css_template": (HERE / "attention_viewer.css").read_text(encoding="utf-8"),
    "js_on_load": (HERE / "attention_viewer.js").read_text(encoding="utf-8"),
}
