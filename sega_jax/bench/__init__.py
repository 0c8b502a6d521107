"""`sega-jax bench`: sega-jax against diffusers on the same saved model, side by side in one process
(`sega`: the SEGA pipelines, `ledits`: LEDITS++, `common`: what both share). Needs the test extra: it may
import `testing`, `settings`, `pipelines` and below; never `cli`, `sweep` or `app`.
"""
