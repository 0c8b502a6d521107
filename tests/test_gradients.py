"""Gradients through the SEGA loop (sega_jax.pipelines.gradients) on the tiny model: the loop function is the
pipeline's, `jax.grad` agrees with finite differences (edit scales and concept embeddings), remat keeps
memory flat in the number of steps, and optax fits edit scales to a target. No torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sega_jax import load_pipeline
from sega_jax.pipelines import gradients

PROMPT = "a photo of a face"
KW = dict(editing_prompt=["smiling", "glasses"], edit_warmup_steps=[1, 0], edit_threshold=[0.9, 0.5],
          edit_guidance_scale=[4.0, 3.0], num_inference_steps=4, height=32, width=32, seed=0)


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loop_function_gives_the_pipelines_latents(pipe):
    job = pipe.prepare(PROMPT, **KW)
    got = np.asarray(jax.jit(gradients.loop_function(pipe, job))(job.params, job.context))
    expected = np.asarray(pipe(PROMPT, output_type="latent", **KW).images)
    assert got.shape == expected.shape == (1, 4, 4, 4)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_grad_matches_finite_differences(pipe):
    job = pipe.prepare(PROMPT, **KW)
    loop = gradients.loop_function(pipe, job)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 4)), jnp.float32)
    direction = np.random.default_rng(1).standard_normal(job.context.shape[1:]).astype(np.float32)
    direction = jnp.asarray(direction / np.linalg.norm(direction))  # unit norm over (B, L, D)

    def loss(scales, eps):  # eps moves the first concept's embedding along `direction`
        context = job.context.at[2].add(eps * direction)
        return jnp.sum(loop(job.params._replace(edit_guidance_scale=scales), context) * w)

    scales = jnp.asarray([4.0, 3.0])
    grad_scales, grad_eps = jax.jit(jax.grad(loss, argnums=(0, 1)))(scales, 0.0)
    value = jax.jit(loss)
    # steps small enough that no quantile mask flips (0.1 on the scales flips one), large enough that
    # float32 rounding stays far below the differences
    h = 0.03
    fd_scales = np.array([(value(scales.at[k].add(h), 0.0) - value(scales.at[k].add(-h), 0.0)) / (2 * h)
                          for k in range(2)])
    fd_eps = (value(scales, 0.1) - value(scales, -0.1)) / 0.2
    print("d/d scales:", np.asarray(grad_scales), "finite differences:", fd_scales)
    print("d/d concept embedding:", float(grad_eps), "finite differences:", float(fd_eps))
    assert np.abs(np.asarray(grad_scales) - fd_scales).max() <= 1e-2 * np.abs(fd_scales).max()
    assert abs(float(grad_eps) - float(fd_eps)) <= 1e-2 * abs(float(fd_eps))
    assert np.abs(fd_scales).min() > 1e-3 and abs(float(fd_eps)) > 1e-3  # non-trivial gradients


def test_remat_keeps_memory_flat_in_the_number_of_steps(pipe):
    def temp_bytes(steps: int, remat: bool) -> int:
        job = pipe.prepare(PROMPT, **dict(KW, num_inference_steps=steps))
        loop = gradients.loop_function(pipe, job, remat=remat)
        total = lambda s: jnp.sum(loop(job.params._replace(edit_guidance_scale=s), job.context))
        grad = jax.jit(jax.grad(total))
        return grad.lower(jnp.asarray([4.0, 3.0])).compile().memory_analysis().temp_size_in_bytes

    plain = (temp_bytes(8, False) - temp_bytes(4, False)) / 4
    remat = (temp_bytes(8, True) - temp_bytes(4, True)) / 4
    print(f"backward-pass temporaries per extra step: {plain / 1e6:.2f} MB plain, {remat / 1e3:.1f} KB remat")
    # measured 3.4 MB plain (the UNet's activations) and ~0.5 KB with remat (latents + momentum: 2 x 256 B)
    assert remat <= 4096 and plain > 100 * max(remat, 1)


def test_optax_fits_edit_scales_to_a_target(pipe):
    target_job = pipe.prepare(PROMPT, **dict(KW, edit_guidance_scale=[2.0, 5.0]))
    target = gradients.loop_function(pipe, target_job)(target_job.params, target_job.context)
    job = pipe.prepare(PROMPT, **KW)  # starts at [4, 3]
    scales, losses = gradients.fit_edit_scales(pipe, job, target, steps=25, learning_rate=0.3)
    print("fitted scales", np.asarray(scales), "loss", losses[0], "->", losses[-1])
    assert losses[-1] < 0.05 * losses[0]
    assert np.abs(np.asarray(scales) - [2.0, 5.0]).max() < 0.5
