"""sega-jax: Semantic Guidance for Stable Diffusion in JAX/Flax NNX.

The public face: every name here is the stable API (see the README's "Layout" for what lives where).
"""

from sega_jax.core.guidance import EditParams, sega_step
from sega_jax.core.sampler import sega_sample
from sega_jax.loaders import concepts
from sega_jax.pipelines import (
    LEditsPPPipelineStableDiffusion,
    LEditsPPPipelineStableDiffusionXL,
    SemanticStableDiffusionPipeline,
    SemanticStableDiffusionXLPipeline,
    gradients,
    load_pipeline,
    parallel,
)
from sega_jax.pipelines.sega.sd import SemanticStableDiffusionPipelineOutput
from sega_jax.version import __version__

__all__ = ["EditParams", "LEditsPPPipelineStableDiffusion", "LEditsPPPipelineStableDiffusionXL",
           "SemanticStableDiffusionPipeline", "SemanticStableDiffusionPipelineOutput",
           "SemanticStableDiffusionXLPipeline", "__version__", "concepts", "gradients", "load_pipeline",
           "parallel", "sega_sample", "sega_step"]
