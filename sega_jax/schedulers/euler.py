"""Euler (Karras et al. 2022, Algorithm 2 without churn) as diffusers' `EulerDiscreteScheduler`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .base import (
    SchedulerBase,
    StepIndex,
    _check,
    alphas_cumprod,
    div,
    f32,
    interpolated_sigmas,
    karras_sigmas,
    predict_x0,
    sigma_coefficients,
    sigma_init_noise,
    sigma_to_t,
)


class EulerSchedule(NamedTuple):
    timesteps: jax.Array  # (N,) float32, fractional like diffusers'
    init_noise_sigma: jax.Array
    sigmas: jax.Array  # (N + 1,) float32
    input_scale: jax.Array  # (N,) sqrt(sigma^2 + 1)
    c_out: jax.Array  # (N,)
    s2p1: jax.Array  # (N,)


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(SchedulerBase):
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    sigma_min: float | None = None  # overrides the Karras range ends, as in diffusers
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    _FIXED: ClassVar[dict[str, tuple]] = {
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "rescale_betas_zero_snr": (False, None),
    }
    _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample", "original_sample")

    def _validate(self) -> None:
        name = type(self).__name__
        _check(name, "interpolation_type", self.interpolation_type, ("linear",))
        _check(name, "use_karras_sigmas", self.use_karras_sigmas, (True, False))
        _check(name, "timestep_type", self.timestep_type, ("discrete", "continuous"))
        _check(name, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        for key in ("sigma_min", "sigma_max"):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
            ):
                raise ValueError(f"{name}: config value {key}={value!r} must be a positive number or None")

    def set_timesteps(self, num_inference_steps: int) -> EulerSchedule:
        self.check_num_steps(num_inference_steps)
        timesteps, sigmas, log_sigmas = interpolated_sigmas(self, num_inference_steps)
        if self.use_karras_sigmas:
            lo = self.sigma_min if self.sigma_min is not None else sigmas[-1].item()
            hi = self.sigma_max if self.sigma_max is not None else sigmas[0].item()
            sigmas = karras_sigmas(lo, hi, num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        if self.final_sigmas_type == "sigma_min":
            ac0 = alphas_cumprod(self)[0]
            last = float(np.sqrt((np.float32(1.0) - ac0) / ac0))
        else:
            last = 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            timesteps = np.float32(0.25) * np.log(sigmas[:-1])
        return EulerSchedule(
            timesteps=jnp.asarray(np.asarray(timesteps, np.float32)),
            init_noise_sigma=f32(sigma_init_noise(self, sigmas)),
            **sigma_coefficients(sigmas),
        )

    def init_state(self, schedule: EulerSchedule, sample_shape: tuple[int, ...], dtype: Any) -> tuple:
        return ()

    def scale_model_input(
        self, schedule: EulerSchedule, sample: jax.Array, step_index: StepIndex
    ) -> jax.Array:
        return div(sample.astype(jnp.float32), schedule.input_scale[step_index]).astype(sample.dtype)

    def step(
        self,
        schedule: EulerSchedule,
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
        i = step_index
        sigma = schedule.sigmas[i]  # s_churn = 0 (diffusers' default), so sigma_hat == sigma
        x0 = predict_x0(self.prediction_type, x, e, sigma, schedule.c_out[i], schedule.s2p1[i])
        derivative = div(x - x0, sigma)
        prev = x + derivative * (schedule.sigmas[i + 1] - sigma)
        return prev.astype(sample.dtype), state
