"""Shared layers for the Stable Diffusion modules.

Parameter names mirror the diffusers/transformers checkpoint keys (`weight`, `bias`), so a module's
state path joined with dots *is* the checkpoint key. Each layer records how its torch tensors map onto
ours in `TORCH_LAYOUT` (see `sega_jax.models.weights`). Images are NHWC, XLA's native layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sega_jax.models.attention import dot_product_attention
from sega_jax.models.placement import computed_after
from sega_jax.runtime import xla_options

Array = jax.Array


def tile_batch(x: Array, batch: int) -> Array:
    """Repeat `x` (b, ...) as [x, x, ...] up to `batch` rows: the UNet's shared-latents layout."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"cannot tile a batch of {x.shape[0]} to {batch}")
    return jnp.tile(x, (batch // x.shape[0],) + (1,) * (x.ndim - 1))


def _accumulator(dtype) -> jnp.dtype:
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else jnp.dtype(dtype)


def fp32_at_use(w: Array, x: Array) -> Array:
    """`w` upcast to fp32 where it meets the activation `x`. XLA:CPU computes half-precision convolutions
    (and matrix-vector products) in fp32 and upcasts their weights itself; inside the SEGA `lax.scan` those
    upcasts are loop-invariant, so XLA hoisted them out of the loop and held an fp32 copy of every conv
    weight for the whole loop (+2.2 GB for SD 1.5 in bf16, more than the bf16 weights themselves; BENCHMARKS
    section 1f), or scheduled them all at once. Tying it to `x` (`placement.computed_after`) makes each
    upcast one fused pass that runs just before its use, into a buffer that is reused (with `xla_options`'s
    half-precision options, which keep XLA from hoisting the convert alone). The values are exact."""
    return computed_after(w.astype(jnp.float32), x)


def upcast_at_use(dtype, rows: int | None = None) -> bool:
    """Whether a half-precision op is computed in fp32 with `fp32_at_use`: on XLA:CPU, what it has no
    half-precision kernel for: convolutions (rows None), bf16 matrix-vector products (rows 1) and every
    fp16 product."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize >= 4 or not xla_options.upcasts_half_precision():
        return False
    return rows in (None, 1) or dtype == jnp.float16


def _operand(x: Array, dtype, upcast: bool) -> Array:
    """A product's activation operand: in `dtype`, or in fp32 where the product is computed in fp32
    (`upcast_at_use`), unrounded: rounding it to half precision first would only cost a convert pair per
    element and precision (an fp32 SiLU(GroupNorm) output meets its 3x3 convolution so on CPU)."""
    return x.astype(jnp.float32) if upcast else x.astype(dtype)


# The fp32 copies an upcast product makes a chunk at a time (a conv weight's output channels, an fp16
# activation's rows) hold at most this many elements (32 MB).
UPCAST_CHUNK_ELEMENTS = 2**23


def _chunks(length: int, elements_per_index: int, limit: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering `length` indices, each with at most `limit` elements (`elements_per_index`
    per index, at least one index per range), as even as possible."""
    n = min(length, max(1, -(-length * elements_per_index // limit)))
    bounds = [round(i * length / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def half_precision_dot(x: Array, w: Array) -> Array:
    """x @ w with w's dtype's accumulator: fp32 for half-precision operands (`preferred_element_type`; XLA:CPU
    runs bf16 -> fp32 matrix products natively, 2-3x faster than bf16 -> bf16), not yet rounded; what it
    upcasts (`upcast_at_use`) is computed in fp32 from `fp32_at_use` weights. fp32 is unchanged."""
    dtype = w.dtype
    rows = math.prod(x.shape[:-1])
    upcast = upcast_at_use(dtype, rows)
    copies_x = upcast and x.dtype != jnp.float32
    chunks = _chunks(rows, x.shape[-1], UPCAST_CHUNK_ELEMENTS) if copies_x else [(0, rows)]
    if len(chunks) == 1:
        x = _operand(x, dtype, upcast)
        return jnp.matmul(x, fp32_at_use(w, x) if upcast else w, preferred_element_type=_accumulator(dtype))
    # A big half-precision activation's fp32 copy was the fp16 loop's largest temporary (SD 1.5's 960 -> 320
    # shortcut at 64x64: 63 MB): upcast and multiply a chunk of rows at a time, each chunk's upcast made after
    # the previous chunk's product.
    flat, w = x.reshape(rows, x.shape[-1]), fp32_at_use(w, x)
    outputs, anchor = [], x
    for lo, hi in chunks:
        anchor = jnp.matmul(computed_after(flat[lo:hi], anchor).astype(jnp.float32), w)
        outputs.append(anchor)
    return jnp.concatenate(outputs).reshape(*x.shape[:-1], w.shape[-1])


def _convolution(x: Array, w: Array, stride: int, padding) -> Array:
    dtype = w.dtype
    upcast = upcast_at_use(dtype)
    x = _operand(x, dtype, upcast)
    conv = lambda kernel: jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=_accumulator(dtype),
    )
    if not upcast:
        return conv(w)
    # The fp32 copy of a big weight (SD 1.5's 3x3 2560 -> 1280: 113 MB) was the loop's largest temporary:
    # upcast and convolve a chunk of output channels at a time, each chunk's upcast made after the previous
    # chunk's output, into the buffer the previous chunk freed.
    outputs, anchor = [], x
    for lo, hi in _chunks(w.shape[-1], math.prod(w.shape[:-1]), UPCAST_CHUNK_ELEMENTS):
        anchor = conv(fp32_at_use(w[..., lo:hi], anchor))
        outputs.append(anchor)
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)


def _with_bias(y: Array, bias, dtype) -> Array:
    """The accumulator `y` plus the bias, rounded once to `dtype`: torch's half-precision linear layers and
    convolutions add their bias before rounding (addmm, oneDNN's fused bias). Rounding first added a convert
    pair per element on XLA:CPU."""
    if bias is not None:
        y = y + bias[...].astype(y.dtype)
    return y.astype(dtype)


def silu(x: Array) -> Array:
    """SiLU computed in fp32 and rounded once to `x`'s dtype, as torch's one-kernel `F.silu` does for half
    precision. XLA rounds after each op of the composite form instead (five roundings), which on XLA:CPU
    costs a convert pair per op (the tiny UNet's GroupNorm + SiLU fusions ran 2x slower in bf16)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def gelu(x: Array) -> Array:
    """Exact GELU in fp32, rounded once to `x`'s dtype, in torch's form 0.5 x (1 + erf(x / sqrt 2)) (its
    CPU and CUDA kernels'): 1.7x faster on XLA:CPU than `jax.nn.gelu`'s erfc form, which is more accurate
    only in the far negative tail (x < -3, |GELU| < 4e-3: by ~1e-6, absolute)."""
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(1 / math.sqrt(2))))).astype(x.dtype)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC inputs; `weight` is HWIO (torch's OIHW transposed on load)."""

    TORCH_LAYOUT = {"weight": "conv", "bias": "identity"}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | tuple[tuple[int, int], tuple[int, int]] = 0, bias: bool = True,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        fan_in = in_channels * kernel_size * kernel_size
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.weight = nnx.Param(_normal(rngs, shape, 1 / math.sqrt(fan_in), dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), dtype)) if bias else None
        self.stride = stride
        self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding

    def __call__(self, x: Array) -> Array:
        w = self.weight[...]
        if w.shape[:2] == (1, 1) and self.stride == 1 and self.padding == ((0, 0), (0, 0)):
            # A 1x1 convolution is a matmul over channels: the same numbers, and 1.3-3.7x faster on XLA:CPU
            # at SD's shapes (proj_in/out, resnet shortcuts).
            y = half_precision_dot(x, w[0, 0])
        else:
            y = _convolution(x, w, self.stride, self.padding)
        return _with_bias(y, self.bias, w.dtype)


class Linear(nnx.Module):
    """torch.nn.Linear; `weight` is (in, out) (torch's (out, in) transposed on load)."""

    TORCH_LAYOUT = {"weight": "linear", "bias": "identity"}

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (in_features, out_features), 1 / math.sqrt(in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: Array, *, out_dtype=None) -> Array:
        """x @ weight + bias in the weights' dtype, or in `out_dtype` (fp32: the accumulator unrounded, for an
        fp32 computation that follows)."""
        w = self.weight[...]
        return _with_bias(half_precision_dot(x, w), self.bias, out_dtype or w.dtype)


class Embedding(nnx.Module):
    TORCH_LAYOUT = {"weight": "identity"}

    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (num_embeddings, features), 0.02, dtype))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.weight[...], ids, axis=0)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over the channel (last) axis; statistics in fp32."""

    TORCH_LAYOUT = {"weight": "identity", "bias": "identity"}

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups")
        self.weight = nnx.Param(jnp.ones((num_channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), dtype))
        self.num_groups = num_groups
        self.eps = eps

    def __call__(self, x: Array, *, silu: bool = False) -> Array:
        """GroupNorm(x) in the weights' dtype. With `silu`, SiLU(GroupNorm(x)) as the 3x3 convolution after it
        takes it (every ResNet block, every model's head): computed in fp32 and rounded once, or not rounded
        where XLA:CPU computes that convolution in fp32 anyway (`upcast_at_use`; torch rounds after the norm
        and again after the SiLU)."""
        # Two-pass statistics like torch, but reduced per channel over the spatial axes first (channels
        # stay the minor, vectorised axis) and only then per group: 2-3x faster on CPU than reducing a
        # (..., groups, channels/group) view, same fp32 numerics.
        batch, channels = x.shape[0], x.shape[-1]
        per_group = channels // self.num_groups
        spatial = tuple(range(1, x.ndim - 1))
        count = math.prod(x.shape[1:-1]) * per_group
        x32 = x.astype(jnp.float32)

        def group_mean(channel_sums: Array) -> Array:  # (B, C) -> (B, 1, ..., 1, C), equal within a group
            means = channel_sums.reshape(batch, self.num_groups, per_group).sum(-1) / count
            return jnp.repeat(means, per_group, axis=1).reshape((batch,) + (1,) * len(spatial) + (channels,))

        centred = x32 - group_mean(x32.sum(spatial))
        scale = jax.lax.rsqrt(group_mean(jnp.square(centred).sum(spatial)) + self.eps)
        out = centred * (scale * self.weight[...].astype(jnp.float32)) + self.bias[...].astype(jnp.float32)
        dtype = self.weight.dtype
        if not silu:
            return out.astype(dtype)
        return jax.nn.silu(out).astype(jnp.float32 if upcast_at_use(dtype) else dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis; statistics in fp32."""

    TORCH_LAYOUT = {"weight": "identity", "bias": "identity"}

    def __init__(self, features: int, *, eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.weight = nnx.Param(jnp.ones((features,), dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.weight.dtype)


class Attention(nnx.Module):
    """diffusers' `Attention` (to_q, to_k, to_v, to_out.0) on token sequences (B, L, C)."""

    def __init__(self, query_dim: int, *, heads: int, dim_head: int, context_dim: int | None = None,
                 qkv_bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.to_q = Linear(query_dim, inner, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_k = Linear(context_dim, inner, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_v = Linear(context_dim, inner, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(inner, query_dim, dtype=dtype, rngs=rngs)])
        self.heads = heads

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        context = x if context is None else context
        lq, b = x.shape[1], context.shape[0]
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1)
        # Queries shared by every copy of the context (the UNet's shared latents) are projected once.
        q = tile_batch(split(self.to_q(x)), b)
        k, v = split(self.to_k(context)), split(self.to_v(context))
        out = dot_product_attention(q, k, v)
        return self.to_out[0](out.reshape(b, lq, -1))


class ResnetBlock2D(nnx.Module):
    """diffusers' ResnetBlock2D with the `default` time-embedding norm (SD 1.x/2.x UNet and VAE)."""

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int,
                 eps: float, output_scale_factor: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (Linear(temb_channels, out_channels, dtype=dtype, rngs=rngs)
                              if temb_channels else None)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        h = self.conv1(self.norm1(x, silu=True))
        if self.time_emb_proj is not None and temb is not None:
            h = h + tile_batch(self.time_emb_proj(silu(temb)), h.shape[0])[:, None, None, :]
        h = self.conv2(self.norm2(h, silu=True))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = shortcut.astype(h.dtype) + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Strided 3x3 conv. `padding=0` reproduces the VAE encoder's asymmetric (0, 1) pad."""

    def __init__(self, channels: int, *, padding: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, size: tuple[int, int] | None = None) -> Array:
        if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = _nearest_resize(x, size)
        return self.conv(x)


def _nearest_resize(x: Array, size: tuple[int, int]) -> Array:
    """torch's F.interpolate(mode="nearest", size=...): source index floor(dst * in / out)."""
    for axis, out in zip((1, 2), size, strict=True):
        n = x.shape[axis]
        index = np.minimum(np.floor(np.arange(out) * np.float32(n / out)).astype(np.int32), n - 1)
        x = jnp.take(x, index, axis=axis)
    return x
