"""`sega-jax sweep`: seed x edit-strength sweeps over all devices and hosts, resumable. `spec` (the spec
and its checks), `store` (local folders and object stores), `files`, `png`, `jobs`, `status` and
`command` (the verb). May import `settings`, `pipelines` and below; never `cli`, `app` or `bench`.
"""

from sega_jax.sweep.command import main

__all__ = ["main"]
