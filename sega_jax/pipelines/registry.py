"""The families: what a diffusers folder (or a built-in name) is, which pipeline classes serve it, and the
one `load_pipeline` behind the Python API, the CLI, sweeps, the app and the notebook.

A family is data: its name, the `model_index.json` class names that identify it, the parts that only it
has, its SEGA and LEDITS++ pipeline classes and whether it carries a safety checker. Adding a family is its
folder under `pipelines/` plus one `Family` in `FAMILIES`; the entry points ask `family_of` /
`family_of_pipeline` instead of testing for a particular class.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sega_jax.builtin.tiny import tiny_components
from sega_jax.loaders.folders import XL_CLASSES, model_index, resolve_folder
from sega_jax.pipelines.ledits_pp.sd import LEditsPPPipelineStableDiffusion
from sega_jax.pipelines.ledits_pp.sdxl import LEditsPPPipelineStableDiffusionXL
from sega_jax.pipelines.sega.sd import SemanticStableDiffusionPipeline
from sega_jax.pipelines.sega.sdxl import SemanticStableDiffusionXLPipeline


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    sega: type  # the SEGA pipeline class (text-to-image with semantic edits)
    ledits: type  # the LEDITS++ pipeline class (invert a photo, then edit it)
    index_classes: tuple[str, ...] = ()  # model_index.json `_class_name`s that name this family
    marker_parts: tuple[str, ...] = ()  # subfolders only this family's folders have
    safety_checker: bool = True  # whether its folders may carry diffusers' safety checker
    ledits_on: Callable[[Any], Any] = None  # the LEDITS++ pipeline on a SEGA pipeline's components

    @property
    def default_guidance(self) -> float:
        """The SEGA pipeline's own `guidance_scale` default (diffusers': SD 7.5, SDXL 5.0)."""
        return float(inspect.signature(self.sega.__call__).parameters["guidance_scale"].default)

    def owns(self, folder: Path) -> bool:
        return (model_index(folder).get("_class_name") in self.index_classes
                or any((folder / part).is_dir() for part in self.marker_parts))

    def offers(self, pipe) -> bool:
        return isinstance(pipe, (self.sega, self.ledits))


def _sd_ledits(pipe) -> LEditsPPPipelineStableDiffusion:
    return LEditsPPPipelineStableDiffusion(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                           pipe.scheduler, pipe.safety_checker, pipe.feature_extractor,
                                           requires_safety_checker=False)


def _sdxl_ledits(pipe) -> LEditsPPPipelineStableDiffusionXL:
    return LEditsPPPipelineStableDiffusionXL(
        pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
        pipe.scheduler, force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt)


SD = Family("sd", SemanticStableDiffusionPipeline, LEditsPPPipelineStableDiffusion, ledits_on=_sd_ledits)
SDXL = Family(
    "sdxl", SemanticStableDiffusionXLPipeline, LEditsPPPipelineStableDiffusionXL,
    index_classes=XL_CLASSES,
    marker_parts=("text_encoder_2",), safety_checker=False, ledits_on=_sdxl_ledits)
FAMILIES: tuple[Family, ...] = (SDXL, SD)  # the most specific first; SD takes any other SD-layout folder
BUILTIN_MODELS = ("demo", "tiny")  # model names that need no folder and no network


def family_of(path_or_hub_id: str | os.PathLike, variant: str | None = None) -> Family:
    """The family of a diffusers folder (or hub id, or built-in name), from its model_index.json and parts."""
    if str(path_or_hub_id) == "tiny":
        return SD
    folder = resolve_folder(path_or_hub_id, variant)
    return next(family for family in FAMILIES if family.owns(folder) or family is FAMILIES[-1])


def family_of_pipeline(pipe) -> Family:
    """The family a loaded pipeline belongs to."""
    for family in FAMILIES:
        if family.offers(pipe):
            return family
    raise TypeError(f"{type(pipe).__name__} is not a pipeline of any sega-jax family")


def pipeline_class(folder: str | os.PathLike, variant: str | None = None) -> type:
    """The SEGA pipeline class for a diffusers folder (or hub id)."""
    return family_of(folder, variant).sega


def load_pipeline(path_or_hub_id: str | os.PathLike, *, scheduler: str | None = None,
                  progress: bool | None = None, **kwargs):
    """The right SEGA pipeline for a folder, hub id or offline name ("demo": the small trained model shipped
    in the package, see `sega_jax.builtin.demo`; "tiny": the random-weight SD model, built in-process):
    `from_pretrained(path_or_hub_id, **kwargs)` of its family's class. `scheduler` swaps in a scheduler by
    name; `progress` turns the per-step progress bar on or off (default: the pipeline's, on)."""
    if str(path_or_hub_id) == "tiny":
        kwargs.pop("requires_safety_checker", None)  # it has none
        pipe = SD.sega(**tiny_components(**kwargs), safety_checker=None, feature_extractor=None,
                       requires_safety_checker=False)
    else:
        family = family_of(path_or_hub_id, kwargs.get("variant"))
        if not family.safety_checker:
            kwargs.pop("requires_safety_checker", None)  # no safety checker in such folders, as in diffusers
        pipe = family.sega.from_pretrained(path_or_hub_id, **kwargs)
    if scheduler:
        pipe.set_scheduler(scheduler)
    if progress is not None:
        pipe.set_progress_bar_config(disable=not progress)
    return pipe


def ledits_pipeline_for(pipe):
    """The LEDITS++ pipeline of the same family on the same weights (no copy)."""
    family = family_of_pipeline(pipe)
    return pipe if isinstance(pipe, family.ledits) else family.ledits_on(pipe)
