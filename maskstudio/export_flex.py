"""`export --format flex`: a standalone Python file (torch and the standard library only) with the
spec's LOWERED mask (lower.py): closed-form arithmetic on q_idx / kv_idx, sizes in one small
tensor `P`, so one compiled kernel serves any sizes of the design's structure (the first
SIZES_IN_KERNEL layouts get a kernel with their sizes as Python constants, as hand-written code).

The file holds the spec's data only as repr literals (names, sizes, positions), the lowered
expression per distinct layer as generated arithmetic, and — so that sizes -> token table ->
parameters and position ids have one definition — the source of the few library functions that
compute them (the resize `segments.resized_segments` with the error type it raises, segment sizes,
the token table, `lower.param_value`, the position scheme, the float-quotient division). So the file
takes and refuses exactly the sizes `Spec.with_sizes` does, with the same one-line messages.
"""
from __future__ import annotations

import inspect

import torch

from . import errors, expr, knobs, lower, lower_blocks, positions, segments, tokens
from .errors import SpecError
from .segments import expand_int_list, layer_sets
from .spec import DEFAULT_MAX_TOKENS, Spec

_LAYOUT_KEYS = ("name", "modality", "length", "grid", "frames", "branch", "attrs")


def _variants(spec) -> list[tuple[tuple, int]]:
    """(layer key, a layer with that key) for every distinct layer program, layer 0's first."""
    sets = layer_sets(spec.mask)
    candidates = [0] + sorted({x for s in sets for x in s}) + [1 + max((x for s in sets for x in s), default=0)]
    seen: dict[tuple, int] = {}
    for layer in candidates:
        seen.setdefault(tuple(layer in s for s in sets), layer)
    return list(seen.items())


def _unframed(spec) -> list[int]:
    """1-D segments without frames: lowered with the closed form t = local (one frame a token)."""
    return [i for i, s in enumerate(spec.segments) if "grid" not in s and "frames" not in s]


def _lowered(spec) -> list[tuple[tuple, "lower.Lowered"]]:
    """((layer key, framed), lowered layer) for every distinct layer program. framed: the program
    with every 1-D segment's frames read from tables, for a resize that gives frames to a segment
    shipped without them (the closed form t = local cannot follow); kept where it differs."""
    framed = None
    if _unframed(spec):
        data = spec.to_dict()
        for i in _unframed(spec):
            data["segments"][i]["frames"] = [1] * data["segments"][i]["length"]
        framed = Spec.from_valid(data)  # the same tokens and attributes: still valid
    out = []
    for key, layer in _variants(spec):
        low = lower.lower(spec, layer)
        out.append(((key, False), low))
        alt = lower.lower(framed, layer) if framed is not None else low
        if alt.text != low.text:
            out.append(((key, True), alt))
    return out


def _param_name(key: tuple) -> str:
    """start_2, hw_1, chunk0_0_4: a readable local name for one size parameter."""
    return "_".join(str(k) for k in key)


def _divisions_by_size(root: expr.E) -> expr.E:
    """Every division by a size prints as `_div(a, d)`: the file picks exact `//` or the float
    quotient per layout at run time (`_dividends` bounds them), as it serves sizes of any range."""
    return expr.with_fast_divisions(root, {nd for nd in expr.nodes(root) if expr.divides_by_size(nd)})


def _dividends(name: str, root: expr.E, slots: dict) -> str:
    """def name(P, n): an upper bound on |dividend| of the mask's divisions by sizes, from the
    sizes P (a list) and the token count n (indices < n)."""
    bounds = [expr.magnitude_source(nd.args[0], {"q": "n", "kv": "n", "h": "65536"}, lambda k: f"P[{slots[k]}]")
              for nd in expr.nodes(root) if expr.divides_by_size(nd)]
    body = "0" if not bounds else "FAST_DIVIDEND" if None in bounds else f"max({', '.join(dict.fromkeys(bounds))}, 0)"
    return f"def {name}(P, n):\n    return {body}\n"


def _where(c, x, y):
    """torch.where, where the condition may be a Python bool (a test of sizes compiled in)."""
    return torch.where(c, x, y) if isinstance(c, torch.Tensor) else (x if c else y)


def _not(x):
    return ~x if isinstance(x, torch.Tensor) else not x


# the file's source for operations a size compiled in as a Python int could reach (the helpers above)
SIZE_SAFE = {"min": "_tensor_min({0}, {1}, torch.minimum)", "max": "_tensor_min({0}, {1}, torch.maximum)",
             "where": "_where({0}, {1}, {2})", "not": "_not({0})", "abs": "abs({0})"}


def _function(name: str, root: expr.E, slots: dict, wide: bool = False) -> str:
    root = _divisions_by_size(root)
    lines, final = expr.source_lines(root, {"q": "q_idx", "kv": "kv_idx"}, param_ref=_param_name,
                                     table_ref=lambda attr, side: f"T[{attr!r}][{side}]", templates=SIZE_SAFE)
    used = sorted(set(expr.leaves(root, "p")), key=lambda k: slots[k])
    unpack = "".join(f"    {_param_name(k)} = P[{slots[k]}]\n" for k in used)
    if wide:  # FlexAttention's indices are int32: widen before any arithmetic
        unpack = "    q_idx, kv_idx = q_idx.to(torch.int64), kv_idx.to(torch.int64)\n" + unpack
    body = "".join(f"    {line}\n" for line in lines)
    if root.is_const:  # every pair allowed (or none): still a tensor, as FlexAttention needs
        final = "(q_idx >= 0)" if root.value else "(q_idx < 0)"
    elif not expr.leaves(root, "var") and not expr.leaves(root, "tab"):  # sizes alone: a bool once compiled in
        final = f"((q_idx >= 0) & {final})"
    return f"def {name}(P, T, h, q_idx, kv_idx, _div=_exact_div):\n{unpack}{body}    return {final}\n"


def lowered_source(spec, layer: int = 0) -> str:
    """One layer's lowered mask as the Python the export writes, with what P holds."""
    low = lower.lower(spec, layer)
    slots = {k: i for i, k in enumerate(low.keys)}
    sizes = ", ".join(f"{_param_name(k)}={int(v)}" for k, v in zip(low.keys, low.params.tolist()))
    lookups = low.uses_lookups()
    note = f"# per-token tables read: {', '.join(lookups)}\n" if lookups else ""
    return (f"# {spec.name!r}, layer {layer}: {spec.n} tokens; P holds {sizes}\n{note}"
            + _function(f"mask_layer_{layer}", low.root, slots, low.params.dtype == torch.int64))


def _sources(spec) -> str:
    """The library functions the file needs, copied from their one definition, after the two
    constants the error helpers read."""
    scheme = positions.SCHEME_FUNCTIONS[spec.positions["scheme"]]
    fns = [errors.one_line, errors.SpecError, errors.did_you_mean, errors.require, errors.is_int,
           segments.resized_segments, segments._shown, segments._resized, segments._check_resized,
           segments.segment_size, tokens.TokenTable, tokens.grid_coordinates, tokens._segment_columns,
           tokens.build_table,
           lower.param_value, scheme, expr.floordiv_by_size, lower.claims_a_kernel, expr._tensor_min, _where, _not,
           lower_blocks.compiled_create_block_mask, lower_blocks.torch_block_mask]
    constants = (f"_CONTROL = re.compile({errors._CONTROL.pattern!r})\nMAX_INT = {errors.MAX_INT}\n"
                 f"COMPILE_BLOCK_MASK_FROM = {lower_blocks.COMPILE_BLOCK_MASK_FROM}  # tokens\n\n\n")
    return constants + "\n\n".join(inspect.getsource(f) for f in fns)


def export_work(spec) -> int:
    """What lowering every segment pair costs, counted before any of it runs: segment pairs x
    steps (base, rules, overlays) x distinct layer programs (about 3.5 us each here: 2 M is ~7 s)."""
    steps = 1 + len(spec.mask["rules"]) + len(spec.mask["overlays"])
    return len(spec.segments) ** 2 * steps * len(_variants(spec))


def flex_code(spec) -> str:
    """The generated file's text (see the module docstring and the file's own docstring)."""
    spec.require_sized()
    if len(spec.segments) > knobs.EXPORT_MAX_SEGMENTS:
        raise SpecError("segments", f"{len(spec.segments):,} segments: the FlexAttention export lowers every "
                        f"segment pair and stops at {knobs.EXPORT_MAX_SEGMENTS:,}; use Spec.mask_mod() / "
                        "Spec.block_mask() from Python, or merge segments")
    work = export_work(spec)
    if work > knobs.EXPORT_MAX_WORK:
        raise SpecError("mask", f"the FlexAttention export would lower {work:,} (segment pair, step, layer variant) "
                        f"cases, over the limit of {knobs.EXPORT_MAX_WORK:,} (EXPORT_MAX_WORK, "
                        f"MASKSTUDIO_EXPORT_MAX_WORK): merge segments or rules, or export JSON")
    lowered = _lowered(spec)
    keys = tuple(sorted(dict.fromkeys(k for _, low in lowered for k in low.keys), key=lambda k: (k[0] != "start", k)))
    slots = {k: i for i, k in enumerate(keys)}
    wide = any(low.params.dtype.itemsize == 8 for _, low in lowered)
    functions = "\n\n".join(_function(f"_layer_variant_{i}", low.root, slots, wide) + "\n\n"
                              + _dividends(f"_layer_variant_{i}_dividends", low.root, slots)
                              for i, (_, low) in enumerate(lowered))
    table = ", ".join(f"{key!r}: (_layer_variant_{i}, {low.uses_head}, _layer_variant_{i}_dividends, "
                      f"{low.uses_lookups()!r})" for i, (key, low) in enumerate(lowered))
    layout = [{k: s[k] for k in _LAYOUT_KEYS if k in s} for s in spec.segments]
    scheme_fn = positions.SCHEME_FUNCTIONS[spec.positions["scheme"]].__name__
    end = slots[("start", len(spec.segments))]
    return TEMPLATE.format(
        name=repr(spec.name), slug=repr(lower.mask_slug(spec.name)), names=repr([s["name"] for s in spec.segments]), layout=repr(layout),
        n=spec.table.n, params=repr(list(keys)), dtype="torch.int64" if wide else "torch.int32",
        layer_sets=repr([expand_int_list(s) for s in layer_sets(spec.mask)]), variants=table,
        unframed=repr(_unframed(spec)), end=end, functions=functions, sources=_sources(spec),
        modalities=repr(segments.MODALITIES), grid_dims=repr(segments.GRID_DIMS),
        scheme_fn=scheme_fn, positions=repr(spec.positions), fast_dividend=expr.FAST_DIVIDEND, max_tokens=DEFAULT_MAX_TOKENS,
        sizes_in_kernel=knobs.SIZES_IN_KERNEL)


TEMPLATE = '''"""FlexAttention mask generated by Mask Studio from a JSON spec (its name: SPEC_NAME).

Lowered: the mask is closed-form integer arithmetic on q_idx / kv_idx (no per-token tables
unless the spec has per-token data, or sizes give frames to a segment shipped without them);
the sizes live in one small tensor P, so any sizes of this design's segments reuse one
compiled kernel; the first SIZES_IN_KERNEL layouts get a kernel of their own with the sizes as
Python constants, as hand-written FlexAttention code holds them (faster: no read of P per score).

    import torch
    from torch.nn.attention.flex_attention import flex_attention
    block_mask = block_mask_for(None, device="cuda")          # the shipped sizes, or
    block_mask = block_mask_for({{SEGMENTS[0]: 4096}}, device="cuda")   # other sizes, or
    block_mask = block_mask_for([sizes_a, sizes_b], device="cuda")    # a batch, padded to the longest
    out = torch.compile(flex_attention)(q, k, v, block_mask=block_mask)
    position_ids = position_ids_for(None)                      # [N] or [3, N] (M-RoPE)

With transformers: load the model with attn_implementation="flex_attention" and pass the
BlockMask as attention_mask, model(input_ids, attention_mask=block_mask,
position_ids=position_ids[None]). Sizes: {{"name": length | [h, w] | [t, h, w] | {{"frames": [...]}}}}
(a list for a 1-D segment is its frame lengths); sizes the design cannot take raise SpecError (a
ValueError) with Mask Studio's own one-line message.
"""
import difflib
import functools
import itertools
import re
from dataclasses import dataclass, field

import torch

SPEC_NAME = {name}
SLUG = {slug}  # the design's name as an identifier: mask_mod_for's functions are mask_<SLUG>_L<layer>
SEGMENTS = {names}
LAYOUT = {layout}
N = {n}
PARAMS = {params}  # what P[i] holds: (quantity, segment[, chunk size]) of the layout
DTYPE = {dtype}
LAYER_SETS = {layer_sets}  # layers of the spec's layer-restricted steps
UNFRAMED = {unframed}  # 1-D segments shipped without frames (their frames are one per token)
END = {end}  # P[END] = the layout's token count
MODALITIES = {modalities}
GRID_DIMS = {grid_dims}
POSITIONS = {positions}
MAX_TOKENS = {max_tokens}  # tokens in a layout, as Spec.with_sizes allows
FAST_DIVIDEND = {fast_dividend}  # |dividend| below this: a float32 quotient and one correction are exact
SIZES_IN_KERNEL = {sizes_in_kernel}  # layouts per layer program whose kernel holds their sizes as Python constants
# (as hand-written code does: no read of P per score; a compile each); later layouts share one kernel reading P
_COMPILED_IN = {{}}  # (layer program, padded) -> layouts given a kernel of their own (claims_a_kernel)


def _exact_div(a, d):
    return a // d


# ---- the lowered mask, one function per distinct layer program
{functions}

VARIANTS = {{{variants}}}  # (layer key, framed) -> (function, reads the head, dividend bound, tables read)


# ---- sizes -> token table -> P (copied from Mask Studio: one definition)
{sources}


def layout_for(sizes=None):
    """LAYOUT with other sizes for some segments: taken and refused as Spec.with_sizes does."""
    return resized_segments(LAYOUT, sizes, POSITIONS, MAX_TOKENS)


def params_for(sizes=None):
    """(P, token table) at these sizes: P = the sizes the mask reads, in PARAMS order."""
    return _params(layout_for(sizes))


def _params(layout):
    table = build_table(layout)
    return torch.tensor([param_value(table, key) for key in PARAMS], dtype=DTYPE), table


def _variant(layer, layouts=()):
    """(function, reads the head, dividend bound, tables read) of the layer's mask for these
    layouts: the one reading frames from tables once a segment in UNFRAMED was given frames."""
    key = tuple(layer in s for s in LAYER_SETS)
    framed = any("frames" in layout[i] for layout in layouts for i in UNFRAMED)
    return VARIANTS.get((key, framed), VARIANTS[(key, False)])


def _division(dividends, layouts):
    """Division by sizes for these layouts [(P list, tokens)]: a float quotient where every dividend
    stays below FAST_DIVIDEND (GPUs have no integer divider), else exact `//`."""
    fast = all(dividends(P, n) < FAST_DIVIDEND for P, n in layouts)
    return floordiv_by_size if fast else _exact_div


def mask_mod_for(sizes=None, layer=0, padded=False, device="cpu", sizes_in_kernel=None):
    """mask_mod(b, h, q_idx, kv_idx) at these sizes (padded: keys and queries past the end masked);
    device: where its captured tensors live (the device attention runs on); sizes_in_kernel: the
    sizes as Python constants in the kernel, as hand-written code holds them (None: for the first
    SIZES_IN_KERNEL layouts of the layer program, then one kernel reading P serves the rest)."""
    return _mask_mods(layout_for(sizes), layer, padded, device, sizes_in_kernel)[0]


def _mask_mods(layout, layer, padded, device, sizes_in_kernel):
    """(the mask_mod attention runs, the one reading P that builds blocks) for one layout."""
    P, table = _params(layout)
    fn, _, dividends, lookups = _variant(layer, [layout])
    T = {{a: table.attrs[a].to(device) for a in lookups}}
    if sizes_in_kernel is None:
        sizes_in_kernel = claims_a_kernel(_COMPILED_IN, (fn.__name__, padded), tuple(P.tolist()), SIZES_IN_KERNEL)
    sizes = P.to(device)
    run_time = _closure(fn, sizes, T, _division(dividends, [(P.tolist(), table.n)]), padded, layer)
    return (_closure(fn, P.tolist(), T, _exact_div, padded, layer) if sizes_in_kernel else run_time), run_time


def _closure(fn, P, T, div, padded, layer):
    """mask_mod over sizes P: a tensor (read per score) or a list of ints (constants in the kernel)."""

    def mask_mod(b, h, q_idx, kv_idx):  # reads no global: torch.compile guards need the file imported to read one
        allow = fn(P, T, h, q_idx, kv_idx, div)
        return (allow & (kv_idx < P[END]) & (q_idx < P[END])) if padded else allow
    mask_mod.__name__ = mask_mod.__qualname__ = f"mask_{{SLUG}}_L{{layer}}"  # compile logs and profiles say which
    mask_mod.sizes_in_kernel = not isinstance(P, torch.Tensor)
    return mask_mod


def block_mask_for(sizes_or_batch=None, device="cpu", layer=0, num_heads=None, block_size=128, length=None,
                   sizes_in_kernel=None):
    """A BlockMask for one layout (None or a sizes dict) or a batch (a list of them, padded to the
    longest or to `length`). num_heads: needed when the layer's rules switch on heads.
    sizes_in_kernel: as mask_mod_for (one layout; a batch reads its sizes from P). Blocks are built
    by the mask_mod reading P either way, so building compiles once for any sizes."""
    batch = isinstance(sizes_or_batch, list)
    layouts = [layout_for(s) for s in (sizes_or_batch if batch else [sizes_or_batch])]
    fn, per_head, dividends, lookups = _variant(layer, layouts)
    heads = num_heads if per_head else None
    if per_head and num_heads is None:
        raise ValueError("this layer has per-head rules: pass num_heads")
    if not batch:
        tokens = sum(segment_size(s) for s in layouts[0])
        n = length or tokens
        runs, builds = _mask_mods(layouts[0], layer, n > tokens, device, sizes_in_kernel)
        block_mask = torch_block_mask(builds, None, heads, n, device, block_size)
        block_mask.mask_mod = runs
        return block_mask
    if lookups:
        raise ValueError(f"attributes {{lookups}} are per-token tables: build one BlockMask per layout")
    Ps = torch.stack([_params(layout)[0] for layout in layouts])
    div = _division(dividends, [(P, P[END]) for P in Ps.tolist()])
    Ps = Ps.to(device)
    n = length or int(Ps[:, END].max())

    def mask_mod(b, h, q_idx, kv_idx):
        P = Ps[b]
        return fn(P, {{}}, h, q_idx, kv_idx, div) & (kv_idx < P[END]) & (q_idx < P[END])
    return torch_block_mask(mask_mod, len(Ps), heads, n, device, block_size)


def position_ids_for(sizes=None):
    """LongTensor [N] (or [3, N] for 3-axis schemes) at these sizes."""
    return _positions(layout_for(sizes))


def _positions(layout):
    table = build_table(layout)
    params = {{k: v for k, v in POSITIONS.items() if k not in ("scheme", "share")}}
    ids = {scheme_fn}(table, layout, **params)
    for copy, source in POSITIONS.get("share", {{}}).items():
        ids[..., table.segment_slice(SEGMENTS.index(copy))] = ids[..., table.segment_slice(SEGMENTS.index(source))]
    return ids


_SHIPPED = {{}}


def mask_mod(b, h, q_idx, kv_idx, layer=0):
    """The mask at the shipped sizes (N tokens); per-layer specs: pass layer."""
    key = tuple(layer in s for s in LAYER_SETS)
    if key not in _SHIPPED:
        _SHIPPED[key] = mask_mod_for(None, layer)
    return _SHIPPED[key](b, h, q_idx, kv_idx)


def position_ids():
    return position_ids_for(None)


if __name__ == "__main__":
    from torch.nn.attention.flex_attention import create_mask

    dense = create_mask(mask_mod, None, None, N, N)[0, 0]
    print(f"{{N}} tokens, density {{dense.float().mean().item():.4f}}")
'''
