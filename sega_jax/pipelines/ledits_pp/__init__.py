"""The LEDITS++ pipelines (invert a photo, then edit it with semantic concepts), one file per family:
`sd`, `sdxl`, and `inputs` (their argument checks).
"""
