"""The SEGA pipelines: `sd` holds `SegaPipeline` (prepare, the compiled loop, run; shared by the families)
and SD 1.x/2.x's `SemanticStableDiffusionPipeline`; `sdxl` holds `SemanticStableDiffusionXLPipeline`. A
family's differences live in its conditioning component (`pipelines.conditioning`).
"""
