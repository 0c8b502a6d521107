"""The LEDITS++ pipelines (invert a photo, then edit it with semantic concepts): `sd` holds
`LEditsPPPipeline` (the inversion and edit steps both families share) and SD's class, `sdxl` SDXL's, and
`inputs` their argument checks.
"""
