"""LEDITS++ guidance (Brack et al., arXiv 2311.16711) as pure functions over noise estimates and maps.

The SEGA variant behind diffusers' `LEditsPPPipelineStableDiffusion`: no prompt copy (the unconditional
estimate plus each concept's scaled difference), each concept masked by its implicit masks: the
noise-magnitude mask M2 (the quantile of the channel-summed |guidance| over H*W), the cross-attention
mask M1 (the concept tokens' averaged, smoothed attention map, thresholded by the same quantile), or
their intersection (M1 alone at timesteps above 800), times an optional user mask. Inputs are NHWC,
arithmetic fp32; nothing here knows about models or schedulers. Settings are arrays (traced).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sega_jax.core.guidance import NEVER, rescale_noise_cfg, spatial_quantile

Array = jax.Array

INTERSECT_MAX_TIMESTEP = 800  # the reference intersects the masks only at t <= 800


class LEditsParams(NamedTuple):
    """Per-concept (K,) arrays and scalars; changing any value never recompiles."""

    edit_guidance_scale: Array
    edit_threshold: Array
    edit_warmup_steps: Array
    edit_cooldown_steps: Array
    reverse_editing_direction: Array
    num_edit_tokens: Array  # (K,) int32: each concept's own tokens (no start/end of text)
    guidance_rescale: Array

    @classmethod
    def create(cls, num_concepts: int, *, edit_guidance_scale=5.0, edit_threshold=0.9, edit_warmup_steps=0,
               edit_cooldown_steps=None, reverse_editing_direction=False, num_edit_tokens=1,
               guidance_rescale=0.0) -> LEditsParams:
        per = lambda v, dtype: jnp.broadcast_to(jnp.asarray(v, dtype), (num_concepts,))
        return cls(
            edit_guidance_scale=per(edit_guidance_scale, jnp.float32),
            edit_threshold=per(edit_threshold, jnp.float32),
            edit_warmup_steps=per(edit_warmup_steps, jnp.int32),
            edit_cooldown_steps=per(NEVER if edit_cooldown_steps is None else edit_cooldown_steps, jnp.int32),
            reverse_editing_direction=per(reverse_editing_direction, jnp.bool_),
            num_edit_tokens=per(num_edit_tokens, jnp.int32),
            guidance_rescale=jnp.asarray(guidance_rescale, jnp.float32),
        )


def smoothing_kernel() -> np.ndarray:
    """The reference's 3x3 `LeditsGaussianSmoothing` kernel (sigma 0.5, its exp(-((x - m) / (2 s))^2))."""
    grid = np.meshgrid(np.arange(3, dtype=np.float32), np.arange(3, dtype=np.float32), indexing="ij")
    kernel = np.float32(1.0)
    for mesh in grid:
        kernel = kernel * (np.float32(1 / (0.5 * math.sqrt(2 * math.pi)))
                           * np.exp(-(((mesh - np.float32(1.0)) / np.float32(1.0)) ** 2)))
    return (kernel / kernel.sum()).astype(np.float32)


def smooth(maps: Array) -> Array:
    """Reflect-pad by 1 and convolve with `smoothing_kernel` (maps (..., H, W))."""
    padded = jnp.pad(maps, [(0, 0)] * (maps.ndim - 2) + [(1, 1), (1, 1)], mode="reflect")
    kernel = smoothing_kernel()
    h, w = maps.shape[-2:]
    out = jnp.zeros_like(maps)
    for dy in range(3):
        for dx in range(3):
            out = out + jnp.float32(kernel[dy, dx]) * padded[..., dy:dy + h, dx:dx + w]
    return out


def concept_attention(probs: Array, num_concepts: int, batch: int, num_edit_tokens: Array) -> Array:
    """(K, B, h, w) per concept and image: the layer-and-head mean of the recorded cross-attention maps
    `probs` (layers*heads, (1 + K) * B, h, w, L) rows [uncond, concept 0, ...], summed over each concept's own
    tokens (1 .. num_edit_tokens[k]; token 0 is start-of-text)."""
    mean = probs.sum(axis=0) / probs.shape[0]
    per_copy = mean.reshape(1 + num_concepts, batch, *mean.shape[1:])[1:]  # (K, B, h, w, L)
    token = jnp.arange(mean.shape[-1])
    span = (token[None, :] >= 1) & (token[None, :] < 1 + num_edit_tokens[:, None])  # (K, L)
    return jnp.where(span[:, None, None, None, :], per_copy, 0.0).sum(axis=-1)


def attention_mask(attention: Array, threshold: Array, size: tuple[int, int]) -> Array:
    """M1: smoothed maps (K, B, h', w') >= their quantile at each concept's threshold, upsampled (nearest,
    as torch's `F.interpolate`) to the latents' (H, W): (K, B, H, W, 1) in {0, 1}."""
    smoothed = smooth(attention)
    q = spatial_quantile(smoothed[..., None], threshold[:, None])  # (K, B, 1)
    mask = (smoothed >= q[..., None]).astype(jnp.float32)  # q (K, B, 1) against (K, B, h', w')
    rows = _nearest(mask.shape[-2], size[0])
    cols = _nearest(mask.shape[-1], size[1])
    return mask[..., rows, :][..., cols][..., None]


def _nearest(n_in: int, n_out: int) -> np.ndarray:
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def noise_mask(guidance: Array, threshold: Array) -> Array:
    """M2: the channel-summed |guidance| (K, B, H, W, 1) >= its H*W quantile at each concept's threshold."""
    magnitude = jnp.abs(guidance).sum(axis=-1, keepdims=True)
    q = spatial_quantile(magnitude, threshold[:, None])  # (K, B, 1)
    return magnitude >= q[:, :, None, None, :]


def ledits_step(noise_uncond: Array, noise_edits: Array, step: Array, timestep: Array, params: LEditsParams,
                *, user_mask: Array, attention: Array | None = None, use_intersect_mask: bool = True,
                replay: Array | None = None, replay_steps: Array | int = 0) -> tuple[Array, Array]:
    """One LEDITS++ guidance step: (guided noise prediction, the applied guidance), both (B, H, W, C).

    noise_uncond (B, H, W, C); noise_edits (K, B, H, W, C); user_mask broadcastable to (B, H, W, C);
    attention (K, B, h', w') from `concept_attention` when cross-attention masks are on (None: M2 alone);
    with `use_intersect_mask`, M1 * M2 at timesteps <= 800, M1 alone above. `replay` (B, H, W, C) is used
    instead of the concepts while `step < replay_steps` (the reference's `sem_guidance`).
    """
    uncond, edits = noise_uncond.astype(jnp.float32), noise_edits.astype(jnp.float32)
    p = params
    expand = lambda a: a[:, None, None, None, None]
    sign = jnp.where(p.reverse_editing_direction, -1.0, 1.0)
    guidance = (edits - uncond[None]) * expand(sign) * expand(p.edit_guidance_scale)
    guidance = guidance * user_mask.astype(jnp.float32)[None]
    if attention is None:
        guidance = jnp.where(noise_mask(guidance, p.edit_threshold), guidance, 0.0)
    else:
        m1 = attention_mask(attention, p.edit_threshold, uncond.shape[1:3])
        if use_intersect_mask:
            both = noise_mask(guidance, p.edit_threshold).astype(jnp.float32) * m1
            guidance = guidance * jnp.where(timestep <= INTERSECT_MAX_TIMESTEP, both, m1)
        else:
            guidance = guidance * m1
    active = (step >= p.edit_warmup_steps) & (step < p.edit_cooldown_steps)
    guidance = jnp.where(expand(active), guidance, 0.0)
    applied = jnp.zeros_like(uncond)
    for k in range(edits.shape[0]):  # in concept order, as the reference accumulates
        applied = applied + guidance[k]
    if replay is not None:
        applied = jnp.where(step < replay_steps, replay.astype(jnp.float32), applied)
    pred = uncond + applied
    if edits.shape[0]:  # the reference means to rescale to the concepts' mean estimate (it crashes instead)
        pred = rescale_noise_cfg(pred, edits.mean(axis=0), p.guidance_rescale)
    return pred, applied
