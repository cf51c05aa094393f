"""Vision-language runs: real image and video segments on a small VLM.

Two families, through transformers:

  qwen2_vl   Qwen2-VL (e.g. Qwen/Qwen2-VL-2B-Instruct): 3-D M-RoPE. An image segment becomes
             <|vision_start|> [<|image_pad|> x h*w] <|vision_end|>, where (h, w) is the processor's
             patch grid after the 2x2 merge; a video segment (frames) becomes <|video_pad|> x t*h*w,
             t = frames / temporal_patch_size. The spec's `mrope` scheme gives exactly the model's
             own rope index on these layouts (tests check it).
  idefics3   Idefics3 / SmolVLM (e.g. HuggingFaceTB/SmolVLM-256M-Instruct): 1-D positions. Images
             are not split into tiles (do_image_splitting=False): one image = one global tile =
             <fake_token_around_image><global-img> [<image> x g*g] <fake_token_around_image>, with
             g = image_size / patch_size / scale_factor (the grid after pixel shuffle, row-major).
             A video segment is its frames' tiles back to back ([t, g, g]) inside one pair of
             markers (SmolVLM2's per-frame timestamps are not inserted, so the grid stays contiguous).

The markers are visible `special` segments (`<name>_start`, `<name>_end`, role `vision_marker`),
never hidden. Masks reach the language model exactly as in `runner` (the registered "maskstudio"
attention function, switched on for the decoder only; the vision tower keeps its own attention).

`load_vlm("tiny-qwen2-vl" | "tiny-idefics3")` builds small random-weight models with locally
constructed tokenizers and image processors (no downloads): the tests and the offline app use them.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import runner
from .runner import ATTN_NAME, LoadedModel, Prepared, RunError, RunResult, _Context
from .spec import Spec

FAMILIES = ("qwen2_vl", "idefics3")
MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "idefics3": "idefics3", "smolvlm": "idefics3"}
TINY = {"tiny-qwen2-vl": "qwen2_vl", "tiny-idefics3": "idefics3"}
HUB_EXAMPLES = ("HuggingFaceTB/SmolVLM-256M-Instruct", "Qwen/Qwen2-VL-2B-Instruct")
QWEN_TOKENS = ("<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IDEFICS_TOKENS = ("<|endoftext|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
VISUAL = ("image", "video")


# ================================================================= models
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


_VLMS: dict[tuple, VLModel] = {}


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
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name, local_files_only=True)
        return cfg.model_type in MODEL_TYPES
    except Exception:  # noqa: BLE001 - not cached / not a folder: not known to be a VLM
        return False


def load_vlm(name, device=None, progress: Callable[[float, str], None] | None = None) -> VLModel:
    """A Qwen2-VL or Idefics3/SmolVLM model by hub id or local folder, or a tiny local one
    ("tiny-qwen2-vl", "tiny-idefics3"). Cached per process. Offline and not cached: RunError."""
    if isinstance(name, VLModel):
        return name
    device = torch.device(device) if device is not None else runner.default_device()
    key = (name, str(device))
    if key in _VLMS:
        return _VLMS[key]
    say = progress or (lambda fraction, message: None)
    t0 = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if name in TINY:
        say(0.2, f"building {name} (random weights, local tokenizer and image processor)")
        lm = tiny_vlm(TINY[name])
    else:
        lm = _load_hub(name, device, say)
    lm.model.to(device).eval()
    lm.device = device
    _VLMS[key] = lm
    say(1.0, f"{lm.name} ready on {device} in {time.perf_counter() - t0:.1f} s")
    return lm


def _load_hub(name: str, device, say) -> VLModel:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def load(local_only: bool):
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

    try:
        return load(True)
    except RunError:
        raise
    except (OSError, ValueError, KeyError) as err:
        if os.path.isdir(name):
            raise RunError(f"cannot load VLM folder '{name}': {str(err).splitlines()[0]}") from None
        if not runner._hub_reachable():
            raise RunError(f"vision-language model '{name}' is not downloaded and the Hugging Face hub is "
                           f"unreachable; connect once to download it, or use 'tiny-qwen2-vl' / "
                           f"'tiny-idefics3' (random weights) to try the pipeline offline") from None
    try:
        say(0.1, f"downloading {name} from the hub")
        return load(False)
    except RunError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise RunError(f"cannot load '{name}' as a vision-language model: {str(err).splitlines()[0]}") from None


# ---------------------------------------------------------------- tiny local models
def _byte_tokenizer(specials):
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


def tiny_vlm(family: str, seed: int = 0) -> VLModel:
    """A 2-layer random-weight VLM of `family` with a local tokenizer and image processor."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024)
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tok = _byte_tokenizer(QWEN_TOKENS)
        ids = {t: int(tok.convert_tokens_to_ids(t)) for t in QWEN_TOKENS}
        text.update(vocab_size=len(tok), eos_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
            temporal_patch_size=2), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        model = tf.Qwen2VLForConditionalGeneration(cfg)
        ip = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64})
    elif family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        tok = _byte_tokenizer(IDEFICS_TOKENS)
        ids = {t: int(tok.convert_tokens_to_ids(t)) for t in IDEFICS_TOKENS}
        text.update(model_type="llama", vocab_size=len(tok), eos_token_id=ids["<|endoftext|>"],
                    bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
        cfg = tf.Idefics3Config(text_config=text, vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=4), scale_factor=2, image_token_id=ids["<image>"], pad_token_id=ids["<|endoftext|>"])
        model = tf.Idefics3ForConditionalGeneration(cfg)
        ip = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=False)
    else:
        raise RunError(f"unknown VLM family '{family}'; use one of {', '.join(FAMILIES)}")
    model.set_attn_implementation("eager")
    return VLModel(model.eval(), tok, f"tiny-{family.replace('_', '-')}", torch.device("cpu"), ip, family)


# ================================================================= images
def as_frames(x) -> list:
    """PIL image / path / numpy array / gradio file (dict or object with .path/.name) / list -> RGB PIL list."""
    from PIL import Image

    items = list(x) if isinstance(x, (list, tuple)) else [x]
    out = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("path") or item.get("name")
        elif hasattr(item, "path") and not isinstance(item, Image.Image):
            item = item.path
        if isinstance(item, (str, os.PathLike)):
            try:
                item = Image.open(item)
            except (OSError, ValueError) as err:
                raise RunError(f"cannot open image '{item}': {err}") from None
        elif not isinstance(item, Image.Image):
            try:
                import numpy as np

                item = Image.fromarray(np.asarray(item).astype("uint8"))
            except Exception:  # noqa: BLE001
                raise RunError(f"not an image: {type(item).__name__}; give a PIL image, a path or an array") from None
        out.append(item.convert("RGB"))
    if not out:
        raise RunError("an empty list of frames; give at least one image")
    return out


def test_pattern(width: int, height: int, seed: int = 0):
    """A synthetic picture (smooth gradient + a bright square), used when a segment has no image."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([255 * xx / max(width - 1, 1), 255 * yy / max(height - 1, 1),
                    np.full_like(xx, 96 + 40 * seed, dtype=float)], -1)
    s = max(2, min(width, height) // 4)
    y0, x0 = (height // 3 + 7 * seed) % max(height - s, 1), (width // 2 + 5 * seed) % max(width - s, 1)
    img[y0:y0 + s, x0:x0 + s] = 255
    return Image.fromarray(img.astype("uint8"))


def _placeholder(lm: VLModel, seg: dict) -> list:
    grid = seg["grid"]
    t, h, w = ([1] + grid) if len(grid) == 2 else grid
    if lm.family == "qwen2_vl":
        factor = lm.image_processor.patch_size * lm.image_processor.merge_size
        frames = t * (lm.image_processor.temporal_patch_size if seg["modality"] == "video" else 1)
        return [test_pattern(w * factor, h * factor, seed=i) for i in range(frames)]
    return [test_pattern(64, 64, seed=i) for i in range(t)]


@dataclass
class _Visual:
    modality: str
    frames: list              # the PIL frames as given
    grid: list                # [h, w] or [t, h, w]: tokens after merging
    token_id: int
    inputs: dict              # processor outputs for this segment

    @property
    def n(self) -> int:
        return int(torch.tensor(self.grid).prod())


def _qwen_visual(lm: VLModel, modality: str, frames: list) -> _Visual:
    ip = lm.image_processor
    m = ip.merge_size
    if modality == "image":
        if len(frames) != 1:
            raise RunError(f"an image segment takes one image, got {len(frames)}; use a video segment for frames")
        enc = ip(frames[0], return_tensors="pt")
        _, gh, gw = enc["image_grid_thw"][0].tolist()
        return _Visual("image", frames, [gh // m, gw // m], lm.token_id("<|image_pad|>"),
                       {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]})
    # video: every frame resized like the first, patchified per frame (temporal 1), then paired in time
    # exactly as Qwen2VLVideoProcessor does (which needs torchvision; this path does not)
    size = frames[0].size
    per_frame = [ip(f.resize(size) if f.size != size else f, temporal_patch_size=1, return_tensors="pt")
                 for f in frames]
    _, gh, gw = per_frame[0]["image_grid_thw"][0].tolist()
    tp, p = ip.temporal_patch_size, ip.patch_size
    pv = torch.stack([e["pixel_values"] for e in per_frame])  # [F, P, C*p*p]
    if pad := -len(frames) % tp:
        pv = torch.cat([pv, pv[-1:].expand(pad, -1, -1)])
    f_all, n_p = pv.shape[:2]
    gt = f_all // tp
    pv = pv.view(gt, tp, n_p, 3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(gt * n_p, 3 * tp * p * p)
    thw = torch.tensor([[gt, gh, gw]])
    return _Visual("video", frames, [gt, gh // m, gw // m], lm.token_id("<|video_pad|>"),
                   {"pixel_values_videos": pv, "video_grid_thw": thw})


def _idefics_visual(lm: VLModel, modality: str, frames: list) -> _Visual:
    if modality == "image" and len(frames) != 1:
        raise RunError(f"an image segment takes one image, got {len(frames)}; use a video segment for frames")
    enc = lm.image_processor([[f] for f in frames], do_image_splitting=False, return_tensors="pt")
    pv = enc["pixel_values"].reshape(1, -1, *enc["pixel_values"].shape[-3:])
    inputs = {"pixel_values": pv}
    if "pixel_attention_mask" in enc:
        inputs["pixel_attention_mask"] = enc["pixel_attention_mask"].reshape(1, -1, *pv.shape[-2:])
    g = lm.idefics_grid
    grid = [g, g] if modality == "image" else [len(frames), g, g]
    return _Visual(modality, frames, grid, lm.token_id("<image>"), inputs)


def _markers(lm: VLModel) -> tuple[str, str]:
    if lm.family == "qwen2_vl":
        return "<|vision_start|>", "<|vision_end|>"
    return "<fake_token_around_image><global-img>", "<fake_token_around_image>"


# ================================================================= spec -> layout
@dataclass
class VLPrepared(Prepared):
    visuals: dict = field(default_factory=dict)   # segment name -> _Visual
    inputs: dict = field(default_factory=dict)    # pixel inputs for the model's forward


def prepare_vlm(spec, lm: VLModel, images: dict | None = None) -> VLPrepared:
    """The materialized layout: image/video grids = the processor's merged patch grid, the model's
    vision markers as visible `special` segments; plus the pixel inputs for the forward."""
    spec = runner._as_spec(spec)
    images = dict(images or {})
    names = [s["name"] for s in spec.segments]
    for key in images:
        if key not in names:
            raise RunError(f"images given for '{key}', but the spec has no segment of that name", spec)
    start, end = _markers(lm)
    segs, seg_ids, notes, visuals = [], [], [], {}
    taken = set(names)

    def fresh(name):
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    def marker(i):
        return 0 <= i < len(spec.segments) and "vision_marker" in spec.segments[i].get("role", [])

    for i, s in enumerate(spec.segments):
        mod = s["modality"]
        if mod == "audio":
            raise RunError(f"segment '{s['name']}' is audio; {lm.name} takes text, image and video", spec)
        if mod not in VISUAL:
            if s["name"] in images:
                raise RunError(f"segment '{s['name']}' is {mod}; images go into image or video segments", spec)
            seg = dict(s)
            seg_ids.append(runner.size_by_tokenizer(seg, lm.tokenizer, notes, spec))
            segs.append(seg)
            continue
        if s["name"] in images and images[s["name"]] is not None:
            frames = as_frames(images[s["name"]])
        else:
            frames = _placeholder(lm, s)
            notes.append(f"segment '{s['name']}': no image given, a synthetic test pattern is used")
        if mod == "video" and lm.family == "qwen2_vl" and len(frames) == 1:
            frames = frames * lm.image_processor.temporal_patch_size
        vis = (_qwen_visual if lm.family == "qwen2_vl" else _idefics_visual)(lm, mod, frames)
        if vis.grid != s["grid"]:
            notes.append(f"segment '{s['name']}': declared grid {s['grid']}, the model sees {vis.grid}")
        visuals[s["name"]] = vis
        # a materialized layout (a run's result fed back, e.g. by knockout) already has its markers
        around = [(start, "start")] * (not marker(i - 1)) + [(None, None)] + [(end, "end")] * (not marker(i + 1))
        for text, where in around:
            if text is None:
                seg = {k: v for k, v in s.items() if k not in ("grid", "text")}
                seg["grid"] = list(vis.grid)
                segs.append(seg)
                seg_ids.append([[vis.token_id] * vis.n])
            else:
                ids = runner._encode(lm.tokenizer, text)
                segs.append({"name": fresh(f"{s['name']}_{where}"), "modality": "special", "text": text,
                             "length": len(ids), "role": ["vision_marker"]})
                seg_ids.append([ids])
    layout, gen = runner.materialize(spec, segs, "the model's real layout")
    inputs: dict = {}
    for vis in visuals.values():
        for k, v in vis.inputs.items():
            inputs.setdefault(k, []).append(v)
    cat_dim = 1 if lm.family == "idefics3" else 0
    inputs = {k: torch.cat(v, dim=cat_dim) for k, v in inputs.items()}
    return VLPrepared(layout, seg_ids, notes, gen, visuals, inputs)


# ================================================================= positions
def _vlm_positions(layout: Spec, lm: VLModel, positions: str | None) -> tuple[Spec, list[str]]:
    """The layout with the scheme the run uses; refuses what the model can't take, with the reason."""
    from .positions import is_3d

    notes = []
    scheme = layout.positions["scheme"]
    if positions == "model":
        own = "mrope" if lm.is_3d else "sequential"
        data = layout.to_dict()
        data["positions"] = {"scheme": own}
        layout = Spec.load(data)
        notes.append(f"positions: the model's own ({own}"
                     f"{', equal to Qwen2-VL get_rope_index' if lm.is_3d else ''})")
    elif positions not in (None, "spec"):
        raise RunError(f"positions='{positions}': use 'model' (the model's own) or leave it out (the spec's)")
    elif is_3d(layout) and not lm.is_3d:
        raise RunError(f"positions scheme '{scheme}' gives 3-D (t, h, w) ids but {lm.name} ({lm.family}) uses "
                       f"1-D RoPE; use 'sequential', 'concentric' or 1-D 'explicit' ids, or a Qwen2-VL model",
                       layout)
    elif scheme == "grid":
        raise RunError("positions scheme 'grid' (FLUX-style, text at (0,0,0)) is for diffusion transformers, "
                       "not a causal VLM; use 'mrope' for Qwen2-VL", layout)
    return layout, notes


def model_rope_index(lm: VLModel, prep: VLPrepared) -> torch.Tensor:
    """Qwen2-VL's own 3-D position ids ([3, N]) for this layout, from its get_rope_index."""
    ids = prep.input_ids[None]
    image_id, video_id = lm.token_id("<|image_pad|>"), lm.token_id("<|video_pad|>")
    mm = (ids == image_id).int() + 2 * (ids == video_id).int()
    import inspect

    fn = lm.model.model.get_rope_index
    kw = {"image_grid_thw": prep.inputs.get("image_grid_thw"), "video_grid_thw": prep.inputs.get("video_grid_thw")}
    if "mm_token_type_ids" in inspect.signature(fn).parameters:  # transformers >= 5.2x
        kw["mm_token_type_ids"] = mm
    pos, _ = fn(ids, **kw)
    return pos[:, 0].cpu()


# ================================================================= forward
def _vlm_forward(lm: VLModel, ctx: _Context, prep: VLPrepared, pos: torch.Tensor, embeds=None):
    """Logits [N, V] under the spec's mask; the merged input embeddings are returned for reuse."""
    got = {}

    def grab(module, args, kwargs):
        got["embeds"] = kwargs.get("inputs_embeds")

    pos = pos[..., None, :] if pos.dim() == 2 else pos[None]
    dev = lm.device
    dec = lm.decoder
    handle = dec.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with runner._attn_impl(dec, ATTN_NAME):
            if embeds is None:
                pix = {k: v.to(dev, dtype=lm.model.dtype if v.is_floating_point() else v.dtype)
                       for k, v in prep.inputs.items()}
                out = lm.model(input_ids=prep.input_ids[None].to(dev), position_ids=pos.to(dev), use_cache=False,
                               **pix, **{ATTN_NAME: ctx})
            else:
                out = lm.model(inputs_embeds=embeds, position_ids=pos.to(dev), use_cache=False, **{ATTN_NAME: ctx})
    finally:
        handle.remove()
    return out.logits[0].float(), got.get("embeds")


@dataclass
class VLMRunResult(RunResult):
    visuals: dict = field(default_factory=dict)   # segment name -> {"frames": [PIL], "grid": [...], "modality"}
    positions: torch.Tensor | None = None

    @property
    def visual_segments(self) -> list[str]:
        return list(self.visuals)


@torch.no_grad()
def run_vlm(spec, model, images: dict | None = None, max_new_tokens: int = 0, attentions: bool = True,
            positions: str | None = None, backend: str | None = None, top_k: int = 10,
            progress: Callable[[float, str], None] | None = None, **_ignored) -> VLMRunResult:
    """Run `spec` on a VLM with real pixels in its image/video segments (`images`: segment name ->
    PIL image | path | list of frames). positions=None: the spec's scheme; "model": the model's own."""
    t0 = time.perf_counter()
    spec = runner._as_spec(spec)
    lm = load_vlm(model, progress=progress)
    runner._register()
    backend = runner._backend(backend, lm)
    prep = prepare_vlm(spec, lm, images)
    layout, pnotes = _vlm_positions(prep.layout, lm, positions)
    prep.layout = layout
    notes = list(prep.notes) + pnotes
    ids = prep.input_ids
    n = len(ids)
    record = attentions and n <= runner.MAX_CAPTURE
    if attentions and not record:
        notes.append(f"{n} tokens > {runner.MAX_CAPTURE}: attention maps not captured (no-maps mode)")
    pos = runner._positions(layout, lm)
    if lm.is_3d and layout.positions["scheme"] == "mrope" and not layout.positions.get("share"):
        own = model_rope_index(lm, prep)
        if not torch.equal(own, pos):
            notes.append("mrope ids differ from Qwen2-VL's get_rope_index here (it starts text after a video "
                         "at max(h, w), not at the block's max + 1); the spec's ids are used")
    ctx = _Context(layout, lm.num_heads, backend, record)
    try:
        logits, embeds = _vlm_forward(lm, ctx, prep, pos)
    except Exception as err:  # noqa: BLE001
        if runner._is_oom(err):
            raise RunError(f"out of memory at {n} tokens; use smaller images or fewer frames, or attentions=False",
                           spec) from None
        raise
    probs = torch.stack([ctx.probs[i] for i in sorted(ctx.probs)]).cpu() if record else None
    tok = lm.tokenizer
    tokens = {}
    for j, s in enumerate(layout.segments):
        flat = [i for fr in prep.seg_ids[j] for i in fr]
        tokens[s["name"]] = ([tok.decode([flat[0]])] * len(flat) if s["modality"] in VISUAL
                             else [tok.decode([i]) for i in flat])
    at = layout.table.starts[prep.gen] + layout.table.sizes[prep.gen] - 1 if prep.gen is not None else n - 1
    p_last = torch.softmax(logits[at], -1)
    top = torch.topk(p_last, min(top_k, p_last.numel()))
    top_list = [(tok.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
    nll = runner._target_nll(layout, logits, ids)
    new_ids, grown = [], None
    if max_new_tokens > 0:
        new_ids, grown = _generate(lm, prep, logits[at], embeds, max_new_tokens, backend)
        notes.append("generation recomputes the prefix each step (VLM runs keep no KV cache)")
    return VLMRunResult(layout=layout, input_ids=ids, tokens=tokens, logits=logits.cpu(), top_k=top_list,
                        text=tok.decode(new_ids) if new_ids else "", target_nll=nll, attentions=probs,
                        segment_mass=runner.segment_mass(probs, layout) if probs is not None else None,
                        rollout=runner.rollout(probs) if probs is not None else None, model=lm.name,
                        backend=backend, new_ids=new_ids, generated_layout=grown.layout if grown else None,
                        notes=notes, seconds=time.perf_counter() - t0,
                        visuals={k: {"frames": v.frames, "grid": v.grid, "modality": v.modality}
                                 for k, v in prep.visuals.items()},
                        positions=pos)


def _generate(lm: VLModel, prep: VLPrepared, first_logits, embeds, max_new_tokens, backend):
    """Greedy decoding over the merged embeddings; new tokens join the generate segment (or a new one)."""
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    table = lm.model.get_input_embeddings()
    new: list[int] = []
    nxt = int(first_logits.argmax())
    grown = None
    while nxt not in eos:
        new.append(nxt)
        grown = runner._grow(prep, new, lm.tokenizer)
        if len(new) >= max_new_tokens:
            break
        layout = grown.layout
        pos = runner._positions(layout, lm)
        # the new tokens' embeddings go where the grown layout puts them (the generate segment)
        gen_ids = grown.input_ids.to(lm.device)
        full = table(gen_ids[None]).to(embeds.dtype)
        vis = torch.zeros(len(gen_ids), dtype=torch.bool)
        off = 0
        for j, s in enumerate(layout.segments):
            size = layout.table.sizes[j]
            if s["modality"] in VISUAL:
                vis[off:off + size] = True
            off += size
        full[0, vis.to(full.device)] = embeds[0, _visual_positions(prep).to(embeds.device)].to(full.dtype)
        ctx = _Context(layout, lm.num_heads, backend, record=False)
        dummy = VLPrepared(layout, grown.seg_ids, [], grown.gen)
        logits, _ = _vlm_forward(lm, ctx, dummy, pos, embeds=full)
        at = layout.table.starts[grown.gen] + layout.table.sizes[grown.gen] - 1
        nxt = int(logits[at].argmax())
    return new, grown


def _visual_positions(prep: VLPrepared) -> torch.Tensor:
    t = prep.layout.table
    mask = torch.zeros(t.n, dtype=torch.bool)
    for j, s in enumerate(prep.layout.segments):
        if s["modality"] in VISUAL:
            mask[t.segment_slice(j)] = True
    return mask


# ================================================================= attention over the image
def _figure(size):
    """A Figure on the Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _query_index(result: RunResult, query) -> int:
    n = len(result.input_ids)
    if isinstance(query, str):  # a segment name: its last token
        t = result.layout.table
        if query not in t.names:
            raise RunError(f"no segment named '{query}'")
        j = t.names.index(query)
        return t.starts[j] + t.sizes[j] - 1
    q = int(query)
    if not -n <= q < n:
        raise RunError(f"query {q} is outside the {n} tokens")
    return q % n


def image_attention(result: RunResult, segment: str | None = None, query=-1, layer: int | None = None,
                    head: int | None = None) -> torch.Tensor:
    """Attention from one query token to the segment's visual tokens, reshaped to [t, h, w].
    layer None = last layer; head None = mean over heads."""
    if result.attentions is None:
        raise RunError("this run recorded no attention maps; run with attentions=True")
    t = result.layout.table
    segment = segment or next((s["name"] for s in result.layout.segments if s["modality"] in VISUAL), None)
    if segment is None or segment not in t.names:
        raise RunError("the run has no image or video segment" if segment is None else f"no segment named '{segment}'")
    j = t.names.index(segment)
    grid = result.layout.segments[j].get("grid")
    if grid is None:
        raise RunError(f"segment '{segment}' is not an image or video segment")
    L, H = result.attentions.shape[:2]
    layer = L - 1 if layer is None else int(layer)
    if not -L <= layer < L:
        raise RunError(f"layer {layer} is outside 0..{L - 1}")
    a = result.attentions[layer].float()
    if head is not None:
        if not 0 <= int(head) < H:
            raise RunError(f"head {head} is outside 0..{H - 1}")
        a = a[int(head)]
    else:
        a = a.mean(0)
    q = _query_index(result, query)
    T, h, w = ([1] + grid) if len(grid) == 2 else grid
    return a[q, t.segment_slice(j)].reshape(T, h, w)


def image_overlay(result: RunResult, segment: str | None = None, query=-1, layer: int | None = None,
                  head: int | None = None, max_frames: int = 8):
    """Heat overlay of `image_attention` on the segment's image (one panel per frame, up to max_frames)."""
    import numpy as np

    att = image_attention(result, segment, query, layer, head)
    t = result.layout.table
    segment = segment or next(s["name"] for s in result.layout.segments if s["modality"] in VISUAL)
    vis = getattr(result, "visuals", {}).get(segment)
    frames = vis["frames"] if vis else []
    T = att.shape[0]
    shown = min(T, max_frames)
    fig = _figure((max(3.2 * shown + 1.0, 5.0), 3.8))
    vmax = float(att.max()) or 1.0
    per = max(1, len(frames) // T) if frames else 1
    q = _query_index(result, query)
    im = None
    for i in range(shown):
        ax = fig.add_subplot(1, shown, i + 1)
        if frames:
            img = np.asarray(frames[min(i * per, len(frames) - 1)])
            ax.imshow(img, extent=(0, img.shape[1], img.shape[0], 0))
            extent = (0, img.shape[1], img.shape[0], 0)
        else:
            extent = (0, att.shape[2], att.shape[1], 0)
        im = ax.imshow(att[i].numpy(), cmap="inferno", alpha=0.6 if frames else 1.0, vmin=0, vmax=vmax,
                       extent=extent, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"frame {i}" if T > 1 else f"{segment} {list(att.shape[1:])}", fontsize=9)
    s = int(t["segment"][q])
    L = result.attentions.shape[0]
    lay = L - 1 if layer is None else layer % L
    fig.suptitle(f"attention from {t.names[s]}[{q - t.starts[s]}] (token {q}) to '{segment}'\nlayer {lay}, "
                 f"{'mean of heads' if head is None else f'head {head}'}; total {float(att.sum()):.3f}", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.8, label="attention")
    return fig


def visual_share(result: RunResult, query=-1, plot: bool = True):
    """Per-layer share of attention (mean over heads) that `query` gives to all image/video tokens:
    the curve hallucination papers plot. query: a token index, a segment name (its last token), or
    "all" (mean over non-visual tokens after the first visual token). Returns (tensor [L], Figure|None)."""
    if result.attentions is None:
        raise RunError("this run recorded no attention maps; run with attentions=True")
    t = result.layout.table
    vis = torch.zeros(t.n, dtype=torch.bool)
    for j, s in enumerate(result.layout.segments):
        if s["modality"] in VISUAL:
            vis[t.segment_slice(j)] = True
    if not vis.any():
        raise RunError("the run has no image or video segment")
    a = result.attentions.float().mean(1)            # [L, N, N]
    if query == "all":
        first = int(torch.nonzero(vis)[0])
        rows = torch.nonzero(~vis & (torch.arange(t.n) > first)).flatten()
        share = a[:, rows][:, :, vis].sum(-1).mean(-1)
        label = "non-visual tokens after the image (mean)"
    else:
        q = _query_index(result, query)
        share = a[:, q, vis].sum(-1)
        s = int(t["segment"][q])
        label = f"{t.names[s]}[{q - t.starts[s]}]"
    fig = None
    if plot:
        fig = _figure((5.5, 3.2))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(range(len(share)), share.numpy(), marker="o")
        ax.axhline(float(vis.float().mean()), color="grey", ls="--", lw=1, label="visual share of tokens")
        ax.set_xlabel("layer"), ax.set_ylabel("attention to visual tokens")
        ax.set_xticks(range(len(share)))
        ax.set_ylim(0, 1)
        ax.set_title(f"share of attention to image/video tokens, query {label}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
    return share, fig
