"""Flax NNX port of diffusers' `AutoencoderKL` (the Stable Diffusion VAE), NHWC inside.

Attribute names mirror diffusers' modules, so each parameter's state path joined with dots is its
checkpoint key (e.g. `decoder.mid_block.attentions.0.to_q.weight`); see `sega_jax.models.weights`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sega_jax.models.layers import Attention, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D
from sega_jax.models.weights import load_model, read_json, resolve_dtype

Array = jax.Array

_EPS = 1e-6  # diffusers hard-codes eps=1e-6 for every norm in the VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The subset of diffusers' `AutoencoderKL` config we support (defaults are diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True  # diffusers: decode in fp32 when the weights are fp16 (SDXL's VAE overflows)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> VAEConfig:
        """Build from a diffusers `vae/config.json` dict; anything we cannot honour raises ValueError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "_class_name" and value != "AutoencoderKL":
                raise ValueError(f"VAE config: _class_name={value!r} is not supported (only AutoencoderKL)")
            if key.startswith("_"):
                continue
            if key in ("shift_factor",):
                if value not in (None, 0, 0.0):
                    raise ValueError(f"VAE config: shift_factor={value!r} is not supported (only None or 0)")
            elif key in ("latents_mean", "latents_std"):
                if value is not None:
                    raise ValueError(f"VAE config: {key} is not supported (only None)")
            elif key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise ValueError(f"VAE config: unsupported key {key!r}")
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        for key in ("down_block_types", "up_block_types"):
            wanted = "DownEncoderBlock2D" if key == "down_block_types" else "UpDecoderBlock2D"
            bad = [t for t in getattr(self, key) if t != wanted]
            if bad:
                raise ValueError(f"VAE config: {key} contains {bad[0]!r}; only {wanted!r} is supported")
            if len(getattr(self, key)) != len(self.block_out_channels):
                raise ValueError(f"VAE config: {key} has {len(getattr(self, key))} entries but "
                                 f"block_out_channels has {len(self.block_out_channels)}")
        if self.act_fn not in ("silu", "swish"):  # diffusers maps both names to nn.SiLU
            raise ValueError(f"VAE config: act_fn={self.act_fn!r} is not supported (only 'silu')")
        for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VAE config: {key}={value!r} must be a positive integer")
        chans = self.block_out_channels
        if not chans or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chans):
            raise ValueError(f"VAE config: block_out_channels={chans!r} must be positive integers")
        for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"VAE config: {key}={getattr(self, key)!r} must be a boolean")


class VAEAttention(Attention):
    """diffusers' mid-block `Attention`: GroupNorm, one head over all channels, residual connection."""

    def __init__(self, channels: int, *, groups: int, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(channels, heads=1, dim_head=channels, qkv_bias=True, dtype=dtype, rngs=rngs)
        self.group_norm = GroupNorm(groups, channels, eps=_EPS, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        return super().__call__(tokens).reshape(b, h, w, c) + x.astype(self.to_out[0].weight.dtype)


class MidBlock(nnx.Module):
    """diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, (attention), resnet."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, dtype, rngs: nnx.Rngs):
        res = lambda: ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS,
                                    dtype=dtype, rngs=rngs)
        self.resnets = nnx.List([res(), res()])
        attention = VAEAttention(channels, groups=groups, dtype=dtype, rngs=rngs) if add_attention else None
        self.attentions = nnx.List([attention])

    def __call__(self, x: Array) -> Array:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, layers: int, groups: int, downsample: bool, dtype,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None, groups=groups, eps=_EPS,
                          dtype=dtype, rngs=rngs)
            for i in range(layers)])
        self.downsamplers = (nnx.List([Downsample2D(cout, padding=0, dtype=dtype, rngs=rngs)])
                             if downsample else None)

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, layers: int, groups: int, upsample: bool, dtype,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None, groups=groups, eps=_EPS,
                          dtype=dtype, rngs=rngs)
            for i in range(layers)])
        self.upsamplers = nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)]) if upsample else None

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, chans[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock(chans[max(i - 1, 0)], c, layers=cfg.layers_per_block, groups=groups,
                             downsample=i < len(chans) - 1, dtype=dtype, rngs=rngs)
            for i, c in enumerate(chans)])
        self.mid_block = MidBlock(chans[-1], groups=groups, add_attention=cfg.mid_block_add_attention,
                                  dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(groups, chans[-1], eps=_EPS, dtype=dtype)
        # double_z: mean and logvar side by side on the channel axis
        self.conv_out = Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        chans, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, chans[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(chans[0], groups=groups, add_attention=cfg.mid_block_add_attention,
                                  dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock(chans[max(i - 1, 0)], c, layers=cfg.layers_per_block + 1, groups=groups,
                           upsample=i < len(chans) - 1, dtype=dtype, rngs=rngs)
            for i, c in enumerate(chans)])
        self.conv_norm_out = GroupNorm(groups, chans[-1], eps=_EPS, dtype=dtype)
        self.conv_out = Conv2d(chans[-1], cfg.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, z: Array) -> Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class AutoencoderKL(nnx.Module):
    """diffusers' `AutoencoderKL` on NHWC arrays. `config.scaling_factor` is left to the caller."""

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = (Conv2d(2 * latent, 2 * latent, 1, dtype=dtype, rngs=rngs)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (Conv2d(latent, latent, 1, dtype=dtype, rngs=rngs)
                                if config.use_post_quant_conv else None)

    @property
    def dtype(self) -> jnp.dtype:
        return self.decoder.conv_in.weight.dtype

    def encode(self, images: Array) -> tuple[Array, Array]:
        """Images (B, H, W, C) -> the posterior's (mean, logvar), each (B, H/f, W/f, latent_channels)."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: Array) -> Array:
        """Latents (B, h, w, latent_channels) -> the decoder's raw output (B, h*f, w*f, out_channels)."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)


# Checkpoints saved before diffusers 0.14 name the mid-block attention's projections differently.
_LEGACY_ATTENTION = re.compile(
    r"^(.*\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_key(key: str) -> str:
    match = _LEGACY_ATTENTION.match(key)
    if match is None:
        return key
    prefix, name, kind = match.groups()
    return f"{prefix}{_LEGACY_NAMES[name]}.{kind}"


def load_vae(folder: str | os.PathLike, *, dtype=None, variant: str | None = None,
             allow_pickle: bool = False) -> AutoencoderKL:
    """Load a diffusers-format `vae/` folder (config.json + weights). dtype None means float32."""
    config = VAEConfig.from_diffusers(read_json(os.path.join(folder, "config.json")))
    dtype = resolve_dtype(dtype) or jnp.dtype(jnp.float32)
    build = lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0))
    return load_model(build, folder, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                      rename=rename_legacy_key)
