"""The pipelines: all Python-side I/O (loading, tokenizing, images in and out) around the compiled programs.

`registry` (the families and `load_pipeline`), `base` (what every pipeline shares), `conditioning` (SD's and
SDXL's text conditioning, a component each family's pipelines hold), one folder per method: `sega/` (`sd`:
`SegaPipeline` and SD's class, `sdxl`), `ledits_pp/` (`sd`: `LEditsPPPipeline` and SD's class, `sdxl`);
`parallel` (data-parallel generation and sweeps over devices), `placement` (meshes, device lists),
`null_text` (inversion for the SEGA pipelines), `gradients` (the loop as a differentiable function),
`inputs` (argument checks). May import `builtin`, `loaders`, `core`, `models`, `schedulers`, `runtime`;
never `settings` or the entry points.
"""

from sega_jax.pipelines.ledits_pp.sd import LEditsPPPipelineStableDiffusion
from sega_jax.pipelines.ledits_pp.sdxl import LEditsPPPipelineStableDiffusionXL
from sega_jax.pipelines.registry import (
    FAMILIES,
    Family,
    family_of,
    family_of_pipeline,
    ledits_pipeline_for,
    load_pipeline,
    pipeline_class,
)
from sega_jax.pipelines.sega.sd import SemanticStableDiffusionPipeline
from sega_jax.pipelines.sega.sdxl import SemanticStableDiffusionXLPipeline

__all__ = ["FAMILIES", "Family", "LEditsPPPipelineStableDiffusion", "LEditsPPPipelineStableDiffusionXL",
           "SemanticStableDiffusionPipeline", "SemanticStableDiffusionXLPipeline", "family_of",
           "family_of_pipeline", "ledits_pipeline_for", "load_pipeline", "pipeline_class"]
