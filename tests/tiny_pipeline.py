"""A tiny random-weight Stable Diffusion pipeline, built and saved by diffusers (the reference oracle)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.pipelines.deprecated.semantic_stable_diffusion import SemanticStableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel

from sega_jax.tokenizer import clip_tokenizer
from tests.test_unet import randomize

UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=8,
)
VAE = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=16,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_reference(seed: int = 0) -> SemanticStableDiffusionPipeline:
    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    for i, module in enumerate((unet, vae, text)):
        randomize(module, seed + i)
    pipe = SemanticStableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_reference(folder: Path, seed: int = 0) -> SemanticStableDiffusionPipeline:
    pipe = build_reference(seed)
    pipe.save_pretrained(folder)
    return pipe
