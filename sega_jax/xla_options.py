"""The XLA compile options of sega-jax's own jitted programs (the SEGA loop, VAE, text encoder, checker).

On x86-64 CPUs, XLA (jaxlib 0.10) hands three kinds of work to YNNPACK by default: matmuls, reductions
and convolutions. Its convolutions are the slow part: with them left to XLA's other convolution kernel the
SD 1.5 UNet forward (4 copies, 64x64 latents) takes 16.4-19.0 s instead of 21.0-23.2 s on a 2-core Xeon,
and the tiny model's 70-81 ms instead of 84-99 ms (BENCHMARKS.md, section 2b). So our programs compile with
YNNPACK's matmuls and reductions only. This is a per-program `compiler_options`, not `XLA_FLAGS`: other
JAX code in the process keeps XLA's defaults. `SEGA_JAX_XLA_DEFAULTS=1` gives our programs the defaults too.

The choice is made at a program's first call, not at import, so importing sega_jax does not start a JAX
backend (users may still set flags or call `jax.distributed.initialize` first).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from collections.abc import Callable

import jax

logger = logging.getLogger(__name__)

ENV_VAR = "SEGA_JAX_XLA_DEFAULTS"
_FUSION = "LIBRARY_FUSION_TYPE_"
# XLA's default YNNPACK set on x86-64 is {INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION, REDUCE}: drop convolutions.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": f"{_FUSION}INDIVIDUAL_DOT,{_FUSION}REDUCE"}


@functools.cache
def compiler_options() -> dict[str, str]:
    """The options sega-jax's programs compile with here: `CPU_OPTIONS` on an x86-64 CPU backend whose XLA
    accepts them, else none."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        return {}
    if jax.default_backend() != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    try:  # an XLA that does not know the option (or its values) rejects it at compile time
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(1.0).compile()
    except Exception as error:  # noqa: BLE001 - any rejection means: compile with XLA's defaults
        logger.info("XLA rejected %s (%s); using its defaults", CPU_OPTIONS, error)
        return {}
    return dict(CPU_OPTIONS)


def jit(fun: Callable | None = None, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` with `compiler_options()`, resolved at the first call; usable as a
    decorator with or without arguments."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    compiled = None

    @functools.wraps(fun)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)
        return compiled(*args, **kwargs)

    return call
