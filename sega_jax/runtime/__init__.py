"""Process-wide JAX settings below everything else: the XLA compile options of our own programs
(`xla_options`) and the persistent compilation cache (`cache`). Imports nothing of sega_jax.
"""
