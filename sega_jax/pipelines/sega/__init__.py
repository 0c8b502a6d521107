"""The SEGA pipelines, one file per family: `sd` (SD 1.x/2.x, `SemanticStableDiffusionPipeline`) and
`sdxl` (`SemanticStableDiffusionXLPipeline`).
"""
