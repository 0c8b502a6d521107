"""Where XLA places a buffer's creation: helpers that keep big temporaries from being made long before use.

XLA schedules a value whose inputs exist early (a constant zero buffer, an upcast of a stored activation)
wherever its memory scheduler likes, and on CPU that was often right after its inputs: a buffer made in the
UNet's down path and first read in its up path is held in between. Each helper here ties a value to the
array it is used with, by a zero computed from that array's first element that XLA cannot fold, so the value
is made when it is needed (BENCHMARKS.md, sections 1f and 1i). The values are exact.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def opaque_zero(x: Array) -> Array:
    """0.0 (fp32) computed from `x` in a way XLA cannot fold: clz of 32 bits is at most 32, so >> 6 is 0."""
    bits = lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.uint32)
    return (lax.clz(bits) >> 6).astype(jnp.float32)


def computed_after(x: Array, anchor: Array) -> Array:
    """`x` unchanged, but read only once `anchor` exists, so that what is computed from `x` (an upcast
    for a GroupNorm, say) is made then and not where `x` was made."""
    return x - opaque_zero(anchor).astype(x.dtype)  # x - (+0) is x bit for bit, -0.0 included


def map_into(fn: Callable[[Array], Array], n: int, shape: tuple[int, ...], dtype, *,
             start_after: Array) -> Array:
    """`lax.map(fn, jnp.arange(n))` for an `fn` returning `shape` arrays of `dtype`, written into a buffer
    XLA cannot create before `start_after` exists. `lax.map` writes into a constant zero buffer that XLA
    shares between every map of that shape and copies per map, and it made those copies early: SD 1.5's
    UNet held each 4096-token attention's and feed-forward's output buffer from the down path to its use in
    the up path. Every row is written, so the buffer's starting values do not matter."""
    out = computed_after(jnp.zeros((n, *shape), dtype), start_after)
    return lax.fori_loop(0, n, lambda i, out: lax.dynamic_update_index_in_dim(out, fn(i), i, 0), out)
