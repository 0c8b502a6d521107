"""CLIP text encoders (transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`) as Flax NNX modules.

The module tree mirrors the checkpoint, so each parameter's state path joined by dots is its key in a
Stable Diffusion `text_encoder/` (or SDXL `text_encoder_2/`) folder:

    text_model.embeddings.token_embedding.weight          Embedding  (vocab, hidden)
    text_model.embeddings.position_embedding.weight       Embedding  (max_positions, hidden)
    text_model.encoder.layers.{i}.layer_norm1.{weight,bias}
    text_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    text_model.encoder.layers.{i}.layer_norm2.{weight,bias}
    text_model.encoder.layers.{i}.mlp.fc1.{weight,bias}
    text_model.encoder.layers.{i}.mlp.fc2.{weight,bias}
    text_model.final_layer_norm.{weight,bias}
    text_projection.weight                                Linear, no bias (hidden -> projection_dim);
                                                          `CLIPTextModelWithProjection` only (SDXL's
                                                          OpenCLIP ViT-bigG `text_encoder_2`)

transformers >= 5 saves a `CLIPTextModel` without the `text_model.` prefix; `load_text_encoder`
accepts both spellings, and picks the class from config.json's `architectures`. Matmuls run in the
parameter dtype; layer norms and the softmax in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sega_jax.models.attention import dot_product_attention
from sega_jax.models.layers import Embedding, LayerNorm, Linear, gelu
from sega_jax.models.weights import WeightLoadError, load_model, read_json, resolve_dtype

Array = jax.Array

ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
PROJECTION_KEY = "text_projection.weight"
# transformers' pooled-output rule: a config with eos_token_id == 2 (the value before transformers PR
# #24773, which every SD/SDXL text encoder config still has) pools at argmax(input_ids).
LEGACY_EOS_TOKEN_ID = 2


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": _quick_gelu,                                   # SD 1.x (OpenAI CLIP ViT-L/14)
    "gelu": gelu,                                                # SD 2.x (OpenCLIP ViT-H/14), exact erf
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),      # tanh approximation
}

# config.json keys that do not change the text encoder's forward pass (metadata, training-time
# settings, token ids other than eos, generation defaults that older transformers versions serialised
# for every model).
IRRELEVANT_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "initializer_factor", "attention_dropout", "dropout",
    "pad_token_id", "bos_token_id", "sep_token_id", "decoder_start_token_id",
    "use_attention_mask", "attn_implementation",
    "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
    "return_dict", "output_attentions", "output_hidden_states", "torchscript", "use_bfloat16",
    "gradient_checkpointing", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "tie_word_embeddings",
    "task_specific_params", "tf_legacy_loss", "use_cache",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text encoder's shape and math; defaults are transformers' `CLIPTextConfig` defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # `text_projection`'s output size (CLIPTextModelWithProjection only)
    # The pooled output's token (see `pooled_output`); diffusers' optional attention mask.
    eos_token_id: int | None = 49407
    use_attention_mask: bool = False

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act: {self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "projection_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size: {self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        eos = self.eos_token_id
        if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or eos < 0):
            raise ValueError(f"eos_token_id: expected a non-negative integer or null, got {eos!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, d: dict) -> CLIPTextConfig:
        """From a transformers `text_encoder/config.json` dict; refuses what would change the math."""
        if not isinstance(d, dict):
            raise ValueError(f"text encoder config: expected a JSON object, got {type(d).__name__}")
        architectures = d.get("architectures")
        if architectures is not None:
            if not isinstance(architectures, list) or not all(a in ARCHITECTURES for a in architectures):
                raise ValueError(f"architectures: {architectures!r} is not supported "
                                 f"(expected one of {', '.join(ARCHITECTURES)})")
        model_type = d.get("model_type")
        if model_type is not None and model_type != "clip_text_model":
            raise ValueError(f"model_type: {model_type!r} is not supported (expected 'clip_text_model')")
        if d.get("pruned_heads"):
            raise ValueError(f"pruned_heads: {d['pruned_heads']!r} is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in IRRELEVANT_KEYS
                         and k != "pruned_heads" and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unsupported text encoder config key(s): {', '.join(unknown)}")
        kwargs = {k: d[k] for k in fields if k in d}
        if "use_attention_mask" in kwargs:
            kwargs["use_attention_mask"] = bool(kwargs["use_attention_mask"])
        if "layer_norm_eps" in kwargs:
            kwargs["layer_norm_eps"] = float(kwargs["layer_norm_eps"])
        return cls(**kwargs)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype,
                                            rngs=rngs)

    def __call__(self, input_ids: Array) -> Array:
        positions = jnp.arange(input_ids.shape[-1], dtype=jnp.int32)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        dim = config.hidden_size
        self.k_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.num_heads = config.num_attention_heads

    def __call__(self, x: Array, mask: Array) -> Array:
        b, length, _ = x.shape
        split = lambda t: t.reshape(b, length, self.num_heads, -1)
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                    mask=mask)
        return self.out_proj(out.reshape(b, length, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.hidden_act = config.hidden_act

    def __call__(self, x: Array) -> Array:
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)

    def __call__(self, x: Array, mask: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])


def attention_mask_for(input_ids: Array, attention_mask: Array | None = None) -> Array:
    """The causal mask, combined with a padding mask (1 = attend) as transformers does: (B|1, 1, L, L)."""
    length = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if attention_mask is not None:
        mask = mask & jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    return mask


class CLIPTextTransformer(nnx.Module):
    """transformers' `CLIPTextTransformer` (the `text_model` of a `CLIPTextModel`)."""

    def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None, *,
                      num_layers: int | None = None) -> list[Array]:
        """The embeddings' output and each of the first `num_layers` layers' outputs (no final norm)."""
        max_positions = self.embeddings.position_embedding.weight.shape[0]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected shape (batch, length), got {input_ids.shape}")
        if input_ids.shape[-1] > max_positions:
            raise ValueError(f"input_ids: sequence length {input_ids.shape[-1]} exceeds "
                             f"max_position_embeddings={max_positions}")
        mask = attention_mask_for(input_ids, attention_mask)
        states = [self.embeddings(jnp.asarray(input_ids, jnp.int32))]
        layers = self.encoder.layers if num_layers is None else list(self.encoder.layers)[:num_layers]
        for layer in layers:
            states.append(layer(states[-1], mask))
        return states

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 clip_skip: int | None = None) -> Array:
        num_layers = len(self.encoder.layers)
        skip = clip_skip or 0
        if not 0 <= skip <= num_layers:
            raise ValueError(f"clip_skip: expected 0..{num_layers}, got {clip_skip}")
        states = self.hidden_states(input_ids, attention_mask, num_layers=num_layers - skip)
        return self.final_layer_norm(states[-1])


def eos_positions(input_ids: Array, eos_token_id: int | None) -> Array:
    """The pooled token's position in each row (B,), by transformers' rule.

    eos_token_id == 2 (legacy configs, all SD/SDXL releases): argmax of the ids (the highest id, EOS in
    CLIP's vocabulary; the first one when padding repeats it). Otherwise: the first position whose id is
    `eos_token_id` (0 for a row without one).
    """
    if eos_token_id is None:
        raise ValueError("eos_token_id: the config sets none, so there is no pooled output")
    ids = jnp.asarray(input_ids, jnp.int32)
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


def pooled_output(last_hidden_state: Array, input_ids: Array, eos_token_id: int | None) -> Array:
    """transformers' `pooler_output`: the final-normed state at each row's EOS position, (B, hidden)."""
    positions = eos_positions(input_ids, eos_token_id)
    return jnp.take_along_axis(last_hidden_state, positions[:, None, None], axis=1)[:, 0]


class SDXLTextEncoding(NamedTuple):
    """One text encoder's outputs as diffusers' `StableDiffusionXLPipeline.encode_prompt` uses them."""

    prompt_embeds: Array        # hidden_states[-(clip_skip + 2)]: no final layer norm, (B, L, hidden)
    pooler_output: Array        # final-normed EOS state, (B, hidden)
    text_embeds: Array | None   # text_projection(pooler_output), (B, projection_dim); None without a head


class CLIPTextModel(nnx.Module):
    """transformers' `CLIPTextModel`: `model(input_ids)` is the last hidden state (B, L, hidden).

    `clip_skip=n` returns diffusers' clip-skip embedding instead: the output of the layer `n` before
    the last, through the final layer norm. `hidden_states(...)` gives transformers'
    `output_hidden_states=True` tuple (embeddings, then every layer; no final norm);
    `encode_for_sdxl(...)` gives what SDXL's pipeline takes from an encoder.
    """

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextTransformer(config, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 clip_skip: int | None = None) -> Array:
        return self.text_model(input_ids, attention_mask, clip_skip=clip_skip)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None) -> tuple[Array, ...]:
        return tuple(self.text_model.hidden_states(input_ids, attention_mask))

    def encode_for_sdxl(self, input_ids: Array, attention_mask: Array | None = None, *,
                        clip_skip: int | None = None) -> SDXLTextEncoding:
        """One pass: `prompt_embeds` = hidden_states[-(clip_skip + 2)] (the penultimate layer for None or
        0), transformers' `pooler_output`, and `text_embeds` (the projection model's; None here).
        diffusers' SDXL pipeline uses `text_embeds` of its last encoder as `pooled_prompt_embeds`."""
        num_layers = len(self.text_model.encoder.layers)
        skip = clip_skip or 0
        if not 0 <= skip < num_layers:
            raise ValueError(f"clip_skip: expected 0..{num_layers - 1}, got {clip_skip}")
        states = self.text_model.hidden_states(input_ids, attention_mask)
        last = self.text_model.final_layer_norm(states[-1])
        pooled = pooled_output(last, input_ids, self.config.eos_token_id)
        return SDXLTextEncoding(states[-(skip + 2)], pooled, self._project(pooled))

    def _project(self, pooled: Array) -> Array | None:
        return None

    @property
    def dtype(self) -> jnp.dtype:
        return self.text_model.final_layer_norm.weight.dtype


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`): a `CLIPTextModel` plus
    `text_projection` on the pooled output. `model(input_ids)` is still the last hidden state."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False, dtype=dtype,
                                      rngs=rngs)

    def _project(self, pooled: Array) -> Array:
        return self.text_projection(pooled)


_CLASSES: dict[str, type[CLIPTextModel]] = {
    "CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


def _key_rules(has_head: bool):
    """(rename, ignore) for checkpoint keys: add the `text_model.` prefix transformers 5 leaves off a
    `CLIPTextModel`; drop the `position_ids` buffer, and `text_projection` unless the model has one."""
    def ignore(key: str) -> bool:
        return key.split(".")[-1] == "position_ids" or (not has_head and key == PROJECTION_KEY)

    def rename(key: str) -> str:
        keep = key.startswith("text_model.") or (has_head and key == PROJECTION_KEY)
        return key if keep else f"text_model.{key}"
    return rename, ignore


def _architecture(config: dict) -> str:
    names = set(config.get("architectures") or ["CLIPTextModel"])
    if len(names) > 1:
        raise ValueError(f"architectures: {sorted(names)} names more than one class")
    return names.pop()


def load_text_encoder(folder: str | os.PathLike, *, dtype=None, variant: str | None = None,
                      allow_pickle: bool = False, architecture: str | None = None) -> CLIPTextModel:
    """Load a diffusers `text_encoder/` folder (config.json + safetensors) into a `CLIPTextModel`, or a
    `CLIPTextModelWithProjection` when config.json's `architectures` (or `architecture`, e.g. the class
    model_index.json names) says so.

    `dtype` (None = float32, or bf16/fp16) is both the parameter and the compute dtype.
    """
    if architecture is not None and architecture not in _CLASSES:
        raise ValueError(f"architecture: {architecture!r} is not supported (expected one of "
                         f"{', '.join(ARCHITECTURES)})")
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightLoadError(f"{folder}: model folder not found")
    config_path = folder / "config.json"
    raw = read_json(config_path)
    try:
        config = CLIPTextConfig.from_transformers(raw)
        cls = _CLASSES[architecture or _architecture(raw)]
    except ValueError as err:
        raise WeightLoadError(f"{config_path}: {err}") from err
    dtype = resolve_dtype(dtype) or jnp.dtype(jnp.float32)
    rename, ignore = _key_rules(cls is CLIPTextModelWithProjection)
    build = lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0))
    return load_model(build, folder, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                      rename=rename, ignore=ignore)


def num_parameters(model: CLIPTextModel) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
