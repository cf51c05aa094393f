"""Export a spec: canonical JSON, dense mask / position ids as .npy, a standalone
FlexAttention Python file (torch and the standard library only) with the lowered mask for any
sizes of the design (export_flex.py), and that file with the design's transformers attention
functions and packing collator added (export_transformers.py).
"""
from __future__ import annotations

import io

import numpy as np

from . import knobs
from .export_flex import flex_code  # noqa: F401  (export.flex_code is the public name)
from .export_transformers import transformers_code  # noqa: F401  (the public name, as flex_code)

FORMATS = ("json", "npy", "positions", "flex", "transformers")


def export_bytes(spec, fmt: str, layer: int = 0, head: int = 0) -> bytes:
    """The bytes of one export format (what the CLI writes and the app downloads)."""
    if fmt == "json":
        return spec.to_json().encode()
    if fmt == "flex":
        return flex_code(spec).encode()
    if fmt == "transformers":
        return transformers_code(spec).encode()
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


