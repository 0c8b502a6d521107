"""The SEGA denoising loop: one `jax.lax.scan` over timesteps, jit-able as a whole.

The denoiser is a plain function `eps(latents, t, context) -> noise` so research code can bring its own
model; the scheduler is any object following the `sega_jax.schedulers` protocol; the guidance is
`sega_jax.core.guidance.sega_step`. The carry holds the latents, the SEGA momentum and the scheduler state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sega_jax.core.guidance import EditParams, sega_step

Array = jax.Array
Denoiser = Callable[[Array, Array, Any], Array]

# Schedulers whose step draws fresh noise (DDIM only when eta > 0, which is traced).
_STOCHASTIC = {"DDIMScheduler", "EulerAncestralDiscreteScheduler"}


class SampleOutput(NamedTuple):
    latents: Array  # (B, H, W, C) final latents, fp32
    sem_guidance: Array  # (steps, B, H, W, C) semantic guidance applied at each step
    estimates: tuple[Array, Array, Array] | None  # uncond (S,B,..), text (S,B,..), edits (S,K,B,..)


def step_noise(image_keys: Array, step: Array, shape: tuple[int, ...]) -> Array:
    """Per-image scheduler noise for one step: image j's noise depends only on its key and the step."""
    draw = lambda key: jax.random.normal(jax.random.fold_in(key, step), shape, jnp.float32)
    return jax.vmap(draw)(image_keys)


def with_uncond(flat_context: Array, uncond: Array) -> Array:
    """The flat context (copies*B, L, D) with its first (unconditional) copy replaced by `uncond`."""
    return flat_context.at[: uncond.shape[0]].set(uncond.astype(flat_context.dtype))


def sega_sample(
    eps: Denoiser,
    scheduler: Any,
    schedule: Any,
    noise: Array,
    context: Array,
    params: EditParams,
    *,
    num_concepts: int,
    do_cfg: bool,
    image_keys: Array | None = None,
    eta: Array | float = 0.0,
    replay: Array | None = None,
    record_estimates: bool = False,
    on_step: Callable[..., None] | None = None,
    emit_latents: bool = False,
    shared_latents: bool = False,
    step_uncond: Array | None = None,
    remat: bool = False,
) -> SampleOutput:
    """Run the SEGA loop from unit-variance `noise` (B, H, W, C).

    `context` (copies, B, L, D) holds the text embeddings [uncond, text, concept 0, ...] when `do_cfg`,
    else just the prompt's (1, B, L, D); it may be a pytree of such arrays (SDXL's pooled embeddings and
    time ids travel beside the hidden states), each leaf (copies, B, ...), handed to the denoiser with
    the first two axes merged. The denoiser runs once per step on all copies as one batch.
    `replay` (steps, B, H, W, C) is guidance added at each step (the `sem_guidance` argument).
    `on_step(i, t[, latents])` is called on the host through `jax.debug.callback` (progress bars, user
    callbacks). With `shared_latents` the denoiser gets the latents once, (B, H, W, C), beside all the
    copies' context (copies*B, L, D), and must answer for every copy, as `UNet2DConditionModel` does
    (computing what precedes its first cross-attention once); otherwise it gets the latents tiled.
    `step_uncond` (steps, B, L, D) replaces the unconditional copy at each step (null-text inversion).
    `remat` rematerialises each step under `jax.grad`: the backward pass keeps only the per-step carry
    (latents, momentum, scheduler state) and recomputes the UNet's activations, so memory grows by the
    carry per step instead of by a whole UNet forward's activations.
    """
    copies = 2 + num_concepts if do_cfg else 1
    for leaf in jax.tree.leaves(context):
        if leaf.shape[0] != copies:
            raise ValueError(f"context has {leaf.shape[0]} copies, expected {copies} "
                             "(uncond, text, concepts)")
    flat_context = jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:]), context)
    steps = schedule.timesteps.shape[0]
    latents = noise.astype(jnp.float32) * schedule.init_noise_sigma
    state = scheduler.init_state(schedule, latents.shape, latents.dtype)
    stochastic = type(scheduler).__name__ in _STOCHASTIC
    if stochastic and image_keys is None:
        raise ValueError(f"{type(scheduler).__name__} draws noise each step: pass image_keys")

    def body(carry, xs):
        x, momentum, state = carry
        i, t, replay_i, uncond_i = xs
        ctx = flat_context if uncond_i is None else with_uncond(flat_context, uncond_i)
        model_in = scheduler.scale_model_input(schedule, x, i)
        if not shared_latents:
            model_in = jnp.concatenate([model_in] * copies)
        out = eps(model_in, t, ctx).astype(jnp.float32).reshape(copies, *x.shape)
        if do_cfg:
            pred, momentum, applied = sega_step(out[0], out[1], out[2:], momentum, i, params, replay_i)
        else:
            pred, applied = out[0], jnp.zeros_like(x)
        z = step_noise(image_keys, i, x.shape[1:]) if stochastic else None
        x, state = scheduler.step(schedule, state, pred, i, x, eta=eta, noise=z)
        if on_step is not None:
            jax.debug.callback(on_step, i, t, *((x,) if emit_latents else ()), ordered=True)
        recorded = (applied, (out[0], out[1], out[2:]) if record_estimates and do_cfg else None)
        return (x, momentum, state), recorded

    xs = (jnp.arange(steps, dtype=jnp.int32), schedule.timesteps, replay, step_uncond)
    carry = (latents, jnp.zeros_like(latents), state)
    step = jax.checkpoint(body) if remat else body
    (latents, _, _), (sem_guidance, estimates) = jax.lax.scan(step, carry, xs)
    return SampleOutput(latents, sem_guidance, estimates)
