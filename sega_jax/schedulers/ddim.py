"""DDIM (Song et al. 2020) as diffusers' `DDIMScheduler`, with eta noise from a JAX key or injected."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .base import SchedulerBase, StepIndex, _check, div, f32, get_noise, spaced_timesteps


class DDIMSchedule(NamedTuple):
    timesteps: jax.Array  # (N,) int32
    init_noise_sigma: jax.Array
    sqrt_alpha: jax.Array  # (N,) sqrt(alpha_prod_t)
    sqrt_beta: jax.Array  # (N,) sqrt(1 - alpha_prod_t)
    sqrt_alpha_prev: jax.Array  # (N,)
    beta_prev: jax.Array  # (N,) 1 - alpha_prod_t_prev
    variance: jax.Array  # (N,) DDIM sigma_t^2 at eta=1


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(SchedulerBase):
    timestep_spacing: str = "leading"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    _FIXED: ClassVar[dict[str, tuple]] = {
        "thresholding": (False, None),
        "rescale_betas_zero_snr": (False, None),
    }
    # Only used by dynamic thresholding, which is fixed off.
    _IGNORED: ClassVar[frozenset[str]] = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})
    _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    def _validate(self) -> None:
        for key in ("clip_sample", "set_alpha_to_one"):
            _check(type(self).__name__, key, getattr(self, key), (True, False))

    def set_timesteps(self, num_inference_steps: int) -> DDIMSchedule:
        self.check_num_steps(num_inference_steps)
        ac = self.alphas_cumprod()
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        timesteps = spaced_timesteps(self, num_inference_steps, round_linspace=True).astype(np.int64)
        # diffusers steps back by num_train // N whatever the spacing (also for trailing/linspace).
        if timesteps.max() >= len(ac):
            raise ValueError(f"steps_offset={self.steps_offset} pushes a timestep past num_train_timesteps")
        prev = timesteps - self.num_train_timesteps // num_inference_steps
        alpha = ac[timesteps]
        alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        beta, beta_prev = np.float32(1.0) - alpha, np.float32(1.0) - alpha_prev
        variance = (beta_prev / beta) * (np.float32(1.0) - alpha / alpha_prev)
        return DDIMSchedule(
            timesteps=jnp.asarray(timesteps, jnp.int32),
            init_noise_sigma=f32(1.0),
            sqrt_alpha=f32(np.sqrt(alpha)),
            sqrt_beta=f32(np.sqrt(beta)),
            sqrt_alpha_prev=f32(np.sqrt(alpha_prev)),
            beta_prev=f32(beta_prev),
            variance=f32(variance),
        )

    def init_state(self, schedule: DDIMSchedule, sample_shape: tuple[int, ...], dtype: Any) -> tuple:
        return ()

    def scale_model_input(
        self, schedule: DDIMSchedule, sample: jax.Array, step_index: StepIndex
    ) -> jax.Array:
        return sample

    def step(
        self,
        schedule: DDIMSchedule,
        state: tuple,
        model_output: jax.Array,
        step_index: StepIndex,
        sample: jax.Array,
        *,
        eta: float | jax.Array = 0.0,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple]:
        x, e = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        sqrt_a, sqrt_b = schedule.sqrt_alpha[step_index], schedule.sqrt_beta[step_index]
        if self.prediction_type == "epsilon":
            x0, eps = div(x - sqrt_b * e, sqrt_a), e
        elif self.prediction_type == "v_prediction":
            x0, eps = sqrt_a * x - sqrt_b * e, sqrt_a * e + sqrt_b * x
        else:
            x0 = e
            eps = div(x - sqrt_a * x0, sqrt_b)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        eta = jnp.asarray(eta, jnp.float32)
        std = eta * jnp.sqrt(schedule.variance[step_index])
        direction = jnp.sqrt(schedule.beta_prev[step_index] - std * std) * eps
        prev = schedule.sqrt_alpha_prev[step_index] * x0 + direction
        if key is not None or noise is not None or not _is_concrete_zero(eta):
            z = get_noise(x.shape, key, noise, "DDIMScheduler.step with eta != 0 (or traced eta)")
            prev = prev + jnp.where(eta > 0, std, 0.0) * z  # diffusers adds noise only when eta > 0
        return prev.astype(sample.dtype), state


def _is_concrete_zero(eta: jax.Array) -> bool:
    try:
        return float(eta) == 0.0
    except (jax.errors.ConcretizationTypeError, TypeError):
        return False
