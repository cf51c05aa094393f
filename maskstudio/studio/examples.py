"""Example inputs, so every design runs with one click: text for text segments that have none,
cut to the segment's declared size by the model's tokenizer (so the run's layout is the design
the pictures show), and the check, before any model is loaded, of what a model can take.

The presets are published designs without inputs (their `length`s are what the papers draw);
this layer fills a fitting example at run time and says so in the run's notes. A segment's own
`text` always wins.
"""
from __future__ import annotations

from ..segments import GRID_DIMS, segment_size
from ..spec import Spec

RUNNABLE = ("text", "special")
# (name/role keywords, example) -- the first whose keyword is in a segment's name or roles wins
EXAMPLES = (
    (("system", "instruction", "sys"), "You are a helpful assistant. Answer briefly and truthfully. "),
    (("question", "query", "prompt", "user", "ask", "request", "task"),
     " Question: Which city is the capital of France, and which river flows through it? Answer:"),
    (("answer", "target", "response", "reply", "output", "generate", "gen", "conclusion", "summary",
      "completion", "decoder", "label"),
     " The capital of France is Paris, and the river Seine flows through it from east to west."),
    (("meta", "sink", "register", "cls", "eos", "bos", "latent", "special", "pad", "marker", "sep"), " *"),
)
DOCUMENT = (" Paris is the capital and largest city of France. It lies on the river Seine in the north of"
            " the country. The city is known for the Eiffel Tower, the Louvre museum, its bridges, its"
            " cafes and its long history as a centre of art, science and trade.")


def example_source(seg: dict) -> str:
    """The example text a segment gets, chosen by its name and roles (a document by default)."""
    words = " ".join([seg["name"]] + list(seg.get("role", []))).lower()
    for keys, text in EXAMPLES:
        if any(k in words for k in keys):
            return text
    return " *" if seg["modality"] == "special" else DOCUMENT


def _cut(source: str, length: int, tokenizer) -> str:
    """`source` repeated and cut to exactly `length` tokens of `tokenizer` when it can be (decoding
    a cut and encoding it again can merge tokens: then a filler of one-token words)."""
    from ..run.inputs import encode

    reps = 1
    ids = encode(tokenizer, source)
    while len(ids) < length:
        reps *= 2
        ids = encode(tokenizer, source * reps)
    text = tokenizer.decode(ids[:length])
    if len(encode(tokenizer, text)) == length:
        return text
    filler = " the" * length
    return filler if len(encode(tokenizer, filler)) == length else text


def _estimate(source: str, length: int) -> str:
    """Without a tokenizer: about `length` tokens (1.3 tokens a word)."""
    words = source.split(" ")
    words = [w for w in words if w] or ["*"]
    n = max(1, round(length / 1.3))
    return " " + " ".join((words * (n // len(words) + 1))[:n])


def example_text(seg: dict, tokenizer=None):
    """Example text fitting a sized segment: one string, or one per frame for `frames`."""
    source = example_source(seg)
    fit = (lambda n: _cut(source, n, tokenizer)) if tokenizer is not None else (lambda n: _estimate(source, n))
    if "frames" in seg:
        return [fit(n) for n in seg["frames"]]
    return fit(segment_size(seg) or 8)


def needs_examples(spec: Spec) -> list[str]:
    """The text segments a run would refuse for lack of text."""
    return [s["name"] for s in spec.segments if s["modality"] in RUNNABLE and "text" not in s]


def with_examples(spec: Spec, tokenizer=None) -> tuple[Spec, list[str]]:
    """The design with example text in its text segments that have none (sizes kept when the
    tokenizer reproduces them); returns (spec, the names filled)."""
    missing = needs_examples(spec)
    if not missing:
        return spec, []
    data = spec.to_dict()
    for seg in data["segments"]:
        if seg["name"] in missing:
            seg["text"] = example_text(seg, tokenizer)
            if seg["modality"] not in GRID_DIMS and "grid" in seg:  # a text grid runs as one row of tokens
                seg["length"] = segment_size(seg)
                seg.pop("grid")
    return Spec.load(data), missing


def run_blocker(spec: Spec, model=None) -> str | None:
    """Why this design cannot run on `model` (None: the embedded default), said before loading it;
    None when it can (text segments without text get examples)."""
    from ..run.models import can_take

    return can_take(spec, model)


def examples_note(names: list[str]) -> str:
    return (f"example text used for {', '.join(names)} (the design gives none; type your own in the "
            f"segments table's text column)") if names else ""
