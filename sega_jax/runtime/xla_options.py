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

import ctypes
import functools
import logging
import os
import platform
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

ENV_VAR = "SEGA_JAX_XLA_DEFAULTS"
_FUSION = "LIBRARY_FUSION_TYPE_"
# XLA's default YNNPACK set on x86-64 is {INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION, REDUCE}: drop convolutions.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": f"{_FUSION}INDIVIDUAL_DOT,{_FUSION}REDUCE"}


# XLA:CPU computes half-precision convolutions in fp32. With loop-invariant code motion on, it hoists each
# weight's upcast out of the SEGA loop (an fp32 copy of every conv weight held for the whole loop); with it
# off, `layers.fp32_at_use` places each upcast at its use (BENCHMARKS.md, section 1f).
HALF_PRECISION_CPU_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def upcasts_half_precision() -> bool:
    """Whether the default backend computes half-precision convolutions in fp32 (XLA:CPU does)."""
    return jax.default_backend() == "cpu"


@functools.cache
def compiler_options(half_precision: bool = False) -> dict[str, str]:
    """The options sega-jax's programs compile with here: `CPU_OPTIONS` on an x86-64 CPU backend whose XLA
    accepts them, plus `HALF_PRECISION_CPU_OPTIONS` for a program with half-precision arrays on a CPU
    backend; else none. (Also starts `release_compiler_memory`, once.)"""
    release_compiler_memory()
    if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        return {}
    options = {}
    if jax.default_backend() == "cpu" and platform.machine().lower() in ("x86_64", "amd64"):
        options.update(_accepted(CPU_OPTIONS))
    if half_precision and upcasts_half_precision():
        options.update(_accepted(HALF_PRECISION_CPU_OPTIONS))
    return options


def _accepted(options: dict[str, str]) -> dict[str, str]:
    try:  # an XLA that does not know the option (or its values) rejects it at compile time
        jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
    except Exception as error:  # noqa: BLE001 - any rejection means: compile with XLA's defaults
        logger.info("XLA rejected %s (%s); using its defaults", options, error)
        return {}
    return dict(options)


def has_half_precision(tree) -> bool:
    """Whether any array leaf of `tree` is a 16-bit float (bf16/fp16 weights or inputs)."""
    return any(jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4
               for dtype in (getattr(leaf, "dtype", None) for leaf in jax.tree.leaves(tree))
               if dtype is not None)


def jit(fun: Callable | None = None, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` with `compiler_options()`, resolved at the first call (and again for
    calls with half-precision arguments, which get `compiler_options(half_precision=True)`); usable as a
    decorator with or without arguments."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    compiled: dict[bool, Callable] = {}

    def program(args, kwargs):
        half = has_half_precision((args, kwargs))
        if half not in compiled:
            compiled[half] = jax.jit(fun, compiler_options=compiler_options(half), **jit_kwargs)
        return compiled[half]

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return program(args, kwargs)(*args, **kwargs)

    call.lower = lambda *args, **kwargs: program(args, kwargs).lower(*args, **kwargs)
    return call


# After XLA compiles (or loads from the cache) a big program, glibc keeps the compiler's freed heap resident,
# and the program's run then allocates its buffers on top: the SD 1.5 SEGA loop's first call peaked 350 MB
# above its compile (BENCHMARKS.md, section 1i). Returning the free heap to the OS once such a compile ends
# (`malloc_trim`, tens of ms) lets the run reuse those pages. Programs compiled in less than this are left be.
RELEASE_ENV_VAR = "SEGA_JAX_RELEASE_COMPILER_MEMORY"
RELEASE_AFTER_SECONDS = 0.25
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None (another C library, another OS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@functools.cache
def release_compiler_memory() -> bool:
    """Return the heap XLA's compiler freed to the OS after each compile that took at least
    `RELEASE_AFTER_SECONDS` (a `jax.monitoring` listener, registered once; glibc only). Whether it is on:
    `SEGA_JAX_RELEASE_COMPILER_MEMORY=0` turns it off."""
    trim = _malloc_trim()
    if trim is None or os.environ.get(RELEASE_ENV_VAR, "").strip().lower() in ("0", "false", "no", "off"):
        return False

    def listener(event: str, duration: float, **_) -> None:
        if event == _COMPILE_EVENT and duration >= RELEASE_AFTER_SECONDS:
            trim(0)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return True
