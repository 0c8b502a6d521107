"""Validation of the pipeline's arguments: every bad input is a clear error naming the argument.

Shared by every pipeline family: call `check_finite` first thing in `prepare` (before any text encoding or
compilation), `warn_ineffective_concepts` once the loop's step count is known, and raise
`non_finite_output(...)` when the result holds NaN/inf.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

PER_CONCEPT = (
    "edit_guidance_scale",
    "edit_threshold",
    "edit_warmup_steps",
    "edit_cooldown_steps",
    "reverse_editing_direction",
    "edit_weights",
)
OUTPUT_TYPES = ("pil", "np", "latent")


def prompt_list(prompt, name: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"`{name}` must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def negative_prompts(negative_prompt, prompt, batch_size: int) -> list[str]:
    """The reference's rules: same type as `prompt`, same length when a list."""
    if negative_prompt is None:
        return [""] * batch_size
    if type(prompt) is not type(negative_prompt):
        raise TypeError(
            f"`negative_prompt` should be the same type to `prompt`, but got "
            f"{type(negative_prompt).__name__} != {type(prompt).__name__}."
        )
    if isinstance(negative_prompt, str):
        return [negative_prompt]  # the reference uses one negative prompt for its single prompt
    negatives = prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != batch_size:
        raise ValueError(
            f"`negative_prompt` has batch size {len(negatives)}, but `prompt` has batch size "
            f"{batch_size}. Please make sure that passed `negative_prompt` matches the batch size "
            "of `prompt`."
        )
    return negatives


def check_int(value, name: str, *, minimum: int = 0, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def per_concept(name: str, value, num_concepts: int) -> list:
    """Broadcast a scalar to every concept; a list must have exactly one entry per concept."""
    if isinstance(value, (list, tuple, np.ndarray)):
        values = list(value)
        if len(values) != num_concepts:
            raise ValueError(
                f"`{name}` has {len(values)} entries but there are {num_concepts} editing "
                f"concepts; pass one value per concept or a single value"
            )
        return values
    return [value] * num_concepts


def edit_settings(
    num_concepts: int,
    *,
    edit_guidance_scale,
    edit_threshold,
    edit_warmup_steps,
    edit_cooldown_steps,
    reverse_editing_direction,
    edit_weights,
    edit_momentum_scale,
    edit_mom_beta,
) -> dict:
    """Validated per-concept lists (and scalars) ready for `EditParams.create`."""
    settings = {
        "edit_guidance_scale": [
            check_number(v, "edit_guidance_scale")
            for v in per_concept("edit_guidance_scale", edit_guidance_scale, num_concepts)
        ],
        "edit_threshold": [
            _unit(v, "edit_threshold") for v in per_concept("edit_threshold", edit_threshold, num_concepts)
        ],
        "edit_warmup_steps": [
            check_int(v, "edit_warmup_steps")
            for v in per_concept("edit_warmup_steps", edit_warmup_steps, num_concepts)
        ],
        "reverse_editing_direction": [
            _bool(v, "reverse_editing_direction")
            for v in per_concept(
                "reverse_editing_direction",
                bool(reverse_editing_direction)
                if reverse_editing_direction is None
                else reverse_editing_direction,
                num_concepts,
            )
        ],
        "edit_momentum_scale": check_number(
            0.0 if edit_momentum_scale is None else edit_momentum_scale, "edit_momentum_scale"
        ),
        "edit_mom_beta": check_number(0.0 if edit_mom_beta is None else edit_mom_beta, "edit_mom_beta"),
    }
    if edit_cooldown_steps is None:
        settings["edit_cooldown_steps"] = None
    else:
        settings["edit_cooldown_steps"] = [
            check_int(v, "edit_cooldown_steps")
            for v in per_concept("edit_cooldown_steps", edit_cooldown_steps, num_concepts)
        ]
    # The reference treats an empty or missing `edit_weights` as all ones (`if edit_weights:`).
    settings["edit_weights"] = (
        [check_number(v, "edit_weights") for v in per_concept("edit_weights", edit_weights, num_concepts)]
        if edit_weights is not None and len(edit_weights)
        else None
    )
    return settings


def check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    return float(value)


def _unit(value, name: str) -> float:
    value = check_number(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1] (it is a quantile), got {value!r}")
    return value


def _bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be a bool or a list of bools, got {value!r}")
    return bool(value)


def check_array(value, name: str, shape: Sequence[int]) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.shape != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)} (diffusers' layout), got {array.shape}")
    return array


def check_generator(generator) -> None:
    if generator is not None:
        raise TypeError(
            "`generator`: a torch.Generator cannot drive JAX's random numbers; pass `seed=` "
            "(an int) or `prng_key=` (a jax.random key) instead, or `latents=` for exact noise"
        )


# -- non-finite values: refused on the way in, explained on the way out ----------------------------------


def check_finite(**named) -> None:
    """ValueError naming the first argument (and entry) holding NaN or inf, as float32 sees it.

    Pass every float input by its argument name: scalars, per-concept lists, arrays (numpy, JAX, torch)
    and lists of arrays (`sem_guidance`). None, bools, strings and non-numeric values are left to the
    argument's own checks. Runs on the host: call it before any compilation.
    """
    for name, value in named.items():
        _check_finite(value, name)


def _check_finite(value, name: str) -> None:
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        return
    if isinstance(value, (list, tuple)):
        for index, entry in enumerate(value):
            _check_finite(entry, f"{name}[{index}]")
        return
    try:
        with np.errstate(over="ignore"):
            array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        return  # not numeric: the argument's own check reports it
    bad = ~np.isfinite(array)
    if not bad.any():
        return
    if array.ndim == 0:
        raise ValueError(f"`{name}` must be a finite number (in float32), got {value!r}")
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"`{name}` contains {int(bad.sum())} non-finite value(s) (NaN or inf in float32) out of "
        f"{array.size}, the first at index {first}; every input must be finite"
    )


def non_finite_output(latents_finite: bool, weight_dtypes: Iterable) -> FloatingPointError:
    """The error for NaN/inf in a result whose inputs were all checked finite: where it arose (the
    denoising loop, or the VAE decoder from finite latents) and whether float16 weights explain it."""
    floats = sorted({np.dtype(d).name for d in weight_dtypes} & {"float16", "bfloat16", "float32", "float64"})
    if latents_finite:
        where = "the VAE decoder turned finite latents into NaN/inf images"
    else:
        where = "the denoising loop (UNet and scheduler) produced NaN/inf latents"
    message = f"{where}, although every input was finite (they are checked before the loop)."
    if "float16" in floats:
        overflow = "the VAE overflowing" if latents_finite else "an activation overflowing"
        return FloatingPointError(
            f"{message} With float16 weights this is usually {overflow}: "
            "load with dtype='bfloat16' or 'float32'."
        )
    return FloatingPointError(
        f"{message} The weights are {' and '.join(floats) or 'not float16'}, so this is not a float16 "
        "overflow: the model itself produced non-finite values (check its weights for NaN/inf)."
    )


# -- concepts that can never take effect -------------------------------------------------------------


class IneffectiveEditWarning(UserWarning):
    """An editing concept whose settings keep it out of the image for the whole call (as in diffusers,
    it simply adds nothing); warned once per call, or once per sweep spec."""


def concept_names(editing_prompt, num_concepts: int) -> list[str]:
    """How warnings name each concept: its text, else its index (for `editing_prompt_embeddings`)."""
    texts = [editing_prompt] if isinstance(editing_prompt, str) else list(editing_prompt or [])
    if len(texts) == num_concepts:
        return [repr(text) for text in texts]
    return [f"#{index}" for index in range(num_concepts)]


def ineffective_reasons(settings: Mapping, loop_steps: int) -> list[list[str]]:
    """For each concept of validated `edit_settings`, why it can never take effect in a loop of
    `loop_steps` iterations (an empty list when it can)."""
    scales = settings["edit_guidance_scale"]
    count = len(scales)
    warmups = settings["edit_warmup_steps"]
    cooldowns = settings["edit_cooldown_steps"] or [None] * count
    weights = settings["edit_weights"] or [1.0] * count
    return [
        _reasons(scale, warmup, cooldown, weight, loop_steps)
        for scale, warmup, cooldown, weight in zip(scales, warmups, cooldowns, weights, strict=True)
    ]


def _reasons(scale: float, warmup: int, cooldown: int | None, weight: float, loop_steps: int) -> list[str]:
    reasons = []
    if warmup >= loop_steps:
        reasons.append(f"edit_warmup_steps={warmup} is not below the {loop_steps} denoising steps")
    if cooldown is not None and cooldown <= warmup:
        reasons.append(f"edit_cooldown_steps={cooldown} is at or before its edit_warmup_steps={warmup}")
    if weight <= 0:
        reasons.append(f"edit_weights={_short(weight)} (weights <= 0 count as 0)")
    if scale == 0:
        reasons.append("edit_guidance_scale=0")
    return reasons


def _short(value: float) -> str:
    return f"{value:g}"


def warn_ineffective_concepts(
    settings: Mapping, loop_steps: int, names: Sequence[str], *, stacklevel: int = 2
) -> list[list[str]]:
    """One IneffectiveEditWarning for the call, naming every concept that can never take effect and why;
    returns the reasons per concept. Behaviour is unchanged (diffusers adds nothing for such a concept)."""
    reasons = ineffective_reasons(settings, loop_steps)
    found = [f"{name}: {'; '.join(why)}" for name, why in zip(names, reasons, strict=True) if why]
    if found:
        what = "concept can never take effect in this call: it adds" if len(found) == 1 else (
            "concepts can never take effect in this call: they add")
        warnings.warn(
            f"editing {what} nothing to the image (as in diffusers): {' | '.join(found)}",
            IneffectiveEditWarning,
            stacklevel=stacklevel + 1,
        )
    return reasons


def warn_ineffective_settings(
    settings: Sequence[Mapping], loop_steps: int, names: Sequence[str], *, stacklevel: int = 2
) -> None:
    """One IneffectiveEditWarning for a whole sweep: each (concept, reason) with the settings it holds in."""
    where: dict[tuple[str, str], list[int]] = {}
    for index, setting in enumerate(settings):
        for name, reasons in zip(names, ineffective_reasons(setting, loop_steps), strict=True):
            for reason in reasons:
                where.setdefault((name, reason), []).append(index)
    if not where:
        return
    found = [
        f"{name} in setting{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices))}: {reason}"
        for (name, reason), indices in where.items()
    ]
    warnings.warn(
        "editing concepts that can never take effect in some settings of this sweep (those images get "
        f"nothing from them, as in diffusers): {' | '.join(found)}",
        IneffectiveEditWarning,
        stacklevel=stacklevel + 1,
    )
