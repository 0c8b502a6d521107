"""A sweep spec: prompts x seeds x images per seed x edit settings, validated before any compute
(see `sega_jax.sweep.command`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from sega_jax.pipelines import inputs
from sega_jax.pipelines.parallel import EDIT_DEFAULTS, check_setting
from sega_jax.settings import CLIError, lora_setting, parse_lora

SPEC_FILE = "spec.json"
EXTRAS = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3")}
DEFAULTS: dict[str, Any] = dict(
    model=None,
    dtype="float32",
    scheduler=None,
    prompts=None,
    negative_prompt=None,
    seeds=None,
    images_per_seed=1,
    height=None,
    width=None,
    num_inference_steps=50,
    guidance_scale=7.5,
    eta=0.0,
    editing_prompt=[],
    edit={},
    grid={},
    settings=[],
    run_safety_checker=True,
    batch_per_device=1,
    mode="jit",
    devices=None,
    output=None,
    lora=[],  # "FILE[@SCALE]" each: LoRA weights loaded at SCALE (default 1); kept as the absolute FILE@SCALE
)
# Keys added after sweeps were first stored: left out of the spec's identity at their default, so a sweep
# stored before them resumes.
LATER_KEYS: dict[str, Any] = dict(lora=[])
# The setting key that varies the LoRAs' scales (a number for all, or one per LoRA); not an edit setting.
LORA_SCALE = "lora_scale"
REQUIRED = ("model", "prompts", "seeds", "output")
# Keys that change how the work is run, not which images come out: they may change between runs.
RUNTIME_KEYS = ("batch_per_device", "mode", "devices", "output")
SHORT_NAMES = dict(
    guidance_scale="cfg",
    edit_guidance_scale="scale",
    edit_threshold="thr",
    edit_warmup_steps="warmup",
    edit_cooldown_steps="cooldown",
    reverse_editing_direction="reverse",
    edit_weights="weights",
    edit_momentum_scale="mom",
    edit_mom_beta="beta",
    lora_scale="lora",
)


class SpecError(ValueError):
    """A sweep spec or output folder that cannot be run; raised before any compute."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A validated spec: `values` is the full spec dict, `settings` each setting's overrides, `checked`
    each setting's full, validated edit parameters, `loras` each setting's LoRAs ("FILE@SCALE")."""

    values: dict
    settings: tuple[dict, ...]
    checked: tuple[dict, ...]
    loras: tuple[tuple[str, ...], ...] = ()

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def output(self) -> str:
        """A local folder or an fsspec URL (see `sega_jax.sweep.store`)."""
        return self.values["output"]

    def fingerprint(self) -> dict:
        """What decides the images (the spec minus RUNTIME_KEYS), as stored in the output folder."""
        return {key: value for key, value in self.values.items()
                if key not in RUNTIME_KEYS and not (key in LATER_KEYS and value == LATER_KEYS[key])}


class Item(NamedTuple):
    prompt: int
    seed: int
    image: int
    setting: int

    @property
    def file(self) -> str:
        return f"p{self.prompt:03d}-s{self.seed}-i{self.image:02d}-e{self.setting:03d}.png"


# -- the spec ----------------------------------------------------------------------------------------


def read_spec_file(path: str | os.PathLike) -> dict:
    """A spec dict from a .json, .yaml or .yml file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"cannot read the spec {path}: {err}") from err
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ImportError as err:
        raise SpecError("YAML specs need PyYAML (pip install pyyaml); or write the spec as JSON") from err
    except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError's subclasses
        raise SpecError(f"{path}: not valid {path.suffix[1:] or 'JSON'}: {err}") from err
    except Exception as err:
        raise SpecError(f"{path}: cannot parse: {err}") from err
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_seeds(value: Any) -> list[int]:
    """A list of ints, one int, "a:b" (range a..b-1) or "1,5,9"."""
    if isinstance(value, str):
        try:
            if ":" in value:
                start, stop = (int(part) for part in value.split(":"))
                return list(range(start, stop))
            return [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise SpecError(f"seeds: cannot parse {value!r} (use a list, 'start:stop' or '1,5,9')") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return value
    raise SpecError(f"seeds: expected a list of ints or 'start:stop', got {value!r}")


def _check_scalars(values: dict) -> None:
    if isinstance(values["prompts"], str):
        values["prompts"] = [values["prompts"]]
    if isinstance(values["editing_prompt"], str):
        values["editing_prompt"] = [values["editing_prompt"]]
    values["seeds"] = parse_seeds(values["seeds"])
    checks = [
        ("prompts", lambda v: isinstance(v, list) and v and all(isinstance(p, str) for p in v)),
        ("seeds", lambda v: v and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v)),
        ("editing_prompt", lambda v: isinstance(v, list) and all(isinstance(p, str) and p for p in v)),
        ("negative_prompt", lambda v: v is None or isinstance(v, str)),
        ("model", lambda v: isinstance(v, str) and v),
        ("edit", lambda v: isinstance(v, dict)),
        ("grid", lambda v: isinstance(v, dict)),
        ("settings", lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v)),
        ("mode", lambda v: v in ("jit", "pmap")),
        ("run_safety_checker", lambda v: isinstance(v, bool)),
        ("scheduler", lambda v: v is None or isinstance(v, str)),
        ("dtype", lambda v: v in ("float32", "bfloat16", "float16")),
    ]
    for key, ok in checks:
        if not ok(values[key]):
            raise SpecError(f"{key}: invalid value {values[key]!r}")
    if len(set(values["seeds"])) != len(values["seeds"]):
        raise SpecError(f"seeds: repeated seeds in {values['seeds']}")
    try:
        for key, minimum in (("images_per_seed", 1), ("num_inference_steps", 1), ("batch_per_device", 1)):
            inputs.check_int(values[key], key, minimum=minimum)
        for key in ("height", "width"):
            if values[key] is not None and inputs.check_int(values[key], key, minimum=8) % 8:
                raise ValueError(f"`{key}` must be a multiple of 8, got {values[key]}")
        inputs.check_int(values["devices"], "devices", minimum=1, allow_none=True)
        inputs.check_number(values["eta"], "eta")
        inputs.check_number(values["guidance_scale"], "guidance_scale")
    except ValueError as err:
        raise SpecError(str(err)) from err


def expand_settings(values: Mapping[str, Any]) -> list[dict]:
    """The grid's cartesian product (keys in the spec's order), then the explicit settings; [{}] if none."""
    grid = values["grid"]
    for key, options in grid.items():
        if not isinstance(options, list) or not options:
            raise SpecError(f"grid.{key}: needs a non-empty list of values, got {options!r}")
    product = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    settings = (product if grid else []) + list(values["settings"])
    return settings or [{}]


def _check_settings(values: dict, settings: list[dict]) -> list[dict]:
    concepts = len(values["editing_prompt"])
    checked = []
    for index, setting in enumerate(settings):
        edits = {key: value for key, value in setting.items() if key != LORA_SCALE}
        merged = {"guidance_scale": values["guidance_scale"], **EDIT_DEFAULTS, **values["edit"], **edits}
        try:
            checked.append(check_setting(concepts, merged))
        except ValueError as err:
            raise SpecError(f"edit setting {index} ({setting}): {err}") from err
    cfg = {c["guidance_scale"] > 1.0 for c in checked}
    if len(cfg) > 1:
        raise SpecError("guidance_scale: all settings must be > 1, or all <= 1 (no classifier-free guidance)")
    if concepts and cfg == {False}:
        raise SpecError("editing_prompt needs classifier-free guidance: guidance_scale must be > 1")
    return checked


def load_spec(spec: Mapping[str, Any]) -> SweepSpec:
    """Validate a spec dict (unknown keys, missing keys, empty grids, bad values) without any compute."""
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise SpecError(f"unknown spec key(s) {unknown}; known keys: {sorted(DEFAULTS)}")
    missing = [key for key in REQUIRED if spec.get(key) is None]
    if missing:
        raise SpecError(f"missing spec key(s) {missing}")
    values = json.loads(json.dumps({**DEFAULTS, **spec}))  # a deep, JSON-clean copy
    values["output"] = os.fspath(spec["output"])
    check_url(values["output"])
    _check_scalars(values)
    _check_lora(values)
    settings = expand_settings(values)
    checked = _check_settings(values, settings)
    loras = tuple(_setting_loras(values["lora"], setting, index) for index, setting in enumerate(settings))
    _check_model(values["model"])
    return SweepSpec(values, tuple(settings), tuple(checked), loras)


def _check_lora(values: dict) -> None:
    """`lora`: a "FILE[@SCALE]" string or a list of them; each FILE must exist (kept as its absolute path)."""
    loras = [values["lora"]] if isinstance(values["lora"], str) else values["lora"]
    if not isinstance(loras, list) or not all(isinstance(spec, str) and spec for spec in loras):
        raise SpecError(f"lora: expected a list of 'FILE[@SCALE]' strings, got {values['lora']!r}")
    try:
        values["lora"] = [lora_setting(spec, "lora:") for spec in loras]
    except CLIError as err:
        raise SpecError(str(err)) from None


def _setting_loras(loras: list[str], setting: Mapping[str, Any], index: int) -> tuple[str, ...]:
    """The spec's LoRAs ("FILE@SCALE") at the setting's `lora_scale`, if it has one."""
    if LORA_SCALE not in setting:
        return tuple(loras)
    scales, where = setting[LORA_SCALE], f"edit setting {index} ({setting}): {LORA_SCALE}"
    if not loras:
        raise SpecError(f"{where}: the spec has no `lora` to scale")
    scales = scales if isinstance(scales, list) else [scales] * len(loras)
    if len(scales) != len(loras):
        raise SpecError(f"{where}: {len(scales)} scale(s) for {len(loras)} LoRA(s) (give one number, or one "
                        "per LoRA)")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scales):
        raise SpecError(f"{where}: expected finite numbers, got {setting[LORA_SCALE]!r}")
    return tuple(f"{parse_lora(spec)[0]}@{float(scale)!r}" for spec, scale in zip(loras, scales, strict=True))


def _check_model(model: str) -> None:
    if model == "tiny":
        if importlib.util.find_spec("sega_jax.builtin.tiny") is None:
            raise SpecError("model 'tiny' needs sega_jax.builtin.tiny, which this installation lacks")
        return
    path = Path(model)
    if path.is_dir():
        return
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise SpecError(f"model: {model} is not a diffusers pipeline folder nor a hub id like 'owner/name'")


def items(spec: SweepSpec) -> list[Item]:
    """Every image of the sweep in its fixed order: prompt, seed, image, setting."""
    return [
        Item(p, seed, image, s)
        for p in range(len(spec.prompts))
        for seed in spec.seeds
        for image in range(spec.images_per_seed)
        for s in range(len(spec.settings))
    ]


def lora_class(settings: Sequence[Mapping[str, Any]], item: Item) -> str:
    """Items of one class share their LoRA weights (the setting's `lora_scale`, if any)."""
    return json.dumps(settings[item.setting].get(LORA_SCALE)) if settings else "null"


def groups(all_items: Sequence[Item], per_device: int,
           settings: Sequence[Mapping[str, Any]] = ()) -> list[list[Item]]:
    """Work groups of `per_device` items in order. One call runs one set of weights, so the items of each
    LoRA class (`settings`' `lora_scale`s, in the order they first appear) are grouped on their own; with
    no `lora_scale` that is all items in one class."""
    classes: dict[str, list[Item]] = {}
    for item in all_items:
        classes.setdefault(lora_class(settings, item), []).append(item)
    return [members[i : i + per_device] for members in classes.values()
            for i in range(0, len(members), per_device)]


def check_url(url: str | os.PathLike, argument: str = "output (--out)") -> str | None:
    """The URL's fsspec protocol (None for a local path), once its package imports; a SpecError naming
    `argument` for an unknown scheme or a missing extra."""
    text = os.fspath(url)
    protocol, sep, _ = text.partition("://")
    if not sep or protocol == "file":
        return None
    module, extra = EXTRAS.get(protocol, (None, None))
    try:
        if module:
            importlib.import_module(module)
        import fsspec
    except ImportError as err:
        wanted = f"{module} (pip install 'sega-jax[{extra}]')" if module else "fsspec (pip install fsspec)"
        raise SpecError(f"{argument}: {text} needs {wanted}: {err}") from err
    if protocol not in fsspec.available_protocols():
        raise SpecError(f"{argument}: {text}: unknown URL scheme {protocol!r} (use a local path, gs://, "
                        "s3://, memory:// or another fsspec protocol)")
    return protocol
