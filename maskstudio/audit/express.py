"""The model's masks as a spec, and cell-by-cell differences from a design, in words.

`express` tries, per distinct layer mask, the few spec programs transformers' masks are made of
(causal or bidirectional base; bidirectional blocks of image / video segments; one local overlay:
a sliding window in transformers' convention `key > query - W`, or chunks `key // C == query // C`),
with sizes from the config and from the mask itself, and keeps the first whose dense mask equals
the model's at every cell. The layers then join into one spec (per-layer rules and overlays carry
`layers`), which is checked again at every layer: `exact[layer]` says where the spec is the model.

`layer_diff` compares a design's layer with the model's: cells only one side allows, named
`segment[index]`, and what they amount to ("your window is 1 key wider than the model's").
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..spec import Spec, SpecError

EXAMPLES = 3  # differing cells named per direction
LOCAL_KINDS = ("sliding_attention", "chunked_attention")  # transformers' layer_types with a local overlay


# ---------------------------------------------------------------- structure of a mask
def visual_runs(layout, visual: list[str]) -> list[list[str]]:
    """Maximal runs of consecutive segments fed to the model as image / video tokens (Gemma 3 makes
    each run one bidirectional block: two images with nothing between them are one block)."""
    runs, last = [], None
    for i, seg in enumerate(layout.segments):
        if seg["name"] in visual:
            if last == i - 1:
                runs[-1].append(seg["name"])
            else:
                runs.append([seg["name"]])
            last = i
    return runs


def _run_slice(layout, run: list[str]) -> slice:
    t = layout.table
    first, last = t.names.index(run[0]), t.names.index(run[-1])
    return slice(t.starts[first], t.starts[last] + t.sizes[last])


def _band(mask: torch.Tensor):
    """The lower triangle (keys at or before the query) as ("causal", None), ("window", W) with
    row q = [q-W+1, q], ("chunked", C) with row q = [C*(q//C), q], or (None, None)."""
    n = mask.shape[0]
    low = torch.tril(mask)
    q = torch.arange(n)
    counts = low.sum(1)
    first = torch.where(low.any(1), low.int().argmax(1), q + 1)
    if not bool(((q - first + 1) == counts).all()) or not bool((counts > 0).all()):
        return None, None  # some row is not one run of keys ending at the query
    if bool((first == 0).all()):
        return "causal", None
    width = int(counts.max())
    if bool((first == (q - width + 1).clamp(min=0)).all()):
        return "window", width
    starts = q[(first == q) & (q > 0)]
    size = int(starts[0]) if len(starts) else 0
    if size and bool((first == q - q % size).all()):
        return "chunked", size
    return None, None


def inferred_sizes(mask: torch.Tensor) -> dict:
    """Window and chunk sizes read off the mask's lower triangle."""
    kind, size = _band(mask)
    return {kind: size} if kind in ("window", "chunked") else {}


# ---------------------------------------------------------------- candidates
def _rule(run: list[str]) -> dict:
    sel = run[0] if len(run) == 1 else list(run)
    return {"q": sel, "k": sel, "pattern": "full"}


def _overlays(sizes: dict, prefer: bool) -> list[list[dict]]:
    """Local overlays to try: the window as maskstudio's window (0 <= q-k < W), transformers' own
    one-sided form (drop keys <= q - W: later keys of an image block stay), two-sided (|q-k| < W,
    Gemma 3's bidirectional window); chunks. None first,
    unless `prefer` (the layer's kind says it is local): a window longer than the layout
    changes nothing here but is what the model does on longer inputs."""
    local: list[list[dict]] = []
    for w in sizes.get("window", []):
        local += [[{"pattern": "window", "size": w, "op": "and"}],
                  [{"pattern": "lookahead", "size": -w, "op": "and_not"}],
                  [{"pattern": "window", "size": w, "causal": False, "op": "and"}]]
    for c in sizes.get("chunked", []):
        local.append([{"pattern": "chunked", "chunk": c, "size": c, "op": "and"}])
    return local + [[]] if prefer else [[]] + local


def _with_mask(layout, mask: dict) -> Spec:
    data = layout.to_dict()
    data["mask"] = mask
    data.pop("checks", None)
    return Spec.load(data)


def express_layer(layout, mask: torch.Tensor, visual: list[str], config_sizes: dict, kind: str = "") -> dict | None:
    """The first spec mask {"base", "rules", "overlays"} whose dense mask is `mask`, or None."""
    blocks = []
    for run in visual_runs(layout, visual):
        sl = _run_slice(layout, run)
        if bool(torch.triu(mask[sl, sl], 1).any()):
            blocks.append(_rule(run))
    sizes = {k: [v] for k, v in config_sizes.items()}
    for kind, size in inferred_sizes(mask).items():
        sizes[kind] = list(dict.fromkeys(sizes.get(kind, []) + [size]))
    for base in ("causal", "full"):
        for overlays in _overlays(sizes, prefer=kind in LOCAL_KINDS or (kind == "attention" and bool(config_sizes))):
            candidate = {"base": {"pattern": base}, "rules": blocks, "overlays": overlays}
            try:
                if torch.equal(_with_mask(layout, candidate).dense_mask(), mask):
                    return candidate
            except SpecError:
                continue
    return None


def describe(program: dict | None, n: int) -> str:
    """A layer's spec program in words."""
    if program is None:
        return "no spec pattern reproduces it (shown as a picture only)"
    words = ["causal" if program["base"]["pattern"] == "causal" else "bidirectional"]
    for o in program["overlays"]:
        size = o["chunk"] if o["pattern"] == "chunked" else abs(o["size"])
        longer = f", longer than this layout's {n} tokens" if size >= n else ""
        if o["pattern"] == "chunked":
            words.append(f"chunks of {size} tokens{longer}")
        elif o.get("causal") is False:
            words.append(f"two-sided window (|query - key| < {size}{longer})")
        else:
            words.append(f"sliding window of {size} keys (key > query - {size}{longer})")
    for r in program["rules"]:
        names = r["q"] if isinstance(r["q"], list) else [r["q"]]
        words.append(f"bidirectional block {' + '.join(names)}")
    return ", ".join(words)


# ---------------------------------------------------------------- one spec for every layer
@dataclass
class Expressed:
    """The model as a spec: `programs[layer]` (None where no pattern fits), the joined `spec`,
    `exact[layer]` = the spec's dense mask equals the model's at that layer, `descriptions`."""
    programs: list
    spec: Spec | None
    exact: list[bool]
    descriptions: list[str]
    positions: dict | None = None
    notes: list[str] = field(default_factory=list)


def _layers_key(step: dict, layers: list[int], total: int) -> dict:
    return step if len(layers) == total else {**step, "layers": layers}


def joined_mask(programs: list) -> dict:
    """Per-layer programs as one spec mask: the most common base, other bases as whole-layout rules
    on their layers, then each distinct block rule and overlay with the layers it holds on."""
    total = len(programs)
    found = [p for p in programs if p is not None]
    base = Counter(p["base"]["pattern"] for p in found).most_common(1)[0][0] if found else "causal"
    rules, overlays = [], []
    for kind, out in (("base", rules), ("rules", rules), ("overlays", overlays)):
        steps: dict[str, tuple[dict, list[int]]] = {}
        for layer, p in enumerate(programs):
            if p is None:
                continue
            items = [p["base"]] if kind == "base" else p[kind]
            for step in items:
                if kind == "base":
                    if step["pattern"] == base:
                        continue
                    step = {"q": "*", "k": "*", "pattern": step["pattern"]}
                steps.setdefault(repr(step), (step, []))[1].append(layer)
        out += [_layers_key(step, layers, total) for step, layers in steps.values()]
    return {"base": {"pattern": base}, "rules": rules, "overlays": overlays}


def position_scheme(layout, positions: torch.Tensor | None) -> dict | None:
    """The first position scheme giving the model's ids on this layout, else its explicit ids."""
    if positions is None:
        return None
    for scheme in ({"scheme": "sequential"}, {"scheme": "mrope", "after": "hw"}, {"scheme": "mrope", "after": "max"}):
        data = layout.to_dict()
        data["positions"] = scheme
        try:
            ids = Spec.load(data).position_ids()
        except SpecError:
            continue
        if ids.shape == positions.shape and torch.equal(ids, positions):
            return scheme
    return {"scheme": "explicit", "ids": positions.tolist()}


def express(layout, captured, provenance: dict | None = None) -> Expressed:
    """The captured model attention (capture.ModelAttention) as one spec over `layout`'s segments."""
    config_sizes = {}
    if captured.settings.get("sliding_window"):
        config_sizes["window"] = captured.settings["sliding_window"]
    if captured.settings.get("attention_chunk_size"):
        config_sizes["chunked"] = captured.settings["attention_chunk_size"]
    by_mask: dict[int, dict | None] = {}
    programs = []
    for mask, kind in zip(captured.masks, captured.layer_types):
        key = (id(mask), kind in LOCAL_KINDS)
        if key not in by_mask:
            by_mask[key] = express_layer(layout, mask, captured.visual, config_sizes, kind)
        programs.append(by_mask[key])
    descriptions = [describe(p, layout.table.n) for p in programs]
    data = layout.to_dict()
    data.pop("checks", None)
    data.update(name=f"{captured.name}: attention", mask=joined_mask(programs),
                description=f"What {captured.name} ({captured.model_type}) builds for this layout in transformers' "
                            f"own masking code, layer by layer; " + "; ".join(dict.fromkeys(
                                f"{kind}: {text}" for kind, text in zip(captured.layer_types, descriptions))))
    if provenance:
        data["provenance"] = provenance
    scheme = position_scheme(layout, captured.positions)
    if scheme is not None:
        data["positions"] = scheme
    spec = Spec.load(data)
    exact = [p is not None and torch.equal(spec.dense_mask(layer), m)
             for layer, (p, m) in enumerate(zip(programs, captured.masks))]
    return Expressed(programs, spec, exact, descriptions, scheme)


# ---------------------------------------------------------------- design vs model
@dataclass
class LayerDiff:
    layer: int
    kind: str
    cells: int            # cells that differ
    yours_only: int       # the design allows, the model masks
    model_only: int       # the model allows, the design masks
    body: str             # what the difference amounts to, without the layer

    @property
    def same(self) -> bool:
        return self.cells == 0

    @property
    def message(self) -> str:
        return f"layer {self.layer} ({self.kind}): {self.body}"


def _cells(table, where: torch.Tensor, most: int = EXAMPLES) -> str:
    pairs = where.nonzero()[:most].tolist()
    return ", ".join(f"{table.label(q)} -> {table.label(k)}" for q, k in pairs)


def _keys(n: int) -> str:
    return f"{n} key{'s' if abs(n) != 1 else ''}"


LOCAL_WORDS = {"window": "the model's layer is a sliding window of {0} keys (key > query - {0})",
               "chunked": "the model attends within chunks of {0} tokens"}


def _band_words(yours, model) -> str | None:
    """What the lower triangles' difference amounts to, when both are plain bands."""
    (yk, ys), (mk, ms) = yours, model
    if yk is None or mk is None or (yk, ys) == (mk, ms):
        return None
    if yk == mk == "window":
        d = ys - ms
        return f"your window is {_keys(abs(d))} {'wider' if d > 0 else 'narrower'} than the model's ({ys} vs {ms} keys)"
    if mk in LOCAL_WORDS:
        return (LOCAL_WORDS[mk].format(ms) + "; "
                + ("your design sees every earlier key" if yk == "causal" else f"yours is {yk} {ys}"))
    if mk == "causal":
        return f"the model sees every earlier key; your {yk} of {ys} cuts some of them"
    return None


def _pair_words(layout, yours: torch.Tensor, model: torch.Tensor, later: bool, most: int = 6) -> list[str]:
    """Differences above the diagonal (later keys) or below it (earlier keys), per (query segment,
    key segment) that has one: who may see whom in the model and not in the design, or back."""
    t = layout.table
    seg = t["segment"]
    part = torch.triu(yours ^ model, 1) if later else torch.tril(yours ^ model, -1)
    differ = part.nonzero()
    pairs = list(dict.fromkeys(zip(seg[differ[:, 0]].tolist(), seg[differ[:, 1]].tolist())))
    out = []
    when = "later" if later else "earlier"
    for sq, sk in pairs[:most]:
        a, b = t.segment_slice(sq), t.segment_slice(sk)
        qi, ki = torch.arange(a.start, a.stop)[:, None], torch.arange(b.start, b.stop)[None, :]
        side = (qi < ki) if later else (qi > ki)
        y, m = yours[a, b] & side, model[a, b] & side
        name_q, name_k = t.names[sq], t.names[sk]
        seen = ("each other" + (" both ways (a bidirectional block)" if later else " causally")) if sq == sk \
            else f"{when} {name_k} tokens"
        if not bool((y & ~m).any()):  # the design allows a subset of the model's cells
            out.append(f"the model lets {name_q} tokens see {seen}; your design does not" if not bool(y.any())
                       else f"the model lets {name_q} tokens see more {when} {name_k} tokens than your design")
        elif not bool((m & ~y).any()):
            out.append(f"your design lets {name_q} tokens see {seen}; the model does not" if not bool(m.any())
                       else f"your design lets {name_q} tokens see more {when} {name_k} tokens than the model")
        else:
            out.append(f"{name_q} -> {name_k}: {when} keys differ both ways")
    if len(pairs) > most:
        out.append(f"and {len(pairs) - most} more segment pairs differ on {when} keys")
    return out


def layer_diff(layout, layer: int, kind: str, yours: torch.Tensor, model: torch.Tensor) -> LayerDiff:
    """The design's layer against the model's, cell by cell, with what the difference amounts to."""
    extra, missing = yours & ~model, model & ~yours
    n_extra, n_missing = int(extra.sum()), int(missing.sum())
    if n_extra + n_missing == 0:
        return LayerDiff(layer, kind, 0, 0, 0, "same as your design")
    words = []
    if not torch.equal(torch.tril(yours), torch.tril(model)):
        ours, theirs = _band(yours), _band(model)
        band = _band_words(ours, theirs)
        if band:
            words.append(band)
        elif theirs[0] in ("window", "chunked"):  # a local model layer against a design that is no band: say
            # the layer once, then only what the design cuts that the model keeps (the window explains the rest)
            words.append(LOCAL_WORDS[theirs[0]].format(theirs[1]) + "; your design is no such band")
            words += _pair_words(layout, yours & model, model, later=False)
        else:
            words += _pair_words(layout, yours, model, later=False)
    words += _pair_words(layout, yours, model, later=True)
    t = layout.table
    counts = []
    if n_extra:
        counts.append(f"you allow {n_extra} the model masks (e.g. {_cells(t, extra)})")
    if n_missing:
        counts.append(f"the model allows {n_missing} you mask (e.g. {_cells(t, missing)})")
    body = "; ".join(words) + f" -- {n_extra + n_missing} cells differ: " + "; ".join(counts)
    return LayerDiff(layer, kind, n_extra + n_missing, n_extra, n_missing, body)


def _ids(x: torch.Tensor, i: int) -> str:
    return str(int(x[i])) if x.dim() == 1 else "(" + ", ".join(str(int(v)) for v in x[:, i]) + ")"


def positions_diff(layout, yours: torch.Tensor, model: torch.Tensor | None) -> tuple[int, str]:
    """(tokens whose ids differ, one line): the design's position ids against the model's."""
    if model is None:
        return 0, "positions: the model's were not read (no rotary embedding module)"
    flat = model.dim() == 2 and bool((model == model[0]).all())
    if yours.dim() == 1 and model.dim() == 2 and not flat:
        differ = ~(model == yours[None]).all(0)
        head = "the model uses 3-D M-RoPE ids (t, h, w); your design gives 1-D ids"
    else:
        m = model[0] if (yours.dim() == 1 and model.dim() == 2) else model
        y = yours[0] if (yours.dim() == 2 and m.dim() == 1 and bool((yours == yours[0]).all())) else yours
        if y.shape != m.shape:
            differ = torch.ones(layout.table.n, dtype=torch.bool)
            head = "your design gives 3-D ids; the model's are 1-D"
        else:
            differ = (y != m) if y.dim() == 1 else (y != m).any(0)
            head = "position ids differ"
    count = int(differ.sum())
    if count == 0:
        return 0, "positions: same as your design"
    t = layout.table
    shown = ", ".join(f"{t.label(i)}: yours {_ids(yours, i)}, model's {_ids(model, i)}"
                      for i in differ.nonzero()[:EXAMPLES, 0].tolist())
    return count, f"positions: {head} -- {count} tokens differ (e.g. {shown})"
