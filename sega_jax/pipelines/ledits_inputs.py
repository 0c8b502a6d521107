"""LEDITS++'s image and mask inputs: diffusers' `VaeImageProcessor.preprocess` for photos (PIL or float
arrays in [0, 1]) and the `user_mask` check, each bad input a clear error naming the argument."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sega_jax import pipeline_inputs as inputs

LANCZOS = Image.Resampling.LANCZOS  # VaeImageProcessor's default `resample`


def preprocess_images(image, height: int | None, width: int | None, resize_mode: str | None, crops_coords,
                      vae_scale_factor: int) -> tuple[np.ndarray, list]:
    """(NHWC float32 images in [-1, 1], the resized photos as PIL images), as diffusers' preprocessing:
    crop, resize (Lanczos) to (height, width) or the first photo's size, both rounded down to a multiple
    of the VAE factor; LEDITS++ then needs multiples of 32."""
    if resize_mode not in ("default", None):
        raise ValueError(f"`resize_mode`={resize_mode!r} is not supported (only 'default')")
    photos = image if isinstance(image, (list, tuple)) else [image]
    if not photos:
        raise ValueError("`image` is empty")
    if all(isinstance(p, Image.Image) for p in photos):
        arrays = _from_pil(photos, height, width, crops_coords, vae_scale_factor)
    elif all(isinstance(p, np.ndarray) for p in photos):
        if crops_coords is not None:
            raise ValueError("`crops_coords` needs PIL images")
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


def _from_pil(photos, height, width, crops_coords, factor: int) -> np.ndarray:
    if crops_coords is not None:
        photos = [p.crop(tuple(crops_coords)) for p in photos]
    height = photos[0].height if height is None else height
    width = photos[0].width if width is None else width
    width, height = (x - x % factor for x in (width, height))
    if height < 1 or width < 1:
        raise ValueError(f"`image` is smaller than the VAE's factor {factor}")
    arrays = [np.asarray(p.convert("RGB").resize((width, height), resample=LANCZOS), np.float32) / 255.0
              for p in photos]
    return np.stack(arrays).astype(np.float32)


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
