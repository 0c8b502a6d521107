"""The `sega-jax generate` settings: the `--edit` inline syntax, settings from flags or a PNG, the pipeline
call they make, and the PNG metadata that carries them (see `sega_jax.cli.generate`)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sega_jax.builtin.demo import shipped_model
from sega_jax.core.guidance import NEVER
from sega_jax.version import __version__

MODEL_ENV = "SEGA_JAX_MODEL"
METADATA_KEY = "sega_jax"  # the PNG text chunk holding the full settings as JSON
FORMAT = "sega-jax/1"
DEFAULTS: dict[str, Any] = dict(
    model=None,
    prompt=None,
    negative_prompt=None,
    edit=[],
    steps=50,
    guidance=7.5,
    scheduler=None,
    height=None,
    width=None,
    seed=None,
    n=1,
    dtype="float32",
    eta=0.0,
    momentum_scale=0.1,
    mom_beta=0.4,
    safety_checker=True,
    lora=[],  # "FILE[@SCALE]" each: LoRA weights loaded and set at SCALE (default 1)
    # SDXL only (None: not given; refused on an SD model).
    prompt_2=None,
    negative_prompt_2=None,
    guidance_rescale=None,
    original_size=None,
    crops_coords_top_left=None,
    target_size=None,
)
# What a PNG's settings may set (the rest are about this run: output, cache, progress).
SETTING_KEYS = tuple(DEFAULTS)
# The SDXL-only settings and their flags.
XL_FLAGS = {"prompt_2": "--prompt-2", "negative_prompt_2": "--negative-prompt-2",
            "guidance_rescale": "--guidance-rescale", "original_size": "--original-size",
            "crops_coords_top_left": "--crops-coords-top-left", "target_size": "--target-size"}

class CLIError(ValueError):
    """A bad flag or value: reported as one line, exit status 2."""


# -- edits -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Edit:
    """One editing concept and its settings (diffusers' per-concept defaults)."""

    prompt: str
    scale: float = 5.0
    threshold: float = 0.9
    warmup: int = 10
    cooldown: int | None = None
    weight: float = 1.0
    reverse: bool = False

    def inline(self) -> str:
        """The canonical `--edit` form, which `parse_edit` reads back to the same Edit."""
        options = [f"scale={_num(self.scale)}", f"threshold={_num(self.threshold)}", f"warmup={self.warmup}"]
        if self.cooldown is not None:
            options.append(f"cooldown={self.cooldown}")
        if self.weight != 1.0:
            options.append(f"weight={_num(self.weight)}")
        if self.reverse:
            options.append("reverse")
        return f"{self.prompt}@{','.join(options)}"


def default_model() -> str:
    """The model used when none is named (CLI, sweeps, app, notebook): $SEGA_JAX_MODEL, else 'demo' when
    the trained demo model ships in this installation, else 'tiny' (random weights)."""
    return os.environ.get(MODEL_ENV) or shipped_model()


def _num(value: float) -> str:
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def parse_finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise CLIError(f"{what} must be a finite number, got {text!r}")
    return value


def parse_integer(text: str, what: str, minimum: int = 0, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CLIError(f"{what} must be an integer, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise CLIError(f"{what} must be an integer {bound}, got {value}")
    return value


def _boolean(text: str, what: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("", "1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise CLIError(f"{what} must be true or false, got {text!r}")


def _edit_option(key: str, value: str | None, spec: str) -> tuple[str, Any]:
    where = f"--edit {spec!r}: {key}"
    if key == "reverse":
        return key, True if value is None else _boolean(value, where)
    if value is None:
        raise CLIError(f"--edit {spec!r}: option {key!r} needs a value ({key}=...)")
    if key == "scale":
        return key, parse_finite(value, where)
    if key == "threshold":
        threshold = parse_finite(value, where)
        if not 0.0 <= threshold <= 1.0:
            raise CLIError(f"{where} must lie in [0, 1] (it is a quantile), got {value}")
        return key, threshold
    if key == "warmup":
        return key, parse_integer(value, where)
    if key == "cooldown":
        return key, None if value.strip().lower() in ("none", "never") else parse_integer(value, where)
    if key == "weight":
        return key, parse_finite(value, where)
    keys = "scale, threshold, warmup, cooldown, weight, reverse"
    raise CLIError(f"--edit {spec!r}: unknown option {key!r} (options: {keys})")


def parse_edit(spec: str, **defaults: Any) -> Edit:
    """`"TEXT@scale=5,threshold=0.975,warmup=10,cooldown=40,weight=1,reverse"` -> Edit; options not in the
    spec take `defaults`, else diffusers' SEGA defaults (Edit's)."""
    text, _, options = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if not text.strip():
        raise CLIError(f"--edit {spec!r}: the concept text is empty")
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, eq, value = item.partition("=")
        key, parsed = _edit_option(key.strip().lower(), value.strip() if eq else None, spec)
        if key in values:
            raise CLIError(f"--edit {spec!r}: option {key!r} given twice")
        values[key] = parsed
    return Edit(text.strip(), **{**defaults, **values})


# -- settings ----------------------------------------------------------------------------------------------


def read_png_settings(path: str | os.PathLike) -> tuple[dict, int]:
    """(settings, index in its batch) from a PNG written by `sega-jax generate`."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except OSError as err:
        raise CLIError(f"--from-png {path}: cannot read it as an image ({err})") from None
    if METADATA_KEY not in text:
        raise CLIError(f"--from-png {path}: no '{METADATA_KEY}' settings in this PNG "
                       "(only PNGs written by sega-jax generate can be reproduced)")
    try:
        data = json.loads(text[METADATA_KEY])
        settings, index = data["settings"], int(data.get("index", 0))
    except (ValueError, KeyError, TypeError) as err:
        raise CLIError(f"--from-png {path}: unreadable '{METADATA_KEY}' settings ({err})") from None
    return {k: v for k, v in settings.items() if k in SETTING_KEYS}, index


def resolve_settings(args: argparse.Namespace) -> tuple[dict, int | None]:
    """Flags over the PNG's settings over the defaults; (settings, the PNG's image index or None)."""
    given = {k: v for k, v in vars(args).items() if k in SETTING_KEYS}
    from_png, index = ({}, None)
    if getattr(args, "from_png", None):
        from_png, index = read_png_settings(args.from_png)
        if "n" in given:
            index = None  # a new batch size: write the whole batch
    settings = {**DEFAULTS, **from_png, **given}
    if not settings["model"]:
        settings["model"] = default_model()
    if not settings["prompt"]:
        raise CLIError("--prompt is required (or --from-png FILE)")
    for spec in settings["edit"]:
        parse_edit(spec)  # a PNG's edits are checked like flags
    return settings, index


def parse_lora(spec: str) -> tuple[str, float]:
    """"FILE[@SCALE]" -> (FILE, SCALE); a FILE containing '@' ends with '@' (as --edit's TEXT)."""
    path, at, scale = spec.rpartition("@")
    if not at:
        return spec, 1.0
    if not scale:
        return path, 1.0
    return path, parse_finite(scale, f"--lora {spec}: SCALE")


def lora_setting(text: str, what: str) -> str:
    """A --lora flag as the settings keep it: the absolute FILE@SCALE (a PNG's settings find it again)."""
    path, scale = parse_lora(text)
    file = Path(path).expanduser()
    if not file.is_file():
        raise CLIError(f"{what} {path}: no such file")
    return f"{file.resolve()}@{scale!r}"


def edit_kwargs(edits: Sequence[Edit]) -> dict:
    """diffusers' per-concept arguments for the edits."""
    if not edits:
        return {}
    cooldowns = [NEVER if e.cooldown is None else e.cooldown for e in edits]
    return dict(
        editing_prompt=[e.prompt for e in edits],
        edit_guidance_scale=[e.scale for e in edits],
        edit_threshold=[e.threshold for e in edits],
        edit_warmup_steps=[e.warmup for e in edits],
        edit_cooldown_steps=None if all(e.cooldown is None for e in edits) else cooldowns,
        edit_weights=[e.weight for e in edits],
        reverse_editing_direction=[e.reverse for e in edits],
    )


def accepts(pipeline: type, argument: str) -> bool:
    """Whether the pipeline class's `__call__` takes `argument` (a family's own settings are its own
    call arguments: SDXL's `prompt_2`, ..., SD's `run_safety_checker`)."""
    return argument in inspect.signature(pipeline.__call__).parameters


def check_family(settings: dict, pipeline: type) -> None:
    """Settings of another family (`XL_FLAGS`, SDXL's) are an error on a model whose pipeline lacks them."""
    given = [flag for key, flag in XL_FLAGS.items()
             if settings.get(key) is not None and not accepts(pipeline, key)]
    if given:
        raise CLIError(f"{', '.join(given)}: SDXL-only, but --model {settings['model']} is a "
                       f"{pipeline.__name__} model")


def prepare_kwargs(settings: dict) -> dict:
    """`pipe.prepare`'s arguments (diffusers' names) for CLI settings; SDXL's only when given."""
    sdxl_only = {key: tuple(v) if isinstance(v, list) else v for key in XL_FLAGS
          if (v := settings.get(key)) is not None}
    return dict(
        prompt=settings["prompt"],
        negative_prompt=settings["negative_prompt"],
        num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance"],
        height=settings["height"],
        width=settings["width"],
        num_images_per_prompt=settings["n"],
        eta=settings["eta"],
        seed=settings["seed"],
        edit_momentum_scale=settings["momentum_scale"],
        edit_mom_beta=settings["mom_beta"],
        **sdxl_only,
        **edit_kwargs([parse_edit(spec) for spec in settings["edit"]]),
    )


def call_kwargs(settings: dict, pipeline: type) -> dict:
    """The pipeline call (diffusers' argument names) for CLI settings; `run_safety_checker` only for a
    pipeline that has a safety checker to switch off."""
    kwargs = prepare_kwargs(settings)
    checker = accepts(pipeline, "run_safety_checker")
    return {**kwargs, "run_safety_checker": settings["safety_checker"]} if checker else kwargs


# -- PNG metadata ------------------------------------------------------------------------------------------


def sampler_name(config: dict) -> str:
    """The scheduler as other SD tools name it ("DDIM", "Euler a", "DPM++ 2M Karras", ...)."""
    name = config.get("_class_name", "?")
    karras = " Karras" if config.get("use_karras_sigmas") else ""
    if name == "DPMSolverMultistepScheduler":
        plus = "++" if config.get("algorithm_type") == "dpmsolver++" else ""
        return f"DPM{plus} {config.get('solver_order', 2)}M{karras}"
    if name == "PNDMScheduler":
        return "PLMS" if config.get("skip_prk_steps") else "PNDM"
    base = {"DDIMScheduler": "DDIM", "LMSDiscreteScheduler": "LMS", "EulerDiscreteScheduler": "Euler",
            "EulerAncestralDiscreteScheduler": "Euler a"}.get(name, name)
    return base + karras


_XL_NAMES = {"prompt_2": "Prompt 2", "negative_prompt_2": "Negative prompt 2",
             "guidance_rescale": "CFG rescale", "original_size": "Original size",
             "crops_coords_top_left": "Crop top left", "target_size": "Target size"}


def _text_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_num(v) if isinstance(v, float) else str(v) for v in value)
    return _num(value) if isinstance(value, float) else str(value)


def _field(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:\n"') else text


def parameters_text(settings: dict, sampler: str, index: int) -> str:
    """The A1111-style `parameters` text: prompt, negative prompt, then `Key: value` pairs."""
    lines = [settings["prompt"]]
    if settings["negative_prompt"]:
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    pairs = {
        "Steps": settings["steps"], "Sampler": sampler, "CFG scale": _num(settings["guidance"]),
        "Seed": settings["seed"], "Size": f"{settings['width']}x{settings['height']}",
        "Model": settings["model"], "Eta": _num(settings["eta"]), "Dtype": settings["dtype"],
    }
    pairs.update({_XL_NAMES[key]: _text_value(settings[key]) for key in XL_FLAGS
                  if settings.get(key) is not None})
    if settings["n"] > 1:
        pairs.update({"Batch size": settings["n"], "Batch pos": index})
    if settings.get("lora"):
        pairs["LoRA"] = " | ".join(settings["lora"])
    if settings["edit"]:
        pairs["SEGA"] = " | ".join(settings["edit"])
        pairs["SEGA momentum"] = _num(settings["momentum_scale"])
        pairs["SEGA momentum beta"] = _num(settings["mom_beta"])
    pairs["Version"] = f"sega-jax {__version__}"
    lines.append(", ".join(f"{key}: {_field(value)}" for key, value in pairs.items()))
    return "\n".join(lines)


def png_info(settings: dict, scheduler_config: dict, index: int, pipeline: type):
    """PNG text chunks: `parameters` (human-readable) and `sega_jax` (JSON, enough to reproduce, with the
    pipeline class's name) for an image of `pipeline` (the class)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(settings, sampler_name(scheduler_config), index))
    data = {"format": FORMAT, "version": __version__, "settings": settings, "index": index,
            "scheduler_config": scheduler_config, "call": call_kwargs(settings, pipeline),
            "pipeline": pipeline.__name__}
    info.add_text(METADATA_KEY, json.dumps(data, default=str))
    return info
