"""Euler ancestral as diffusers' `EulerAncestralDiscreteScheduler`; noise from a JAX key or injected."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .base import (
    SchedulerBase,
    StepIndex,
    div,
    f32,
    get_noise,
    interpolated_sigmas,
    predict_x0,
    sigma_coefficients,
    sigma_init_noise,
)


class EulerAncestralSchedule(NamedTuple):
    timesteps: jax.Array  # (N,) float32
    init_noise_sigma: jax.Array
    sigmas: jax.Array  # (N + 1,) float32, last 0
    input_scale: jax.Array  # (N,)
    c_out: jax.Array  # (N,)
    s2p1: jax.Array  # (N,)
    sigma_up: jax.Array  # (N,) std of the fresh noise
    sigma_down: jax.Array  # (N,) the deterministic step's target


@dataclasses.dataclass(frozen=True)
class EulerAncestralDiscreteScheduler(SchedulerBase):
    _FIXED: ClassVar[dict[str, tuple]] = {"rescale_betas_zero_snr": (False, None)}

    def set_timesteps(self, num_inference_steps: int) -> EulerAncestralSchedule:
        self.check_num_steps(num_inference_steps)
        timesteps, sigmas, _ = interpolated_sigmas(self, num_inference_steps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        s_from, s_to = sigmas[:-1], sigmas[1:]
        sigma_up = np.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
        sigma_down = np.sqrt(s_to * s_to - sigma_up * sigma_up)
        return EulerAncestralSchedule(
            timesteps=jnp.asarray(timesteps, jnp.float32),
            init_noise_sigma=f32(sigma_init_noise(self, sigmas)),
            sigma_up=f32(sigma_up),
            sigma_down=f32(sigma_down),
            **sigma_coefficients(sigmas),
        )

    def init_state(
        self, schedule: EulerAncestralSchedule, sample_shape: tuple[int, ...], dtype: Any
    ) -> tuple:
        return ()

    def scale_model_input(
        self, schedule: EulerAncestralSchedule, sample: jax.Array, step_index: StepIndex
    ) -> jax.Array:
        return div(sample.astype(jnp.float32), schedule.input_scale[step_index]).astype(sample.dtype)

    def step(
        self,
        schedule: EulerAncestralSchedule,
        state: tuple,
        model_output: jax.Array,
        step_index: StepIndex,
        sample: jax.Array,
        *,
        eta: float | jax.Array = 0.0,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple]:
        """One ancestral step. diffusers draws noise at every step (also the last, where sigma_up is 0), so
        `key` or `noise` is always required."""
        x, e = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        i = step_index
        sigma = schedule.sigmas[i]
        x0 = predict_x0(self.prediction_type, x, e, sigma, schedule.c_out[i], schedule.s2p1[i])
        derivative = div(x - x0, sigma)
        prev = x + derivative * (schedule.sigma_down[i] - sigma)
        z = get_noise(x.shape, key, noise, "EulerAncestralDiscreteScheduler.step")
        return (prev + z * schedule.sigma_up[i]).astype(sample.dtype), state
