"""DPM-Solver++ multistep (Lu et al. 2022) as diffusers' `DPMSolverMultistepScheduler` with
`algorithm_type="dpmsolver++"`: orders 1-3, midpoint/heun, Karras sigmas, `final_sigmas_type`,
`lower_order_final`, `euler_at_final`.

The order used at each step depends only on the step index, so it is precomputed on the host together with all
scalar coefficients (in float32, op for op as diffusers computes them).
"""

from __future__ import annotations

import dataclasses
import math
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
    karras_sigmas,
    sigma_to_t,
    train_sigmas,
)


class DPMSolverSchedule(NamedTuple):
    timesteps: jax.Array  # (N,) int32
    init_noise_sigma: jax.Array
    order: jax.Array  # (N,) int32 in 1..solver_order
    sigmas: jax.Array  # (N + 1,) float32
    alpha_s: jax.Array  # (N,) alpha_t at the current sigma (for the x0 prediction)
    sigma_s: jax.Array  # (N,)
    ratio: jax.Array  # (N,) sigma_t / sigma_s0
    b: jax.Array  # (N,) alpha_t * (exp(-h) - 1)
    c1: jax.Array  # (N,) D1 coefficient (order 2: -0.5 * b for midpoint, heun/order 3 term otherwise)
    c2: jax.Array  # (N,) D2 coefficient (order 3)
    inv_r0: jax.Array  # (N,)
    inv_r1: jax.Array  # (N,)
    r0_frac: jax.Array  # (N,) r0 / (r0 + r1)
    inv_r01: jax.Array  # (N,) 1 / (r0 + r1)


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(SchedulerBase):
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf

    _FIXED: ClassVar[dict[str, tuple]] = {
        "thresholding": (False, None),
        "variance_type": (None,),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "use_lu_lambdas": (False, None),
        "use_flow_sigmas": (False, None),
        "rescale_betas_zero_snr": (False, None),
        "use_dynamic_shifting": (False, None),
    }
    # Only used by thresholding, flow sigmas or dynamic shifting, which are fixed off.
    _IGNORED: ClassVar[frozenset[str]] = frozenset(
        {"dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type"}
    )
    _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    def _validate(self) -> None:
        name = type(self).__name__
        _check(name, "solver_order", self.solver_order, (1, 2, 3))
        _check(name, "algorithm_type", self.algorithm_type, ("dpmsolver++",))
        _check(name, "solver_type", self.solver_type, ("midpoint", "heun"))
        _check(name, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        for key in ("lower_order_final", "euler_at_final", "use_karras_sigmas"):
            _check(name, key, getattr(self, key), (True, False))
        if isinstance(self.lambda_min_clipped, bool) or not isinstance(self.lambda_min_clipped, (int, float)):
            raise ValueError(
                f"{name}: config value lambda_min_clipped={self.lambda_min_clipped!r} must be a number"
            )

    def timesteps_and_sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        ac = alphas_cumprod(self)
        lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
        clipped_idx = np.searchsorted(lambda_t[::-1], self.lambda_min_clipped)
        last = self.num_train_timesteps - int(clipped_idx)
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            step_ratio = last // (n + 1)
            timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(
                np.int64
            ) + self.steps_offset
        else:
            timesteps = np.arange(last, 0, -self.num_train_timesteps / n).round().astype(np.int64) - 1
        sigmas = train_sigmas(ac)
        log_sigmas = np.log(sigmas)
        if self.use_karras_sigmas:
            flipped = sigmas[::-1]
            sigmas = karras_sigmas(flipped[-1].item(), flipped[0].item(), n)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if self.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        last_sigma = (
            float(np.sqrt((np.float32(1.0) - ac[0]) / ac[0])) if self.final_sigmas_type == "sigma_min" else 0
        )
        return timesteps.astype(np.int64), np.concatenate([sigmas, [last_sigma]]).astype(np.float32)

    def solver_orders(self, n: int) -> np.ndarray:
        orders = []
        for i in range(n):
            final = i == n - 1 and (
                self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
            )
            second = i == n - 2 and self.lower_order_final and n < 15
            if self.solver_order == 1 or i < 1 or final:
                orders.append(1)
            elif self.solver_order == 2 or i < 2 or second:
                orders.append(2)
            else:
                orders.append(3)
        return np.array(orders, np.int32)

    def set_timesteps(self, num_inference_steps: int) -> DPMSolverSchedule:
        self.check_num_steps(num_inference_steps)
        timesteps, sigmas = self.timesteps_and_sigmas(num_inference_steps)
        n = len(timesteps)
        order = self.solver_orders(n)
        one = np.float32(1.0)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            alpha = one / np.sqrt(sigmas * sigmas + one)
            sig = sigmas * alpha
            lam = np.log(alpha) - np.log(sig)  # +inf at a zero final sigma, as in torch
            idx = np.arange(n)
            lam_t, lam_s0 = lam[idx + 1], lam[idx]
            lam_s1, lam_s2 = lam[np.maximum(idx - 1, 0)], lam[np.maximum(idx - 2, 0)]
            h = lam_t - lam_s0
            r0, r1 = (lam_s0 - lam_s1) / h, (lam_s1 - lam_s2) / h
            alpha_t = alpha[idx + 1]
            em1 = np.exp(-h) - one
            b = alpha_t * em1
            heun = alpha_t * (em1 / h + one)
            c1 = np.where(
                order == 3, heun, -(np.float32(0.5) * b) if self.solver_type == "midpoint" else heun
            )
            c2 = -(alpha_t * ((np.exp(-h) - one + h) / (h * h) - np.float32(0.5)))
            coeffs = {
                "ratio": sig[idx + 1] / sig[idx],
                "b": b,
                "c1": c1,
                "c2": c2,
                "inv_r0": one / r0,
                "inv_r1": one / r1,
                "r0_frac": r0 / (r0 + r1),
                "inv_r01": one / (r0 + r1),
            }
        # Entries a step's order does not use may be inf/nan; zero them so nothing non-finite reaches jit.
        usage = {"c1": 2, "inv_r0": 2, "c2": 3, "inv_r1": 3, "r0_frac": 3, "inv_r01": 3}
        for name, needed in usage.items():
            coeffs[name] = np.where(order >= needed, coeffs[name], 0)
        return DPMSolverSchedule(
            timesteps=jnp.asarray(timesteps, jnp.int32),
            init_noise_sigma=f32(1.0),
            order=jnp.asarray(order),
            sigmas=f32(sigmas),
            alpha_s=f32(alpha[:-1]),
            sigma_s=f32(sig[:-1]),
            **{k: f32(v) for k, v in coeffs.items()},
        )

    def init_state(self, schedule: DPMSolverSchedule, sample_shape: tuple[int, ...], dtype: Any) -> jax.Array:
        """The last `solver_order` x0 predictions, newest last (float32 whatever the sample dtype)."""
        return jnp.zeros((self.solver_order, *sample_shape), jnp.float32)

    def scale_model_input(
        self, schedule: DPMSolverSchedule, sample: jax.Array, step_index: StepIndex
    ) -> jax.Array:
        return sample

    def step(
        self,
        schedule: DPMSolverSchedule,
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
        alpha_s, sigma_s = schedule.alpha_s[i], schedule.sigma_s[i]
        if self.prediction_type == "epsilon":
            x0 = div(x - sigma_s * e, alpha_s)
        elif self.prediction_type == "v_prediction":
            x0 = alpha_s * x - sigma_s * e
        else:
            x0 = e
        history = jnp.concatenate([state[1:], x0[None]])
        c = {name: getattr(schedule, name)[i] for name in _COEFFS}
        branches = (_first_order, _second_order, _third_order)[: self.solver_order]
        prev = jax.lax.switch(schedule.order[i] - 1, branches, c, history, x)
        return prev.astype(sample.dtype), history


_COEFFS = ("ratio", "b", "c1", "c2", "inv_r0", "inv_r1", "r0_frac", "inv_r01")


# The updates, written term by term as in diffusers' dpm_solver_*_order_update (dpmsolver++ branch).
def _first_order(c: dict, m: jax.Array, x: jax.Array) -> jax.Array:
    return c["ratio"] * x - c["b"] * m[-1]


def _second_order(c: dict, m: jax.Array, x: jax.Array) -> jax.Array:
    d1 = c["inv_r0"] * (m[-1] - m[-2])
    return c["ratio"] * x - c["b"] * m[-1] + c["c1"] * d1


def _third_order(c: dict, m: jax.Array, x: jax.Array) -> jax.Array:
    d1_0, d1_1 = c["inv_r0"] * (m[-1] - m[-2]), c["inv_r1"] * (m[-2] - m[-3])
    d1 = d1_0 + c["r0_frac"] * (d1_0 - d1_1)
    d2 = c["inv_r01"] * (d1_0 - d1_1)
    return c["ratio"] * x - c["b"] * m[-1] + c["c1"] * d1 + c["c2"] * d2
