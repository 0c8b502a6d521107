"""LEDITS++'s image and mask inputs: diffusers' `VaeImageProcessor.preprocess` for photos (PIL or float
arrays in [0, 1]) and the `user_mask` check, each bad input a clear error naming the argument."""

from __future__ import annotations

import numbers

import numpy as np
from PIL import Image

from sega_jax.pipelines import inputs

LANCZOS = Image.Resampling.LANCZOS  # VaeImageProcessor's default `resample`
RESIZE_MODES = ("default", "fill", "crop")


def preprocess_images(image, height: int | None, width: int | None, resize_mode: str | None, crops_coords,
                      vae_scale_factor: int) -> tuple[np.ndarray, list]:
    """(NHWC float32 images in [-1, 1], the resized photos as PIL images), as diffusers' preprocessing:
    crop to `crops_coords`, resize (Lanczos; `resize_mode` "fill" / "crop" keep the aspect ratio) to
    (height, width) or the first photo's size, both rounded down to a multiple of the VAE factor; LEDITS++
    then needs multiples of 32. `resize_mode=None` means "default" (diffusers raises for it)."""
    mode = "default" if resize_mode is None else resize_mode
    if mode not in RESIZE_MODES:
        raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {resize_mode!r}")
    photos = image if isinstance(image, (list, tuple)) else [image]
    if not photos:
        raise ValueError("`image` is empty")
    if all(isinstance(p, Image.Image) for p in photos):
        arrays = _from_pil(photos, height, width, mode, _crop_box(crops_coords), vae_scale_factor)
    elif all(isinstance(p, np.ndarray) for p in photos):
        if crops_coords is not None or mode != "default":
            raise ValueError("`crops_coords` and `resize_mode` 'fill' / 'crop' need PIL images, got numpy "
                             "arrays")
        arrays = _from_numpy(photos, height, width)
    else:
        raise TypeError("`image` must be a PIL image, a float numpy array (H, W, 3) or (B, H, W, 3) in "
                        f"[0, 1], or a list of them; got {type(photos[0]).__name__}")
    h, w = arrays.shape[1:3]
    if h % 32 or w % 32:
        raise ValueError(f"Image height and width must be a factor of 32, got {h}x{w}. Consider "
                         "down-sampling the input using the `height` and `width` parameters")
    resized = [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in arrays]
    return arrays * np.float32(2.0) - np.float32(1.0), resized


def _crop_box(crops_coords) -> tuple[int, int, int, int] | None:
    """`crops_coords` as PIL's (left, top, right, bottom) box; it may reach past the photo (zeros there)."""
    if crops_coords is None:
        return None
    box = tuple(crops_coords) if isinstance(crops_coords, (list, tuple, np.ndarray)) else ()
    if len(box) != 4 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in box):
        raise ValueError("`crops_coords` must be four integers (left, top, right, bottom), got "
                         f"{crops_coords!r}")
    left, top, right, bottom = (int(v) for v in box)
    if right <= left or bottom <= top:
        raise ValueError(f"`crops_coords` {crops_coords!r} is an empty box: it needs left < right and "
                         "top < bottom")
    return left, top, right, bottom


def _from_pil(photos, height, width, mode: str, box, factor: int) -> np.ndarray:
    if box is not None:
        photos = [p.crop(box) for p in photos]
    height = photos[0].height if height is None else height
    width = photos[0].width if width is None else width
    width, height = (x - x % factor for x in (width, height))
    if height < 1 or width < 1:
        raise ValueError(f"`image` is smaller than the VAE's factor {factor}")
    arrays = [np.asarray(_resize(p.convert("RGB"), width, height, mode), np.float32) / 255.0 for p in photos]
    return np.stack(arrays).astype(np.float32)


def _resize(photo: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`VaeImageProcessor.resize` on an RGB photo: stretched ("default"), or scaled with its aspect ratio
    and centred, the rest filled by stretching its edge rows or columns ("fill") or cropped ("crop")."""
    if mode == "default":
        return photo.resize((width, height), resample=LANCZOS)
    ratio, src_ratio = width / height, photo.width / photo.height
    wide = ratio < src_ratio if mode == "fill" else ratio > src_ratio  # scaled to the target's width
    src_w = width if wide else photo.width * height // photo.height
    src_h = photo.height * width // photo.width if wide else height
    resized = photo.resize((src_w, src_h), resample=LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "fill":
        _fill_edges(out, resized, ratio, src_ratio, width, height)
    return out


def _fill_edges(out: Image.Image, resized: Image.Image, ratio: float, src_ratio: float, width: int,
                height: int) -> None:
    """diffusers' `_resize_and_fill` borders: its first/last row (or column) stretched over the gaps."""
    src_w, src_h = resized.size
    if ratio < src_ratio and (gap := height // 2 - src_h // 2) > 0:
        out.paste(resized.resize((width, gap), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, gap), box=(0, src_h, width, src_h)), box=(0, gap + src_h))
    elif ratio > src_ratio and (gap := width // 2 - src_w // 2) > 0:
        out.paste(resized.resize((gap, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((gap, height), box=(src_w, 0, src_w, height)), box=(gap + src_w, 0))


def _from_numpy(photos, height, width) -> np.ndarray:
    arrays = [p[None] if p.ndim == 3 else p for p in photos]
    if any(a.ndim != 4 or a.shape[-1] != 3 for a in arrays):
        raise ValueError("`image` arrays must be (H, W, 3) or (B, H, W, 3) RGB, got shapes "
                         f"{[p.shape for p in photos]}")
    if any(not np.issubdtype(a.dtype, np.floating) for a in arrays):
        raise ValueError("`image` arrays must be float in [0, 1] (diffusers' numpy layout); got "
                         f"{[str(a.dtype) for a in arrays]}: convert with `array / 255.0` or pass PIL images")
    array = np.concatenate(arrays).astype(np.float32)
    inputs.check_finite(image=array)
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(f"`image` values must lie in [0, 1], got [{array.min()}, {array.max()}]")
    if (height is not None and height != array.shape[1]) or (width is not None and width != array.shape[2]):
        raise ValueError("resizing numpy images is not supported: pass PIL images or arrays of the "
                         "target size")
    return array


def user_mask_array(user_mask, shape: tuple[int, int, int, int]) -> np.ndarray:
    """`user_mask` broadcast to the latents' (B, 4, h, w) (diffusers' layout) and returned NHWC; ones when
    None (multiplying by one is exact)."""
    if user_mask is None:
        return np.ones((shape[0], shape[2], shape[3], shape[1]), np.float32)
    mask = np.asarray(user_mask, np.float32)
    try:
        full = np.broadcast_to(mask, np.broadcast_shapes(mask.shape, shape))
    except ValueError:
        full = None
    if full is None or full.shape != tuple(shape):
        raise ValueError(f"`user_mask` must broadcast to the latents' shape {tuple(shape)} (B, 4, h, w), got "
                         f"{mask.shape}")
    return np.ascontiguousarray(np.moveaxis(full, 1, -1))
