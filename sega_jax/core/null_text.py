"""DDIM and null-text inversion as pure JAX (Mokady et al. 2022, "Null-text Inversion for Editing Real
Images"): the steps of diffusers' `DDIMInverseScheduler` and `DDIMScheduler`, and the null-text optimisation
of the unconditional embedding per denoising step (a fresh Adam per step, warm-started, each image stopping
on its own threshold) as a `lax.scan` around a `lax.while_loop`. The denoiser is a function argument;
`sega_jax.pipelines.null_text` compiles these for a pipeline's UNet, on one device or data-parallel."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sega_jax.schedulers import DDIMScheduler, scheduler_from_name
from sega_jax.schedulers.base import div
from sega_jax.schedulers.ddim import DDIMSchedule

Array = jax.Array
UNetFn = Callable[[Array, Array, Array], Array]  # (latents (B,h,w,4), t, context (C*B, L, D)) -> (C*B,h,w,4)


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
