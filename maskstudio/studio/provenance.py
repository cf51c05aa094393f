"""Which design a result was computed for, and a line when the design has changed since.

Every result text the app shows (the run summary, knockout, comparisons, evaluation, training)
starts with one label line, `Run of prefix_lm  [design 3f2a9c]`: the design's name and a short
digest of its JSON (an edit that keeps the name still changes the digest). `results_note` reads
those first lines back from the result boxes, exactly as the page shows them, and says which
results are of another design than the current one ("this run is of streaming_llm; the design is
now prefix_lm"). Nothing is kept on the server for it: what the page shows is what is checked.
"""
from __future__ import annotations

import hashlib
import json
import re

from ..spec import Spec
from .state import card_text

_LABEL = re.compile(r"^(?P<what>[A-Z][\w ]*?) of (?P<name>.*)  \[design (?P<version>[0-9a-f]{6})\]$")


def version(spec: Spec) -> str:
    """A short digest of the design's canonical JSON: equal designs, equal versions."""
    return hashlib.sha1(json.dumps(spec.to_dict(), sort_keys=True).encode("utf-8", "backslashreplace")).hexdigest()[:6]


def label(what: str, spec: Spec) -> str:
    """The first line of a result: 'Run of prefix_lm  [design 3f2a9c]' (`what` capitalised, one line)."""
    name = " ".join(str(spec.name).split())
    return f"{what[:1].upper()}{what[1:]} of {name}  [design {version(spec)}]"


def labelled(what: str, spec: Spec, text: str) -> str:
    """`text` under its label line (an empty text stays empty: no result, nothing to label)."""
    return f"{label(what, spec)}\n{text}" if text else text


def read_label(text) -> dict | None:
    """{"what", "name", "version"} of a result text's label line, or None (no label, no result)."""
    first = str(text or "").split("\n", 1)[0]
    m = _LABEL.match(first)
    return m.groupdict() if m else None


def results_note(state, *texts) -> str:
    """One Markdown line per shown result that was computed for another design than the session's
    (`state`, or a Spec), or ''. `texts`: the result boxes' values (unlabelled or empty ones are skipped)."""
    spec = state if isinstance(state, Spec) else state["spec"]
    now = version(spec)
    lines = []
    for text in texts:
        got = read_label(text)
        if got is None or got["version"] == now:
            continue
        what, then = got["what"].lower(), got["name"]
        if then == " ".join(str(spec.name).split()):
            lines.append(f"⚠ This {what} is of an earlier version of **{card_text(then)}**: the design has "
                         f"changed since; run it again to see the current one.")
        else:
            lines.append(f"⚠ This {what} is of **{card_text(then)}**; the design is now "
                         f"**{card_text(spec.name)}**.")
    return "  \n".join(dict.fromkeys(lines))


def label_result(out: dict, key: str, what: str, spec: Spec) -> dict:
    """A handler's outputs with `out[key]` labelled (`labelled`)."""
    return {**out, key: labelled(what, spec, out.get(key) or "")}
