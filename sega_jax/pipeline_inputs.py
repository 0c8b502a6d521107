"""Validation of the pipeline's arguments: every bad input is a clear error naming the argument."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

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
            _number(v, "edit_guidance_scale")
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
        "edit_momentum_scale": _number(
            0.0 if edit_momentum_scale is None else edit_momentum_scale, "edit_momentum_scale"
        ),
        "edit_mom_beta": _number(0.0 if edit_mom_beta is None else edit_mom_beta, "edit_mom_beta"),
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
        [_number(v, "edit_weights") for v in per_concept("edit_weights", edit_weights, num_concepts)]
        if edit_weights is not None and len(edit_weights)
        else None
    )
    return settings


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    return float(value)


def _unit(value, name: str) -> float:
    value = _number(value, name)
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
