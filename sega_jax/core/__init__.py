"""Pure JAX, no I/O: the SEGA and LEDITS++ guidance steps (`guidance`, `guidance_ledits`), the sampler's
`lax.scan` loop (`sampler`) and the inversion loops (`inversion`: DDIM and DDPM edit-friendly for LEDITS++;
`null_text`: DDIM inversion and the null-text optimisation). Knows nothing of models: the denoiser
is a function argument. May import `models`, `schedulers` and `runtime` only.
"""
