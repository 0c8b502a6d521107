"""`sega_jax.models.placement`: values tied to where they are used compute exactly what they did, and XLA
no longer makes the buffers they guard early (issue 16: SD 1.5's figures are in `test_sd15_heavy.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sega_jax.models.attention import chunked_attention
from sega_jax.models.placement import computed_after, map_into, opaque_zero

SPECIAL = [0.0, -0.0, -1.5, 3e38, np.inf, -np.inf, np.nan]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("first", SPECIAL)
def test_computed_after_returns_its_value_bit_for_bit_whatever_the_anchor(dtype, first):
    x = jnp.asarray(SPECIAL + [1e-3, -7.25, 65000.0], jnp.float32).astype(dtype)
    anchor = jnp.full((2, 3), first, jnp.float32)
    got = jax.jit(computed_after)(x, anchor)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(x).view(np.uint8))
    assert float(jax.jit(opaque_zero)(anchor)) == 0.0


def test_map_into_equals_lax_map():
    rows = jax.random.normal(jax.random.key(0), (5, 3, 4))
    fn = lambda i: jnp.sin(rows[i]) * i
    got = jax.jit(lambda: map_into(fn, 5, (3, 4), jnp.float32, start_after=rows))()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(lax.map(fn, jnp.arange(5))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_attention_makes_its_output_buffer_when_its_queries_exist(dtype):
    """A chain of attentions with a skip from the first to the last, like the UNet's down and up paths:
    XLA used to make every call's output buffer (a copy of one shared zero buffer) at the start, so the
    program's temporaries grew by about one output per call (fp32 +4 outputs from 1 to 5 calls, bf16 +9)."""
    x = jax.ShapeDtypeStruct((2, 2048, 4, 40), dtype)
    output_bytes = 2 * 2048 * 4 * 40 * jnp.dtype(dtype).itemsize

    def chain(x, calls):
        first = y = chunked_attention(x, x, x)
        for _ in range(calls):
            y = chunked_attention(y, y, y)
        return y + first

    temp = lambda calls: (jax.jit(chain, static_argnums=1).lower(x, calls).compile()
                          .memory_analysis().temp_size_in_bytes)
    assert temp(5) - temp(1) < 2 * output_bytes, (temp(5), temp(1), output_bytes)
