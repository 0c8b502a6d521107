"""The pipeline families, side by side on one SEGA core (`sega_jax.pipelines.sega.sd`: prepare / denoise /
finish): SD 1.x/2.x (`SemanticStableDiffusionPipeline`) and SDXL (`SemanticStableDiffusionXLPipeline`)."""

from __future__ import annotations

import os

from sega_jax.loaders.folders import is_xl_folder, resolve_folder
from sega_jax.pipelines.ledits_pp.sd import LEditsPPPipelineStableDiffusion
from sega_jax.pipelines.ledits_pp.sdxl import LEditsPPPipelineStableDiffusionXL
from sega_jax.pipelines.sega.sd import SemanticStableDiffusionPipeline
from sega_jax.pipelines.sega.sdxl import SemanticStableDiffusionXLPipeline

__all__ = ["LEditsPPPipelineStableDiffusion", "LEditsPPPipelineStableDiffusionXL",
           "SemanticStableDiffusionPipeline", "SemanticStableDiffusionXLPipeline", "ledits_pipeline_for",
           "load_pipeline", "pipeline_class"]


def pipeline_class(folder: str | os.PathLike, variant: str | None = None) -> type:
    """The family for a diffusers folder (or hub id): from its model_index.json's class, or its parts."""
    return SemanticStableDiffusionXLPipeline if is_xl_folder(resolve_folder(folder, variant)) \
        else SemanticStableDiffusionPipeline


def load_pipeline(path_or_hub_id: str | os.PathLike, **kwargs):
    """The right pipeline for a folder, hub id or offline name ("demo": the small trained model shipped in
    the package, see `sega_jax.builtin.demo`; "tiny": the random-weight SD model, built in-process):
    `from_pretrained(path_or_hub_id, **kwargs)` of the class `pipeline_class` picks."""
    if str(path_or_hub_id) == "tiny":
        from sega_jax.builtin.tiny import tiny_pipeline

        return tiny_pipeline(**kwargs)
    cls = pipeline_class(path_or_hub_id, kwargs.get("variant"))
    if cls is SemanticStableDiffusionXLPipeline:
        kwargs.pop("requires_safety_checker", None)  # SDXL folders have no safety checker, as in diffusers
    return cls.from_pretrained(path_or_hub_id, **kwargs)


def ledits_pipeline_for(pipe):
    """The LEDITS++ pipeline of the same family on the same weights (no copy)."""
    if isinstance(pipe, LEditsPPPipelineStableDiffusion):
        return pipe
    if isinstance(pipe, SemanticStableDiffusionXLPipeline):
        return LEditsPPPipelineStableDiffusionXL(
            pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
            pipe.scheduler, force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt)
    return LEditsPPPipelineStableDiffusion(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                           pipe.scheduler, pipe.safety_checker, pipe.feature_extractor,
                                           requires_safety_checker=False)
