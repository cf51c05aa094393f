"""The model's side of an audit: build the model from its config and record, per layer, the mask
and the position ids its own code builds for a layout.

Nothing here re-implements transformers' masking: the model runs its own forward (its
`create_causal_mask` / `create_sliding_window_causal_mask` / `create_chunked_causal_mask` per
`layer_types`, Gemma 3's bidirectional image blocks from `token_type_ids`, Qwen2-VL's M-RoPE from
`get_rope_index`) with an attention implementation registered here that records the mask each
layer receives and returns zeros (masks never depend on weights or hidden states). Masks are built
by transformers' own `sdpa_mask` with its shortcuts off, so a plain causal layer is materialized
instead of being left to `is_causal`. Position ids are read where the model hands them to its
rotary embedding.

Mask construction depends on the config, not on weights, so a hub config is built with tiny widths
(one head of the model's own head size, a small vocabulary with the special token ids moved
into it, a one-layer vision tower) and every layer and attention setting kept.
"""
from __future__ import annotations

import contextvars
import inspect
import json
import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import RunError, one_line

ATTN_NAME = "maskstudio_audit"
SMALL_VOCAB = 1024
TEXT_TOKEN = 11  # any ordinary token id: masks never read text ids
MAX_PARAMS = 200_000_000  # parameters of the tiny-width model; past this a config is refused (it did not shrink)
_SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
              vocab_size=128, max_position_embeddings=4096)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TINY_CONFIGS = {  # tiny local configs of each masking family (random weights, no hub)
    "tiny-llama": dict(_SMALL, model_type="llama", num_hidden_layers=2),
    "tiny-mistral": dict(_SMALL, model_type="mistral", num_hidden_layers=2, sliding_window=4),
    "tiny-gemma2": dict(_SMALL, model_type="gemma2", num_hidden_layers=4, sliding_window=4),
    "tiny-gemma3": dict(_SMALL, model_type="gemma3_text", num_hidden_layers=6, sliding_window=4),
    "tiny-gemma3-vision": dict(
        model_type="gemma3", image_token_id=120, boi_token_index=121, eoi_token_index=122, mm_tokens_per_image=4,
        text_config=dict(_SMALL, num_hidden_layers=6, sliding_window=4),
        vision_config=dict(_VISION, image_size=16, patch_size=4)),
    "tiny-qwen2-vl": dict(
        model_type="qwen2_vl", image_token_id=120, video_token_id=121, vision_start_token_id=122,
        vision_end_token_id=123, text_config=dict(
            _SMALL, num_hidden_layers=2, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2)),
    "tiny-llama4": dict(_SMALL, model_type="llama4_text", num_hidden_layers=4, attention_chunk_size=4,
                        intermediate_size_mlp=64, num_local_experts=1),
}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?\Z")


@dataclass
class ModelAttention:
    """What a model really does on one layout: per layer its mask (bool [N, N], True = may attend;
    layers of one kind share one tensor) and layer kind, the position ids its rotary embedding
    receives ([N], or [3, N] for M-RoPE; None without a rotary module), and notes on the way."""
    name: str
    model_type: str
    layer_types: list[str]
    masks: list[torch.Tensor]
    positions: torch.Tensor | None
    visual: list[str] = field(default_factory=list)  # segments fed as image / video tokens
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.masks)


# ---------------------------------------------------------------- configs
def load_config(source, allow_paths: bool = True):
    """A transformers config from a tiny name (TINY_CONFIGS), config JSON text or a dict, a
    config.json file or model folder (allow_paths: the CLI and Python, never the app), or a hub
    id (the local cache first, then the hub). Bad input is one RunError line naming the fix."""
    from transformers import AutoConfig

    if isinstance(source, str) and source.strip() in TINY_CONFIGS:
        return _from_dict(TINY_CONFIGS[source.strip()], source.strip())
    if isinstance(source, dict):
        return _from_dict(source, "config")
    if not isinstance(source, str) or not source.strip():
        raise RunError(f"give a model: one of {', '.join(TINY_CONFIGS)}, a hub id, or a config JSON")
    text = source.strip()
    if text.startswith("{"):
        try:
            return _from_dict(json.loads(text), "config")
        except json.JSONDecodeError as err:
            raise RunError(f"model config JSON: invalid at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if allow_paths and os.path.isfile(text):
        if os.path.getsize(text) > 1 << 20:
            raise RunError(f"{text} is over 1 MiB; a model config.json is a few KiB")
        try:
            with open(text, encoding="utf-8") as fh:
                return _from_dict(json.load(fh), os.path.basename(text))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{text} is not a JSON config: {one_line(err)}") from None
    if allow_paths and os.path.isdir(text):
        if not os.path.isfile(os.path.join(text, "config.json")):
            raise RunError(f"folder {text} has no config.json; give a model folder or its config.json")
        return load_config(os.path.join(text, "config.json"))
    if not allow_paths and os.path.exists(text):
        raise RunError(f"'{text[:60]}' names a path on this server; give a hub id, a tiny config name or config JSON")
    if not _HUB_ID.match(text) or ".." in text:
        raise RunError(f"'{text[:60]}' is not a model: give one of {', '.join(TINY_CONFIGS)}, a hub id like "
                       "google/gemma-3-4b-it, or a config JSON")
    from ..run.models import _local_then_hub

    def load(local_only: bool):
        return AutoConfig.from_pretrained(text, local_files_only=local_only, trust_remote_code=False)
    return _local_then_hub(text, load, "model config", f"use a tiny config ({', '.join(TINY_CONFIGS)})",
                           lambda *_: None), text


def _from_dict(data, name: str):
    from transformers import AutoConfig

    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise RunError(f"{name}: a model config is a JSON object with a \"model_type\" (e.g. \"llama\")")
    data = dict(data)
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data), name
    except ValueError as err:
        raise RunError(f"{name}: {one_line(err)[:200]}") from None
    except TypeError as err:
        raise RunError(f"{name}: a field has the wrong type ({one_line(err)[:160]})") from None


def _sub_configs(config) -> list:
    from transformers import PretrainedConfig

    return [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]


def _set(cfg, **values) -> None:
    """Set the integer fields `cfg` has (a per-layer list of them too, e.g. Gemma 3n's MLP sizes)."""
    for key, value in values.items():
        old = getattr(cfg, key, None)
        if isinstance(old, list) and old and all(isinstance(v, int) and not isinstance(v, bool) for v in old):
            setattr(cfg, key, [value] * len(old))
        elif isinstance(old, int) and not isinstance(old, bool):
            setattr(cfg, key, value)


def shrunk(config):
    """The config with tiny widths and every masking setting kept: the text model keeps its layers,
    layer types, windows, chunks and head size (RoPE sections depend on it) but has one head and a
    small MLP and vocabulary (special token ids moved into it); other towers get one small layer."""
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", 1) or 1
    head_dim = getattr(text, "head_dim", None) or getattr(text, "hidden_size", 64) // heads
    _set(text, hidden_size=head_dim, num_attention_heads=1, num_key_value_heads=1, intermediate_size=16,
         intermediate_size_mlp=16, moe_intermediate_size=16, shared_expert_intermediate_size=16,
         num_local_experts=1, num_experts=1, n_routed_experts=1, num_experts_per_tok=1, n_shared_experts=1)
    if getattr(text, "head_dim", None) is not None:
        text.head_dim = head_dim
    for sub in _sub_configs(config):
        if sub is not text:
            _set(sub, num_hidden_layers=1, depth=1, hidden_size=16, embed_dim=16, intermediate_size=16,
                 num_attention_heads=1, num_heads=1)
    if (getattr(text, "vocab_size_per_layer_input", 0) or 0) > SMALL_VOCAB:  # Gemma 3n's per-layer embeddings
        text.vocab_size_per_layer_input = SMALL_VOCAB
    _set(text, hidden_size_per_layer_input=8)
    if getattr(text, "vocab_size", 0) > SMALL_VOCAB:
        _move_special_ids(config, text)
        text.vocab_size = SMALL_VOCAB
        if getattr(config, "vocab_size", None) and config is not text:
            config.vocab_size = SMALL_VOCAB
    return config


def _move_special_ids(config, text) -> None:
    """Token ids past the small vocabulary (image, video, vision start, pad, bos...) moved to its
    top, one new id per old id, in every config that names them."""
    moved: dict[int, int] = {}
    for cfg in [config, *_sub_configs(config)]:
        for key, value in list(vars(cfg).items()):
            if not key.endswith(("_token_id", "_token_index", "_token_ids")):
                continue
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                continue
            new = [moved.setdefault(v, SMALL_VOCAB - 1 - len(moved)) if v >= SMALL_VOCAB else v for v in values]
            setattr(cfg, key, new if isinstance(value, list) else new[0])


# ---------------------------------------------------------------- recording
_RECORD: contextvars.ContextVar = contextvars.ContextVar("maskstudio_audit_record")


def _mask_function(*args, **kwargs):
    """transformers' own sdpa_mask with its shortcuts off: every layer's mask is materialized."""
    from transformers.masking_utils import sdpa_mask

    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """Records (layer_idx, mask, is_causal) and returns zeros shaped like the attention output."""
    record = _RECORD.get(None)
    if record is not None:
        record.append((getattr(module, "layer_idx", None), attention_mask, getattr(module, "is_causal", True),
                       key.shape[-2]))
    return torch.zeros_like(query).transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _recording_attention)
    AttentionMaskInterface.register(ATTN_NAME, _mask_function)


def _allowed(mask, is_causal: bool, n: int) -> torch.Tensor:
    """A recorded mask as bool [N, N] (True = may attend); None is what sdpa does without a mask."""
    if mask is None:
        full = torch.ones(n, n, dtype=torch.bool)
        return torch.tril(full) if is_causal else full
    m = mask[0, 0] if mask.dim() == 4 else mask[0]
    if m.dtype != torch.bool:  # an additive float mask: 0 = attend, the dtype's minimum = masked
        m = m > torch.finfo(m.dtype).min / 2
    return m.to("cpu")


# ---------------------------------------------------------------- inputs
def _token_id(config, *names):
    for cfg in [config, *_sub_configs(config)]:
        for name in names:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def model_inputs(layout, model, config) -> tuple[dict, list[str], list[str]]:
    """The forward's inputs for the layout: text tokens, image / video placeholder tokens with the
    token types and grids the model's own preprocessing gives (Gemma 3: token_type_ids; Qwen2-VL:
    mm_token_type_ids and merged grids x spatial_merge_size); a model without that input sees the
    segment as text tokens, said in a note. Returns (inputs, notes, segments fed as visual tokens)."""
    params = inspect.signature(model.forward).parameters
    table = layout.table
    image_id, video_id = _token_id(config, "image_token_id", "image_token_index"), _token_id(config, "video_token_id")
    specials = {v for v in (image_id, video_id) if v is not None}
    text_id = next(i for i in range(TEXT_TOKEN, TEXT_TOKEN + 64) if i not in specials)
    ids = torch.full((table.n,), text_id, dtype=torch.long)
    types = torch.zeros(table.n, dtype=torch.long)
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", 1) or 1
    grids: dict[int, list] = {1: [], 2: []}
    qwen_style = "mm_token_type_ids" in params and "image_grid_thw" in params
    notes, visual = [], []
    for i, seg in enumerate(layout.segments):
        kind = {"image": 1, "video": 2}.get(seg["modality"])
        token = {1: image_id, 2: video_id}.get(kind)
        if kind is None:
            continue
        if token is None or (kind == 2 and not qwen_style):
            notes.append(f"{config.model_type} takes no {seg['modality']} input: segment '{seg['name']}' is audited "
                         "as text tokens")
            continue
        sl = table.segment_slice(i)
        if qwen_style and sl.start > 0 and types[sl.start - 1] == kind:
            raise RunError(f"segments '{layout.segments[i - 1]['name']}' and '{seg['name']}' are adjacent "
                           f"{seg['modality']} segments: {config.model_type}'s get_rope_index reads them as one; put a "
                           "special segment (its vision_end / vision_start tokens) between them, as its processor does")
        ids[sl], types[sl] = token, kind
        visual.append(seg["name"])
        t, h, w = ([1] + seg["grid"]) if len(seg["grid"]) == 2 else seg["grid"]
        grids[kind].append([t, h * merge, w * merge])
    inputs = {"input_ids": ids[None]}
    if qwen_style and types.any():
        inputs["mm_token_type_ids"] = types[None]
        for kind, key in ((1, "image_grid_thw"), (2, "video_grid_thw")):
            if grids[kind]:
                inputs[key] = torch.tensor(grids[kind])
    elif "token_type_ids" in params and types.any():
        inputs["token_type_ids"] = (types == 1).long()[None]
    return inputs, notes, visual


# ---------------------------------------------------------------- the audit run
def build_model(config):
    """The model (base model, no head) from `config` with the recording attention, on the CPU."""
    from transformers import AutoModel

    register()
    try:
        with torch.device("meta"):  # count first: a config the widths above do not shrink is refused, not built
            params = sum(p.numel() for p in AutoModel.from_config(config, attn_implementation=ATTN_NAME).parameters())
    except Exception:  # noqa: BLE001 -- a model that cannot be built on the meta device is counted when built
        params = 0
    if params > MAX_PARAMS:
        raise RunError(f"a {config.model_type} model from this config has {params:,} parameters even with tiny widths "
                       f"(limit {MAX_PARAMS:,}); give a config with fewer layers or a smaller vocabulary")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        try:
            model = AutoModel.from_config(config, attn_implementation=ATTN_NAME, dtype=torch.float32)
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError, AssertionError) as err:
            raise RunError(f"cannot build a {config.model_type} model from this config: {one_line(err)[:200]}") from None
    return model.eval()


def _settings(text) -> dict:
    keys = ("sliding_window", "attention_chunk_size", "use_bidirectional_attention", "is_causal")
    return {k: getattr(text, k) for k in keys if getattr(text, k, None) is not None}


def _forward(model, inputs: dict) -> tuple[list, list]:
    """One forward without a cache; returns (recorded attention calls, rotary position ids seen)."""
    seen: list = []
    grab = lambda mod, a, kw: seen.append(a[1] if len(a) > 1 else kw.get("position_ids"))  # noqa: E731
    hooks = [m.register_forward_pre_hook(grab, with_kwargs=True)
             for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    record: list = []
    token = _RECORD.set(record)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        _RECORD.reset(token)
        for h in hooks:
            h.remove()
    return record, seen


_FAILURES = (ValueError, RuntimeError, IndexError, TypeError, AttributeError, KeyError, AssertionError)


def model_attention(source, layout, allow_paths: bool = True, small: bool = True) -> ModelAttention:
    """Run the model named by `source` (see load_config) on `layout` (a sized Spec) and record what
    it really uses: per-layer masks, position ids, layer kinds. small: build it with tiny widths.
    A multimodal wrapper that cannot run gives way to its text model, said in a note."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    layout.require_sized()
    config, name = load_config(source, allow_paths=allow_paths)
    config = shrunk(config) if small else config
    text = config.get_text_config()
    model = build_model(config)
    inputs, notes, visual = model_inputs(layout, model, config)
    try:
        record, seen = _forward(model, inputs)
    except _FAILURES as err:
        if text is config:
            raise RunError(f"{config.model_type} could not run on this layout: {one_line(err)[:200]}") from None
        notes.append(f"the {config.model_type} model could not run ({one_line(err)[:120]}); its text model "
                     f"{text.model_type} was audited, with every segment as text tokens")
        model, config, visual = build_model(text), text, []
        try:
            record, seen = _forward(model, {"input_ids": inputs["input_ids"].clamp(max=text.vocab_size - 1)})
        except _FAILURES as err2:
            raise RunError(f"{text.model_type} could not run on this layout: {one_line(err2)[:200]}") from None
    return _collect(name, config, text, record, seen, layout.table.n, notes, model, visual)


def _collect(name, config, text, record, seen, n, notes, model, visual) -> ModelAttention:
    layers = getattr(text, "num_hidden_layers", len(record))
    if len(record) != layers:
        notes.append(f"{len(record)} attention calls for {layers} layers: layers numbered in call order")
    cache: dict[int, torch.Tensor] = {}
    masks = []
    for i, (idx, mask, is_causal, kv) in enumerate(record):
        if kv != n:
            raise RunError(f"layer {i} attends over {kv} keys for {n} tokens; the audit reads self-attention only")
        key = id(mask) if mask is not None else -1 - int(is_causal)
        masks.append(cache.setdefault(key, _allowed(mask, is_causal, n)))
    kinds = list(getattr(text, "layer_types", None) or ["attention"] * len(masks))[:len(masks)]
    pos = seen[0] if seen and seen[0] is not None else None
    if pos is not None:
        pos = pos[:, 0] if pos.dim() == 3 else pos[0] if pos.dim() == 2 else pos
        pos = pos.to("cpu", torch.long)
    else:
        notes.append("no rotary embedding module was called: positions are the model's own (not read)")
    ropes = [m.use_rope for m in model.modules() if hasattr(m, "use_rope")]
    nope = [i for i, uses in enumerate(ropes) if not uses]
    if nope:
        notes.append(f"layer(s) {', '.join(map(str, nope))} use no rotary positions (NoPE): position ids do not "
                     "reach attention there")
    return ModelAttention(name, config.model_type, kinds, masks, pos, visual, _settings(text), notes)
