"""Pure-functional JAX ports of the diffusers schedulers SD pipelines use, step for step equal to diffusers.

Protocol (every scheduler; the scheduler object is a frozen, hashable config usable as a static jit arg)::

    sched = scheduler_from_config(json.load(open(".../scheduler/scheduler_config.json")))
    schedule = sched.set_timesteps(num_inference_steps)       # host-side, once; a pytree of arrays
    state = sched.init_state(schedule, x.shape, x.dtype)      # fixed-shape pytree (history buffers)
    x = x * schedule.init_noise_sigma
    for i in range(len(schedule.timesteps)):                  # or lax.scan with i traced
        eps = model(sched.scale_model_input(schedule, x, i), schedule.timesteps[i])
        x, state = sched.step(schedule, state, eps, i, x, eta=eta, key=key_i)  # or noise=...
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import SchedulerBase
from .ddim import DDIMSchedule, DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler, DPMSolverSchedule
from .euler import EulerDiscreteScheduler, EulerSchedule
from .euler_ancestral import EulerAncestralDiscreteScheduler, EulerAncestralSchedule
from .lms import LMSDiscreteScheduler, LMSSchedule
from .pndm import PNDMSchedule, PNDMScheduler, PNDMState

Scheduler = (
    DDIMScheduler
    | PNDMScheduler
    | LMSDiscreteScheduler
    | EulerDiscreteScheduler
    | EulerAncestralDiscreteScheduler
    | DPMSolverMultistepScheduler
)

SCHEDULERS: dict[str, type[SchedulerBase]] = {
    cls.__name__: cls
    for cls in (
        DDIMScheduler,
        PNDMScheduler,
        LMSDiscreteScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
    )
}

# Short names: (class, config overrides). Unlike class names, which keep the base config's settings as
# diffusers' `XScheduler.from_config(pipe.scheduler.config)` does, short names fix the variant they name.
SCHEDULER_ALIASES: dict[str, tuple[type[SchedulerBase], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
    "lms-karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler-karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (
        DPMSolverMultistepScheduler,
        {"solver_order": 2, "algorithm_type": "dpmsolver++", "use_karras_sigmas": False},
    ),
    "dpm++2m-karras": (
        DPMSolverMultistepScheduler,
        {"solver_order": 2, "algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
}
SCHEDULER_ALIASES["dpmpp-2m"] = SCHEDULER_ALIASES["dpm++2m"]
SCHEDULER_ALIASES["dpmpp-2m-karras"] = SCHEDULER_ALIASES["dpm++2m-karras"]


def scheduler_from_config(config: Mapping[str, Any]) -> Scheduler:
    """The scheduler named by the config's `_class_name`, built from the rest of the config."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(
            f"unsupported scheduler _class_name={name!r}; supported: {sorted(SCHEDULERS)} "
            "(or swap one in with scheduler_from_name)"
        )
    return SCHEDULERS[name].from_config(config)


def load_scheduler(folder: str | Path) -> Scheduler:
    """Read `scheduler_config.json` from a diffusers `scheduler/` folder, a pipeline folder, or the file."""
    path = Path(folder)
    candidates = (
        [path]
        if path.is_file()
        else [path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"]
    )
    for file in candidates:
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{file}: not a valid scheduler_config.json ({err})") from err
            if not isinstance(config, dict):
                raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
            return scheduler_from_config(config)
    raise FileNotFoundError(f"no scheduler config: {candidates[0]} does not exist")


def scheduler_from_name(name_or_class_name: str, base_config: Mapping[str, Any] | None = None) -> Scheduler:
    """Swap a scheduler onto a loaded pipeline's scheduler config, like diffusers'
    `XScheduler.from_config(pipe.scheduler.config)`.

    `name_or_class_name` is a diffusers class name ("EulerDiscreteScheduler") or a short name
    ("ddim", "pndm", "plms", "lms", "lms-karras", "euler", "euler-karras", "euler-a", "dpm++2m",
    "dpm++2m-karras", ...; see `SCHEDULER_ALIASES`). Keys of `base_config` the new class does not know are
    ignored, as in diffusers.
    """
    config = dict(base_config or {})
    if name_or_class_name in SCHEDULERS:
        return SCHEDULERS[name_or_class_name].from_config(config)
    key = name_or_class_name.strip().lower().replace("_", "-").replace(" ", "-")
    by_lower = {n.lower(): cls for n, cls in SCHEDULERS.items()}
    if key in by_lower:
        return by_lower[key].from_config(config)
    if key in SCHEDULER_ALIASES:
        cls, overrides = SCHEDULER_ALIASES[key]
        defaults = [k for k in config.get("_use_default_values") or () if k not in overrides]
        return cls.from_config({**config, **overrides, "_use_default_values": defaults})
    raise ValueError(
        f"unknown scheduler {name_or_class_name!r}; use one of {sorted(SCHEDULER_ALIASES)} "
        f"or a class name {sorted(SCHEDULERS)}"
    )


__all__ = [
    "SCHEDULERS",
    "SCHEDULER_ALIASES",
    "DDIMSchedule",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSchedule",
    "EulerAncestralDiscreteScheduler",
    "EulerAncestralSchedule",
    "EulerDiscreteScheduler",
    "EulerSchedule",
    "LMSDiscreteScheduler",
    "LMSSchedule",
    "PNDMSchedule",
    "PNDMScheduler",
    "PNDMState",
    "Scheduler",
    "SchedulerBase",
    "load_scheduler",
    "scheduler_from_config",
    "scheduler_from_name",
]
