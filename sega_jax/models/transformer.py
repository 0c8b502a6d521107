"""diffusers' Transformer2DModel (continuous input) and BasicTransformerBlock, as the SD UNet uses them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sega_jax.models.attention import attention_probabilities
from sega_jax.models.layers import Attention, Conv2d, GroupNorm, LayerNorm, Linear, gelu, tile_batch
from sega_jax.models.placement import map_into

Array = jax.Array


class GEGLU(nnx.Module):
    def __init__(self, dim: int, inner: int, *, dtype, rngs: nnx.Rngs):
        self.proj = Linear(dim, inner * 2, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        # In fp32 from the projection's accumulator, rounded once (torch rounds the projection, the GELU and
        # the product): each rounding inside this fusion cost XLA:CPU more than the GELU (bf16 2.4x slower
        # than fp32 with all three, 0.93x with one).
        hidden, gate = jnp.split(self.proj(x, out_dtype=jnp.float32), 2, axis=-1)
        return (hidden * gelu(gate)).astype(self.proj.weight.dtype)


class FeedForward(nnx.Module):
    """`ff.net.0` is the GEGLU projection, `ff.net.2` the output (net.1 is dropout in torch)."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        inner = 4 * dim
        self.net = nnx.List([GEGLU(dim, inner, dtype=dtype, rngs=rngs), None,
                             Linear(inner, dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: Array) -> Array:
        chunks = feed_forward_chunks(x.shape[-2])
        if chunks == 1:
            return self.net[2](self.net[0](x))
        # diffusers' feed-forward chunking (`enable_forward_chunking`), on by itself for long sequences: the
        # GEGLU's (rows, tokens, 8 x dim) fp32 product is the UNet's largest buffer (160 MB for SD 1.5's 4
        # rows at 64x64 latents, plus its bf16 copy in half precision). Rows are independent: exact.
        lead, tokens, dim = x.shape[:-2], x.shape[-2], x.shape[-1]
        parts = jnp.moveaxis(x.reshape(*lead, chunks, tokens // chunks, dim), -3, 0)
        out = map_into(lambda i: self.net[2](self.net[0](parts[i])), chunks, parts.shape[1:], x.dtype,
                       start_after=x)
        return jnp.moveaxis(out, 0, -3).reshape(x.shape)


# 512 rather than 1024 tokens: SD 1.5's loop temporaries at 512 px fp16 333 -> 234 MB (XLA:CPU upcasts the
# fp16 GEGLU output for its fp32 dot), bf16 194 -> 190, fp32 270 -> 246 (BENCHMARKS.md, section 1i).
FEED_FORWARD_CHUNK = 512


def feed_forward_chunks(tokens: int) -> int:
    """How many token chunks the feed-forward runs in: chunks of at most FEED_FORWARD_CHUNK tokens that
    divide the sequence (1 for short ones)."""
    chunks = -(-tokens // FEED_FORWARD_CHUNK)
    while tokens % chunks:
        chunks += 1
    return chunks


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim: int, *, heads: int, dim_head: int, context_dim: int, norm_eps: float = 1e-5,
                 dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
        self.attn2 = Attention(dim, heads=heads, dim_head=dim_head, context_dim=context_dim, dtype=dtype,
                               rngs=rngs)
        self.norm3 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, context: Array, record: list | None = None) -> Array:
        """`record`: a list to which the cross-attention probabilities (rows, heads, tokens, keys) are
        appended (attention maps on request; the output is the same either way)."""
        x = x + self.attn1(self.norm1(x))
        normed = self.norm2(x)
        if record is not None:
            record.append(cross_attention_probabilities(self.attn2, normed, context))
        cross = self.attn2(normed, context)
        x = tile_batch(x, cross.shape[0]) + cross  # shared latents diverge here, one copy per context
        return x + self.ff(self.norm3(x))


def cross_attention_probabilities(attn: Attention, x: Array, context: Array) -> Array:
    """(context rows, heads, x tokens, context tokens) fp32 softmax probabilities of `attn` (diffusers'
    `get_attention_scores`); shared queries are tiled to the context's rows as `Attention` does."""
    split = lambda t: t.reshape(t.shape[0], t.shape[1], attn.heads, -1)
    q = tile_batch(split(attn.to_q(x)), context.shape[0])
    return attention_probabilities(q, split(attn.to_k(context)))


class Transformer2DModel(nnx.Module):
    """Spatial transformer: GroupNorm, proj_in (1x1 conv, or linear with `use_linear_projection`),
    transformer blocks over the H*W tokens, proj_out, residual."""

    def __init__(self, channels: int, *, heads: int, context_dim: int, num_layers: int, groups: int,
                 use_linear_projection: bool, dtype, rngs: nnx.Rngs):
        dim_head = channels // heads
        inner = heads * dim_head
        self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype)
        self.use_linear_projection = use_linear_projection
        if use_linear_projection:
            self.proj_in = Linear(channels, inner, dtype=dtype, rngs=rngs)
            self.proj_out = Linear(inner, channels, dtype=dtype, rngs=rngs)
        else:
            self.proj_in = Conv2d(channels, inner, 1, dtype=dtype, rngs=rngs)
            self.proj_out = Conv2d(inner, channels, 1, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads=heads, dim_head=dim_head, context_dim=context_dim,
                                  dtype=dtype, rngs=rngs)
            for _ in range(num_layers)
        ])

    def __call__(self, x: Array, context: Array, record: dict | None = None) -> Array:
        """`record` (attention maps on request): {"size": (h, w), "maps": list}; when this transformer's token
        grid is `size`, each block's cross-attention probabilities are appended to `maps`."""
        b, h, w, c = x.shape
        maps = record["maps"] if record is not None and tuple(record["size"]) == (h, w) else None
        hidden = self.norm(x)
        # A 1x1 conv and a linear layer are the same map on NHWC tokens; only the weight layout differs.
        hidden = self.proj_in(hidden.reshape(b, h * w, c) if self.use_linear_projection else hidden)
        hidden = hidden.reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, maps)
        b = hidden.shape[0]  # the context's batch once shared latents have met their contexts
        if self.use_linear_projection:
            hidden = self.proj_out(hidden).reshape(b, h, w, c)
        else:
            hidden = self.proj_out(hidden.reshape(b, h, w, -1))
        return hidden + tile_batch(x, hidden.shape[0]).astype(hidden.dtype)
