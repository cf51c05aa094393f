"""Segments -> TokenTable: one int64 tensor per token attribute, tokens in segment order.

Image tokens are row-major; video tokens frame-major then row-major. Attributes:

  index    global position in the sequence
  segment  ordinal of the token's segment
  local    index inside its segment
  frame    GLOBAL frame id: every 1-D token is its own frame unless the segment declares
           `frames` (token counts per frame); an image is one frame; a video has T frames
  t        frame inside the segment (0 for images)
  row, col grid coordinates (1-D segments: row 0, col = local)
  cell     spatial location inside a frame, row * W + col (1-D: local)
  ring     concentric ring min(row, col, H-1-row, W-1-col) (CCA); -1 for 1-D segments
  height, width  the token's grid H and W (1-D segments: 1 and their length)
  branch   -1, or an id per distinct branch label in order of first appearance
  modality index into spec.MODALITIES
  length   tokens in the token's segment;  frames: frames in the token's segment
plus every user attribute from segments' `attrs` (-1 where a segment does not set it).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .segments import MODALITIES, segment_size


@dataclass
class TokenTable:
    attrs: dict[str, torch.Tensor]
    names: list[str]
    starts: list[int]
    sizes: list[int]
    modalities: list[str]
    grids: list[list[int] | None] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.attrs[name]

    def to(self, device) -> "TokenTable":
        return TokenTable({k: v.to(device) for k, v in self.attrs.items()}, self.names, self.starts,
                          self.sizes, self.modalities, self.grids)

    def segment_slice(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i] + self.sizes[i])

    def label(self, i: int) -> str:
        """Token i as `segment[local]`, the one way tokens are named in messages and pictures."""
        seg = int(self.attrs["segment"][i])
        return f"{self.names[seg]}[{i - self.starts[seg]}]"


def grid_coordinates(local, h, w, hw, video: bool, mul=lambda a, b: a * b, minimum=torch.minimum) -> dict:
    """Frame t, cell, row, col and the concentric ring (CCA) of grid tokens from their index inside
    the segment: the one definition, run on tensors here and on symbolic expressions by the spec
    compiler (symbolic.py, which passes its own product and minimum). One division per
    coordinate: a division by a runtime size is the costly instruction on a GPU."""
    t = local // hw if video else 0
    cell = local - mul(t, hw) if video else local
    row = cell // w
    col = cell - mul(row, w)
    ring = minimum(minimum(row, col), minimum(h - 1 - row, w - 1 - col))
    return {"t": t, "cell": cell, "row": row, "col": col, "ring": ring}


def _segment_columns(seg: dict, n: int) -> dict[str, torch.Tensor]:
    """Per-segment attribute columns (frame-in-segment t, row, col, cell, ring)."""
    local = torch.arange(n)
    if "grid" in seg:
        grid = seg["grid"]
        T, H, W = ([1] + grid) if len(grid) == 2 else grid
        c = grid_coordinates(local, H, W, H * W, video=len(grid) == 3)
        t = c["t"] if len(grid) == 3 else torch.zeros(n, dtype=torch.long)
        return {**c, "t": t, "frames": torch.full((n,), T), "height": torch.full((n,), H),
                "width": torch.full((n,), W)}
    if "frames" in seg:
        counts = torch.tensor(seg["frames"])
        t = torch.repeat_interleave(torch.arange(len(counts)), counts)
    else:
        t = local
    return {"t": t, "row": torch.zeros(n, dtype=torch.long), "col": local, "cell": local,
            "ring": torch.full((n,), -1), "frames": torch.full((n,), int(t[-1]) + 1),
            "height": torch.ones(n, dtype=torch.long), "width": torch.full((n,), n)}


def build_table(segments: list[dict]) -> TokenTable:
    sizes = [segment_size(s) for s in segments]
    starts = [0, *itertools.accumulate(sizes)][:-1]
    branch_ids: dict[str, int] = {}
    user_attrs = sorted({k for s in segments for k in s.get("attrs", {})})
    cols: dict[str, list[torch.Tensor]] = {}
    frame_offset = 0
    for i, (seg, n) in enumerate(zip(segments, sizes)):
        c = _segment_columns(seg, n)
        c["frame"] = c["t"] + frame_offset
        frame_offset += int(c["frames"][0])
        c["segment"] = torch.full((n,), i)
        c["local"] = torch.arange(n)
        c["length"] = torch.full((n,), n)
        c["modality"] = torch.full((n,), MODALITIES.index(seg["modality"]))
        label = seg.get("branch")
        if label is not None:
            branch_ids.setdefault(label, len(branch_ids))
        c["branch"] = torch.full((n,), branch_ids[label] if label is not None else -1)
        for key in user_attrs:
            values = seg.get("attrs", {}).get(key)
            c[key] = torch.tensor(values, dtype=torch.long) if values is not None else torch.full((n,), -1)
        for key, value in c.items():
            cols.setdefault(key, []).append(value.long())
    attrs = {k: torch.cat(v) for k, v in cols.items()}
    attrs["index"] = torch.arange(sum(sizes))
    return TokenTable(attrs, [s["name"] for s in segments], starts, sizes,
                      [s["modality"] for s in segments], [s.get("grid") for s in segments])


def _tokenizer_pieces(tokenizer, text: str, size: int) -> list[str] | None:
    """The tokenizer's pieces of `text` when they are exactly `size` tokens, else None."""
    try:
        pieces = [str(x) for x in tokenizer.tokenize(text)]
    except (ValueError, TypeError, KeyError, AttributeError):  # a tokenizer that cannot help
        return None
    if len(pieces) != size:
        return None
    return [x.replace("Ġ", "·").replace("▁", "·") for x in pieces]


def token_labels(spec, tokenizer=None) -> list[str]:
    """Short per-token labels for pictures: the tokenizer's pieces for text (when given and they
    match the segment's size), `t,row,col` / `row,col` for video / image, else `name[index]`."""
    t = spec.table
    labels: list[str] = []
    for s, seg in enumerate(spec.segments):
        sl = t.segment_slice(s)
        pieces = None
        if tokenizer is not None and isinstance(seg.get("text"), str):
            pieces = _tokenizer_pieces(tokenizer, seg["text"], t.sizes[s])
        if pieces is not None:
            labels += pieces
        elif seg["modality"] == "video":
            labels += [f"{a},{b},{c}" for a, b, c in zip(t["t"][sl].tolist(), t["row"][sl].tolist(),
                                                         t["col"][sl].tolist())]
        elif seg["modality"] == "image":
            labels += [f"{b},{c}" for b, c in zip(t["row"][sl].tolist(), t["col"][sl].tolist())]
        else:  # `path1[0]`, never `path10` (path1's token 0 or path's token 10?); long names cut with '…'
            name = seg["name"] if len(seg["name"]) <= 7 else seg["name"][:6] + "…"
            labels += [f"{name}[{i}]" for i in range(t.sizes[s])]
    return labels
