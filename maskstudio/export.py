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

from . import knobs, patterns
from .compile import Tok
from .segments import all_steps, expand_int_list

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
    """Attributes read by any step of the spec, whatever its layers and heads (every step's
    pattern is called once on recording views; patterns never branch on values)."""
    seen = {"segment"}
    idx = torch.zeros(1, dtype=torch.long)
    q, k = _Recorder(spec.table.attrs, idx, seen), _Recorder(spec.table.attrs, idx, seen)
    for _, step in all_steps(spec.mask):
        pat = patterns.PATTERNS[step["pattern"]]
        pat.fn(q, k, **{name: step[name] for name in pat.params if name in step})
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
            consts.append(f"{name} = torch.tensor({flags})  # {side} side of {label}")
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
    steps: list[str] = []  # descriptions with the spec's names: only ever written as repr literals
    body: list[str] = [f"    allow = {_call(mask['base'])}"]
    for key in ("rules", "overlays"):
        for i, step in enumerate(mask[key]):
            label = f"{key[:-1].upper()}{i}"
            region = _region(spec, step, consts, label)
            steps.append(f"{label}: {step.get('op', 'rule')} {step['pattern']} on {step['q']} -> {step['k']}")
            desc = f"{label} = {key}[{i}], STEPS[{len(steps) - 1}]"
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
    steps_code = "".join(f"\n    {d!r}," for d in steps)
    return f'''"""FlexAttention mask generated by Mask Studio from a JSON spec (its name: SPEC_NAME).

Reproduce the dense mask:
    from torch.nn.attention.flex_attention import create_mask, create_block_mask
    dense = create_mask(mask_mod, None, None, N, N)  # [1, 1, N, N], True = may attend
    block_mask = create_block_mask(mask_mod, None, None, N, N, device="cuda")
{"Per-layer rules: pass functools.partial(mask_mod, layer=l) for layer l." if spec.varies_by_layer else ""}"""
import torch

SPEC_NAME = {spec.name!r}
N = {table.n}
SEGMENTS = {table.names!r}
STEPS = [{steps_code}
]
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
        self._idx = idx

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return A[name][self._idx]


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
        if fmt == "npy" and spec.n > knobs.DENSE_EXPORT_MAX:
            raise ValueError(f"a dense mask of {spec.n:,} tokens is {spec.n ** 2 / 2 ** 30:.1f} GiB; .npy masks "
                             f"stop at {knobs.DENSE_EXPORT_MAX:,} tokens: export --format flex (any size) or "
                             f"use spec.block_mask()")
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


