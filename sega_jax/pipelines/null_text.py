"""DDIM and null-text inversion (Mokady et al. 2022, "Null-text Inversion for Editing Real Images").

DDIM inversion runs diffusers' `DDIMInverseScheduler` step for step (the UNet at the target timestep t_k,
from the latents at t_k - N_train // N). Null-text inversion then, for each denoising step i, optimises the
unconditional embedding with a fresh Adam (optax), warm-started from step i-1's, so that the guided DDIM step
from the current latents lands on the inverted ones: learning rate `lr * (1 - i * lr_decay)`, at most
`num_inner_steps` iterations, each image stopping once its loss falls below `stop + i * stop_slope`. All of
it is one compiled program: a `lax.scan` over steps around a `lax.while_loop` with a per-image mask.
With `mode="pmap"` or `"jit"` (sharded over a ('data',) mesh) both run data-parallel, each device inverting
its slice of the batch with its own early stops (devices and layouts: `sega_jax.pipelines.placement`).
The loops themselves are pure JAX in `sega_jax.core.null_text`; this module compiles them for a
pipeline's UNet. Latents are NHWC inside; `Inversion` holds them in diffusers' layouts. `invert` reaches the
pipeline only through its public `unet_parts`, `vae_parts` and `text_embeddings`; `job_inputs` turns an
`Inversion` into a job's inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from PIL import Image

from sega_jax.core.null_text import (
    NullTextResult,
    NullTextSettings,
    UNetFn,
    ddim_invert,
    ddim_scheduler,
    null_text_loop,
)
from sega_jax.pipelines import inputs
from sega_jax.pipelines.base import encode_image
from sega_jax.pipelines.placement import (
    AXIS,
    MODES,
    merge_from_pmap,
    replicated,
    resolve_devices,
    spec,
    split_for_pmap,
)
from sega_jax.runtime import traces, xla_options
from sega_jax.schedulers.ddim import DDIMSchedule

Array = jax.Array
TRACE_COUNT = traces.counter("null_text", "ddim", "null_text", "ddim pmap", "null_text pmap", "ddim jit",
                             "null_text jit")  # traces (= compilations) of each program
METHODS = ("null-text", "ddim")


def _unet_fn(graph, state) -> UNetFn:
    unet = nnx.merge(graph, state)
    return lambda x, t, c: unet(x, t, c)


@xla_options.jit(static_argnames=("graph",))
def ddim_inversion(graph, state, schedule: DDIMSchedule, x0: Array, cond: Array) -> Array:
    """Compiled DDIM inversion at guidance 1 (the prompt's conditional estimate), as the paper."""
    TRACE_COUNT["ddim"] += 1
    unet = _unet_fn(graph, state)
    return ddim_invert(lambda x, t: unet(x, t, cond), schedule, x0)


@xla_options.jit(static_argnames=("graph", "num_inner_steps"))
def null_text_inversion(graph, state, schedule: DDIMSchedule, trajectory: Array, uncond: Array, cond: Array,
                        scale: Array, settings: NullTextSettings, *, num_inner_steps: int) -> NullTextResult:
    TRACE_COUNT["null_text"] += 1
    return null_text_loop(_unet_fn(graph, state), schedule, trajectory, uncond, cond, scale, settings,
                          num_inner_steps)


# Batch axis of each argument after (unet state, schedule), and of the outputs; None: replicated.
_AXES = {
    "ddim": ((0, 0), 1),  # (x0, cond) -> trajectory
    # (trajectory, uncond, cond, scale, settings) -> NullTextResult
    "null_text": ((1, 0, 0, None, None), NullTextResult(1, 1, 1, 1, 1)),
}


@functools.lru_cache(maxsize=16)
def _data_parallel(kind: str, graph, num_inner_steps: int, mode: str, devices: tuple,
                   half_precision: bool = False):
    """`ddim_inversion` / `null_text_inversion` as one pmap or sharded-jit program over `devices`."""
    in_axes, out_axes = _AXES[kind]

    def body(state, schedule, *args):
        TRACE_COUNT[f"{kind} {mode}"] += 1
        unet = _unet_fn(graph, state)
        if kind == "ddim":
            x0, cond = args
            return ddim_invert(lambda x, t: unet(x, t, cond), schedule, x0)
        return null_text_loop(unet, schedule, *args, num_inner_steps)

    if mode == "pmap":
        return jax.pmap(body, AXIS, in_axes=(None, None, *in_axes), out_axes=out_axes, devices=devices)
    specs = lambda axes: jax.tree.map(spec, axes, is_leaf=lambda a: a is None)
    mapped = jax.shard_map(body, mesh=jax.sharding.Mesh(np.asarray(devices), (AXIS,)),
                           in_specs=(P(), P(), *specs(in_axes)), out_specs=specs(out_axes), check_vma=False)
    return jax.jit(mapped, compiler_options=xla_options.compiler_options(half_precision))


def _pad_batch(x: Array, axis: int | None, total: int) -> Array:
    """Repeat the last image along `axis` up to `total` images."""
    if axis is None or x.shape[axis] == total:
        return x
    last = jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
    return jnp.concatenate([x, *[last] * (total - x.shape[axis])], axis=axis)


def run_parallel(kind: str, pipe, schedule: DDIMSchedule, mode: str, devices, batch: int, *args,
                 num_inner_steps: int = 0):
    """Run `kind` ("ddim" or "null_text") data-parallel: pad the batch to a multiple of the device count,
    place the slices, run, and return the outputs for the `batch` real images."""
    devices = resolve_devices(devices)
    count = len(devices)
    total = -(-batch // count) * count
    in_axes, out_axes = _AXES[kind]
    args = [_pad_batch(a, axis, total) for a, axis in zip(args, in_axes, strict=True)]
    if mode == "pmap":
        # via the host: an input committed to another sharding (the DDIM pass's output) is refused by pmap
        args = [jax.tree.map(lambda x, axis=axis: split_for_pmap(np.asarray(x), axis, count), a)
                for a, axis in zip(args, in_axes, strict=True)]
    else:
        mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
        place = lambda a, axis: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec(axis)))
        args = [a if axis is None else place(a, axis) for a, axis in zip(args, in_axes, strict=True)]
    program = _data_parallel(kind, pipe.unet_parts[0], num_inner_steps, mode, devices,
                             xla_options.has_half_precision(pipe.unet_parts[1]))
    out = program(replicated(pipe, devices), schedule, *args)
    if mode == "pmap":
        out = jax.tree.map(merge_from_pmap, out, out_axes)
    return jax.tree.map(lambda x, axis: jax.lax.slice_in_dim(x, 0, batch, axis=axis), out, out_axes)


@dataclasses.dataclass
class Inversion:
    """What `SemanticStableDiffusionPipeline.invert` found; pass it as `pipe(..., inversion=inv)`.

    Arrays in diffusers' layouts. `uncond_embeddings` is None for method "ddim" (the pipeline then uses the
    negative prompt, as usual)."""

    latents: np.ndarray  # (B, 4, h, w) start latents (the inverted x_T)
    uncond_embeddings: np.ndarray | None  # (N, B, L, D), one per denoising step
    trajectory: np.ndarray  # (N + 1, B, 4, h, w) DDIM-inverted latents, x0 first
    image_latents: np.ndarray  # (B, 4, h, w) the photo's VAE latents (x0)
    timesteps: np.ndarray  # (N,) descending
    prompt: str
    num_inference_steps: int
    guidance_scale: float
    method: str
    losses: np.ndarray | None = None  # (N, B) each step's last inner-iteration loss
    iterations: np.ndarray | None = None  # (N, B)
    initial_losses: np.ndarray | None = None  # (N, B) each step's loss before its first update
    scheduler: Any = dataclasses.field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])


def image_array(image, factor: int) -> np.ndarray:
    """PIL image(s) or float arrays (H, W, 3) / (B, H, W, 3) in [0, 1] -> NHWC float32 in [-1, 1]."""
    photos = image if isinstance(image, (list, tuple)) else [image]
    if not photos:
        raise ValueError("`image` is empty")
    arrays = [np.asarray(p.convert("RGB"), np.float32) / 255.0 if isinstance(p, Image.Image)
              else np.asarray(p, np.float32) for p in photos]
    batch = np.concatenate([a[None] if a.ndim == 3 else a for a in arrays])
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"`image` must be (H, W, 3) or (B, H, W, 3) RGB, got {batch.shape}")
    if batch.shape[1] % max(8, factor) or batch.shape[2] % max(8, factor):
        raise ValueError(f"image height and width must be divisible by {max(8, factor)}, "
                         f"got {batch.shape[1:3]}")
    if not np.isfinite(batch).all():
        raise ValueError("`image` has non-finite values")
    return batch * np.float32(2.0) - np.float32(1.0)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    return method


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES} or None, got {mode!r}")


def invert(pipe, image, prompt: str = "", num_inference_steps: int = 50, guidance_scale: float = 7.5,
           method: str = "null-text", *, num_inner_steps: int = 10, learning_rate: float = 1e-2,
           lr_decay: float = 1e-2, early_stop: float = 1e-5, early_stop_slope: float = 2e-5,
           mode: str | None = None, devices=None) -> Inversion:
    """`SemanticStableDiffusionPipeline.invert`: DDIM-invert the photo(s) at guidance 1 with `prompt`, then
    (method "null-text") optimise the per-step unconditional embeddings for `guidance_scale`. `mode` "pmap"
    or "jit" spreads the batch over `devices` (all local ones, the first N, or a list) as
    `sega_jax.pipelines.parallel` does; None runs on one device."""
    check_method(method)
    check_mode(mode)  # before the photo is encoded
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a string, got {type(prompt).__name__}")
    num_inference_steps = inputs.check_int(num_inference_steps, "num_inference_steps", minimum=1)
    num_inner_steps = inputs.check_int(num_inner_steps, "num_inner_steps", minimum=0)
    scheduler = ddim_scheduler(pipe.scheduler)
    schedule = scheduler.set_timesteps(num_inference_steps)
    x0 = encode_image(*pipe.vae_parts, jnp.asarray(image_array(image, pipe.vae_scale_factor)),
                      pipe.vae.config.scaling_factor)
    batch = x0.shape[0]
    cond = pipe.text_embeddings([prompt] * batch)
    if mode is None:
        trajectory = ddim_inversion(*pipe.unet_parts, schedule, x0, cond)
    else:
        trajectory = run_parallel("ddim", pipe, schedule, mode, devices, batch, x0, cond)
    result = None
    if method == "null-text":
        uncond = pipe.text_embeddings([""] * batch, truncation=True)
        settings = NullTextSettings.create(learning_rate, lr_decay, early_stop, early_stop_slope)
        args = (trajectory, uncond, cond, jnp.float32(guidance_scale), settings)
        result = (null_text_inversion(*pipe.unet_parts, schedule, *args, num_inner_steps=num_inner_steps)
                  if mode is None else run_parallel("null_text", pipe, schedule, mode, devices, batch, *args,
                                                    num_inner_steps=num_inner_steps))
    nchw = lambda a: np.moveaxis(np.asarray(a), -1, -3)
    return Inversion(
        latents=nchw(trajectory[-1]), uncond_embeddings=None if result is None else np.asarray(result.uncond),
        trajectory=nchw(trajectory), image_latents=nchw(x0), timesteps=np.asarray(schedule.timesteps),
        prompt=prompt, num_inference_steps=num_inference_steps, guidance_scale=float(guidance_scale),
        method=method, losses=None if result is None else np.asarray(result.losses),
        iterations=None if result is None else np.asarray(result.iterations),
        initial_losses=None if result is None else np.asarray(result.initial_losses), scheduler=scheduler)


def job_inputs(inversion: Inversion, steps: int, batch: int, do_cfg: bool, latents) -> tuple:
    """(start noise NHWC, DDIM scheduler, its schedule, per-step uncond (N, B, L, D) or None) for
    `pipe(..., inversion=inv)`."""
    if not isinstance(inversion, Inversion):
        raise TypeError(f"`inversion` must come from `pipe.invert`, got {type(inversion).__name__}")
    if latents is not None:
        raise ValueError("pass either `latents` or `inversion`, not both")
    if steps != inversion.num_inference_steps:
        raise ValueError(f"the inversion has {inversion.num_inference_steps} steps; pass "
                         f"num_inference_steps={inversion.num_inference_steps}, got {steps}")
    if batch != inversion.batch_size:
        raise ValueError(f"the inversion has {inversion.batch_size} images, the call makes {batch}")
    uncond = inversion.uncond_embeddings
    step_uncond = jnp.asarray(uncond) if do_cfg and uncond is not None else None
    noise = jnp.asarray(np.moveaxis(inversion.latents, 1, -1))
    return noise, inversion.scheduler, inversion.scheduler.set_timesteps(steps), step_uncond
