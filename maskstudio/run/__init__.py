"""Live runs: apply a spec to a real model, record what it attends to, generate, compare.

`maskstudio.run` is this package and also the function: `maskstudio.run(spec, model, ...)` calls
`run.pipeline.run`.

How a spec reaches the model
  * Text segments are tokenized; declared sizes are replaced by the real token counts and the run
    returns that materialized spec (`RunResult.layout`). A list of strings is one string per frame.
    With `chat=True` the chat template's own tokens become visible `special` segments. On a
    vision-language model (Qwen2-VL, Idefics3/SmolVLM, tiny-*) image/video segments take pictures
    and the model's vision markers become visible `special` segments too.
  * Masks go in through transformers' attention-function registry: `masked_attention` is registered
    as "maskstudio", the model (a VLM: its decoder) is switched to it only for the duration of our
    forward, and a `MaskContext` travels as the extra forward kwarg `maskstudio=...` into the
    attention function's **kwargs (transformers then builds no mask of its own: attention_mask=None).
    The function reads `module.layer_idx`, so per-layer and per-head rules are honoured, and it
    records probabilities itself (no output_attentions).
  * Backends: "eager" (dense bool rows from the layer's lowered expression, float32 softmax, probabilities
    recorded) and "flex" (FlexAttention on the same expression as a mask_mod, its BlockMask built on
    the device from tile bounds; no N^2 mask; compiled with static shapes once per structure and
    length bucket, so other sizes of a design reuse the kernel).
  * Position ids come from the spec (1-D; 3-D only for models with M-RoPE).
  * Generation appends to the `generate` segment (else a new trailing segment "generated") with
    Spec.with_tokens_appended and obeys the spec's rules for it: full recompute, or the KV cache when
    the mask is KV-cache compatible (analysis.kv_cache_compatible).

Modules, in import order (each imports only those before it, never viz/ or studio/):
  measures     pure computations over recorded tensors (segment mass, rollout, NLL, image attention)
  models       loading (embedded SmolLM2 GGUF, hub ids, tiny VLMs) and the one model cache
  attention    the registered attention function and its MaskContext; FlexAttention block masks
  inputs       text sizing, chat segments, materializing, Prepared, the text adapter
  vision       the vision adapter (Qwen2-VL, Idefics3/SmolVLM): pixels -> layout, forward, extend
  pipeline     the one run, the one generation loop, RunResult
  experiments  compare, knockout
"""
from __future__ import annotations


from ..callable_package import make_callable
from ..errors import RunError
from . import attention, experiments, inputs, measures, models, pipeline, vision
from .attention import ATTN_NAME, MaskContext, flex_block_mask, masked_attention
from .experiments import Comparison, Knockout, compare, knockout
from .inputs import Prepared, TextAdapter, materialize, prepare, size_by_tokenizer
from .measures import VISUAL, image_attention, query_index, rollout, segment_mass, target_nll, visual_share
from .models import (DEFAULT_NAMES, HUB_EXAMPLES, TINY, LoadedModel, VLModel, default_device, is_vlm_name,
                     load_model, loaded_models, loaded_tokenizer, tiny_vlm)
from .pipeline import RunResult, run
from .vision import VisionAdapter, VLPrepared, as_frames, model_rope_index, prepare_vlm, test_pattern

__all__ = ["run", "load_model", "LoadedModel", "VLModel", "RunError", "RunResult", "Comparison", "Knockout",
           "compare", "knockout", "segment_mass", "rollout", "target_nll", "query_index", "image_attention",
           "visual_share", "size_by_tokenizer", "loaded_tokenizer", "loaded_models", "default_device",
           "ATTN_NAME", "MaskContext", "masked_attention", "flex_block_mask", "prepare", "prepare_vlm",
           "materialize", "Prepared", "VLPrepared", "TextAdapter", "VisionAdapter", "is_vlm_name", "tiny_vlm",
           "as_frames", "test_pattern", "model_rope_index", "VISUAL", "TINY", "HUB_EXAMPLES", "DEFAULT_NAMES",
           "attention", "experiments", "inputs", "measures", "models", "pipeline", "vision"]


make_callable(__name__, run)  # `maskstudio.run(spec, ...)` keeps working although run is a package
