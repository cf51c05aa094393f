"""From a spec to a model's inputs: text sizing, chat segments, the materialized layout, and the
text family's adapter (prepare / forward / extend) that the one pipeline drives.

A `Prepared` is what every adapter hands the pipeline: the materialized layout (declared sizes
replaced by real token counts), the token ids per segment and frame, notes for the user and the
ordinal of the generate segment. `TextAdapter` is the adapter of text-only causal LMs;
`vision.VisionAdapter` extends it for vision-language models.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch

from ..errors import RunError, SpecError
from ..spec import Spec
from .attention import ATTN_NAME, attn_impl
from .measures import VISUAL
from .models import HUB_EXAMPLES, LoadedModel

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class Prepared:
    layout: Spec                  # the materialized spec
    seg_ids: list[list[list[int]]]  # per segment, per frame, token ids
    notes: list[str]
    gen: int | None               # ordinal of the generate segment, None = append a new one
    visuals: dict = field(default_factory=dict)  # image/video segment name -> vision.Visual (VLM runs)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor([i for seg in self.seg_ids for fr in seg for i in fr], dtype=torch.long)

    @property
    def predict_at(self) -> int:
        """The position whose logits predict the next generated token: the generate segment's last
        token, else the last token."""
        t = self.layout.table
        return t.starts[self.gen] + t.sizes[self.gen] - 1 if self.gen is not None else t.n - 1


def as_spec(spec) -> Spec:
    return spec if isinstance(spec, Spec) else Spec.load(spec)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


# ================================================================= chat template
def _chat_turns(segs: list[dict]) -> list[tuple[str, list[int]]]:
    """(chat role, segment ordinals) per turn. A segment's chat role is its role system/user/assistant
    if it has one; otherwise segments before the first `generate`/`target` segment are the user turn
    and the rest the assistant's."""
    answer = next((i for i, s in enumerate(segs) if {"generate", "target"} & set(s.get("role", []))), len(segs))
    turns: list[tuple[str, list[int]]] = []
    for i, s in enumerate(segs):
        role = next((r for r in s.get("role", []) if r in CHAT_ROLES), "user" if i < answer else "assistant")
        if turns and turns[-1][0] == role:
            turns[-1][1].append(i)
        else:
            turns.append((role, [i]))
    return turns


def chat_segments(spec: Spec, tokenizer) -> list[dict]:
    """Wrap the segments in the tokenizer's chat template; its own text becomes `special` segments."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise RunError("this tokenizer has no chat template; run without chat formatting")
    segs = [dict(s) for s in spec.segments]
    turns = _chat_turns(segs)
    marks = [f"MSKSTDXQ{j}Z" for j in range(len(turns))]
    messages = [{"role": role, "content": marks[j]} for j, (role, _) in enumerate(turns)]
    last_is_assistant = turns[-1][0] == "assistant"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not last_is_assistant,
                                             continue_final_message=last_is_assistant)
    names = {s["name"] for s in segs}
    out, rest, k = [], rendered, 0

    def special(text):
        nonlocal k
        name = f"chat_{k}"
        while name in names:
            name += "_"
        k += 1
        return {"name": name, "modality": "special", "text": text, "role": ["chat_template"]}

    for j, (_, members) in enumerate(turns):
        before, found, rest = rest.partition(marks[j])
        if not found:
            raise RunError("the chat template rewrote the message text; run without chat formatting")
        if before:
            out.append(special(before))
        out.extend(segs[i] for i in members)
    if rest:
        out.append(special(rest))
    return out


# ================================================================= sizing and materializing
def size_by_tokenizer(s: dict, tokenizer, notes: list, spec: Spec) -> list[list[int]]:
    """Tokenize a text segment (one string, or one per frame) and set its length / frames to the
    real token counts, in place; returns the token ids per frame."""
    if "text" not in s:
        raise RunError(f"segment '{s['name']}' has no text; give it \"text\" to run it on a model", spec)
    texts = s["text"] if isinstance(s["text"], list) else [s["text"]]
    frames = [encode(tokenizer, t) for t in texts]
    if any(len(f) == 0 for f in frames):
        raise RunError(f"segment '{s['name']}' has empty text{' in a frame' if len(frames) > 1 else ''}; "
                       f"give it at least one token of text or remove it", spec)
    declared = s.get("length")
    if isinstance(s["text"], str) and "frames" in s:
        notes.append(f"segment '{s['name']}': declared frames dropped (its text is one string; "
                     f"give a list of strings for one frame each)")
    for key in ("length", "frames"):
        s.pop(key, None)
    if isinstance(s["text"], list):
        s["frames"] = [len(f) for f in frames]
    else:
        s["length"] = len(frames[0])
    if declared is not None and declared != sum(len(f) for f in frames):
        notes.append(f"segment '{s['name']}': declared {declared} tokens, text has "
                     f"{sum(len(f) for f in frames)} (sized by the tokenizer)")
    return frames


def materialize(spec: Spec, segs: list[dict], what: str) -> tuple[Spec, int | None]:
    """The spec with its segments replaced by the sized ones, and the ordinal of the generate
    segment (None: generation appends a new segment)."""
    data = spec.to_dict()
    data["segments"] = segs
    try:
        layout = Spec.load(data)
    except SpecError as err:
        raise RunError(f"the spec does not fit {what}: {err}", spec) from None
    gen = next((i for i, s in enumerate(layout.segments) if "generate" in s.get("role", [])), None)
    return layout, gen


def sized_by_tokenizer(spec: Spec, tokenizer) -> tuple[Spec, list[str]]:
    """The layout a run will use (without a chat template): every text segment sized by the
    tokenizer, and a note for each whose declared size differs. What `check` and `export` show
    with --size-by-tokenizer, so the picture, the checks and the files match the run."""
    notes: list[str] = []
    segs = [dict(s) for s in spec.segments]
    for s in segs:
        if "text" in s and s["modality"] in ("text", "special"):
            size_by_tokenizer(s, tokenizer, notes, spec)
    return materialize(spec, segs, "the tokenized text")[0], notes


def prepare(spec: Spec, lm: LoadedModel, chat: bool = False) -> Prepared:
    """Tokenize the spec's texts and return the materialized layout (sizes = real token counts)."""
    for s in spec.segments:
        if s["modality"] not in ("text", "special"):
            raise RunError(f"segment '{s['name']}' is {s['modality']} but {lm.name} is a text-only model; "
                           f"pick a vision-language model (e.g. HuggingFaceTB/SmolVLM-256M-Instruct, "
                           f"Qwen/Qwen2-VL-2B-Instruct, tiny-qwen2-vl), or make it a text segment", spec)
    segs = chat_segments(spec, lm.tokenizer) if chat else [dict(s) for s in spec.segments]
    notes, seg_ids = [], []
    for s in segs:
        seg_ids.append(size_by_tokenizer(s, lm.tokenizer, notes, spec))
    layout, gen = materialize(spec, segs, "the tokenized text")
    return Prepared(layout, seg_ids, notes, gen)


def grow(prep: Prepared, new_ids: list[int], tokenizer) -> Prepared:
    """`prep` with the generated tokens joined to the generate segment (else a new last segment
    "generated"). The layout is extended, not re-validated (Spec.with_tokens_appended)."""
    seg_ids = [[list(f) for f in seg] for seg in prep.seg_ids]
    layout = prep.layout.with_tokens_appended(prep.gen, tokenizer.decode(new_ids), len(new_ids))
    if prep.gen is None:
        seg_ids.append([list(new_ids)])
        gen = len(seg_ids) - 1
    else:
        gen = prep.gen
        seg_ids[gen][-1].extend(new_ids)
    return Prepared(layout, seg_ids, prep.notes, gen, prep.visuals)


def decode_tokens(prep: Prepared, tokenizer) -> dict[str, list[str]]:
    """Segment name -> one string per token (a visual segment repeats its placeholder token)."""
    tokens = {}
    for j, s in enumerate(prep.layout.segments):
        flat = [i for fr in prep.seg_ids[j] for i in fr]
        tokens[s["name"]] = ([tokenizer.decode([flat[0]])] * len(flat) if s["modality"] in VISUAL
                             else [tokenizer.decode([i]) for i in flat])
    return tokens


def model_positions(layout: Spec, lm: LoadedModel) -> torch.Tensor:
    """The spec's position ids as the model takes them: [N], or [3, N] for an M-RoPE model."""
    from ..positions import is_3d

    ids = layout.position_ids()
    if is_3d(layout) and not lm.uses_mrope:
        raise RunError(f"positions scheme '{layout.positions['scheme']}' gives 3-D (t, h, w) ids but "
                       f"{lm.name} uses 1-D RoPE; use a 1-D scheme such as 'sequential' or an M-RoPE model",
                       layout)
    if lm.uses_mrope and ids.dim() == 1:
        ids = ids[None].expand(3, -1)
    return ids


# ================================================================= the text adapter
@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept both (looked up once per class)."""
    return _cache_kwarg_of(type(model))


def forward_ids(lm: LoadedModel, ctx, ids: torch.Tensor, pos: torch.Tensor, cache=None) -> torch.Tensor:
    """One forward of `ids` (the new tokens) at positions `pos` under ctx's masks -> logits [n, V]
    fp32; a KV `cache` is updated in place."""
    pos = pos[..., None, :] if pos.dim() == 2 else pos[None]  # [3, 1, n] or [1, n]
    with attn_impl(lm.model, ATTN_NAME):
        out = lm.model(input_ids=ids[None].to(lm.device), position_ids=pos.to(lm.device),
                       use_cache=cache is not None, **{_cache_kwarg(lm.model): cache, ATTN_NAME: ctx})
    return out.logits[0].float()


class TextAdapter:
    """How a text-only causal LM takes a spec: token ids in, logits out, the KV cache allowed.

    The pipeline calls prepare -> position_ids -> forward once, then extend / forward per new token."""

    no_kv_reason: str | None = None   # None: generation may use the KV cache (when the mask allows)
    oom_hint = "shorten the texts, pass attentions=False, or run on a GPU"

    def __init__(self, lm: LoadedModel):
        self.lm = lm

    def masked(self):
        """A context in which the model attends through the spec (held for a whole run)."""
        return attn_impl(self.lm.model, ATTN_NAME)

    def prepare(self, spec: Spec, chat: bool = False, images: dict | None = None,
                positions: str | None = None) -> Prepared:
        if images:
            raise RunError(f"images were given but {self.lm.name} is a text-only model; pick a vision-language "
                           f"model such as {HUB_EXAMPLES[0]} (or tiny-qwen2-vl offline)", spec)
        return prepare(spec, self.lm, chat)

    def position_ids(self, layout: Spec) -> torch.Tensor:
        return model_positions(layout, self.lm)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()  # full layers: a sliding-window cache would drop keys our mask indexes

    def forward(self, ctx, prep: Prepared, pos: torch.Tensor, cache=None, tail: int | None = None) -> torch.Tensor:
        """Logits [n, V] of prep's tokens (only the last `tail` ones, on top of `cache`, when given)."""
        ids = prep.input_ids
        if tail:
            ids, pos = ids[-tail:], pos[..., -tail:]
        return forward_ids(self.lm, ctx, ids, pos, cache)

    def extend(self, prep: Prepared, new_ids: list[int]) -> Prepared:
        return grow(prep, new_ids, self.lm.tokenizer)
