"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., arXiv 2304.06140), as LEDITS++ uses it.

diffusers' `LEditsPPPipelineStableDiffusion.invert` step for step: the photo's latents x0 are noised to
every timestep independently (`add_noise` with fresh noise per timestep), then, from the noisiest down,
each x_{t-1} is explained as the scheduler's mean from x_t plus its noise std times a noise map z_t
(`z = (x_{t-1} - mu(x_t)) / std`). Replaying the scheduler with those z as its variance noise reproduces
the photo; editing changes the noise prediction and keeps the z.

Two schedulers, as in the reference: DPM-Solver++ 2M SDE (`sde-dpmsolver++`, order 2, the default) and
DDIM with eta = 1. All per-step scalars are computed once on the host in float32, op for op as diffusers
computes them; the loops are pure functions of an `eps(latents, t) -> noise` and arrays (NHWC latents).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sega_jax.schedulers import DDIMScheduler, DPMSolverMultistepScheduler, scheduler_from_name
from sega_jax.schedulers.base import div

Array = jax.Array


class EditSchedule(NamedTuple):
    """Per-step float32 scalars of the N inversion/edit timesteps (the last N of the full schedule).

    mean(x, eps) = c_x * x + c_0 * m0 (+ c_1 * inv_r0 * (m0 - m1) at order 2), m = the x0 prediction
    (x - sigma_s * eps) / alpha_s; DDIM is order 1 with m0 := x0 and an extra `c_eps * eps` term.
    """

    timesteps: Array  # (N,) int32, descending
    add_alpha: Array  # (N,) add_noise: alpha_t * x0 + sigma_t * noise at each timestep
    add_sigma: Array
    alpha_s: Array
    sigma_s: Array
    c_x: Array
    c_0: Array
    c_1: Array
    c_eps: Array
    inv_r0: Array
    std: Array  # (N,) the noise std (0 at a final zero sigma)
    order_invert: Array  # (N,) int32: the reference's inversion uses order 1 first, then order 2
    order_edit: Array  # (N,) int32: its scheduler.step during editing (lower-order final steps)


def ledits_scheduler(scheduler: Any) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """The scheduler LEDITS++ runs: DDIM stays DDIM (clip_sample off, as the reference forces); anything
    else becomes DPM-Solver++ 2M SDE on the same config, as diffusers' `LEditsPPPipeline*.__init__` does.
    Both with "leading" spacing (the reference's `invert` sets it)."""
    if scheduler.prediction_type != "epsilon":
        raise NotImplementedError(f"LEDITS++ inversion supports prediction_type='epsilon' only, got "
                                  f"{scheduler.prediction_type!r}")
    if isinstance(scheduler, DDIMScheduler):
        return dataclasses.replace(scheduler, clip_sample=False, timestep_spacing="leading")
    if isinstance(scheduler, DPMSolverMultistepScheduler):  # ours is `dpmsolver++`; the SDE variant is here
        return dataclasses.replace(scheduler, solver_order=2, timestep_spacing="leading")
    dpm = scheduler_from_name("DPMSolverMultistepScheduler", scheduler.config)
    return dataclasses.replace(dpm, solver_order=2, timestep_spacing="leading")


def edit_schedule(scheduler: DDIMScheduler | DPMSolverMultistepScheduler, num_inversion_steps: int,
                  skip: float) -> EditSchedule:
    """The full schedule has int(N * (1 + skip)) steps; inversion and editing run its last N."""
    full = int(num_inversion_steps * (1 + skip))
    if isinstance(scheduler, DDIMScheduler):
        return _ddim_schedule(scheduler, full, num_inversion_steps)
    return _sde_dpm_schedule(scheduler, full, num_inversion_steps)


def _ddim_schedule(scheduler: DDIMScheduler, full: int, n: int) -> EditSchedule:
    s = scheduler.set_timesteps(full)
    ac = scheduler.alphas_cumprod()
    ts = np.asarray(s.timesteps)[-n:]
    take = lambda a: np.asarray(a, np.float32)[-n:]
    one = np.float32(1.0)
    std = np.sqrt(take(s.variance))  # eta = 1
    return EditSchedule(
        timesteps=jnp.asarray(ts, jnp.int32),
        add_alpha=_f32(ac[ts] ** np.float32(0.5)), add_sigma=_f32((one - ac[ts]) ** np.float32(0.5)),
        alpha_s=_f32(take(s.sqrt_alpha)), sigma_s=_f32(take(s.sqrt_beta)), c_x=_f32(np.zeros(n)),
        c_0=_f32(take(s.sqrt_alpha_prev)), c_1=_f32(np.zeros(n)),
        c_eps=_f32(np.sqrt(take(s.beta_prev) - std * std)), inv_r0=_f32(np.zeros(n)), std=_f32(std),
        order_invert=jnp.ones(n, jnp.int32), order_edit=jnp.ones(n, jnp.int32),
    )


def _sde_dpm_schedule(scheduler: DPMSolverMultistepScheduler, full: int, n: int) -> EditSchedule:
    timesteps, sigmas = scheduler.timesteps_and_sigmas(full)
    orders = scheduler.solver_orders(len(timesteps))
    start = len(timesteps) - n
    one = np.float32(1.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alpha = one / np.sqrt(sigmas * sigmas + one)
        sig = sigmas * alpha
        lam = np.log(alpha) - np.log(sig)
        idx = np.arange(start, len(timesteps))
        h = lam[idx + 1] - lam[idx]
        r0 = (lam[idx] - lam[np.maximum(idx - 1, 0)]) / h
        em2h = one - np.exp(np.float32(-2.0) * h)
        c_0 = alpha[idx + 1] * em2h
        c_1 = np.float32(0.5) * c_0 if scheduler.solver_type == "midpoint" else \
            alpha[idx + 1] * (em2h / (np.float32(-2.0) * h) + one)
        inv_r0 = np.where(idx > start, one / r0, 0)
        inv_r0 = np.where(np.isfinite(inv_r0), inv_r0, 0)  # unused where infinite (order 1), see below
        order_edit = np.where(idx == start, 1, np.minimum(orders[idx], 2))
    return EditSchedule(
        timesteps=jnp.asarray(timesteps[start:], jnp.int32),
        add_alpha=_f32(alpha[idx]), add_sigma=_f32(sig[idx]),
        alpha_s=_f32(alpha[idx]), sigma_s=_f32(sig[idx]),
        c_x=_f32(sig[idx + 1] / sig[idx] * np.exp(-h)), c_0=_f32(c_0), c_1=_f32(c_1),
        c_eps=_f32(np.zeros(n)), inv_r0=_f32(inv_r0),
        std=_f32(sig[idx + 1] * np.sqrt(em2h)),
        order_invert=jnp.asarray(np.where(idx == start, 1, 2), jnp.int32),
        order_edit=jnp.asarray(order_edit, jnp.int32),
    )


def _f32(x) -> Array:
    return jnp.asarray(np.asarray(x, np.float32))


def step_mean(s: EditSchedule, i: Array, x: Array, eps: Array, previous: Array,
              order: Array) -> tuple[Array, Array]:
    """(the scheduler's mean for x_{t-1}, the x0 prediction kept for the next step's order-2 update)."""
    x, eps = x.astype(jnp.float32), eps.astype(jnp.float32)
    m0 = div(x - s.sigma_s[i] * eps, s.alpha_s[i])
    first = s.c_x[i] * x + s.c_0[i] * m0
    second = first + s.c_1[i] * (s.inv_r0[i] * (m0 - previous))
    mean = jnp.where(order == 2, second, first) + s.c_eps[i] * eps
    return mean, m0


def add_noise(s: EditSchedule, x0: Array, noise: Array) -> Array:
    """x0 (B, h, w, 4) noised to every timestep: (N, B, h, w, 4); noise[k] goes with timesteps[N-1-k]
    (the reference draws from the least noisy timestep up)."""
    rev = lambda a: a[::-1][:, None, None, None, None]
    return rev(s.add_alpha) * x0[None] + rev(s.add_sigma) * noise


def invert_loop(eps: Callable[[Array, Array], Array], s: EditSchedule, x0: Array,
                noise: Array) -> tuple[Array, Array, Array]:
    """The edit-friendly inversion: (init latents (B, h, w, 4), zs (N, ...) in editing order, xts (N+1,
    ...) in the reference's order: xts[0] the corrected x0 slot, xts[N] the init latents)."""
    noisy = add_noise(s, x0, noise)
    n = noisy.shape[0]
    targets = jnp.concatenate([noisy[:-1][::-1], x0[None]])  # x_{t-1} for each step, noisiest first

    def body(carry, xs):
        xt, previous = carry
        i, t, target = xs
        mean, m0 = step_mean(s, i, xt, eps(xt, t), previous, s.order_invert[i])
        std = s.std[i]
        z = jnp.where(std > 0, (target - mean) / jnp.where(std > 0, std, 1.0), 0.0)
        corrected = mean + std * z
        return (corrected, m0), (z, corrected)

    init = noisy[-1]
    _, (zs, corrected) = jax.lax.scan(body, (init, jnp.zeros_like(init)),
                                      (jnp.arange(n, dtype=jnp.int32), s.timesteps, targets))
    xts = jnp.concatenate([corrected[::-1], init[None]])
    return init, zs, xts


def edit_step(s: EditSchedule, i: Array, x: Array, eps: Array, previous: Array,
              z: Array) -> tuple[Array, Array]:
    """One editing step with the stored noise map: (x_{t-1}, the x0 prediction for the next step)."""
    mean, m0 = step_mean(s, i, x, eps, previous, s.order_edit[i])
    return mean + s.std[i] * z, m0


@dataclasses.dataclass
class LEditsPPInversion:
    """What `invert` found (arrays in diffusers' layouts) and how; pass it to the pipeline's `__call__`.

    `images` / `vae_reconstruction_images` are diffusers' `LEditsPPInversionPipelineOutput` fields.
    """

    init_latents: np.ndarray  # (B, 4, h, w)
    zs: np.ndarray  # (N, B, 4, h, w), in editing order (diffusers' `pipe.zs`)
    xts: np.ndarray  # (N + 1, B, 4, h, w), the reference's local `xts` after its corrections
    timesteps: np.ndarray  # (N,)
    images: list
    vae_reconstruction_images: list
    source_prompt: str
    source_guidance_scale: float
    num_inversion_steps: int
    skip: float
    schedule: EditSchedule = dataclasses.field(repr=False)
    scheduler: Any = dataclasses.field(repr=False)
    seed: int | None = None

    @property
    def batch_size(self) -> int:
        return int(self.init_latents.shape[0])
