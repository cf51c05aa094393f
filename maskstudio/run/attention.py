"""The attention function registered with transformers, and the per-call mask context it reads.

`masked_attention` is registered as ATTN_NAME ("maskstudio") in transformers' AttentionInterface.
A `MaskContext` travels as the extra forward kwarg `maskstudio=ctx` into its **kwargs; the function
reads `module.layer_idx`, asks the context for that layer's mask and computes attention itself:

  eager  dense bool rows from the layer's lowered expression (`dense_rows`), float32 softmax,
         probabilities recorded; KV-cache steps read the
         same rows;
  flex   FlexAttention on the spec's lowered, closed-form mask_mod (lower.py) with its BlockMask
         built on the device; q / k / v are padded to a length bucket (a power of two times the
         block size, padded keys masked) and the kernel is compiled with static shapes once per
         (mask structure, bucket): a new prompt of the same design in the same bucket, or the same
         design at other segment sizes, reuses it. Layouts of many segments lower to the table
         form (attributes and segment selections read per token, lower.TableTok): the same path.
         A packed row (`lower_packed.DocumentRow`: training and packed evaluation) runs the
         document mask of its documents' own lowered designs, eager and flex alike.
         A layer whose lowered expression is exactly `kv <= q` (or always true) runs transformers'
         SDPA attention instead (flash, no mask tensor): the same mask on the fastest kernel for it
         (`Lowered.dense_kernel`; not under a model's own sliding window or soft-capping).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

from ..errors import RunError
from ..knobs import FLEX_BLOCK
from ..lower_packed import DocumentRow

ATTN_NAME = "maskstudio"


@dataclass
class MaskContext:
    """One forward's masks: travels to `masked_attention` through `model(..., maskstudio=ctx)`.

    Masks are built on first use per distinct layer mask (layers with the same `Spec.layer_key` share
    one) and kept for the forward; recorded probabilities land in `probs` (layer -> [H, N, N] fp16)."""

    spec: object
    num_heads: int
    backend: str = "eager"
    record: bool = True
    probs: dict = field(default_factory=dict)
    _dense: dict = field(default_factory=dict)
    _blocks: dict = field(default_factory=dict)
    _kernels: dict = field(default_factory=dict)

    def _heads(self) -> range | list[int]:
        return range(self.num_heads) if self.spec.varies_by_head else [0]

    def dense(self, layer: int, q_start: int, device) -> torch.Tensor:
        """bool [H or 1, n_q, N] for query rows q_start.. (True = may attend)."""
        key = (self.spec.layer_key(layer), q_start)
        if key not in self._dense:
            rows = [dense_rows(self.spec, layer, h, q_start) for h in self._heads()]
            self._dense[key] = torch.stack(rows).to(device)
        return self._dense[key]

    def dense_kernel(self, layer: int) -> str | None:
        """"causal" / "full" when the layer's mask is exactly that (Lowered.dense_kernel), else None;
        a packed row never (its documents' masks meet at their borders)."""
        if isinstance(self.spec, DocumentRow):
            return None
        key = self.spec.layer_key(layer)
        if key not in self._kernels:  # asked per layer and forward: the lowering's lookup is kept
            self._kernels[key] = self.spec.lowered(layer).dense_kernel
        return self._kernels[key]

    def block_mask(self, layer: int, device, window: int | None = None):
        """(BlockMask, padded length) of a layer (a model's own sliding window folded in)."""
        key = (self.spec.layer_key(layer), window)
        if key not in self._blocks:
            self._blocks[key] = flex_block_mask(self.spec, layer, self.num_heads, device, window=window)
        return self._blocks[key]


def dense_rows(layout, layer: int, head: int, q_start: int = 0) -> torch.Tensor:
    """bool [n - q_start, n]: the mask's rows from q_start, from the layer's lowered expression (a
    packed row: its document mask). Prefill rows and KV-cache steps alike."""
    if isinstance(layout, DocumentRow):
        return layout.packed(layer).dense(head, q_start)
    return layout.lowered(layer).dense(head, q_start=q_start)


@dataclass
class HeadEdits:
    """Changes to single heads inside the forwards run under `editing(edits)` (experiments.py):
    `zero` {(layer, head)}: the head's output is zeroed before the output projection (ablation);
    `patch` {(layer, head): [N, D] tensor}: its output replaced by another run's (activation patching);
    `keep` {(layer, head)}: its output recorded into `kept` (to patch it elsewhere);
    `block` {layer: bool [N, N]}: (query, key) pairs blocked on top of the spec's mask (eager only).
    Heads are query heads, counted as the model's attention does (GQA: after repeating kv heads)."""

    zero: set = field(default_factory=set)
    patch: dict = field(default_factory=dict)
    keep: set = field(default_factory=set)
    block: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)

    def apply(self, layer: int, out: torch.Tensor, n_k: int) -> torch.Tensor:
        """out [1, n_q, H, D] (the attention output before o_proj) with this layer's edits."""
        q0 = n_k - out.shape[1]  # KV-cache steps: the rows q0..n_k-1 of the full sequence
        for (lay, h) in self.keep:
            if lay == layer:
                self.kept[(lay, h)] = out[0, :, h].detach().clone()
        if not any(lay == layer for lay, _ in [*self.zero, *self.patch]):
            return out
        out = out.clone()
        for (lay, h) in self.zero:
            if lay == layer:
                out[0, :, h] = 0
        for (lay, h), src in self.patch.items():
            if lay == layer:
                out[0, :, h] = src[q0:n_k].to(out)
        return out


_EDITS: contextvars.ContextVar = contextvars.ContextVar("maskstudio_head_edits", default=None)


@contextlib.contextmanager
def editing(edits: HeadEdits):
    """Every maskstudio forward inside the block applies `edits` (experiments: knockout, patching)."""
    token = _EDITS.set(edits)
    try:
        yield edits
    finally:
        _EDITS.reset(token)


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-function signature; the mask comes from kwargs[ATTN_NAME]."""
    ctx: MaskContext | None = kwargs.get(ATTN_NAME)
    if ctx is None:
        raise RuntimeError("the maskstudio attention function was called without a spec; use maskstudio.run()")
    edits = _EDITS.get()
    out, weights = _attention(ctx, module, query, key, value, scaling, dropout, kwargs, edits)
    return (out if edits is None else edits.apply(module.layer_idx, out, key.shape[-2])), weights


def _attention(ctx, module, query, key, value, scaling, dropout, kwargs, edits):
    layer, n_q, n_k = module.layer_idx, query.shape[-2], key.shape[-2]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if ctx.backend == "flex" and n_q == n_k and not ctx.record and not (edits and edits.block):
        if dropout:
            raise RunError(f"the model's attention dropout ({dropout}) has no FlexAttention form; set "
                           "config.attention_dropout = 0 or train with backend='eager'")
        gqa_known = query.shape[1] == key.shape[1] or hasattr(module, "num_key_value_groups")
        kind = ctx.dense_kernel(layer) if window is None and softcap is None and gqa_known else None
        if kind:
            return _sdpa_attention(module, query, key, value, scaling, causal=kind == "causal")
        return _flex_attention(ctx, layer, query, key, value, scaling, window, softcap)
    return _eager_attention(ctx, layer, query, key, value, scaling, window, softcap, dropout,
                            edits.block.get(layer) if edits else None)


def _eager_attention(ctx, layer, query, key, value, scaling, window, softcap, dropout=0.0, block=None):
    n_q, n_k = query.shape[-2], key.shape[-2]
    mask = ctx.dense(layer, n_k - n_q, query.device)
    if block is not None:  # an experiment's blocked (query, key) pairs
        mask = mask & ~block[n_k - n_q:n_k, :n_k].to(query.device)
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
    if dropout:  # the model's attention dropout (transformers passes 0 outside training), as eager does
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, None


def register() -> None:
    """Make ATTN_NAME known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, masked_attention)


@contextlib.contextmanager
def attn_impl(model, name: str):
    """Switch `model` to the attention implementation `name` for the duration of the block."""
    old = model.config._attn_implementation
    if old != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if old != name:
            model.set_attn_implementation(old)


# ================================================================= FlexAttention
_FLEX_FNS: dict = {}


def flex_fn(device):
    """flex_attention, torch.compile'd once per process on CUDA (plain on CPU, where it is a
    reference implementation used by the tests). Static shapes: the lowered masks pad to buckets."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "compiled" not in _FLEX_FNS:
        import torch._dynamo

        limit = max(torch._dynamo.config.cache_size_limit, 256)  # one graph per structure and bucket
        torch._dynamo.config.cache_size_limit = limit
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = limit
        _FLEX_FNS["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_FNS["compiled"]


def bucket(n: int, block: int = FLEX_BLOCK) -> int:
    """The padded length a kernel is compiled for: block * 2**k >= n (few shapes, few compiles;
    padded query blocks have no key blocks, so the kernel skips them)."""
    blocks = -(-n // block)
    return block * (1 << max(blocks - 1, 0).bit_length())


def flex_block_mask(spec, layer: int, num_heads: int, device, block: int = FLEX_BLOCK,
                    window: int | None = None):
    """(BlockMask, length): the layer's lowered mask padded to `bucket(n)` (window: a model's own
    sliding window, folded in so its blocks are skipped too); a packed row: its document mask."""
    if isinstance(spec, DocumentRow):
        return packed_block_mask(spec, layer, num_heads, device, block, window)
    length = bucket(spec.table.n, block)
    low = spec.lowered(layer).padded_to(length=length)
    if window:
        low = low.with_window(window)
    heads = num_heads if low.uses_head else None
    return low.block_mask(block, device, num_heads=heads, length=length), length


def packed_block_mask(row: DocumentRow, layer: int, num_heads: int, device, block: int = FLEX_BLOCK,
                      window: int | None = None):
    """(BlockMask, length) of a packed row: its document mask padded to `bucket(n)` with document
    slots rounded up to a power of two, so rows of the same designs share a compiled kernel."""
    length = bucket(row.n, block)
    packed = row.packed(layer, length, window)
    heads = num_heads if packed.low.uses_head else None
    return packed.block_mask(block, device, num_heads=heads), length


def _sdpa_attention(module, query, key, value, scaling, causal: bool):
    """A plain causal (or all-true) layer on the flex backend: transformers' own SDPA attention (the
    model's flash path, GQA handled as the model does), no mask tensor, no BlockMask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling, is_causal=causal)


def _flex_attention(ctx, layer, query, key, value, scaling, window, softcap):
    n = query.shape[-2]
    block_mask, length = ctx.block_mask(layer, query.device, window)
    if length > n:  # pad to the bucket the kernel is compiled for (padded keys are masked)
        pad = (0, 0, 0, length - n)
        query, key, value = (torch.nn.functional.pad(x, pad) for x in (query, key, value))
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q, kv):
            return torch.tanh(score / softcap) * softcap
    out = flex_fn(query.device)(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                         scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out[:, :, :n].transpose(1, 2).contiguous(), None
