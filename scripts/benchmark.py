"""ours vs diffusers, side by side in one process: see sega_jax/benchmark.py (`sega-jax bench`)."""

from sega_jax.bench.sega import main

if __name__ == "__main__":
    raise SystemExit(main())
