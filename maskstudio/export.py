"""Export a spec: canonical JSON, dense mask / position ids as .npy, and a standalone
FlexAttention Python file (imports only torch) that reproduces the exact mask.

The generated file carries the token attributes the rules read (run-length encoded), the
source of the patterns it uses (copied from patterns.py, so there is still one definition),
and a mask_mod that composes them in the spec's order.
"""
from __future__ import annotations

import inspect
import io

import numpy as np
import torch

from . import patterns
from .compile import Tok, compile_program, evaluate
from .segments import expand_int_list

FORMATS = ("json", "npy", "positions", "flex")


def affine_runs(values) -> list[tuple[int, int, int]]:
    """Encode an int sequence as (start, step, count) runs: 0..9 -> [(0, 1, 10)]."""
    arr = np.asarray(values, dtype=np.int64)
    runs, i, n = [], 0, len(arr)
    while i < n:
        if i + 1 == n:
            runs.append((int(arr[i]), 0, 1))
            break
        step = int(arr[i + 1] - arr[i])
        j = i + 1
        while j + 1 < n and arr[j + 1] - arr[j] == step:
            j += 1
        runs.append((int(arr[i]), step, j - i + 1))
        i = j + 1
    return runs


class _Recorder(Tok):
    """A token view that notes which attributes the mask reads."""

    def __init__(self, attrs, idx, seen):
        super().__init__(attrs, idx)
        self._seen = seen

    def __getattr__(self, name):
        if not name.startswith("_"):
            self._seen.add(name)
        return super().__getattr__(name)


def used_attributes(spec) -> list[str]:
    """Attributes read by the spec's patterns on any layer (patterns never branch on values)."""
    seen = {"segment"}
    layers = sorted({0} | {x for s in spec.layer_sets() for x in s})
    idx = torch.zeros(1, dtype=torch.long)
    for layer in layers:
        evaluate(compile_program(spec, layer), _Recorder(spec.table.attrs, idx, seen),
                 _Recorder(spec.table.attrs, idx, seen), 0)
    return [a for a in spec.table.attrs if a in seen]


def _fmt_runs(runs, indent="    ") -> str:
    text = repr(runs)
    if len(text) < 88:
        return text
    body = ",\n".join(indent + "    " + repr(r) for r in runs)
    return "[\n" + body + ",\n" + indent + "]"


def _call(step: dict) -> str:
    pat = patterns.PATTERNS[step["pattern"]]
    args = [f"{k}={step[k]!r}" for k in pat.params if k in step]
    return f"{pat.fn.__name__}(q, k{', ' if args else ''}{', '.join(args)})"


def _region(spec, step: dict, consts: list, label: str) -> str:
    parts = []
    for side in ("q", "k"):
        chosen = spec.selected(step.get(side, "*"))
        if len(chosen) < len(spec.segments):
            name = f"{label}_{side.upper()}"
            flags = [i in chosen for i in range(len(spec.segments))]
            consts.append(f"{name} = torch.tensor({flags})  # {side}: {step.get(side)}")
            parts.append(f"{name}[seg_{side}]")
    heads = expand_int_list(step.get("heads"))
    if heads is not None:
        parts.append("(" + " | ".join(f"(h == {x})" for x in heads) + ")")
    return " & ".join(parts) if parts else "True"


def flex_code(spec) -> str:
    """A standalone, readable Python file with mask_mod(b, h, q_idx, kv_idx[, layer]) and position_ids()."""
    table = spec.table
    used = used_attributes(spec)
    mask = spec.mask
    consts: list[str] = []
    body: list[str] = [f"    allow = {_call(mask['base'])}"]
    for key in ("rules", "overlays"):
        for i, step in enumerate(mask[key]):
            label = f"{key[:-1].upper()}{i}"
            region = _region(spec, step, consts, label)
            desc = f"{key}[{i}]: {step.get('op', 'rule')} {step['pattern']} on {step['q']} -> {step['k']}"
            layers = expand_int_list(step.get("layers"))
            pad = "    "
            lines = [f"    # {desc}"]
            if layers is not None:
                lines.append(f"    if layer in {tuple(layers)!r}:")
                pad = "        "
            call = _call(step)
            if key == "rules":
                lines.append(f"{pad}allow = torch.where({region}, {call}, allow)" if region != "True"
                             else f"{pad}allow = {call}")
            else:
                op = step["op"]
                hit = call if region == "True" else f"({region}) & {call}"
                if op == "or":
                    lines.append(f"{pad}allow = allow | ({hit})")
                elif op == "and":
                    lines.append(f"{pad}allow = allow & ({call})" if region == "True"
                                 else f"{pad}allow = allow & (~({region}) | {call})")
                else:
                    lines.append(f"{pad}allow = allow & ~({hit})")
            body += lines
    used_patterns = [mask["base"]["pattern"]] + [s["pattern"] for k in ("rules", "overlays") for s in mask[k]]
    sources = [inspect.getsource(patterns.value), inspect.getsource(patterns.group)]
    sources = [src + '\n' for src in sources]
    sources += [inspect.getsource(patterns.PATTERNS[p].fn) + '\n' for p in dict.fromkeys(used_patterns)]
    attrs = "\n".join(f"    {name!r}: _runs({_fmt_runs(affine_runs(table[name].tolist()), '    ')}),"
                      for name in used)
    pos = spec.position_ids()
    if pos.dim() == 1:
        pos_code = f"    return _runs({_fmt_runs(affine_runs(pos.tolist()), '    ')})"
    else:
        rows = ",\n".join(f"        _runs({_fmt_runs(affine_runs(r.tolist()), '        ')})" for r in pos)
        pos_code = f"    return torch.stack([\n{rows},\n    ])  # (t, h, w) M-RoPE"
    layer_arg = ", layer=0" if spec.varies_by_layer else ""
    return f'''"""FlexAttention mask for '{spec.name}' — generated by Mask Studio from its JSON spec.

Reproduce the dense mask:
    from torch.nn.attention.flex_attention import create_mask, create_block_mask
    dense = create_mask(mask_mod, None, None, N, N)  # [1, 1, N, N], True = may attend
    block_mask = create_block_mask(mask_mod, None, None, N, N, device="cuda")
{"Per-layer rules: pass functools.partial(mask_mod, layer=l) for layer l." if spec.varies_by_layer else ""}"""
import torch

N = {table.n}
SEGMENTS = {table.names!r}
CHUNK_STRIDE = {patterns.CHUNK_STRIDE}


def _runs(runs):
    """Decode (start, step, count) runs into a LongTensor."""
    return torch.cat([start + step * torch.arange(count) for start, step, count in runs])


# Token attributes read by the mask (see Mask Studio's tokens.py for their meaning).
A = {{
{attrs}
}}


class Tok:
    """Attribute view over token indices: Tok(idx).frame -> the frame ids of those tokens."""

    def __init__(self, idx):
        self.idx = idx

    def __getattr__(self, name):
        return A[name][self.idx]


{chr(10).join(sources)}

{chr(10).join(consts)}


def mask_mod(b, h, q_idx, kv_idx{layer_arg}):
    q, k = Tok(q_idx), Tok(kv_idx)
    seg_q, seg_k = A["segment"][q_idx], A["segment"][kv_idx]
{chr(10).join(body)}
    return allow


def position_ids():
{pos_code}


if __name__ == "__main__":
    from torch.nn.attention.flex_attention import create_mask

    dense = create_mask(mask_mod, None, None, N, N)[0, 0]
    print(f"{{N}} tokens, density {{dense.float().mean().item():.4f}}")
'''


def export_bytes(spec, fmt: str, layer: int = 0, head: int = 0) -> bytes:
    """The bytes of one export format (what the CLI writes and the app downloads)."""
    if fmt == "json":
        return spec.to_json().encode()
    if fmt == "flex":
        return flex_code(spec).encode()
    if fmt in ("npy", "positions"):
        if fmt == "npy":
            arr = spec.dense_mask(layer=layer, head=head)
            cross = spec.cross_slices()
            if cross is not None:
                arr = arr[cross[0]][:, cross[1]]
        else:
            arr = spec.position_ids()
        buf = io.BytesIO()
        np.save(buf, arr.numpy())
        return buf.getvalue()
    raise ValueError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")


