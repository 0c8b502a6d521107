"""transformers' `CLIPImageProcessor` (the safety checker's `feature_extractor/`) in numpy + Pillow.

What the reference pipeline does with its decoded images, step by step, and what we do the same way:

1. `VaeImageProcessor.numpy_to_pil`: float images in [0, 1] -> `(x * 255).round().astype(uint8)` -> PIL.
2. `CLIPImageProcessor` (transformers' PIL backend, the one transformers 4 always used and transformers 5
   uses without torchvision): resize with Pillow and the configured `resample` (bicubic for CLIP) so the
   shortest edge is `size["shortest_edge"]` (the other side truncated: `int(size * long / short)`),
   center crop to `crop_size` (zero padding where the image is smaller), rescale by `rescale_factor` in
   float64 then cast to float32, normalize `(x - mean) / std` in float32.

The resize itself is Pillow's, so it is bit-identical to the reference's; everything else is numpy.
Output is NHWC float32 (the reference's `pixel_values` is the same array in NCHW).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sega_jax.models.weights import WeightLoadError, read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, CLIPImageProcessor's default

# preprocessor_config.json keys that do not change the math (metadata, other backends' settings).
_IGNORED_KEYS = frozenset({
    "feature_extractor_type", "image_processor_type", "processor_class", "auto_map", "_processor_class",
    "default_to_square", "input_data_format", "data_format", "device", "return_tensors",
    "disable_grouping", "do_pad", "pad_size",
})


def _size_dict(value, *, default_to_square: bool, name: str) -> dict[str, int]:
    """transformers' `get_size_dict`: int / (h, w) / dict -> a dict of known keys."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an int, a (height, width) pair or a dict, got {value!r}")
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        size = {k: v for k, v in value.items() if v is not None}
        keys = set(size)
        if keys in ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"}):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size.values()):
                raise ValueError(f"{name}: expected positive integers, got {value!r}")
            return size
        raise ValueError(f"{name}: unsupported keys {sorted(keys)} (supported: height+width, shortest_edge, "
                         "shortest_edge+longest_edge)")
    raise ValueError(f"{name}: expected an int, a (height, width) pair or a dict, got {value!r}")


def _per_channel(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(v) for v in value)
    raise ValueError(f"{name}: expected a number or 3 numbers, got {value!r}")


def resize_output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """The (height, width) transformers' PIL backend resizes an image of (height, width) to."""
    if "height" in size:
        return size["height"], size["width"]
    shortest = size["shortest_edge"]
    longest = size.get("longest_edge")
    if longest is None:
        # get_resize_output_image_size(..., default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = shortest, int(shortest * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    # get_size_with_aspect_ratio(image_size, shortest_edge, longest_edge)
    raw = None
    if max(height, width) / float(min(height, width)) * shortest > longest:
        raw = longest * float(min(height, width)) / float(max(height, width))
        shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    scale_from = raw if raw is not None else shortest
    if width < height:
        return int(scale_from * height / width), shortest
    return shortest, int(scale_from * width / height)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' `center_crop` on one HWC image: zero-pads where the image is smaller than the crop."""
    orig_h, orig_w = image.shape[:2]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0 and top + height <= orig_h and left + width <= orig_w:
        return image[top:top + height, left:left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
    top_pad, left_pad = math.ceil((new_h - orig_h) / 2), math.ceil((new_w - orig_w) / 2)
    padded[top_pad:top_pad + orig_h, left_pad:left_pad + orig_w] = image
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' `numpy_to_pil` conversion: uint8 passes through, floats in [0, 1] -> round(x * 255)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images: expected uint8 or float values in [0, 1], got dtype {images.dtype}")
    # The reference gets images already clamped to [0, 1]; clipping keeps out-of-range values from wrapping.
    return np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """Float images (B, H, W, 3) in [0, 1] (or uint8) as PIL images: the one float-to-PIL conversion."""
    return [Image.fromarray(image) for image in to_uint8(images)]


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessor:
    """A `preprocessor_config.json`; defaults are transformers' `CLIPImageProcessor` defaults."""

    do_resize: bool = True
    size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = BICUBIC
    do_center_crop: bool = True
    crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("size", _size_dict(self.size, default_to_square=False, name="size"))
        crop = _size_dict(self.crop_size, default_to_square=True, name="crop_size")
        if set(crop) != {"height", "width"}:
            raise ValueError(f"crop_size: expected height and width, got {self.crop_size!r}")
        set_("crop_size", crop)
        if isinstance(self.resample, bool) or self.resample not in tuple(int(r) for r in Image.Resampling):
            raise ValueError(f"resample: expected a PIL resampling filter id 0-5, got {self.resample!r}")
        set_("resample", int(self.resample))
        set_("rescale_factor", float(self.rescale_factor))
        set_("image_mean", _per_channel(self.image_mean, "image_mean"))
        set_("image_std", _per_channel(self.image_std, "image_std"))

    @classmethod
    def from_dict(cls, d: dict) -> CLIPImageProcessor:
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        if d.get("do_pad"):
            raise ValueError("do_pad: padding to a fixed size is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in _IGNORED_KEYS
                         and k != "use_square_size" and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unsupported image processor key(s): {', '.join(unknown)}")
        kwargs = {k: d[k] for k in fields if d.get(k) is not None}
        if d.get("use_square_size"):  # transformers' KOSMOS-2 compatibility switch
            edge = _size_dict(kwargs.get("size", 224), default_to_square=False, name="size")["shortest_edge"]
            kwargs["size"] = {"height": edge, "width": edge}
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> CLIPImageProcessor:
        return load_feature_extractor(folder)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image, when it does not depend on the input's size."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def preprocess_one(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """One (H, W, 3) image (uint8, or float in [0, 1], or a PIL image) -> (h, w, 3) float32."""
        if isinstance(image, Image.Image):
            pil = image.convert("RGB") if self.do_convert_rgb and image.mode != "RGB" else image
            pixels = np.asarray(pil)
        else:
            pixels = to_uint8(image)
            if pixels.ndim != 3 or pixels.shape[-1] != 3:
                raise ValueError(f"images: expected (height, width, 3) images, got shape {pixels.shape}")
            pil = None
        if self.do_resize:
            pil = pil if pil is not None else Image.fromarray(pixels)
            height, width = resize_output_size(pixels.shape[0], pixels.shape[1], self.size)
            pixels = np.asarray(pil.resize((width, height), resample=self.resample))
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        out = pixels
        if self.do_rescale:
            out = (out.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            out = out if np.issubdtype(out.dtype, np.floating) else out.astype(np.float32)
            mean = np.asarray(self.image_mean, out.dtype)
            std = np.asarray(self.image_std, out.dtype)
            out = (out - mean) / std
        return np.asarray(out, np.float32)

    def preprocess(self, images: np.ndarray | Sequence) -> np.ndarray:
        """(B, H, W, 3) uint8 or float-in-[0, 1] images (or a list of images / PIL images) ->
        (B, h, w, 3) float32, the reference's `pixel_values` in NHWC."""
        if isinstance(images, Image.Image):
            images = [images]
        elif not isinstance(images, (list, tuple)):
            images = np.asarray(images)      # numpy or jax arrays
            if images.ndim not in (3, 4):
                raise ValueError(f"images: expected (B, H, W, 3) or (H, W, 3), got shape {images.shape}")
            images = to_uint8(images[None] if images.ndim == 3 else images)
        outs = [self.preprocess_one(image) for image in images]
        if len({o.shape for o in outs}) > 1:
            raise ValueError(f"images: preprocessed sizes differ ({sorted({o.shape for o in outs})}); "
                             "enable center cropping or pass images of one size")
        return np.stack(outs) if outs else np.zeros((0, 0, 0, 3), np.float32)

    __call__ = preprocess


def load_feature_extractor(folder: str | os.PathLike) -> CLIPImageProcessor:
    """Read a diffusers `feature_extractor/` folder (`preprocessor_config.json`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightLoadError(f"{folder}: feature extractor folder not found")
    path = folder / "preprocessor_config.json"
    try:
        return CLIPImageProcessor.from_dict(read_json(path))
    except WeightLoadError:
        raise
    except (TypeError, ValueError) as err:
        raise WeightLoadError(f"{path}: {err}") from err
