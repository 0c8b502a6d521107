"""diffusers' UNet2DConditionModel for SD 1.x / 2.x configs, in Flax NNX on NHWC latents."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from sega_jax.models.layers import (
    Conv2d,
    Downsample2D,
    GroupNorm,
    Linear,
    ResnetBlock2D,
    Upsample2D,
    silu,
    tile_batch,
    upcast_at_use,
)
from sega_jax.models.placement import computed_after
from sega_jax.models.transformer import Transformer2DModel
from sega_jax.models.weights import load_model, read_json, resolve_dtype

Array = jax.Array

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# Keys whose value must stay at diffusers' default: anything else would need layers we don't build.
_REQUIRED_DEFAULTS = {
    "center_input_sample": False, "only_cross_attention": False, "mid_block_only_cross_attention": None,
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "reverse_transformer_layers_per_block": None, "num_attention_heads": None,
    "act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn",
}
# diffusers' defaults for the keys that may be an int or a per-block list.
_PER_BLOCK_DEFAULTS = {"layers_per_block": 2, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
                       "attention_head_dim": 8}
# Accepted and irrelevant to inference: metadata, dropout, and a head count for an embedding we reject.
_IGNORED = {"dropout", "addition_embed_type_num_heads"}


def _is_default(key: str, value) -> bool:
    if key == "only_cross_attention" and isinstance(value, (list, tuple)):
        return not any(value)
    return value == _REQUIRED_DEFAULTS[key]


def _per_block(value, n: int, key: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"unet config: `{key}` has {len(values)} entries for {n} down blocks")
    return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] = (768,) * 4
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    # diffusers' historical naming: `attention_head_dim` holds the number of heads per block.
    attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)
    use_linear_projection: bool = False
    upcast_attention: bool = False  # we always compute attention scores and softmax in fp32
    sample_size: int | None = None
    # SDXL's micro-conditioning: "text_time" adds an embedding of the pooled text embeds and the time ids.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_diffusers(cls, config: dict) -> UNetConfig:
        """Validate a diffusers `unet/config.json` dict; unsupported keys or values raise ValueError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = dict(_PER_BLOCK_DEFAULTS)
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED:
                continue
            if key in _REQUIRED_DEFAULTS:
                if not _is_default(key, value):
                    raise ValueError(f"unet config: `{key}`={value!r} is not supported "
                                     f"(only {_REQUIRED_DEFAULTS[key]!r})")
            elif key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise ValueError(f"unet config: unknown key `{key}` (not supported by sega_jax's UNet)")
        n = len(kwargs.get("down_block_types", cls.down_block_types))
        for key in _PER_BLOCK_DEFAULTS:
            kwargs[key] = _per_block(kwargs[key], n, key)
            if not all(isinstance(v, int) for v in kwargs[key]):
                raise ValueError(f"unet config: `{key}` must be an int or a list of ints, "
                                 f"got {kwargs[key]!r}")
        return cls(**kwargs)._validated()

    def _validated(self) -> UNetConfig:
        n = len(self.down_block_types)
        for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            bad = [t for t in getattr(self, key) if t not in allowed]
            if bad:
                raise ValueError(f"unet config: `{key}` contains unsupported {bad} (supported: {allowed})")
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError("unet config: `down_block_types`, `up_block_types` and `block_out_channels` "
                             "must have the same length")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"unet config: `addition_embed_type`={self.addition_embed_type!r} is not "
                             "supported (only None or 'text_time')")
        if self.addition_embed_type and not (self.addition_time_embed_dim
                                             and self.projection_class_embeddings_input_dim):
            raise ValueError("unet config: `addition_embed_type`='text_time' needs `addition_time_embed_dim` "
                             "and `projection_class_embeddings_input_dim`")
        return self

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


def timestep_embedding(timesteps: Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> Array:
    """diffusers' `get_timestep_embedding` (sinusoidal, fp32)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_dim: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_dim, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(silu(self.linear_1(x)))


class DownBlock(nnx.Module):
    """CrossAttnDownBlock2D (with `attentions`) or DownBlock2D (without)."""

    def __init__(self, cfg: UNetConfig, i: int, in_ch: int, out_ch: int, *, dtype, rngs: nnx.Rngs):
        cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        n = cfg.layers_per_block[i]
        self.resnets = nnx.List([_resnet(cfg, in_ch if j == 0 else out_ch, out_ch, dtype, rngs)
                                 for j in range(n)])
        self.attentions = nnx.List([_transformer(cfg, i, out_ch, dtype, rngs) for _ in range(n)]) if cross \
            else None
        self.downsamplers = nnx.List([Downsample2D(out_ch, padding=cfg.downsample_padding, dtype=dtype,
                                                   rngs=rngs)]) if i < len(cfg.block_out_channels) - 1 \
            else None

    def __call__(self, x: Array, temb: Array, context: Array,
                 record: dict | None = None) -> tuple[Array, list[Array]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, record)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nnx.Module):
    """CrossAttnUpBlock2D (with `attentions`) or UpBlock2D (without)."""

    def __init__(self, cfg: UNetConfig, i: int, in_ch: int, prev_ch: int, out_ch: int, *, dtype,
                 rngs: nnx.Rngs):
        cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        n = cfg.layers_per_block[::-1][i] + 1
        block_index = len(cfg.block_out_channels) - 1 - i
        self.resnets = nnx.List([
            _resnet(cfg, (prev_ch if j == 0 else out_ch) + (in_ch if j == n - 1 else out_ch), out_ch, dtype,
                    rngs)
            for j in range(n)
        ])
        self.attentions = nnx.List([_transformer(cfg, block_index, out_ch, dtype, rngs)
                                    for _ in range(n)]) if cross else None
        self.upsamplers = nnx.List([Upsample2D(out_ch, dtype=dtype, rngs=rngs)]) if block_index > 0 else None

    def __call__(self, x: Array, skips: list[Array], temb: Array, context: Array,
                 upsample_size: tuple[int, int] | None, record: dict | None = None) -> Array:
        for j, resnet in enumerate(self.resnets):
            skip = skips.pop()
            # x has met the contexts (the mid block cross-attends); skips from before that are tiled to it.
            if upcast_at_use(skip.dtype):  # upcast for norm1 where it is used, not held in fp32 till then
                skip = computed_after(skip, x)
            skip = tile_batch(skip, x.shape[0]).astype(x.dtype)
            x = resnet(jnp.concatenate([x, skip], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, record)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) per layer (SD uses one)."""

    def __init__(self, cfg: UNetConfig, channels: int, *, dtype, rngs: nnx.Rngs):
        last = len(cfg.block_out_channels) - 1
        self.resnets = nnx.List([_resnet(cfg, channels, channels, dtype, rngs, cfg.mid_block_scale_factor)
                                 for _ in range(2)])
        self.attentions = nnx.List([_transformer(cfg, last, channels, dtype, rngs)])

    def __call__(self, x: Array, temb: Array, context: Array, record: dict | None = None) -> Array:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context, record), temb)


def _resnet(cfg: UNetConfig, in_ch: int, out_ch: int, dtype, rngs, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(in_ch, out_ch, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups,
                         eps=cfg.norm_eps, output_scale_factor=scale, dtype=dtype, rngs=rngs)


def _transformer(cfg: UNetConfig, block: int, channels: int, dtype, rngs) -> Transformer2DModel:
    return Transformer2DModel(channels, heads=cfg.attention_head_dim[block],
                              context_dim=cfg.cross_attention_dim[block],
                              num_layers=cfg.transformer_layers_per_block[block], groups=cfg.norm_num_groups,
                              use_linear_projection=cfg.use_linear_projection, dtype=dtype, rngs=rngs)


class UNet2DConditionModel(nnx.Module):
    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        ch = config.block_out_channels
        self.time_embedding = TimestepEmbedding(ch[0], config.time_embed_dim, dtype=dtype, rngs=rngs)
        if config.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim,
                                                   config.time_embed_dim, dtype=dtype, rngs=rngs)
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock(config, i, ch[max(i - 1, 0)], ch[i], dtype=dtype, rngs=rngs) for i in range(len(ch))
        ])
        self.mid_block = MidBlock(config, ch[-1], dtype=dtype, rngs=rngs)
        rev = ch[::-1]
        self.up_blocks = nnx.List([
            UpBlock(config, i, rev[min(i + 1, len(ch) - 1)], rev[max(i - 1, 0)], rev[i], dtype=dtype,
                    rngs=rngs)
            for i in range(len(ch))
        ])
        self.conv_norm_out = GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps, dtype=dtype)
        self.conv_out = Conv2d(ch[0], config.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, sample: Array, timesteps: Array, context: Array, text_embeds: Array | None = None,
                 time_ids: Array | None = None, *,
                 cross_attention_maps: tuple[int, int] | None = None) -> Array | tuple[Array, dict]:
        """sample (B, H, W, C) NHWC; timesteps scalar or (B,); context (B, L, D). Returns NHWC noise.

        `text_embeds` (pooled, (B, P)) and `time_ids` (B, 6) are SDXL's `added_cond_kwargs`, required by
        (and only by) a "text_time" config.

        Shared latents: `context` may hold k copies' worth of rows (k*B, L, D), ordered [copy 0 of all B,
        copy 1, ...], and so may `text_embeds` / `time_ids`. The output is then that of the sample tiled k
        times (k*B, H, W, C), but everything before the first cross-attention (conv_in, the first resnet,
        the first self-attention) runs on the B latents once: SEGA's UNet batch [uncond, text, concepts...]
        shares its latents. (With "text_time" the time embedding differs per copy, so the latents are tiled
        from the start.)

        Attention maps on request: `cross_attention_maps=(h, w)` returns `(noise, maps)`, where `maps` is
        {"down": [...], "mid": [...], "up": [...]}, one fp32 array (context rows, heads, h, w, context tokens)
        per cross-attention layer whose token grid is (h, w), in call order. The noise is unchanged.
        """
        if context.shape[0] % sample.shape[0]:
            raise ValueError(f"UNet: context batch {context.shape[0]} is not a multiple of the sample "
                             f"batch {sample.shape[0]}")
        dtype = self.conv_in.weight.dtype
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        cfg = self.config
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   freq_shift=cfg.freq_shift)
        temb = self.time_embedding(t_emb.astype(dtype))
        if cfg.addition_embed_type == "text_time":
            temb = tile_batch(temb, context.shape[0]) + self._text_time_embedding(text_embeds, time_ids,
                                                                                  context.shape[0], dtype)
            sample = tile_batch(sample, context.shape[0])
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("UNet: `text_embeds` / `time_ids` need a config with "
                             "addition_embed_type='text_time'")
        context = context.astype(dtype)
        size = None if cross_attention_maps is None else tuple(int(n) for n in cross_attention_maps)
        records = {place: None if size is None else {"size": size, "maps": []}
                   for place in ("down", "mid", "up")}
        x = self.conv_in(sample.astype(dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, records["down"])
            skips += block_skips
        x = self.mid_block(x, temb, context, records["mid"])
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Odd latent sizes: upsample to the next skip's size, as diffusers' `forward_upsample_size`.
            upsample = skips[-1].shape[1:3] if skips else None
            x = block(x, block_skips, temb, context, upsample, records["up"])
        noise = tile_batch(self.conv_out(self.conv_norm_out(x, silu=True)), context.shape[0])
        if size is None:
            return noise
        grid = lambda p: p.reshape(p.shape[0], p.shape[1], *size, p.shape[-1])
        return noise, {place: [grid(p) for p in record["maps"]] for place, record in records.items()}

    def _text_time_embedding(self, text_embeds: Array | None, time_ids: Array | None, batch: int,
                             dtype) -> Array:
        """diffusers' "text_time" `aug_emb`: add_embedding(concat(text_embeds, add_time_proj(time_ids)))."""
        if text_embeds is None or time_ids is None:
            raise ValueError("UNet: an SDXL ('text_time') UNet needs `text_embeds` and `time_ids`")
        if text_embeds.shape[0] != batch or time_ids.shape[0] != batch:
            raise ValueError(f"UNet: `text_embeds` {text_embeds.shape} and `time_ids` {time_ids.shape} need "
                             f"one row per context row ({batch})")
        cfg = self.config
        time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                         flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds.reshape(batch, -1)], -1)
        return self.add_embedding(add_embeds.astype(dtype))


def load_unet(folder: str | os.PathLike, *, dtype=None, variant: str | None = None,
              allow_pickle: bool = False) -> UNet2DConditionModel:
    """Load a diffusers `unet/` folder (config.json + safetensors) into our UNet."""
    config = UNetConfig.from_diffusers(read_json(os.path.join(folder, "config.json")))
    build_dtype = resolve_dtype(dtype) or jnp.float32
    return load_model(lambda: UNet2DConditionModel(config, dtype=build_dtype, rngs=nnx.Rngs(0)), folder,
                      dtype=dtype, variant=variant, allow_pickle=allow_pickle)
