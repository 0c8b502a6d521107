"""The models that need no download: `tiny` (random weights, SD-shaped, built in-process) and `demo` (the
small trained model shipped in `sega_jax/assets/demo`, with its drawing data set and pixel classifier).
May import `core`, `models`, `schedulers` and `runtime`; the registry (`pipelines`) turns them into
pipelines.
"""
