"""Linear multistep (order 4) as diffusers' `LMSDiscreteScheduler`.

diffusers integrates each Lagrange basis polynomial with `scipy.integrate.quad`; the integrand is a
polynomial of degree < 4, so we integrate it exactly with numpy's polynomial tools on the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import polynomial as P

from .base import (
    SchedulerBase,
    StepIndex,
    _check,
    div,
    f32,
    interpolated_sigmas,
    karras_sigmas,
    predict_x0,
    sigma_coefficients,
    sigma_init_noise,
    sigma_to_t,
)

ORDER = 4


class LMSSchedule(NamedTuple):
    timesteps: jax.Array  # (N,) float32, fractional like diffusers'
    init_noise_sigma: jax.Array
    sigmas: jax.Array  # (N + 1,) float32, last 0
    input_scale: jax.Array  # (N,) sqrt(sigma^2 + 1)
    c_out: jax.Array  # (N,)
    s2p1: jax.Array  # (N,)
    lms_coeffs: jax.Array  # (N, 4): coefficient of the derivative k steps back, zero past the current order


def lms_coefficients(sigmas: np.ndarray, order: int = ORDER) -> np.ndarray:
    """(N, order) exact integrals of the Lagrange basis over [sigma_t, sigma_{t+1}] (diffusers'
    `get_lms_coefficient`), the current order being min(t + 1, order)."""
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    coeffs = np.zeros((n, order))
    for t in range(n):
        cur_order = min(t + 1, order)
        for j in range(cur_order):
            others = [s[t - k] for k in range(cur_order) if k != j]
            basis = P.polyfromroots(others) / np.prod([s[t - j] - o for o in others])
            antiderivative = P.polyint(basis)
            coeffs[t, j] = P.polyval(s[t + 1], antiderivative) - P.polyval(s[t], antiderivative)
    return coeffs


@dataclasses.dataclass(frozen=True)
class LMSDiscreteScheduler(SchedulerBase):
    use_karras_sigmas: bool = False

    _FIXED: ClassVar[dict[str, tuple]] = {
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
    }
    _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    def _validate(self) -> None:
        _check(type(self).__name__, "use_karras_sigmas", self.use_karras_sigmas, (True, False))

    def set_timesteps(self, num_inference_steps: int) -> LMSSchedule:
        self.check_num_steps(num_inference_steps)
        timesteps, sigmas, log_sigmas = interpolated_sigmas(self, num_inference_steps)
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas).astype(np.float32)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return LMSSchedule(
            timesteps=jnp.asarray(timesteps, jnp.float32),
            init_noise_sigma=f32(sigma_init_noise(self, sigmas)),
            lms_coeffs=f32(lms_coefficients(sigmas)),
            **sigma_coefficients(sigmas),
        )

    def init_state(self, schedule: LMSSchedule, sample_shape: tuple[int, ...], dtype: Any) -> jax.Array:
        """The last `ORDER` derivatives, newest first (float32 whatever the sample dtype)."""
        return jnp.zeros((ORDER, *sample_shape), jnp.float32)

    def scale_model_input(self, schedule: LMSSchedule, sample: jax.Array, step_index: StepIndex) -> jax.Array:
        scaled = div(sample.astype(jnp.float32), schedule.input_scale[step_index])
        return scaled.astype(sample.dtype)

    def step(
        self,
        schedule: LMSSchedule,
        state: jax.Array,
        model_output: jax.Array,
        step_index: StepIndex,
        sample: jax.Array,
        *,
        eta: float | jax.Array = 0.0,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        x, e = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        i = step_index
        sigma = schedule.sigmas[i]
        x0 = predict_x0(self.prediction_type, x, e, sigma, schedule.c_out[i], schedule.s2p1[i])
        derivatives = jnp.concatenate([div(x - x0, sigma)[None], state[:-1]])
        coeffs = schedule.lms_coeffs[i]
        update = coeffs[0] * derivatives[0]
        for k in range(1, ORDER):  # zero coefficients past the current order add exact zeros
            update = update + coeffs[k] * derivatives[k]
        return (x + update).astype(sample.dtype), derivatives
