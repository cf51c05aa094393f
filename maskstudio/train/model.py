"""The model a run trains: a private copy (the run cache's model is never touched), LoRA through
`peft`, the tiny random model CI trains, and the memory estimate behind the refusal."""
from __future__ import annotations

import copy
import os

import torch

from ..errors import RunError
from ..run.models import TINY_TEXT, LoadedModel, VLModel, byte_tokenizer, is_vlm_name, load_model

# TINY_TEXT ("tiny-llama"): 2 layers, 4 heads, hidden 64, byte tokenizer, random weights
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# BICO's adapters (trestad/mitigating-reversal-curse run_mlm.py: every linear layer but lm_head)
BICO_LORA = {"r": 32, "lora_alpha": 16, "lora_dropout": 0.01, "target_modules": "all-linear"}


def lora_options(options) -> dict:
    """LoRA settings as given (a dict, or its JSON text from --lora-config), checked key by key:
    r (integer >= 1), lora_alpha (> 0), lora_dropout ([0, 1)), target_modules ("all-linear" or
    module names). Raises ValueError in one line naming the key."""
    if isinstance(options, str):
        import json

        try:
            options = json.loads(options)
        except (ValueError, RecursionError):
            raise ValueError('--lora-config must be a JSON object, e.g. {"r": 32, "lora_alpha": 16}') from None
    if not isinstance(options, dict):
        raise ValueError('the LoRA config must be an object, e.g. {"r": 32, "lora_alpha": 16}')
    checks = {"r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
              "lora_alpha": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
              "lora_dropout": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
              "target_modules": lambda v: v == "all-linear" or (
                  isinstance(v, list) and v and all(isinstance(m, str) and m for m in v))}
    for key, value in options.items():
        if key not in checks:
            raise ValueError(f"LoRA config key '{key}' is not one of {', '.join(checks)}")
        if not checks[key](value):
            raise ValueError(f"LoRA config {key}={value!r} is out of range (r: integer >= 1, lora_alpha > 0, "
                             "lora_dropout in [0, 1), target_modules: \"all-linear\" or a list of module names)")
    return dict(options)


def tiny_lm(seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4) -> LoadedModel:
    """A random Llama-architecture model with a byte-level tokenizer: no download, trains in ms."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer(("<|endoftext|>",))
    eos = int(tok.convert_tokens_to_ids("<|endoftext|>"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=2048, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
                      tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation("eager")
    return LoadedModel(model.eval(), tok, TINY_TEXT, torch.device("cpu"))


def source_model(model, device=None) -> LoadedModel:
    """The model to start from: a LoadedModel, TINY_TEXT, a hub id, or None (embedded SmolLM2).
    Vision-language models are refused before loading: training feeds token ids only, not pictures."""
    if isinstance(model, VLModel) or (isinstance(model, str) and model != TINY_TEXT and is_vlm_name(model)):
        name = model.name if isinstance(model, VLModel) else model
        raise RunError(f"training a vision-language model ({name}) is not supported: training feeds token ids, "
                       "not pictures; train a text model, or run the VLM with `maskstudio run`")
    if isinstance(model, LoadedModel):
        return model
    if model == TINY_TEXT:
        lm = tiny_lm()
        if device is not None:
            lm.model.to(device)
            lm.device = torch.device(device)
        return lm
    return load_model(model, device=device)


def model_id(lm: LoadedModel) -> str | None:
    """The name that loads this model again (None: the embedded default), for a run's config."""
    return None if lm.name.endswith("(embedded GGUF)") else lm.name


def trainable_copy(src: LoadedModel, lora: bool | dict, seed: int) -> tuple[LoadedModel, object]:
    """A fresh fp32 copy of `src` to train (LoRA adapters added when `lora`), seeded.

    Returns (LoadedModel whose .model is the module forwards go through, the module to save).
    With LoRA the forward module is the peft model's base model with the adapters injected."""
    torch.manual_seed(seed)
    model = copy.deepcopy(src.model)
    for t in list(model.parameters()) + list(model.buffers()):  # not .float(): refused on GGUF-loaded models
        if t.is_floating_point():
            t.data = t.data.float()
    _dequantized(model)
    model.train()
    outer = model
    if lora:
        from peft import LoraConfig, get_peft_model

        options = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": list(LORA_TARGETS)}
        options.update(lora_options(lora) if isinstance(lora, dict) else {})
        outer = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
        model = outer.get_base_model()
    return LoadedModel(model, src.tokenizer, src.name, src.device), outer


def _dequantized(model) -> None:
    """A copy of a GGUF-loaded model holds plain float weights (transformers dequantized them on
    load): drop the quantizer's marks so it trains and saves (`save_pretrained`) as a plain model."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def trainable_parameters(module) -> dict[str, torch.Tensor]:
    """name -> parameter for every trainable parameter (shared ones once)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- memory
def estimate_bytes(lm: LoadedModel, tokens: int, lora: bool, backend: str, trainable: int | None = None) -> dict:
    """A deliberately generous estimate of one training step's peak memory, by part (bytes)."""
    cfg = lm.config
    params = sum(p.numel() for p in lm.model.parameters())
    train_n = trainable if trainable is not None else (params // 100 if lora else params)
    L, H, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", 4 * d)
    V = cfg.vocab_size
    parts = {
        "weights (fp32)": 4 * params,
        "gradients": 4 * train_n,
        "AdamW state": 8 * train_n,
        # per layer and token: norms, q/k/v/o, residuals (~10 d) and the MLP (~4 intermediate), fp32
        "activations": 4 * L * tokens * (10 * d + 4 * inter),
        "logits": 3 * 4 * tokens * V,
    }
    if backend == "eager":  # scores, probabilities and their gradient per layer, plus the bool mask
        parts["attention matrices (eager)"] = L * H * tokens * tokens * 12 + tokens * tokens
    return parts


def available_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_memory(lm: LoadedModel, tokens: int, lora: bool, backend: str, limit: int | None = None,
                 trainable: int | None = None) -> dict:
    """Refuse (RunError) when the estimate exceeds what the device has free (or `limit` bytes)."""
    parts = estimate_bytes(lm, tokens, lora, backend, trainable)
    need = sum(parts.values())
    have = available_bytes(lm.device) if limit is None else int(limit)
    if need > 0.9 * have:
        detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items())
        hints = [] if lora else ["lora=True"]
        if backend == "eager":
            hints.append("a GPU (FlexAttention: no N x N matrices)")
        hints.append("shorter examples")
        raise RunError(f"refusing to train: one step at {tokens} tokens needs about {gib(need)} ({detail}) "
                       f"but {lm.device} has {gib(have)} available; try {', '.join(hints)}")
    return {"estimate_bytes": need, "available_bytes": have, "parts": parts}
