"""The vision adapter: real image and video segments on Qwen2-VL and Idefics3 / SmolVLM.

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
never hidden. Masks reach the language model exactly as for text models (the registered
"maskstudio" attention function, switched on for the decoder only; the vision tower keeps its own
attention). `VisionAdapter` plugs this into the one pipeline: prepare (pixels -> layout), forward
(pixels or cached merged embeddings -> logits), extend (generated tokens join the layout).
"""
from __future__ import annotations

import contextlib

import inspect
import os
from dataclasses import dataclass, field

import torch

from .. import knobs
from ..errors import RunError
from ..spec import Spec
from .attention import ATTN_NAME, attn_impl
from .inputs import Prepared, TextAdapter, as_spec, encode, grow, materialize, size_by_tokenizer
from .measures import VISUAL, visual_tokens
from .models import VLModel


# ================================================================= images
def _open(item):
    """One frame: PIL image / path / numpy array / gradio file (dict or object with .path) -> PIL."""
    from PIL import Image

    if isinstance(item, dict):
        item = item.get("path") or item.get("name")
    elif hasattr(item, "path") and not isinstance(item, Image.Image):
        item = item.path
    if isinstance(item, (str, os.PathLike)):
        try:
            return _within_pixels(Image.open(item), item)  # the header only: nothing decoded yet
        except Image.DecompressionBombError:  # PIL's own header check, where its limit is set lower
            raise RunError(f"image '{item}' is over the limit of {knobs.IMAGE_MAX_PIXELS:,} pixels per image "
                           "(knobs.IMAGE_MAX_PIXELS); downscale it") from None
        except (OSError, ValueError) as err:
            raise RunError(f"cannot open image '{item}': {str(err).splitlines()[0][:200]}") from None
    if isinstance(item, Image.Image):
        return _within_pixels(item, "image")
    import numpy as np

    try:
        return Image.fromarray(np.asarray(item).astype("uint8"))
    except (TypeError, ValueError):
        raise RunError(f"not an image: {type(item).__name__}; give a PIL image, a path or an array") from None


def _within_pixels(img, name):
    """The image, or RunError when its header says it has more than knobs.IMAGE_MAX_PIXELS pixels
    (a small file can decode to gigabytes)."""
    if img.width * img.height > knobs.IMAGE_MAX_PIXELS:
        raise RunError(f"image '{name}' is {img.width} x {img.height} pixels, over the limit of "
                       f"{knobs.IMAGE_MAX_PIXELS:,} pixels per image (knobs.IMAGE_MAX_PIXELS); downscale it")
    return img


def as_frames(x) -> list:
    """PIL image / path / numpy array / gradio file (dict or object with .path/.name) / list -> RGB PIL list."""
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    out = [_open(item).convert("RGB") for item in items]
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
class Visual:
    """One image/video segment as the model sees it."""

    modality: str
    frames: list              # the PIL frames as given
    grid: list                # [h, w] or [t, h, w]: tokens after merging
    token_id: int
    inputs: dict              # processor outputs for this segment

    @property
    def n(self) -> int:
        return int(torch.tensor(self.grid).prod())


def _one_image(frames: list) -> None:
    if len(frames) != 1:
        raise RunError(f"an image segment takes one image, got {len(frames)}; use a video segment for frames")


def _qwen_visual(lm: VLModel, modality: str, frames: list) -> Visual:
    ip = lm.image_processor
    m = ip.merge_size
    if modality == "image":
        _one_image(frames)
        enc = ip(frames[0], return_tensors="pt")
        _, gh, gw = enc["image_grid_thw"][0].tolist()
        return Visual("image", frames, [gh // m, gw // m], lm.token_id("<|image_pad|>"),
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
    return Visual("video", frames, [gt, gh // m, gw // m], lm.token_id("<|video_pad|>"),
                  {"pixel_values_videos": pv, "video_grid_thw": thw})


def _idefics_visual(lm: VLModel, modality: str, frames: list) -> Visual:
    if modality == "image":
        _one_image(frames)
    enc = lm.image_processor([[f] for f in frames], do_image_splitting=False, return_tensors="pt")
    pv = enc["pixel_values"].reshape(1, -1, *enc["pixel_values"].shape[-3:])
    inputs = {"pixel_values": pv}
    if "pixel_attention_mask" in enc:
        inputs["pixel_attention_mask"] = enc["pixel_attention_mask"].reshape(1, -1, *pv.shape[-2:])
    g = lm.idefics_grid
    grid = [g, g] if modality == "image" else [len(frames), g, g]
    return Visual(modality, frames, grid, lm.token_id("<image>"), inputs)


def _markers(lm: VLModel) -> tuple[str, str]:
    if lm.family == "qwen2_vl":
        return "<|vision_start|>", "<|vision_end|>"
    return "<fake_token_around_image><global-img>", "<fake_token_around_image>"


# ================================================================= spec -> layout
@dataclass
class VLPrepared(Prepared):
    inputs: dict = field(default_factory=dict)    # pixel inputs for the model's forward
    visual_embeds: torch.Tensor | None = None     # merged visual embeddings, set by the first forward


def _check_images(spec: Spec, images: dict, lm: VLModel) -> None:
    names = [s["name"] for s in spec.segments]
    for key in images:
        if key not in names:
            raise RunError(f"images given for '{key}', but the spec has no segment of that name", spec)
    for s in spec.segments:
        if s["modality"] == "audio":
            raise RunError(f"segment '{s['name']}' is audio; {lm.name} takes text, image and video", spec)
        if s["modality"] not in VISUAL and s["name"] in images:
            raise RunError(f"segment '{s['name']}' is {s['modality']}; images go into image or video segments", spec)


def _visual(lm: VLModel, s: dict, images: dict, notes: list) -> Visual:
    if images.get(s["name"]) is not None:
        frames = as_frames(images[s["name"]])
    else:
        frames = _placeholder(lm, s)
        notes.append(f"segment '{s['name']}': no image given, a synthetic test pattern is used")
    if s["modality"] == "video" and lm.family == "qwen2_vl" and len(frames) == 1:
        frames = frames * lm.image_processor.temporal_patch_size
    vis = (_qwen_visual if lm.family == "qwen2_vl" else _idefics_visual)(lm, s["modality"], frames)
    if vis.grid != s["grid"]:
        notes.append(f"segment '{s['name']}': declared grid {s['grid']}, the model sees {vis.grid}")
    return vis


def _merged_inputs(lm: VLModel, visuals: dict) -> dict:
    inputs: dict = {}
    for vis in visuals.values():
        for k, v in vis.inputs.items():
            inputs.setdefault(k, []).append(v)
    cat_dim = 1 if lm.family == "idefics3" else 0
    return {k: torch.cat(v, dim=cat_dim) for k, v in inputs.items()}


def prepare_vlm(spec, lm: VLModel, images: dict | None = None) -> VLPrepared:
    """The materialized layout: image/video grids = the processor's merged patch grid, the model's
    vision markers as visible `special` segments; plus the pixel inputs for the forward."""
    spec = as_spec(spec)
    images = dict(images or {})
    _check_images(spec, images, lm)
    start, end = _markers(lm)
    segs, seg_ids, notes, visuals = [], [], [], {}
    taken = {s["name"] for s in spec.segments}

    def marker_segment(s, text, where):
        name = f"{s['name']}_{where}"
        while name in taken:
            name += "_"
        taken.add(name)
        ids = encode(lm.tokenizer, text)
        segs.append({"name": name, "modality": "special", "text": text, "length": len(ids), "role": ["vision_marker"]})
        seg_ids.append([ids])

    def is_marker(i):
        return 0 <= i < len(spec.segments) and "vision_marker" in spec.segments[i].get("role", [])

    for i, s in enumerate(spec.segments):
        if s["modality"] not in VISUAL:
            seg = dict(s)
            seg_ids.append(size_by_tokenizer(seg, lm.tokenizer, notes, spec))
            segs.append(seg)
            continue
        vis = visuals[s["name"]] = _visual(lm, s, images, notes)
        # a materialized layout (a run's result fed back, e.g. by knockout) already has its markers
        if not is_marker(i - 1):
            marker_segment(s, start, "start")
        segs.append({**{k: v for k, v in s.items() if k not in ("grid", "text")}, "grid": list(vis.grid)})
        seg_ids.append([[vis.token_id] * vis.n])
        if not is_marker(i + 1):
            marker_segment(s, end, "end")
    layout, gen = materialize(spec, segs, "the model's real layout")
    return VLPrepared(layout, seg_ids, notes, gen, visuals, _merged_inputs(lm, visuals))


# ================================================================= positions
def vlm_positions(layout: Spec, lm: VLModel, positions: str | None) -> tuple[Spec, list[str]]:
    """The layout with the scheme the run uses; refuses what the model can't take, with the reason."""
    from ..positions import is_3d

    scheme = layout.positions["scheme"]
    if positions == "model":
        own = "mrope" if lm.is_3d else "sequential"
        data = layout.to_dict()
        data["positions"] = {"scheme": own}
        return Spec.load(data), [f"positions: the model's own ({own}"
                                 f"{', equal to Qwen2-VL get_rope_index' if lm.is_3d else ''})"]
    if positions not in (None, "spec"):
        raise RunError(f"positions='{positions}': use 'model' (the model's own) or leave it out (the spec's)")
    if is_3d(layout) and not lm.is_3d:
        raise RunError(f"positions scheme '{scheme}' gives 3-D (t, h, w) ids but {lm.name} ({lm.family}) uses "
                       f"1-D RoPE; use 'sequential', 'concentric' or 1-D 'explicit' ids, or a Qwen2-VL model",
                       layout)
    if scheme == "grid":
        raise RunError("positions scheme 'grid' (FLUX-style, text at (0,0,0)) is for diffusion transformers, "
                       "not a causal VLM; use 'mrope' for Qwen2-VL", layout)
    return layout, []


def model_rope_index(lm: VLModel, prep: VLPrepared) -> torch.Tensor:
    """Qwen2-VL's own 3-D position ids ([3, N]) for this layout, from its get_rope_index."""
    ids = prep.input_ids[None]
    image_id, video_id = lm.token_id("<|image_pad|>"), lm.token_id("<|video_pad|>")
    mm = (ids == image_id).int() + 2 * (ids == video_id).int()
    fn = lm.model.model.get_rope_index
    kw = {"image_grid_thw": prep.inputs.get("image_grid_thw"), "video_grid_thw": prep.inputs.get("video_grid_thw")}
    if "mm_token_type_ids" in inspect.signature(fn).parameters:  # transformers >= 5.2x
        kw["mm_token_type_ids"] = mm
    pos, _ = fn(ids, **kw)
    return pos[:, 0].cpu()


# ================================================================= the adapter
class VisionAdapter(TextAdapter):
    """How a VLM takes a spec: pixels into image/video segments, the decoder under the spec's mask.

    The first forward runs the vision tower on the pixels and keeps the merged visual embeddings
    (`VLPrepared.visual_embeds`); generation steps reuse them with the new tokens' embeddings."""

    no_kv_reason = "VLM runs keep no KV cache"
    oom_hint = "use smaller images or fewer frames, or attentions=False"
    lm: VLModel

    def masked(self):
        """Nothing for the whole run: each forward switches the decoder only (the vision tower
        keeps its own attention)."""
        return contextlib.nullcontext()

    def prepare(self, spec: Spec, chat: bool = False, images: dict | None = None,
                positions: str | None = None) -> VLPrepared:
        if chat:
            raise RunError("chat formatting is not available for vision-language runs yet; write the "
                           "prompt's template tokens into text segments", spec)
        prep = prepare_vlm(spec, self.lm, images)
        prep.layout, notes = vlm_positions(prep.layout, self.lm, positions)
        prep.notes = prep.notes + notes
        if self.lm.is_3d and prep.layout.positions["scheme"] == "mrope" and not prep.layout.positions.get("share"):
            if not torch.equal(model_rope_index(self.lm, prep), self.position_ids(prep.layout)):
                prep.notes.append("mrope ids differ from Qwen2-VL's get_rope_index here (it starts text after a "
                                  "video at max(h, w), not at the block's max + 1); the spec's ids are used")
        return prep

    def forward(self, ctx, prep: VLPrepared, pos: torch.Tensor, cache=None, tail: int | None = None) -> torch.Tensor:
        """Logits [N, V] under the spec's mask: from the pixels the first time, then from the kept
        visual embeddings and the token embeddings of the (grown) text."""
        pos = pos[..., None, :] if pos.dim() == 2 else pos[None]
        if prep.visual_embeds is None:
            return self._pixel_forward(ctx, prep, pos)
        embeds = self.lm.model.get_input_embeddings()(prep.input_ids[None].to(self.lm.device))
        embeds = embeds.to(prep.visual_embeds.dtype)
        vis = visual_tokens(prep.layout).to(embeds.device)
        embeds[0, vis] = prep.visual_embeds.to(embeds.dtype)
        return self._decode(ctx, pos, inputs_embeds=embeds)

    def _pixel_forward(self, ctx, prep: VLPrepared, pos: torch.Tensor) -> torch.Tensor:
        got = {}

        def grab(module, args, kwargs):
            got["embeds"] = kwargs.get("inputs_embeds")

        dev = self.lm.device
        pix = {k: v.to(dev, dtype=self.lm.model.dtype if v.is_floating_point() else v.dtype)
               for k, v in prep.inputs.items()}
        handle = self.lm.decoder.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            logits = self._decode(ctx, pos, input_ids=prep.input_ids[None].to(dev), **pix)
        finally:
            handle.remove()
        if got.get("embeds") is not None:
            prep.visual_embeds = got["embeds"][0, visual_tokens(prep.layout).to(got["embeds"].device)]
        return logits

    def _decode(self, ctx, pos: torch.Tensor, **inputs) -> torch.Tensor:
        with attn_impl(self.lm.decoder, ATTN_NAME):
            out = self.lm.model(position_ids=pos.to(self.lm.device), use_cache=False, **inputs, **{ATTN_NAME: ctx})
        return out.logits[0].float()

    def extend(self, prep: VLPrepared, new_ids: list[int]) -> VLPrepared:
        grown = grow(prep, new_ids, self.lm.tokenizer)
        return VLPrepared(grown.layout, grown.seg_ids, grown.notes, grown.gen, prep.visuals, prep.inputs,
                          prep.visual_embeds)
