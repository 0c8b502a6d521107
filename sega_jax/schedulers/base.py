"""Shared pieces of the functional schedulers: config handling, beta/sigma schedules, noise.

Every scheduler is a frozen dataclass holding only configuration (hashable, so it can be a static jit
argument). `set_timesteps` computes a `Schedule` (a NamedTuple of arrays) once on the host;
`scale_model_input` and `step` are pure functions of that schedule, a fixed-shape state pytree and a possibly
traced step index. Host-side arithmetic mirrors diffusers' float32 torch arithmetic op for op, so schedules
agree with diffusers to the last bit where possible.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

_REGISTRY: list[type[SchedulerBase]] = []
S = TypeVar("S", bound="SchedulerBase")
StepIndex = int | jax.Array  # a Python int, or a traced int32 scalar inside jit / scan


def _matches(value: Any, allowed: Any) -> bool:
    # Flags compare by identity so that 1 is not taken for True.
    if isinstance(value, bool) or isinstance(allowed, bool) or value is None or allowed is None:
        return value is allowed
    return value == allowed


def _check(cls_name: str, key: str, value: Any, allowed: tuple) -> None:
    if not any(_matches(value, a) for a in allowed):
        raise ValueError(f"{cls_name}: unsupported config value {key}={value!r}; supported: {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class SchedulerBase:
    """Configuration keys common to all supported diffusers schedulers (defaults are diffusers')."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    # Keys of the diffusers class that we only implement at one value: key -> accepted values.
    _FIXED: ClassVar[dict[str, tuple]] = {}
    # Keys of the diffusers class that cannot change our math (listed so nothing is ignored by accident).
    _IGNORED: ClassVar[frozenset[str]] = frozenset()
    _PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY.append(cls)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.trained_betas is not None:
            betas = tuple(float(b) for b in self.trained_betas)
            object.__setattr__(self, "trained_betas", betas)
            if len(betas) != self.num_train_timesteps:
                raise ValueError(
                    f"{name}: trained_betas has {len(betas)} entries but num_train_timesteps="
                    f"{self.num_train_timesteps}"
                )
        else:
            _check(name, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        for key, minimum in (("num_train_timesteps", 1), ("steps_offset", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: config value {key}={value!r} must be an integer >= {minimum}")
        _check(name, "prediction_type", self.prediction_type, self._PREDICTION_TYPES)
        _check(name, "timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        self._validate()

    def _validate(self) -> None:
        """Per-scheduler checks of the remaining fields."""

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any]) -> S:
        """Build from a diffusers `scheduler_config.json` dict, as `XScheduler.from_config` does.

        Keys starting with "_" and keys that belong only to other schedulers are ignored (diffusers ignores
        them too when a config is swapped onto another class); unsupported values raise ValueError.
        """
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        defaults = set(config.get("_use_default_values") or ())  # keys the original config did not give
        for key, value in config.items():
            if key.startswith("_") or key in defaults:
                continue
            if key in own:
                if value is None and isinstance(cls.__dataclass_fields__[key].default, bool):
                    value = False  # diffusers types some flags `bool | None`
                kwargs[key] = value
            elif key in cls._FIXED:
                _check(cls.__name__, key, value, cls._FIXED[key])
            elif key not in cls._IGNORED and key not in known_config_keys():
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"{cls.__name__}.from_config ignores unknown config keys {sorted(unknown)}", stacklevel=2
            )
        if isinstance(kwargs.get("trained_betas"), (list, np.ndarray)):
            kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
        scheduler = cls(**kwargs)
        # As diffusers: remember which keys took this class's defaults, so that a swap onto another class
        # (`scheduler_from_name`) takes that class's defaults for them (SD 1.5's config has no
        # timestep_spacing: DDIM/PNDM default to "leading", LMS/Euler/DPM-Solver to "linspace").
        object.__setattr__(scheduler, "_use_default_values", tuple(sorted(own - kwargs.keys())))
        return scheduler

    @property
    def config(self) -> dict[str, Any]:
        """The configuration as a diffusers-style dict (with `_class_name`)."""
        cfg = {"_class_name": type(self).__name__, **dataclasses.asdict(self)}
        if cfg["trained_betas"] is not None:
            cfg["trained_betas"] = list(cfg["trained_betas"])
        if getattr(self, "_use_default_values", None):
            cfg["_use_default_values"] = list(self._use_default_values)
        return cfg

    # ---- host-side schedule helpers -------------------------------------------------------------------
    def alphas_cumprod(self) -> np.ndarray:
        return alphas_cumprod(self)

    def check_num_steps(self, num_inference_steps: int) -> None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps="
                f"{self.num_train_timesteps}]"
            )


def known_config_keys() -> frozenset[str]:
    """Every config key some supported scheduler knows (fields, fixed and ignored keys)."""
    keys: set[str] = set()
    for cls in _REGISTRY:
        keys |= {f.name for f in dataclasses.fields(cls)} | set(cls._FIXED) | cls._IGNORED
    return frozenset(keys)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` on CPU, bit for bit.

    torch computes `start + step * i` below the halfway point and `end - step * (steps - 1 - i)` above it in
    float32 with fused multiply-adds; `np.linspace` differs in the last ulp for about a third of the betas.
    The float64 evaluation of the exact product followed by one rounding reproduces the FMA.
    """
    if steps == 1:
        return np.array([start], np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    i = np.arange(steps)
    lo = np.float64(start32) + np.float64(step) * i.astype(np.float32).astype(np.float64)
    hi = np.float64(end32) - np.float64(step) * (steps - 1 - i).astype(np.float32).astype(np.float64)
    return np.where(i < steps // 2, lo, hi).astype(np.float32)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(
            1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps),
            max_beta,
        )
        for i in range(num_diffusion_timesteps)
    ]
    return np.asarray(betas, np.float64).astype(np.float32)


def betas(cfg: SchedulerBase) -> np.ndarray:
    """float32 betas exactly as diffusers builds them (torch float32 on CPU)."""
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, np.float64).astype(np.float32)
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
    if cfg.beta_schedule == "scaled_linear":
        b = torch_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n)
        return b * b
    return _betas_for_alpha_bar(n)


def alphas_cumprod(cfg: SchedulerBase) -> np.ndarray:
    alphas = np.float32(1.0) - betas(cfg)
    # torch.cumprod on CPU accumulates float32 in double, then rounds each entry.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """((1 - a) / a) ** 0.5 in float32, ascending in t."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def spaced_timesteps(cfg: SchedulerBase, n: int, round_linspace: bool) -> np.ndarray:
    """Descending float64 timesteps for `timestep_spacing` as DDIM/LMS/Euler compute them.

    "linspace" is rounded by DDIM and PNDM, left fractional by LMS and Euler; "leading" adds
    `steps_offset`; "trailing" ignores it (as diffusers does).
    """
    t_train = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, t_train - 1, n)
        ts = ts.round() if round_linspace else ts
        return ts[::-1].copy()
    if cfg.timestep_spacing == "leading":
        ratio = t_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + cfg.steps_offset
    ratio = t_train / n
    return np.round(np.arange(t_train, 0, -ratio)) - 1


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma by log-linear interpolation (diffusers `_sigma_to_t`).

    One sigma at a time, as diffusers calls it: numpy's vectorised float64 log can differ from the scalar one
    in the last ulp, which moves a float32 timestep.
    """
    return np.array([_sigma_to_t(sigma, log_sigmas) for sigma in sigmas])


def _sigma_to_t(sigma: np.floating, log_sigmas: np.ndarray) -> np.ndarray:
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas, float64, descending (diffusers `_convert_to_karras`)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def f32(x: np.ndarray | float) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float32))


def div(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a / b` for a scalar `b`, rounded as IEEE division like torch.

    XLA rewrites `a / broadcast(b)` into `a * broadcast(1 / b)`, which is an ulp off for about half of the
    elements; behind the barrier the divisor is an opaque full-size operand.
    """
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def get_noise(shape: tuple[int, ...], key: jax.Array | None, noise: jax.Array | None, who: str) -> jax.Array:
    """The injected noise, else standard normal noise drawn from `key` (float32)."""
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != tuple(shape):
            raise ValueError(
                f"{who}: noise has shape {noise.shape}, expected the sample's shape {tuple(shape)}"
            )
        return noise
    if key is None:
        raise ValueError(f"{who} needs noise: pass `key` (a jax.random key) or `noise` (an array)")
    return jax.random.normal(key, shape, jnp.float32)


# ---- k-diffusion style (sigma-parameterised) schedulers: LMS, Euler, Euler ancestral --------------------
def interpolated_sigmas(cfg: SchedulerBase, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 timesteps, float64 sigmas at them, float32 log training sigmas), as LMS/Euler compute them."""
    sigmas = train_sigmas(alphas_cumprod(cfg))
    timesteps = spaced_timesteps(cfg, n, round_linspace=False).astype(np.float32)
    return timesteps, np.interp(timesteps, np.arange(0, len(sigmas)), sigmas), np.log(sigmas)


def sigma_init_noise(cfg: SchedulerBase, sigmas: np.ndarray) -> np.float32:
    """diffusers' `init_noise_sigma` property of the sigma schedulers."""
    max_sigma = sigmas.max()
    if cfg.timestep_spacing in ("linspace", "trailing"):
        return max_sigma
    return np.sqrt(max_sigma * max_sigma + np.float32(1.0))


def sigma_coefficients(sigmas: np.ndarray) -> dict[str, jax.Array]:
    """Per-step float32 scalars for `scale_model_input` and the x0 prediction (sigmas: (N + 1,) float32)."""
    s = sigmas[:-1]
    s2p1 = s * s + np.float32(1.0)
    return {
        "sigmas": f32(sigmas),
        "input_scale": f32(np.sqrt(s2p1)),
        "c_out": f32(-s / np.sqrt(s2p1)),
        "s2p1": f32(s2p1),
    }


def predict_x0(
    prediction_type: str, x: jax.Array, e: jax.Array, sigma: jax.Array, c_out: jax.Array, s2p1: jax.Array
) -> jax.Array:
    """Denoised estimate from the model output as LMS/Euler write it; c_out = -sigma / sqrt(sigma^2 + 1)."""
    if prediction_type == "epsilon":
        return x - sigma * e
    if prediction_type == "v_prediction":
        return e * c_out + div(x, s2p1)
    return e
