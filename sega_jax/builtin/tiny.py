"""A tiny random-weight, Stable-Diffusion-shaped pipeline built in-process (no download, no torch).

`load_pipeline("tiny")` (built from `tiny_components()`) is what `sega-jax generate --model tiny` (the
default with no model configured), the notebook in CI and the tests run: the same architecture as SD 1.x
(CLIP text encoder with the real 49,408-token vocabulary and tokenizer, a cross-attention UNet, an
AutoencoderKL with SD's 8x latent downsampling, SD's DDIM scheduler config), only narrow and shallow, with
weights drawn by the modules' own initializers from `seed`. Its images are structured noise: it exercises
every code path, not image quality.

`save_tiny(folder)` writes it as a diffusers-format pipeline folder, which `from_pretrained` reloads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sega_jax.models.clip import CLIPTextConfig, CLIPTextModel
from sega_jax.models.tokenizer import clip_tokenizer, offline_clip_tokenizer
from sega_jax.models.unet import UNet2DConditionModel, UNetConfig
from sega_jax.models.vae import AutoencoderKL, VAEConfig
from sega_jax.models.weights import resolve_dtype, to_torch_layout, torch_parameter_layouts
from sega_jax.schedulers import scheduler_from_config

TINY_UNET = UNetConfig(
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=(2, 2),
    norm_num_groups=32,
    cross_attention_dim=(32, 32),
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(4, 4),
    sample_size=8,  # latents 8x8 -> default image 64x64 (SD 1.5: 64 -> 512)
)
TINY_VAE = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),  # four levels: 8x downsampling, as SD's VAE
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)
TINY_TEXT = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
)
# Stable Diffusion 1.x's scheduler/scheduler_config.json (a DDIMScheduler here).
SD_DDIM = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
TINY_NOTICE = (
    "note: model 'tiny' has random weights (an SD-shaped toy built in-process), so its images are noise. "
    "For real images pass --model with a local diffusers folder (e.g. one saved by save_pretrained) or a "
    "Hugging Face hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 (needs network), or set "
    "SEGA_JAX_MODEL."
)


# The modules' own initialisation (sega_jax.models.layers), drawn with numpy: run eagerly through JAX it
# compiles one small program per parameter shape (~20 s on a 2-core CPU for the UNet and VAE).
_INIT_STD = {
    "conv": lambda shape: 1 / math.sqrt(math.prod(shape[:-1])),  # (kh, kw, in, out): 1/sqrt(fan_in)
    "linear": lambda shape: 1 / math.sqrt(shape[0]),  # (in, out)
    "embedding": lambda shape: 0.02,
}
_CONSTANTS = {"GroupNorm": {"weight": 1.0, "bias": 0.0}, "LayerNorm": {"weight": 1.0, "bias": 0.0}}


def _initial_value(owner: str, name: str, kind: str, shape: tuple[int, ...], rng) -> np.ndarray:
    if name == "bias" or owner in _CONSTANTS:
        return np.full(shape, _CONSTANTS.get(owner, {}).get(name, 0.0), np.float32)
    if owner == "Embedding":
        kind = "embedding"
    if kind not in _INIT_STD:
        raise ValueError(f"tiny: no initialiser for {owner}.{name} ({kind})")
    return (_INIT_STD[kind](shape) * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def random_init(build, seed: int, dtype) -> nnx.Module:
    """Build a module abstractly and draw its parameters as its layers' initialisers do, from `seed`."""
    model = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        layout = getattr(type(node), "TORCH_LAYOUT", None) or {}
        for name, kind in layout.items():
            param = getattr(node, name, None)
            if param is not None:
                value = _initial_value(type(node).__name__, name, kind, tuple(param.shape), rng)
                param.set_value(jnp.asarray(value, dtype))
    missed = [x for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if isinstance(x, jax.ShapeDtypeStruct)]
    if missed:
        raise ValueError(f"tiny: {len(missed)} parameter(s) outside the layers' TORCH_LAYOUT were not drawn")
    return model


def tiny_models(seed: int = 0, dtype=None) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """The UNet, VAE and text encoder with random weights, deterministic in `seed`."""
    dtype = resolve_dtype(dtype) or jnp.dtype(jnp.float32)
    rngs = lambda: nnx.Rngs(0)  # only shapes: eval_shape draws nothing
    unet = random_init(lambda: UNet2DConditionModel(TINY_UNET, dtype=dtype, rngs=rngs()), seed, dtype)
    vae = random_init(lambda: AutoencoderKL(TINY_VAE, dtype=dtype, rngs=rngs()), seed + 1, dtype)
    text = random_init(lambda: CLIPTextModel(TINY_TEXT, dtype=dtype, rngs=rngs()), seed + 2, dtype)
    return unet, vae, text


def tiny_components(seed: int = 0, dtype=None) -> dict:
    """The tiny model's components (fp32 unless `dtype`), built offline with JAX only, by their pipeline
    argument names: `SemanticStableDiffusionPipeline(**tiny_components(), ...)`."""
    unet, vae, text = tiny_models(seed, dtype)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
                scheduler=scheduler_from_config(SD_DDIM))


# -- saving as a diffusers folder ---------------------------------------------------------------------------


def module_tensors(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's parameters under their checkpoint keys, in torch's layout (float32)."""
    return {
        key: np.ascontiguousarray(to_torch_layout(np.asarray(param[...], np.float32), kind))
        for key, (param, kind) in torch_parameter_layouts(module).items()
    }


def _config_dict(config, class_name: str) -> dict:
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {"_class_name": class_name, **values}


def _write_model(folder: Path, module: nnx.Module, config: dict, weights_name: str) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(module_tensors(module), str(folder / weights_name))


def save_tiny(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny pipeline (fp32) as a diffusers-format folder that `from_pretrained` reloads."""
    folder = Path(folder)
    unet, vae, text = tiny_models(seed)
    _write_model(folder / "unet", unet, _config_dict(TINY_UNET, "UNet2DConditionModel"),
                 "diffusion_pytorch_model.safetensors")
    _write_model(folder / "vae", vae, _config_dict(TINY_VAE, "AutoencoderKL"),
                 "diffusion_pytorch_model.safetensors")
    text_config = {**dataclasses.asdict(TINY_TEXT), "architectures": ["CLIPTextModel"],
                   "model_type": "clip_text_model"}
    text_config.pop("use_attention_mask")
    _write_model(folder / "text_encoder", text, text_config, "model.safetensors")
    offline_clip_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_DDIM, indent=2))
    index = {"_class_name": "SemanticStableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
