"""The one attention function every model calls, so a faster kernel is a change in one place."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None) -> Array:
    """Scaled dot-product attention on (batch, length, heads, head_dim) arrays.

    Scores and softmax are computed in fp32 whatever the input dtype (diffusers' `upcast_attention`
    and `upcast_softmax` behaviour, which is also the right default for bf16/fp16). `mask` is a boolean
    array broadcastable to (batch, heads, q_len, k_len); False entries are excluded.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
