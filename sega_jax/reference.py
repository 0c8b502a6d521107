"""diffusers (PyTorch) reference pipelines with random weights, for parity tests and benchmarks.

Needs the test extra (torch, diffusers, transformers' torch models); nothing at run time imports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sega_jax.tiny import SD_DDIM  # Stable Diffusion 1.x's scheduler_config.json

TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=8,
)
TINY_VAE = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=16,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    sample_size=64,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
CONFIGS = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT), "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT)}


def randomize(module, seed: int) -> None:
    """Give every parameter (norm scales and biases included) non-trivial random values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            fan_in = max(param[0].numel(), 1)
            scale = 0.2 if name.endswith("bias") or "norm" in name else 1.0 / np.sqrt(fan_in)
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            param.copy_(base + scale * torch.randn(param.shape, generator=gen))


def build_reference(model: str = "tiny", seed: int = 0, *, randomized: bool = True):
    """diffusers' SemanticStableDiffusionPipeline with random weights and the real CLIP tokenizer.

    `randomized=False` keeps diffusers' own initialisation (much faster for the SD 1.5 architecture).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.semantic_stable_diffusion import SemanticStableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from sega_jax.tokenizer import clip_tokenizer

    unet_config, vae_config, text_config = CONFIGS[model]
    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    text = CLIPTextModel(CLIPTextConfig(**text_config))
    if randomized:
        for i, module in enumerate((unet, vae, text)):
            randomize(module, seed + i)
    pipe = SemanticStableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler.from_config(SD_DDIM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_reference(folder: Path, model: str = "tiny", seed: int = 0, **kwargs):
    pipe = build_reference(model, seed, **kwargs)
    pipe.save_pretrained(folder)
    return pipe
