"""Declared sizes against a run's (#23 item 1, the app's half of `--size-by-tokenizer`).

A text segment may declare a length and also hold text; a run sizes it by the model's tokenizer
(`run.inputs.sized_by_tokenizer`, what `maskstudio check/export --size-by-tokenizer` uses). The
pictures, checks and exports show the declared sizes; this module says, in one line, where they
differ from the run's, and adopts the run's sizes on request (the "Use the run's sizes" button),
with the tokenizer of the model chosen in the Run tab (the embedded SmolLM2 by default).
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

from .. import knobs
from ..errors import RunError, SpecError
from ..spec import Spec
from .state import attempt, current, one_line

_TOKENIZERS: OrderedDict = OrderedDict()  # model name (None: the embedded one) -> tokenizer
_DIFFS: OrderedDict = OrderedDict()       # digest of (texts, sizes, model) -> differences
_LOCK = threading.Lock()
KEPT = 4, 256                             # tokenizers, difference lists kept
ADOPT_LABEL = "Use the run's sizes (tokenizer of the Run tab's model)"  # the button beside the line


def model_key(model_id) -> str | None:
    """The model a box names, None for the embedded default (as `actions.model_name`)."""
    model_id = (model_id or "").strip() if isinstance(model_id, str) else ""
    return None if model_id.lower() in ("", "default", "embedded", "smollm2") else model_id


def model_label(model: str | None) -> str:
    return "the embedded SmolLM2's tokenizer" if model is None else f"{model}'s tokenizer"


def _remember(cache: OrderedDict, key, value, size: int):
    with _LOCK:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > size:
            cache.popitem(last=False)
    return value


def run_tokenizer(model: str | None):
    """The tokenizer a run on `model` sizes text with (loaded once per process: seconds for the
    embedded GGUF's, never the model's weights)."""
    with _LOCK:
        if model in _TOKENIZERS:
            return _TOKENIZERS[model]
    from ..run.models import load_tokenizer

    return _remember(_TOKENIZERS, model, load_tokenizer(model), KEPT[0])


def text_segments(spec: Spec) -> list[str]:
    """Segments a run sizes by its tokenizer: text or special segments that hold text."""
    return [s["name"] for s in spec.segments if "text" in s and s["modality"] in ("text", "special")]


def _declared(spec: Spec) -> list[tuple[str, int]]:
    """(name, declared size) of text segments that also declare a size."""
    unsized = set(spec.unsized_segments())
    names = set(text_segments(spec))
    return [(s["name"], int(spec.table.sizes[i])) for i, s in enumerate(spec.segments)
            if s["name"] in names and s["name"] not in unsized]


def size_differences(spec: Spec, model: str | None = None) -> list[tuple[str, int, int]]:
    """(segment, declared tokens, the run's tokens) for every text segment whose declared size is
    not what a run on `model` gives it; [] when none differs or none declares a size."""
    declared = _declared(spec)
    if not declared:
        return []
    key = hashlib.sha1(json.dumps([spec.to_dict()["segments"], model], sort_keys=True, default=str)
                       .encode("utf-8", "backslashreplace")).hexdigest()
    with _LOCK:
        if key in _DIFFS:
            return _DIFFS[key]
    from ..run.inputs import sized_by_tokenizer

    sized, _ = sized_by_tokenizer(spec, run_tokenizer(model))
    run = {s["name"]: int(sized.table.sizes[i]) for i, s in enumerate(sized.segments)}
    diffs = [(name, n, run[name]) for name, n in declared if run.get(name, n) != n]
    return _remember(_DIFFS, key, diffs, KEPT[1])


def text_characters(spec: Spec) -> int:
    """Characters of text a run would tokenize (a frames segment's text is a list of strings)."""
    texts = [s["text"] for s in spec.segments if s["name"] in set(text_segments(spec))]
    return sum(len(t) if isinstance(t, str) else sum(len(x) for x in t) for t in texts)


def size_line(spec: Spec, model: str | None = None) -> str:
    """One line for the picture, the checks and the export when declared and run sizes differ
    ("" when they agree); a tokenizer that cannot be had is said, never raised. Past
    knobs.SIZE_CHECK_MAX_CHARS characters of text the edit does not tokenize (seconds per edit for
    megabytes of text): the line says so and the button still sizes them on request."""
    if _declared(spec) and text_characters(spec) > knobs.SIZE_CHECK_MAX_CHARS:
        return (f"the segments' texts hold {text_characters(spec):,} characters: their run sizes are not checked on "
                f"every edit past {knobs.SIZE_CHECK_MAX_CHARS:,} (MASKSTUDIO_SIZE_CHECK_MAX_CHARS); 'Use the run's "
                f"sizes' tokenizes them")
    try:
        diffs = size_differences(spec, model)
    except (RunError, SpecError, OSError, ValueError) as err:
        return (f"segment(s) {', '.join(text_segments(spec)[:5])} have text and declared sizes; the run's sizes "
                f"could not be checked ({one_line(err)})") if _declared(spec) else ""
    if not diffs:
        return ""
    shown = ", ".join(f"{name} {n} → {m}" for name, n, m in diffs[:6]) + (", …" if len(diffs) > 6 else "")
    return (f"Declared sizes differ from a run's ({model_label(model)}): {shown} tokens. The pictures, checks "
            f"and exports show the declared sizes; 'Use the run's sizes' adopts the run's.")


def adopt_run_sizes(state: dict, model_id: str = "") -> tuple[dict, str]:
    """The design with every text segment sized as a run on the Run tab's model sizes it (the
    embedded SmolLM2 when the box is empty); the session then checks sizes with that tokenizer."""
    spec, model = current(state), model_key(model_id)
    if not text_segments(spec):
        return state, "no segment has text: there are no run sizes to adopt (sizes come from the segments table)"
    try:
        tok = run_tokenizer(model)
    except (RunError, OSError, ValueError) as err:
        return state, f"model box: {one_line(err)}"
    from ..run.inputs import sized_by_tokenizer

    new, error = attempt(state, lambda: sized_by_tokenizer(spec, tok)[0])
    if not error:
        new["sizes_by"] = model
    return new, error
