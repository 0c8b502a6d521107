"""sega-jax: Semantic Guidance for Stable Diffusion in JAX/Flax NNX."""

from sega_jax.core.guidance import EditParams, sega_step
from sega_jax.core.sampler import sega_sample
from sega_jax.pipelines import (
    LEditsPPPipelineStableDiffusion,
    LEditsPPPipelineStableDiffusionXL,
    SemanticStableDiffusionXLPipeline,
    load_pipeline,
)
from sega_jax.pipelines.sega.sd import SemanticStableDiffusionPipeline, SemanticStableDiffusionPipelineOutput

__all__ = ["EditParams", "LEditsPPPipelineStableDiffusion", "LEditsPPPipelineStableDiffusionXL",
           "SemanticStableDiffusionPipeline",
           "SemanticStableDiffusionPipelineOutput", "SemanticStableDiffusionXLPipeline", "load_pipeline",
           "sega_sample", "sega_step"]
__version__ = "0.1.0"
