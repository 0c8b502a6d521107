"""Resumable prompts x seeds x edit-settings sweeps: see sega_jax/sweep.py (`sega-jax sweep`)."""

from sega_jax.sweep.command import main

if __name__ == "__main__":
    raise SystemExit(main())
