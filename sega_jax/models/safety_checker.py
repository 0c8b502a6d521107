"""diffusers' `StableDiffusionSafetyChecker` (CLIP vision tower + concept head) as a Flax NNX module.

The module tree mirrors the checkpoint of a Stable Diffusion `safety_checker/` folder, so each
parameter's state path joined by dots is its key:

    vision_model.vision_model.embeddings.class_embedding                (hidden,)
    vision_model.vision_model.embeddings.patch_embedding.weight         Conv2d, no bias
    vision_model.vision_model.embeddings.position_embedding.weight      Embedding (patches + 1, hidden)
    vision_model.vision_model.pre_layrnorm.{weight,bias}                (sic: transformers' name)
    vision_model.vision_model.encoder.layers.{i}....                    the CLIP text encoder's layer
    vision_model.vision_model.post_layernorm.{weight,bias}
    visual_projection.weight                                            Linear, no bias
    concept_embeds (17, proj), special_care_embeds (3, proj)
    concept_embeds_weights (17,), special_care_embeds_weights (3,)      the per-concept thresholds

transformers >= 5 saves the tower as `vision_model.{embeddings,...}` (one `vision_model.`);
`load_safety_checker` accepts both spellings.

The head is the reference's `forward` (not `forward_onnx`), quirks included: per image, special-care
scores are `round(cos - threshold + adjustment, 3)` where `adjustment` becomes 0.01 from the first
special-care concept whose score is > 0 on (so it also shifts the later special-care scores); concept
scores are `round(cos - threshold + adjustment, 3)`; an image is flagged when any concept score is > 0.
Cosine similarities and scores are computed in float32 whatever the parameter dtype (the reference casts
its cosines to float32; its thresholds stay in the model dtype, as ours do).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sega_jax.models.clip import ACTIVATIONS, CLIPEncoder
from sega_jax.models.image_processing import CLIPImageProcessor
from sega_jax.models.layers import Conv2d, Embedding, LayerNorm, Linear
from sega_jax.models.weights import WeightLoadError, load_model, read_json, resolve_dtype
from sega_jax.runtime import traces, xla_options

Array = jax.Array
logger = logging.getLogger(__name__)

NUM_CONCEPTS = 17          # fixed by diffusers' StableDiffusionSafetyChecker
NUM_SPECIAL_CARE = 3
SPECIAL_CARE_ADJUSTMENT = 0.01
TRACE_COUNT = traces.counter("safety_checker", "safety_checker")  # traces of the jitted checker

_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5)


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}: only square sizes are supported, got {value!r}")
        value = value[0]
    return value


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower's shape and math; defaults are transformers' `CLIPVisionConfig` defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act: {self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "image_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"vision_config.{name}: expected a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision_config.hidden_size: {self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.patch_size > self.image_size:
            raise ValueError(f"vision_config.patch_size: {self.patch_size} > image_size={self.image_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers(cls, d: dict) -> CLIPVisionConfig:
        """From a `vision_config` dict; keys that do not change the forward pass are ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"vision_config: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type is not None and model_type != "clip_vision_model":
            raise ValueError(f"vision_config.model_type: {model_type!r} is not supported "
                             "(expected 'clip_vision_model')")
        kwargs = {k: d[k] for k in _VISION_DEFAULTS if d.get(k) is not None}
        for name in ("image_size", "patch_size"):
            if name in kwargs:
                kwargs[name] = _square(kwargs[name], f"vision_config.{name}")
        if "layer_norm_eps" in kwargs:
            kwargs["layer_norm_eps"] = float(kwargs["layer_norm_eps"])
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class SafetyCheckerConfig:
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512

    def __post_init__(self):
        if not isinstance(self.projection_dim, int) or isinstance(self.projection_dim, bool) \
                or self.projection_dim <= 0:
            raise ValueError(f"projection_dim: expected a positive integer, got {self.projection_dim!r}")

    @classmethod
    def from_transformers(cls, d: dict) -> SafetyCheckerConfig:
        """From a `safety_checker/config.json` (a transformers `CLIPConfig`).

        As transformers does, a legacy `vision_config_dict` (found in SD 1.x checkpoints) replaces
        `vision_config`, completed with `CLIPVisionConfig`'s defaults.
        """
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        architectures = d.get("architectures")
        if architectures is not None and architectures != ["StableDiffusionSafetyChecker"]:
            raise ValueError(f"architectures: {architectures!r} is not supported "
                             "(expected ['StableDiffusionSafetyChecker'])")
        model_type = d.get("model_type")
        if model_type is not None and model_type != "clip":
            raise ValueError(f"model_type: {model_type!r} is not supported (expected 'clip')")
        vision = d.get("vision_config_dict")
        if vision is None:
            vision = d.get("vision_config") or {}
        return cls(vision=CLIPVisionConfig.from_transformers(vision),
                   projection_dim=d.get("projection_dim", 512))


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class CLIPVisionEmbeddings(nnx.Module):
    TORCH_LAYOUT = {"class_embedding": "identity"}

    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        dim = config.hidden_size
        self.class_embedding = nnx.Param(_normal(rngs, (dim,), dim ** -0.5, dtype))
        self.patch_embedding = Conv2d(config.num_channels, dim, config.patch_size, stride=config.patch_size,
                                      bias=False, dtype=dtype, rngs=rngs)
        self.position_embedding = Embedding(config.num_positions, dim, dtype=dtype, rngs=rngs)
        self.image_size = config.image_size

    def __call__(self, pixel_values: Array) -> Array:
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"clip_input: image size {h}x{w} does not match the model's "
                             f"{self.image_size}x{self.image_size}")
        patches = self.patch_embedding(pixel_values)              # (B, grid, grid, hidden), row-major
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.weight[...][None]


class CLIPVisionTransformer(nnx.Module):
    """transformers' CLIP vision transformer (the inner `vision_model` of a `CLIPVisionModel`)."""

    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        # The text encoder's layers fit: they read only hidden_size, intermediate_size, heads, act, eps.
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)

    def __call__(self, pixel_values: Array) -> Array:
        """NHWC pixel values -> the pooled output (post-layernormed class token), (B, hidden)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            x = layer(x, None)
        return self.post_layernorm(x[:, 0])


class CLIPVisionModel(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.vision_model = CLIPVisionTransformer(config, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: Array) -> Array:
        return self.vision_model(pixel_values)


class SafetyCheckerOutput(NamedTuple):
    has_nsfw_concepts: Array     # (B,) bool
    concept_scores: Array        # (B, 17) float32, rounded to 3 decimals as the reference's dict values
    special_scores: Array        # (B, 3) float32, rounded likewise
    cos_dist: Array              # (B, 17) float32 cosine similarities to the concept embeddings
    special_cos_dist: Array      # (B, 3)
    image_embeds: Array          # (B, projection_dim), model dtype


def cosine_distance(image_embeds: Array, text_embeds: Array) -> Array:
    """The reference's `cosine_distance` (F.normalize with eps 1e-12, then a matmul), in float32."""
    normalize = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    a = normalize(image_embeds.astype(jnp.float32))
    b = normalize(text_embeds.astype(jnp.float32))
    return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def _round3(x: Array) -> Array:
    """numpy's `round(x, 3)` on float32: rint(x * 1000) / 1000, ties to even, bit for bit.

    XLA turns a division by a (broadcast) scalar into a multiplication by its reciprocal, which is off by
    an ulp for a third of the values; dividing by an opaque full array keeps the true division.
    """
    k = jnp.round(x * jnp.float32(1000))
    return k / jax.lax.optimization_barrier(jnp.full(k.shape, 1000, jnp.float32))


def concept_scores(cos_dist: Array, special_cos_dist: Array, concept_thresholds: Array,
                   special_thresholds: Array) -> tuple[Array, Array, Array]:
    """The reference `forward`'s per-image loop, vectorised: (has_nsfw, concept_scores, special_scores)."""
    cos_dist = cos_dist.astype(jnp.float32)
    special_cos_dist = special_cos_dist.astype(jnp.float32)
    concept_thresholds = concept_thresholds.astype(jnp.float32)
    special_thresholds = special_thresholds.astype(jnp.float32)
    adjustment = jnp.zeros(cos_dist.shape[:1], jnp.float32)
    special = []
    for j in range(special_cos_dist.shape[1]):
        score = _round3(special_cos_dist[:, j] - special_thresholds[j] + adjustment)
        special.append(score)
        adjustment = jnp.where(score > 0, jnp.float32(SPECIAL_CARE_ADJUSTMENT), adjustment)
    scores = _round3(cos_dist - concept_thresholds[None] + adjustment[:, None])
    special_scores = jnp.stack(special, axis=1) if special else jnp.zeros((cos_dist.shape[0], 0))
    return jnp.any(scores > 0, axis=1), scores, special_scores


class SafetyChecker(nnx.Module):
    """diffusers' `StableDiffusionSafetyChecker`; `checker(clip_input)` takes NHWC pixel values (the
    feature extractor's output) and returns a `SafetyCheckerOutput`. Use `check_images` for the jitted
    call and `run_safety_checker` for the pipeline's full step (preprocess, check, black out)."""

    TORCH_LAYOUT = {"concept_embeds": "identity", "special_care_embeds": "identity",
                    "concept_embeds_weights": "identity", "special_care_embeds_weights": "identity"}

    def __init__(self, config: SafetyCheckerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        proj = config.projection_dim
        self.vision_model = CLIPVisionModel(config.vision, dtype=dtype, rngs=rngs)
        self.visual_projection = Linear(config.vision.hidden_size, proj, bias=False, dtype=dtype, rngs=rngs)
        self.concept_embeds = nnx.Param(jnp.ones((NUM_CONCEPTS, proj), dtype))
        self.special_care_embeds = nnx.Param(jnp.ones((NUM_SPECIAL_CARE, proj), dtype))
        self.concept_embeds_weights = nnx.Param(jnp.ones((NUM_CONCEPTS,), dtype))
        self.special_care_embeds_weights = nnx.Param(jnp.ones((NUM_SPECIAL_CARE,), dtype))

    @property
    def dtype(self) -> jnp.dtype:
        return self.visual_projection.weight.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def image_embeds(self, clip_input: Array) -> Array:
        return self.visual_projection(self.vision_model(clip_input))

    def __call__(self, clip_input: Array) -> SafetyCheckerOutput:
        embeds = self.image_embeds(clip_input)
        special_cos = cosine_distance(embeds, self.special_care_embeds[...])
        cos = cosine_distance(embeds, self.concept_embeds[...])
        flags, scores, special_scores = concept_scores(
            cos, special_cos, self.concept_embeds_weights[...], self.special_care_embeds_weights[...])
        return SafetyCheckerOutput(flags, scores, special_scores, cos, special_cos, embeds)


@xla_options.jit(static_argnames=("graph",))
def _check(graph, state, clip_input):
    TRACE_COUNT["safety_checker"] += 1
    return nnx.merge(graph, state)(clip_input)


def check_images(checker: SafetyChecker, clip_input, *, split=None) -> SafetyCheckerOutput:
    """The jitted checker on NHWC `clip_input` (B, image_size, image_size, 3): compiled once per batch
    shape and dtype. `split` may pass a cached `nnx.split(checker)` to skip re-splitting each call."""
    graph, state = split if split is not None else nnx.split(checker)
    clip_input = jnp.asarray(clip_input)
    if clip_input.ndim != 4 or clip_input.shape[1:] != (checker.image_size, checker.image_size,
                                                         checker.config.vision.num_channels):
        size = checker.image_size
        raise ValueError(f"clip_input: expected shape (batch, {size}, {size}, "
                         f"{checker.config.vision.num_channels}) (NHWC), got {tuple(clip_input.shape)}")
    return _check(graph, state, clip_input)


def run_safety_checker(checker: SafetyChecker, feature_extractor: CLIPImageProcessor, images, *,
                       split=None) -> tuple[np.ndarray, list[bool]]:
    """The reference pipeline's `run_safety_checker` + its postprocessing, on NHWC images in [0, 1].

    The feature extractor sees `round(images * 255)` as uint8 (diffusers' `numpy_to_pil`); flagged images
    come back as zeros (black), as the reference's (its checker zeroes them in [-1, 1] and postprocessing
    then skips their denormalisation). Returns (images as float32 numpy, has_nsfw per image).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected (batch, height, width, 3) in [0, 1], got shape {images.shape}")
    clip_input = feature_extractor.preprocess(images)
    out = check_images(checker, clip_input, split=split)
    flags = np.asarray(out.has_nsfw_concepts, bool)
    result = np.where(flags[:, None, None, None], np.zeros((), images.dtype), images)
    if flags.any():
        logger.warning("Potential NSFW content was detected in one or more images. A black image will be "
                       "returned instead. Try again with a different prompt and/or seed.")
    return result, [bool(f) for f in flags]


def _ignored_key(key: str) -> bool:
    return key.split(".")[-1] == "position_ids"   # transformers' buffer, saved by old versions


def _legacy_key(key: str) -> str:
    """transformers >= 5 saves `vision_model.embeddings...`; SD has `vision_model.vision_model...`."""
    if key.startswith("vision_model.") and not key.startswith("vision_model.vision_model."):
        return "vision_model." + key
    return key


def load_safety_checker(folder: str | os.PathLike, *, dtype=None, variant: str | None = None,
                        allow_pickle: bool = False) -> SafetyChecker:
    """Load a diffusers `safety_checker/` folder (config.json + safetensors) into a `SafetyChecker`.

    `dtype` (None = float32, or bf16/fp16) is the parameter and compute dtype; thresholds are cast too,
    as in the reference loaded with that `torch_dtype`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightLoadError(f"{folder}: safety checker folder not found")
    config_path = folder / "config.json"
    try:
        config = SafetyCheckerConfig.from_transformers(read_json(config_path))
    except WeightLoadError:
        raise
    except (TypeError, ValueError) as err:
        raise WeightLoadError(f"{config_path}: {err}") from err
    dtype = resolve_dtype(dtype) or jnp.dtype(jnp.float32)
    build = lambda: SafetyChecker(config, dtype=dtype, rngs=nnx.Rngs(0))
    return load_model(build, folder, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                      rename=_legacy_key, ignore=_ignored_key)
