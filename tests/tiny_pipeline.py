"""The tiny random-weight reference pipeline the pipeline tests share (see sega_jax.testing.reference)."""

from sega_jax.testing.reference import build_reference, save_reference

__all__ = ["build_reference", "save_reference"]
