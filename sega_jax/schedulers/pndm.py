"""PNDM (Liu et al. 2022) as diffusers' `PNDMScheduler`: PLMS, with the Runge-Kutta warm-up unless
`skip_prk_steps`.

diffusers drives PNDM by a counter and a growing list of past outputs; both depend only on the step index, so
the host precomputes which update rule each step uses (`mode`) and the state is a fixed-size history.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .base import SchedulerBase, StepIndex, _check, div, f32, spaced_timesteps

# Update rules, in diffusers' step_plms / step_prk order.
PLMS_FIRST, PLMS_SECOND, PLMS_2, PLMS_3, PLMS_4, PRK_FIRST, PRK_MID, PRK_LAST = range(8)


class PNDMSchedule(NamedTuple):
    timesteps: jax.Array  # (len,) int32; N + 1 with skip_prk_steps, N + 9 without
    init_noise_sigma: jax.Array
    mode: jax.Array  # (len,) int32, one of the update rules above
    sample_coeff: jax.Array  # (len,) sqrt(alpha_prev / alpha)
    alpha_diff: jax.Array  # (len,) alpha_prev - alpha
    denom: jax.Array  # (len,) alpha * sqrt(beta_prev) + sqrt(alpha * beta * alpha_prev)
    sqrt_alpha: jax.Array  # (len,) for v_prediction
    sqrt_beta: jax.Array  # (len,)


class PNDMState(NamedTuple):
    ets: jax.Array  # (4, *shape) past model outputs, newest last
    cur_sample: jax.Array  # sample at the start of the current PRK step / first PLMS step
    cur_model_output: jax.Array  # PRK accumulator


@dataclasses.dataclass(frozen=True)
class PNDMScheduler(SchedulerBase):
    timestep_spacing: str = "leading"
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False

    def _validate(self) -> None:
        for key in ("skip_prk_steps", "set_alpha_to_one"):
            _check(type(self).__name__, key, getattr(self, key), (True, False))

    def _plan(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Timesteps, and per step the (timestep, prev_timestep) used for alphas and the update rule."""
        ratio = self.num_train_timesteps // n
        base = spaced_timesteps(self, n, round_linspace=True)[::-1].astype(np.int64)  # ascending
        if self.skip_prk_steps:
            prk = np.array([], np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            if n < 4:
                raise ValueError("PNDMScheduler with skip_prk_steps=False needs num_inference_steps >= 4")
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1]
            plms = base[:-3][::-1]
        timesteps = np.concatenate([prk, plms]).astype(np.int64)
        cur, prev, mode = [], [], []
        n_ets = 0
        for counter, t in enumerate(timesteps):
            if counter < len(prk):
                prev.append(t - (0 if counter % 2 else ratio // 2))
                cur.append(prk[counter // 4 * 4])
                r = counter % 4
                mode.append(PRK_FIRST if r == 0 else PRK_LAST if r == 3 else PRK_MID)
                n_ets += r == 0
                continue
            if counter != 1:
                n_ets = min(n_ets, 3) + 1
                cur.append(t)
                prev.append(t - ratio)
            else:  # diffusers' second PLMS step re-evaluates the first interval
                cur.append(t + ratio)
                prev.append(t)
            if n_ets == 1:
                mode.append(PLMS_FIRST if counter == 0 else PLMS_SECOND)
            else:
                mode.append({2: PLMS_2, 3: PLMS_3, 4: PLMS_4}[n_ets])
        return timesteps, np.array(cur), np.array(prev), np.array(mode)

    def set_timesteps(self, num_inference_steps: int) -> PNDMSchedule:
        self.check_num_steps(num_inference_steps)
        timesteps, cur, prev, mode = self._plan(num_inference_steps)
        ac = self.alphas_cumprod()
        if cur.max() >= len(ac):
            raise ValueError(f"steps_offset={self.steps_offset} pushes a timestep past num_train_timesteps")
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        alpha = ac[cur]
        alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        beta, beta_prev = np.float32(1.0) - alpha, np.float32(1.0) - alpha_prev
        denom = alpha * np.sqrt(beta_prev) + np.sqrt(alpha * beta * alpha_prev)
        return PNDMSchedule(
            timesteps=jnp.asarray(timesteps, jnp.int32),
            init_noise_sigma=f32(1.0),
            mode=jnp.asarray(mode, jnp.int32),
            sample_coeff=f32(np.sqrt(alpha_prev / alpha)),
            alpha_diff=f32(alpha_prev - alpha),
            denom=f32(denom),
            sqrt_alpha=f32(np.sqrt(alpha)),
            sqrt_beta=f32(np.sqrt(beta)),
        )

    def init_state(self, schedule: PNDMSchedule, sample_shape: tuple[int, ...], dtype: Any) -> PNDMState:
        zeros = jnp.zeros(sample_shape, jnp.float32)  # history is kept in float32 whatever the sample dtype
        return PNDMState(jnp.zeros((4, *sample_shape), jnp.float32), zeros, zeros)

    def scale_model_input(
        self, schedule: PNDMSchedule, sample: jax.Array, step_index: StepIndex
    ) -> jax.Array:
        return sample

    def step(
        self,
        schedule: PNDMSchedule,
        state: PNDMState,
        model_output: jax.Array,
        step_index: StepIndex,
        sample: jax.Array,
        *,
        eta: float | jax.Array = 0.0,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, PNDMState]:
        x, e = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        combined, x_used, state = jax.lax.switch(schedule.mode[step_index], _RULES, state, e, x)
        if self.prediction_type == "v_prediction":
            combined = schedule.sqrt_alpha[step_index] * combined + schedule.sqrt_beta[step_index] * x_used
        prev = schedule.sample_coeff[step_index] * x_used - div(
            schedule.alpha_diff[step_index] * combined, schedule.denom[step_index]
        )
        return prev.astype(sample.dtype), state


def _push(ets: jax.Array, e: jax.Array) -> jax.Array:
    return jnp.concatenate([ets[1:], e[None]])


# Each rule: (state, model_output, sample) -> (combined output, sample to step from, new state).
# The arithmetic is written exactly as in diffusers' step_plms / step_prk.
def _plms_first(s: PNDMState, e: jax.Array, x: jax.Array) -> tuple:
    return e, x, s._replace(ets=_push(s.ets, e), cur_sample=x)


def _plms_second(s: PNDMState, e: jax.Array, x: jax.Array) -> tuple:
    return (e + s.ets[-1]) / 2, s.cur_sample, s


def _plms_2(s: PNDMState, e: jax.Array, x: jax.Array) -> tuple:
    ets = _push(s.ets, e)
    return (3 * ets[-1] - ets[-2]) / 2, x, s._replace(ets=ets)


def _plms_3(s: PNDMState, e: jax.Array, x: jax.Array) -> tuple:
    ets = _push(s.ets, e)
    return div(23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3], 12.0), x, s._replace(ets=ets)


def _plms_4(s: PNDMState, e: jax.Array, x: jax.Array) -> tuple:
    ets = _push(s.ets, e)
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]), x, s._replace(ets=ets)


def _prk_first(s: PNDMState, e: jax.Array, x: jax.Array) -> tuple:
    acc = s.cur_model_output + 1 / 6 * e
    return e, x, PNDMState(ets=_push(s.ets, e), cur_sample=x, cur_model_output=acc)


def _prk_mid(s: PNDMState, e: jax.Array, x: jax.Array) -> tuple:
    return e, s.cur_sample, s._replace(cur_model_output=s.cur_model_output + 1 / 3 * e)


def _prk_last(s: PNDMState, e: jax.Array, x: jax.Array) -> tuple:
    combined = s.cur_model_output + 1 / 6 * e
    return combined, s.cur_sample, s._replace(cur_model_output=jnp.zeros_like(e))


_RULES = (_plms_first, _plms_second, _plms_2, _plms_3, _plms_4, _prk_first, _prk_mid, _prk_last)
