"""Position-id schemes: token table -> LongTensor [N] (1-D RoPE) or [3, N] (t, h, w M-RoPE).

  sequential  {start=0}                0, 1, 2, ... (the model's default)
  per_segment                          each segment restarts at 0 (its local index)
  branches    {align=start, span=longest}
              a run of consecutive branch segments starts every branch at the same position
              (Multiverse); align=end, span=sum right-aligns them to the run's total length
              (PINE's stacked documents). After the run, positions continue at start + span.
  concentric  image/video tokens take start + ring, so a ring shares one id and the image
              occupies ceil(min(H, W) / 2) ids per frame (CCA); 1-D tokens count on.
  mrope       Qwen2-VL [3, N]: 1-D tokens (p, p, p); image/video token (s+t, s+row, s+col);
              the next segment starts at the block's max + 1.
  attr        {attr}: the value of a token attribute (TC-LLaVA's temporal id = frame; TaH's p)
  explicit    {ids}: N ints, or 3 lists of N ints
  grid        {offsets={}} FLUX-style [3, N] ids: 1-D tokens (0, 0, 0); image/video token
              (t, row, col) + offsets[segment] (EasyControl's subject condition shifted by 64)
Any scheme may add `share: {"copy": "source"}`: segment `copy` reuses the positions of the
same-sized segment `source` (ACDiT's clean/noisy copies share coordinates).
"""
from __future__ import annotations

import torch

from .errors import SpecError, check_keys as _check_keys, did_you_mean, is_int as _is_int, require as _require
from .segments import segment_size

MROPE_AFTER = ("max", "hw")
SCHEMES = {
    "sequential": {"start": 0},
    "per_segment": {},
    "branches": {"align": "start", "span": "longest"},
    "concentric": {"start": 0},
    "mrope": {"start": 0, "after": "max"},
    "attr": {"attr": None},
    "explicit": {"ids": None},
    "grid": {"offsets": {}},
}


def normalize(pos, segments: list[dict], attr_names) -> dict:
    _require(isinstance(pos, dict), "positions", 'must be an object like {"scheme": "sequential"}')
    scheme = pos.get("scheme", "sequential")
    _require(isinstance(scheme, str) and scheme in SCHEMES, "positions.scheme",
             f"unknown scheme '{scheme}'{did_you_mean(scheme, SCHEMES)}; use one of {', '.join(SCHEMES)}")
    _check_keys(pos, ("scheme", "share") + tuple(SCHEMES[scheme]), "positions")
    out: dict = {"scheme": scheme}
    for key, default in SCHEMES[scheme].items():
        v = pos.get(key, default)
        _require(v is not None, f"positions.{key}", f"scheme '{scheme}' needs '{key}'")
        out[key] = v
    if "start" in out:
        _require(_is_int(out["start"]), "positions.start", "must be an integer")
    if scheme == "mrope":
        _require(out["after"] in MROPE_AFTER, "positions.after",
                 "use 'max' (text after a grid starts at the grid's largest id + 1: Qwen2-VL's own code, "
                 "vLLM) or 'hw' (at the grid's start + max(h, w), frames ignored: transformers 5.24)")
    if scheme == "branches":
        _require(out["align"] in ("start", "end"), "positions.align", "use 'start' or 'end'")
        _require(out["span"] in ("longest", "sum"), "positions.span", "use 'longest' or 'sum'")
    if scheme == "attr":
        _require(isinstance(out["attr"], str) and out["attr"] in attr_names, "positions.attr",
                 f"unknown attribute '{out['attr']}'{did_you_mean(out['attr'], attr_names)}")
    if scheme == "explicit":
        ids = out["ids"]
        flat = ids if ids and not isinstance(ids[0], list) else None
        ok = isinstance(ids, list) and ids and (
            all(_is_int(i) for i in ids) or
            (len(ids) == 3 and all(isinstance(r, list) and all(_is_int(i) for i in r) for r in ids)))
        _require(ok, "positions.ids", "give N integers, or 3 lists of N integers for (t, h, w)")
        sizes = [segment_size(s) for s in segments]
        if None not in sizes:
            n = sum(sizes)
            length = len(flat) if flat is not None else len(ids[0])
            _require(length == n and (flat is not None or all(len(r) == n for r in ids)), "positions.ids",
                     f"has {length} ids but the layout has {n} tokens; give one id per token")
    if scheme == "grid":
        offsets = out["offsets"]
        names = [s["name"] for s in segments]
        _require(isinstance(offsets, dict), "positions.offsets", 'maps a segment to [dt, dh, dw], e.g. {"cond": [0, 64, 0]}')
        for name, off in offsets.items():
            _require(name in names, f"positions.offsets.{name}", f"no segment named '{name}'{did_you_mean(name, names)}")
            _require(isinstance(off, list) and len(off) == 3 and all(_is_int(x) for x in off),
                     f"positions.offsets.{name}", "give three integers [dt, dh, dw]")
        out["offsets"] = {k: list(v) for k, v in offsets.items()}
    if "share" in pos:
        share = pos["share"]
        names = {s["name"]: segment_size(s) for s in segments}
        _require(isinstance(share, dict), "positions.share", 'maps a segment to its source, e.g. {"noisy": "clean"}')
        for copy, source in share.items():
            _require(isinstance(source, str), f"positions.share.{copy}",
                     'the source is one segment name, e.g. {"noisy": "clean"}')
            for name in (copy, source):
                _require(name in names, f"positions.share.{copy}",
                         f"no segment named '{name}'{did_you_mean(name, names)}")
            _require(names[copy] == names[source], f"positions.share.{copy}",
                     f"'{copy}' has {names[copy]} tokens but '{source}' has {names[source]}; shared positions need equal sizes")
        out["share"] = dict(share)
    return out


# ---------------------------------------------------------------- schemes
def _sequential(table, segments, start=0):
    return table["index"] + start


def _per_segment(table, segments):
    return table["local"].clone()


def _branches(table, segments, align="start", span="longest"):
    out = torch.empty(table.n, dtype=torch.long)
    pos, i = 0, 0
    while i < len(segments):
        if "branch" not in segments[i]:
            sl = table.segment_slice(i)
            out[sl] = pos + torch.arange(table.sizes[i])
            pos += table.sizes[i]
            i += 1
            continue
        run = []
        while i < len(segments) and "branch" in segments[i]:
            run.append(i)
            i += 1
        lengths: dict[str, int] = {}
        for j in run:
            lengths[segments[j]["branch"]] = lengths.get(segments[j]["branch"], 0) + table.sizes[j]
        width = max(lengths.values()) if span == "longest" else sum(lengths.values())
        used = dict.fromkeys(lengths, 0)
        for j in run:
            label = segments[j]["branch"]
            first = pos + used[label] + (width - lengths[label] if align == "end" else 0)
            out[table.segment_slice(j)] = first + torch.arange(table.sizes[j])
            used[label] += table.sizes[j]
        pos += width
    return out


def _concentric(table, segments, start=0):
    out = torch.empty(table.n, dtype=torch.long)
    pos = start
    for i, seg in enumerate(segments):
        sl = table.segment_slice(i)
        if "grid" in seg:
            rings = (min(seg["grid"][-2:]) + 1) // 2
            out[sl] = pos + table["t"][sl] * rings + table["ring"][sl]
            pos += rings * int(table["frames"][sl][0])
        else:
            out[sl] = pos + torch.arange(table.sizes[i])
            pos += table.sizes[i]
    return out


def _mrope(table, segments, start=0, after="max"):
    """Qwen2-VL 3-axis ids: text (p, p, p); a grid (p + t, p + row, p + col). The next text starts at
    the grid's largest id + 1 (after="max": the original Qwen2-VL and vLLM) or at p + max(h, w)
    (after="hw": transformers 5.24's get_rope_index, which ignores the frame count). Equal for images."""
    out = torch.empty(3, table.n, dtype=torch.long)
    pos = start
    for i, seg in enumerate(segments):
        sl = table.segment_slice(i)
        if "grid" in seg:
            block = torch.stack([table["t"][sl], table["row"][sl], table["col"][sl]]) + pos
            out[:, sl] = block
            pos = int(block.max()) + 1 if after == "max" else pos + max(seg["grid"][-2:])
        else:
            out[:, sl] = pos + torch.arange(table.sizes[i])
            pos += table.sizes[i]
    return out


def _attr(table, segments, attr):
    return table[attr].clone()


def _explicit(table, segments, ids):
    return torch.tensor(ids, dtype=torch.long)


def _grid(table, segments, offsets):
    """FLUX / EasyControl 3-axis ids: text (0,0,0); grid tokens (t, row, col) + per-segment offset."""
    out = torch.zeros(3, table.n, dtype=torch.long)
    for i, seg in enumerate(segments):
        if "grid" in seg:
            sl = table.segment_slice(i)
            off = torch.tensor(offsets.get(seg["name"], [0, 0, 0]))[:, None]
            out[:, sl] = torch.stack([table["t"][sl], table["row"][sl], table["col"][sl]]) + off
    return out


SCHEME_FUNCTIONS = {"sequential": _sequential, "per_segment": _per_segment, "branches": _branches,
                    "concentric": _concentric, "mrope": _mrope, "attr": _attr, "explicit": _explicit, "grid": _grid}


def position_ids(spec) -> torch.Tensor:
    """LongTensor [N] or [3, N] for the spec's scheme, with `share` applied."""
    pos = spec.positions
    table = spec.table
    params = {k: v for k, v in pos.items() if k not in ("scheme", "share")}
    ids = SCHEME_FUNCTIONS[pos["scheme"]](table, spec.segments, **params)
    if ids.shape[-1] != table.n:
        raise SpecError("positions.ids", f"has {ids.shape[-1]} ids but the layout has {table.n} tokens")
    names = table.names
    for copy, source in pos.get("share", {}).items():
        ids[..., table.segment_slice(names.index(copy))] = ids[..., table.segment_slice(names.index(source))]
    return ids


def is_3d(spec) -> bool:
    pos = spec.positions
    return pos["scheme"] in ("mrope", "grid") or (pos["scheme"] == "explicit" and isinstance(pos["ids"][0], list))


# ---------------------------------------------------------------- RoPE distances
def default_query(spec) -> int:
    """The last text segment (the answer / question that reads the image), else the last segment."""
    text = [s for s, seg in enumerate(spec.segments) if seg["modality"] == "text"]
    return text[-1] if text else len(spec.segments) - 1


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact mean |a_i - b_j| over all pairs in O((|a| + |b|) log |b|)."""
    b = torch.sort(b.double()).values
    a = a.double()
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), b.cumsum(0)])
    k = torch.searchsorted(b, a, right=True)
    below = a * k - prefix[k]
    above = (prefix[-1] - prefix[k]) - a * (len(b) - k)
    return float((below + above).sum() / (len(a) * len(b)))


def distance_stats(spec, query=None) -> dict:
    """Mean RoPE |delta pos| from the query segment to every key segment (exact, all pairs, mask
    ignored: the distance a pair WOULD have). 3-D schemes: [t, h, w] per segment."""
    t = spec.table
    q = default_query(spec) if query is None else t.names.index(query)
    ids = position_ids(spec)
    ids = ids if ids.dim() == 2 else ids[None]
    qs = t.segment_slice(q)
    means = {}
    for s, name in enumerate(t.names):
        ks = t.segment_slice(s)
        vals = [_mean_abs_diff(ids[a, qs], ids[a, ks]) for a in range(ids.shape[0])]
        means[name] = vals if ids.shape[0] > 1 else vals[0]
    return {"query": t.names[q], "axes": ["t", "h", "w"] if ids.shape[0] > 1 else ["pos"], "mean": means}
