"""Gradients through the SEGA loop, for research code: the whole denoising loop as a differentiable function
of the edit settings and the text/concept embeddings.

    job = pipe.prepare("a photo of a cat", editing_prompt=["smiling"], num_inference_steps=20, seed=0)
    loop = gradients.loop_function(pipe, job)          # (params, context) -> final latents (B, 4, h, w)
    grads = jax.grad(lambda p: loss(loop(p, job.context)))(job.params)

`job.params` is a `guidance.EditParams` of arrays (edit_guidance_scale, edit_threshold, ... per concept),
`job.context` the embeddings (uncond, text, concept 0, ...); both are differentiable inputs. Each step is
rematerialised (`jax.checkpoint`): the backward pass keeps one carry per step (latents, momentum and the
scheduler's state) and recomputes the UNet's activations, so memory grows by the carry per step, not by a
UNet forward's activations. `fit_edit_scales` is the README's example: optax fits per-concept edit
scales so that the final latents approach a target.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sega_jax.core.guidance import EditParams
from sega_jax.core.sampler import sega_sample
from sega_jax.pipelines.base import DenoiseJob, denoiser


def loop_function(pipe, job: DenoiseJob, *,
                  remat: bool = True) -> Callable[[EditParams, jax.Array], jax.Array]:
    """The job's SEGA loop as a pure function (params, context) -> final latents (B, 4, h, w) float32
    (the latents `output_type="latent"` returns), differentiable with `jax.grad`; the UNet's weights, the
    noise and the schedule are closed over as constants."""
    if job.scheduler is not None or job.step_uncond is not None:
        raise ValueError("loop_function: a job from an inversion is not supported (its own scheduler)")
    graph, state = pipe.unet_parts
    scheduler = pipe.scheduler

    def loop(params: EditParams, context: jax.Array) -> jax.Array:
        unet = denoiser(nnx.merge(graph, state))
        out = sega_sample(unet, scheduler, job.schedule, job.noise, context, params,
                          num_concepts=job.num_concepts, do_cfg=job.do_cfg, image_keys=job.image_keys,
                          eta=job.eta, replay=job.replay, shared_latents=True, remat=remat)
        return jnp.transpose(out.latents, (0, 3, 1, 2))

    return loop


def fit_edit_scales(pipe, job: DenoiseJob, target: jax.Array, *, steps: int = 20,
                    learning_rate: float = 0.5) -> tuple[jax.Array, list[float]]:
    """Fits the job's per-concept `edit_guidance_scale` with Adam so that the final latents approach
    `target` (B, 4, h, w) in mean squared error; returns (the fitted scales, the loss at each step)."""
    loop = loop_function(pipe, job)

    @jax.jit
    def loss_and_grad(scales):
        def loss(s):
            return jnp.mean((loop(job.params._replace(edit_guidance_scale=s), job.context) - target) ** 2)

        return jax.value_and_grad(loss)(scales)

    optimizer = optax.adam(learning_rate)
    scales = jnp.asarray(job.params.edit_guidance_scale, jnp.float32)
    opt_state, losses = optimizer.init(scales), []
    for _ in range(steps):
        value, grad = loss_and_grad(scales)
        updates, opt_state = optimizer.update(grad, opt_state, scales)
        scales = optax.apply_updates(scales, updates)
        losses.append(float(value))
    return scales, losses
