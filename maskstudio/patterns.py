"""The pattern library: each pattern is a tiny pure function allow(q, k, **params).

`q` and `k` are token views: `q.frame` is the query token's frame id, `k.index` the key's
global index, and so on (see tokens.py for the attributes). Patterns use only arithmetic,
comparisons and & | ~, so the same function works as a FlexAttention mask_mod, on broadcast
index grids (dense masks) and on tile intervals (bounds.py) for block-level work.
Each docstring names the design it serves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import SpecError, did_you_mean

BUILTIN_ATTRS = ("index", "segment", "local", "frame", "t", "row", "col", "cell", "ring",
                 "branch", "modality", "length", "frames", "height", "width")
CHUNK_STRIDE = 1 << 32  # chunk ids are (segment, local // size) in lexicographic order
REQUIRED = object()


def value(tok, v):
    """A numeric parameter: an int, or the name of a per-token attribute of `tok`."""
    return getattr(tok, v) if isinstance(v, str) else v


def group(tok, by: str, size: int | None = None):
    """Group id of a token: an attribute, or `chunk` = (segment, local // size)."""
    if by == "chunk":
        ordinal = getattr(tok, "_chunk_ordinal", None)  # lowered views number chunks without the stride
        return ordinal(size) if ordinal else tok.segment * CHUNK_STRIDE + tok.local // size
    return getattr(tok, by)


# ---------------------------------------------------------------- patterns
def full(q, k):
    """Every pair may attend (bidirectional; LLM2Vec, NV-Embed, prefix regions)."""
    return (q.index >= 0) & (k.index >= 0)


def none(q, k):
    """No pair may attend (use inside rules to cut a segment pair)."""
    return (q.index < 0) | (k.index < 0)


def causal(q, k):
    """k <= q: the standard autoregressive mask."""
    return k.index <= q.index


def anticausal(q, k):
    """k >= q: right-to-left attention."""
    return k.index >= q.index


def only_self(q, k):
    """k == q: each token sees only itself."""
    return k.index == q.index


def window(q, k, size, causal=True, by="index"):
    """Sliding window over `by` (Longformer, Mistral SWA; StreamingLLM's recent window R).
    causal: 0 <= q-k < size; otherwise |q-k| < size."""
    d = getattr(q, by) - getattr(k, by)
    return ((d >= 0) & (d < size)) if causal else (abs(d) < size)


def lookahead(q, k, size, by="index"):
    """k <= q + size; `size` may name a per-token attribute (ANCAT's learned per-frame look-ahead)."""
    return getattr(k, by) <= getattr(q, by) + value(q, size)


def dilated(q, k, size, dilation):
    """Dilated causal window: 0 <= q-k < size*dilation and (q-k) % dilation == 0 (LongNet-style)."""
    d = q.index - k.index
    return (d >= 0) & (d < size * dilation) & (d % dilation == 0)


def block_causal(q, k, by="frame", size=None, strict=False):
    """group(k) <= group(q): bidirectional inside a group, causal across groups (NFD, TC-LLaVA,
    CCA with by=ring, HieraTok by segment). strict: group(k) < group(q) (ACDiT noisy -> clean)."""
    gq, gk = group(q, by, size), group(k, by, size)
    return (gk < gq) if strict else (gk <= gq)


def same(q, k, by="frame", size=None):
    """group(k) == group(q): attention only inside a group (RecGPT items with chunk, EasyControl
    conditions with segment, Phenaki/OmniTokenizer temporal layers with cell)."""
    return group(k, by, size) == group(q, by, size)


def first(q, k, size, by="index"):
    """k < size: attention sinks (StreamingLLM's first S tokens; by=t for first frames)."""
    return getattr(k, by) < size


def flagged_key(q, k, by):
    """The key's attribute `by` is > 0: keys that carry a flag, e.g. BICO's [MASK] tokens, which
    no query may see (use with op and_not; tokens without the attribute hold -1)."""
    return getattr(k, by) > 0


def branch_isolated(q, k):
    """False iff both tokens are on branches and the branches differ (Multiverse paths)."""
    return ~((q.branch >= 0) & (k.branch >= 0) & (q.branch != k.branch))


def other_branch(q, k):
    """True iff both tokens are on branches and the branches differ (PINE: documents see each other)."""
    return (q.branch >= 0) & (k.branch >= 0) & (q.branch != k.branch)


def local2d(q, k, radius):
    """Same frame and |drow| <= radius and |dcol| <= radius (neighbourhood attention)."""
    return (q.frame == k.frame) & (abs(q.row - k.row) <= radius) & (abs(q.col - k.col) <= radius)


def neighborhood(q, k, radius):
    """NATTEN's neighbourhood attention: the (2r+1) x (2r+1) window around the query, shifted
    inward at the borders so that every query sees a full window (local2d truncates instead).
    The window's rows are [c - r, c + r] with c = clamp(row, r, H-1-r); as 0 <= row < H this is
    (k.row >= q.row - r or k.row >= H-1-2r) and (k.row <= q.row + r or k.row <= 2r), same for cols."""
    span = 2 * radius
    rows = (((k.row >= q.row - radius) | (k.row >= q.height - 1 - span))
            & ((k.row <= q.row + radius) | (k.row <= span)))
    cols = (((k.col >= q.col - radius) | (k.col >= q.width - 1 - span))
            & ((k.col <= q.col + radius) | (k.col <= span)))
    return (q.frame == k.frame) & rows & cols


def tile(q, k, size):
    """Same frame and same non-overlapping size[0] x size[1] window (Swin, OmniTokenizer 'w' layers)."""
    th, tw = size
    return (q.frame == k.frame) & (q.row // th == k.row // th) & (q.col // tw == k.col // tw)


def chunked(q, k, chunk, size=-1, lookahead=0, by="index"):
    """Chunk-causal with a left window and look-ahead (WeNet streaming ASR; LongLive's training band).
    With e = end of q's chunk: e - size <= g(k) < e + lookahead (size -1 = unlimited left context)."""
    gq, gk = getattr(q, by), getattr(k, by)
    end = (gq // chunk + 1) * chunk
    allow = gk < end + lookahead
    return allow if size < 0 else allow & (gk >= end - size)


def sparse_causal(q, k, by="t"):
    """Tune-A-Video sparse-causal: frame f sees frame 0 and frame max(f-1, 0)."""
    return (getattr(k, by) == 0) | (getattr(k, by) == getattr(q, by) - 1)


def spread_causal(q, k):
    """Queries spread evenly over the key frames, causally: query i of N sees frames
    t < ceil((i+1) T / N) of its key segment (Video-CCAM causal cross-attention, FAVOR Q-Former)."""
    return k.t * q.length < (q.local + 1) * k.frames


# ---------------------------------------------------------------- registry
@dataclass
class Param:
    kind: str  # int | posint | bool | attr | group | int_or_attr | pair
    default: object = REQUIRED


@dataclass
class Pattern:
    name: str
    fn: Callable
    params: dict[str, Param] = field(default_factory=dict)

    @property
    def doc(self) -> str:
        return " ".join((self.fn.__doc__ or "").split())


def _p(fn, name: str | None = None, **params) -> Pattern:
    """A registry entry; the JSON name is the function's name unless given (`self` is no Python name)."""
    return Pattern(name or fn.__name__, fn, params)


PATTERNS: dict[str, Pattern] = {p.name: p for p in [
    _p(full), _p(none), _p(causal), _p(anticausal), _p(only_self, name="self"),
    _p(window, size=Param("posint"), causal=Param("bool", True), by=Param("attr", "index")),
    _p(lookahead, size=Param("int_or_attr"), by=Param("attr", "index")),
    _p(dilated, size=Param("posint"), dilation=Param("posint")),
    _p(block_causal, by=Param("group", "frame"), size=Param("posint", None), strict=Param("bool", False)),
    _p(same, by=Param("group", "frame"), size=Param("posint", None)),
    _p(first, size=Param("int"), by=Param("attr", "index")),
    _p(flagged_key, by=Param("attr")),
    _p(branch_isolated), _p(other_branch),
    _p(local2d, radius=Param("int")),
    _p(neighborhood, radius=Param("int")),
    _p(tile, size=Param("pair")),
    _p(chunked, chunk=Param("posint"), size=Param("int", -1), lookahead=Param("int", 0),
       by=Param("attr", "index")),
    _p(sparse_causal, by=Param("attr", "t")),
    _p(spread_causal),
]}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_KIND_CHECKS = {
    "int": (lambda v: _is_int(v), "an integer"),
    "posint": (lambda v: _is_int(v) and v > 0, "an integer > 0"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "attr": (lambda v: isinstance(v, str), "an attribute name"),
    "group": (lambda v: isinstance(v, str), "an attribute name or 'chunk'"),
    "int_or_attr": (lambda v: _is_int(v) or isinstance(v, str), "an integer or an attribute name"),
    "pair": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v),
             "two integers > 0, e.g. [2, 2]"),
}


def normalize_params(pat: Pattern, step: dict, path: str) -> dict:
    """Validated parameters in declaration order, defaults filled (None defaults left out)."""
    out = {}
    for name, prm in pat.params.items():
        if name in step:
            ok, what = _KIND_CHECKS[prm.kind]
            if not ok(step[name]):
                raise SpecError(f"{path}.{name}", f"'{pat.name}' needs {name} = {what}, got {step[name]!r}")
            out[name] = step[name]
        elif prm.default is REQUIRED:
            raise SpecError(f"{path}.{name}", f"pattern '{pat.name}' needs parameter '{name}' ({_KIND_CHECKS[prm.kind][1]})")
        elif prm.default is not None:
            out[name] = prm.default
    if out.get("by") == "chunk" and out.get("size") is None:
        raise SpecError(f"{path}.size", f"'{pat.name}' by chunk needs size (tokens per chunk)")
    return out


def check_attr_params(pat: Pattern, step: dict, path: str, attr_names) -> None:
    """Attribute-valued parameters must name an attribute the token table has."""
    for name, prm in pat.params.items():
        v = step.get(name)
        if prm.kind in ("attr", "group", "int_or_attr") and isinstance(v, str):
            allowed = set(attr_names) | ({"chunk"} if prm.kind == "group" else set())
            if v not in allowed:
                raise SpecError(f"{path}.{name}", f"unknown attribute '{v}'{did_you_mean(v, allowed)}; "
                                f"known: {', '.join(sorted(allowed))}")
