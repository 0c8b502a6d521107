"""DDIM and null-text inversion (Mokady et al. 2022, "Null-text Inversion for Editing Real Images").

DDIM inversion runs diffusers' `DDIMInverseScheduler` step for step (the UNet at the target timestep t_k,
from the latents at t_k - N_train // N). Null-text inversion then, for each denoising step i, optimises the
unconditional embedding with a fresh Adam (optax), warm-started from step i-1's, so that the guided DDIM step
from the current latents lands on the inverted ones: learning rate `lr * (1 - i * lr_decay)`, at most
`num_inner_steps` iterations, each image stopping once its loss falls below `stop + i * stop_slope`. All of
it is one compiled program: a `lax.scan` over steps around a `lax.while_loop` with a per-image mask.
With `mode="pmap"` or `"jit"` (sharded over a ('data',) mesh) both run data-parallel, each device inverting
its slice of the batch with its own early stops (devices and layouts: `sega_jax.pipelines.placement`).
Latents are NHWC inside; `Inversion` holds them in diffusers' layouts. `invert` reaches the pipeline only
through its public `unet_parts`, `vae_parts` and `text_embeddings`; `job_inputs` turns an `Inversion` into
a job's inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P
from PIL import Image

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
from sega_jax.schedulers import DDIMScheduler, scheduler_from_name
from sega_jax.schedulers.base import div
from sega_jax.schedulers.ddim import DDIMSchedule

Array = jax.Array
UNetFn = Callable[[Array, Array, Array], Array]  # (latents (B,h,w,4), t, context (C*B, L, D)) -> (C*B,h,w,4)
TRACE_COUNT = traces.counter("null_text", "ddim", "null_text", "ddim pmap", "null_text pmap", "ddim jit",
                             "null_text jit")  # traces (= compilations) of each program
METHODS = ("null-text", "ddim")


class NullTextSettings(NamedTuple):
    """The optimisation's traced settings (changing them never recompiles)."""

    learning_rate: Array  # 1e-2
    lr_decay: Array  # 1/100: lr at step i is learning_rate * (1 - i * lr_decay)
    stop: Array  # 1e-5: early stop when loss < stop + i * stop_slope
    stop_slope: Array  # 2e-5

    @classmethod
    def create(cls, learning_rate=1e-2, lr_decay=1e-2, stop=1e-5, stop_slope=2e-5) -> NullTextSettings:
        return cls(*(jnp.float32(v) for v in (learning_rate, lr_decay, stop, stop_slope)))


class NullTextResult(NamedTuple):
    uncond: Array  # (N, B, L, D) the unconditional embedding used at each denoising step
    latents: Array  # (N + 1, B, h, w, 4) the guided trajectory with those embeddings, noisiest first
    losses: Array  # (N, B) the last inner iteration's loss at each step
    iterations: Array  # (N, B) int32 inner iterations run per step and image
    initial_losses: Array  # (N, B) each step's loss before its first update


def ddim_scheduler(scheduler: Any) -> DDIMScheduler:
    """The DDIM scheduler inversion runs on: the pipeline's config, clip_sample off (as the paper)."""
    if scheduler.prediction_type != "epsilon":
        raise NotImplementedError("null-text inversion supports prediction_type='epsilon' only")
    if scheduler.timestep_spacing not in ("leading", "trailing"):
        raise ValueError("DDIM inversion needs timestep_spacing 'leading' or 'trailing' "
                         "(as DDIMInverseScheduler)")
    if isinstance(scheduler, DDIMScheduler):
        return dataclasses.replace(scheduler, clip_sample=False)
    return dataclasses.replace(scheduler_from_name("DDIMScheduler", scheduler.config), clip_sample=False)


def inverse_step(s: DDIMSchedule, k: Array, x: Array, eps: Array) -> Array:
    """DDIMInverseScheduler.step at the k-th ascending timestep (forward index N-1-k): from the level of
    t_k - ratio (alpha_prev of the forward schedule) up to t_k."""
    i = s.timesteps.shape[0] - 1 - k
    x, eps = x.astype(jnp.float32), eps.astype(jnp.float32)
    x0 = div(x - jnp.sqrt(s.beta_prev[i]) * eps, s.sqrt_alpha_prev[i])
    return s.sqrt_alpha[i] * x0 + s.sqrt_beta[i] * eps


def forward_step(s: DDIMSchedule, i: Array, x: Array, eps: Array) -> Array:
    """DDIMScheduler.step with eta 0 and no clipping, at forward index i."""
    x0 = div(x - s.sqrt_beta[i] * eps, s.sqrt_alpha[i])
    return s.sqrt_alpha_prev[i] * x0 + jnp.sqrt(s.beta_prev[i]) * eps


def ddim_invert(eps: Callable[[Array, Array], Array], s: DDIMSchedule, x0: Array) -> Array:
    """The inverted trajectory (N + 1, B, h, w, 4): x0 first, the start latents last."""

    def body(x, xs):
        k, t = xs
        x = inverse_step(s, k, x, eps(x, t))
        return x, x

    n = s.timesteps.shape[0]
    _, xs = jax.lax.scan(body, x0.astype(jnp.float32), (jnp.arange(n, dtype=jnp.int32), s.timesteps[::-1]))
    return jnp.concatenate([x0[None].astype(jnp.float32), xs])


def guided(unet: UNetFn, x: Array, t: Array, uncond: Array, cond: Array, scale: Array) -> Array:
    """uncond + scale * (text - uncond) for latents x (B, ...) with shared-latent UNet calls."""
    out = unet(x, t, jnp.concatenate([uncond, cond])).astype(jnp.float32).reshape(2, *x.shape)
    return out[0] + scale * (out[1] - out[0])


def _image_loss(pred: Array, target: Array) -> Array:
    return jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))


def optimise_step(unet: UNetFn, s: DDIMSchedule, i: Array, x: Array, target: Array, uncond: Array,
                  cond: Array, scale: Array, settings: NullTextSettings,
                  num_inner_steps: int) -> tuple[Array, Array, Array, Array]:
    """One step's inner Adam loop: (optimised uncond (B, L, D), last losses (B,), iterations (B,), losses
    before the first update (B,))."""
    t = s.timesteps[i]
    eps_cond = jax.lax.stop_gradient(unet(x, t, cond).astype(jnp.float32))
    lr = settings.learning_rate * (1.0 - i.astype(jnp.float32) * settings.lr_decay)
    threshold = settings.stop + i.astype(jnp.float32) * settings.stop_slope
    opt = optax.adam(lr)

    def losses(emb: Array) -> tuple[Array, Array]:
        eps_u = unet(x, t, emb.astype(cond.dtype)).astype(jnp.float32)
        per_image = _image_loss(forward_step(s, i, x, eps_u + scale * (eps_cond - eps_u)), target)
        return jnp.sum(per_image), per_image

    def cond_fn(carry) -> Array:
        j, _, _, active, _, _, _ = carry
        return (j < num_inner_steps) & jnp.any(active)

    def body(carry):
        j, emb, opt_state, active, count, last, first = carry
        (_, per_image), grads = jax.value_and_grad(losses, has_aux=True)(emb)
        updates, opt_state = opt.update(grads, opt_state, emb)
        mask = active[:, None, None]
        emb = jnp.where(mask, optax.apply_updates(emb, updates), emb)
        last = jnp.where(active, per_image, last)
        count = count + active.astype(jnp.int32)
        first = jnp.where(j == 0, per_image, first)
        return j + 1, emb, opt_state, active & (per_image >= threshold), count, last, first

    batch = x.shape[0]
    zeros = jnp.zeros(batch, jnp.float32)
    init = (jnp.int32(0), uncond, opt.init(uncond), jnp.ones(batch, bool), jnp.zeros(batch, jnp.int32),
            zeros, zeros)
    _, emb, _, _, count, last, first = jax.lax.while_loop(cond_fn, body, init)
    return emb, last, count, first


def null_text_loop(unet: UNetFn, s: DDIMSchedule, trajectory: Array, uncond: Array, cond: Array,
                   scale: Array, settings: NullTextSettings, num_inner_steps: int) -> NullTextResult:
    """Optimise one unconditional embedding per step so the guided DDIM steps follow `trajectory`."""
    n = s.timesteps.shape[0]
    targets = trajectory[:-1][::-1]  # the target of forward step i is the inverted latents at level N-1-i

    def body(carry, xs):
        x, emb = carry
        i, target = xs
        emb, loss, count, first = optimise_step(unet, s, i, x, target, emb, cond, scale, settings,
                                                num_inner_steps)
        x = forward_step(s, i, x, guided(unet, x, s.timesteps[i], emb.astype(cond.dtype), cond, scale))
        return (x, emb), (emb, x, loss, count, first)

    start = trajectory[-1]
    _, (embs, xs, loss, count, first) = jax.lax.scan(
        body, (start, uncond.astype(jnp.float32)), (jnp.arange(n, dtype=jnp.int32), targets))
    return NullTextResult(embs, jnp.concatenate([start[None], xs]), loss, count, first)


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
