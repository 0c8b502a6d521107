"""diffusers (PyTorch) reference pipelines with random weights, for parity tests and benchmarks.

Needs the test extra (torch, diffusers, transformers' torch models); nothing at run time imports it.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np

from sega_jax.builtin.tiny import SD_DDIM
from sega_jax.models.tokenizer import clip_tokenizer  # Stable Diffusion 1.x's scheduler_config.json

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


# -- SDXL: diffusers' StableDiffusionXLPipeline (the SEGA-free twin of SemanticStableDiffusionXLPipeline) --

TINY_XL_UNET = dict(
    block_out_channels=(16, 32, 32), layers_per_block=1, cross_attention_dim=64, attention_head_dim=(2, 4, 8),
    transformer_layers_per_block=(1, 2, 2), norm_num_groups=8, use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8, sample_size=8,
)
TINY_XL_VAE = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)
TINY_XL_TEXT = dict(TINY_TEXT)  # CLIP ViT-L's shape: hidden 32 of the 64 in the UNet's context
TINY_XL_TEXT_2 = dict(TINY_TEXT, hidden_act="gelu", projection_dim=16)  # OpenCLIP bigG's: gelu, a projection
# stabilityai/stable-diffusion-xl-base-1.0's configs (2.6B-parameter UNet).
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), norm_num_groups=32,
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
    addition_embed_type_num_heads=64, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    sample_size=128,
)
SDXL_VAE = dict(SD15_VAE, scaling_factor=0.13025, force_upcast=True, sample_size=1024)
SDXL_TEXT = dict(SD15_TEXT)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
XL_CONFIGS = {"tiny": (TINY_XL_UNET, TINY_XL_VAE, TINY_XL_TEXT, TINY_XL_TEXT_2),
              "sdxl": (SDXL_UNET, SDXL_VAE, SDXL_TEXT, SDXL_TEXT_2)}
# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json.
SDXL_EULER = {
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "interpolation_type": "linear",
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def build_reference_xl(model: str = "tiny", seed: int = 0, *, randomized: bool = True,
                       force_zeros_for_empty_prompt: bool = True):
    """diffusers' StableDiffusionXLPipeline with random weights and the real CLIP tokenizers (the second
    padding with "!", as SDXL's does)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config, vae_config, text_config, text_config_2 = XL_CONFIGS[model]
    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    text = CLIPTextModel(CLIPTextConfig(**text_config))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config_2))
    if randomized:
        for i, module in enumerate((unet, vae, text, text_2)):
            randomize(module, seed + i)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text.eval(), text_encoder_2=text_2.eval(), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_reference_xl(folder: Path, model: str = "tiny", seed: int = 0, **kwargs):
    pipe = build_reference_xl(model, seed, **kwargs)
    pipe.save_pretrained(folder)
    return pipe


# -- SEGA on SDXL in torch: diffusers' SEGA pipeline code around diffusers' SDXL UNet ----------------------


@functools.cache
def _xl_oracle_classes() -> tuple[type, type, type]:
    """The oracle's torch classes (defined on first use: torch is imported lazily here)."""
    import torch
    from diffusers.pipelines.deprecated.semantic_stable_diffusion import (
        SemanticStableDiffusionPipeline as TorchSega,
    )

    class XLTextOracle(torch.nn.Module):
        """Stands in for the SEGA pipeline's text encoder: token ids -> the SDXL hidden states that
        diffusers' `StableDiffusionXLPipeline.encode_prompt` gives for that text (both encoders,
        penultimate layer)."""

        def __init__(self, table: dict):
            super().__init__()
            self.table = table

        @property
        def dtype(self):  # the table's (DiffusionPipeline.to asks every component)
            return next(iter(self.table.values()))[0].dtype

        @property
        def device(self):
            return next(iter(self.table.values()))[0].device

        def forward(self, input_ids):
            return (torch.stack([self.table[tuple(row.tolist())][0] for row in input_ids]),)

    class XLUNetOracle(torch.nn.Module):
        """diffusers' SDXL UNet with each row's pooled embedding looked up from its hidden states, and the
        prompt's time ids for every row (LEDITS++ for SDXL's conditioning of concepts)."""

        def __init__(self, unet, table: dict, time_ids):
            super().__init__()
            self.unet, self.pairs, self.time_ids = unet, list(table.values()), time_ids

        @property
        def config(self):
            return self.unet.config

        @property
        def dtype(self):
            return self.unet.dtype

        @property
        def device(self):
            return self.unet.device

        def forward(self, sample, t, encoder_hidden_states):
            pooled = torch.stack([next(p for h, p in self.pairs if torch.equal(h, row))
                                  for row in encoder_hidden_states])
            cond = {"text_embeds": pooled, "time_ids": self.time_ids.repeat(len(sample), 1)}
            return self.unet(sample, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=cond)

    class SegaOracle(TorchSega):
        # diffusers' device lookup expects its own model classes: the wrapped UNet's device it is.
        @property
        def _execution_device(self):
            return self.unet.unet.device

        @property
        def device(self):
            return self.unet.unet.device

    return XLTextOracle, XLUNetOracle, SegaOracle


def _xl_embedding_table(reference_xl_pipe, texts: list[str]) -> dict:
    """Token ids (first tokenizer) -> (hidden states, pooled embedding) as diffusers' SDXL pipeline
    encodes each text; "" is the zeros of `force_zeros_for_empty_prompt`."""
    import torch

    tokenizer, table, device = reference_xl_pipe.tokenizer, {}, reference_xl_pipe.unet.device
    for text in texts:
        with torch.no_grad():
            encoded = reference_xl_pipe.encode_prompt(text, device=device, do_classifier_free_guidance=False)
        hidden, pooled = encoded[0], encoded[2]
        if text == "":  # force_zeros_for_empty_prompt: the unconditional copy is zeros
            hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length).input_ids
        table[tuple(ids)] = (hidden[0], pooled[0])
    return table


def sega_xl_reference(reference_xl_pipe, prompt: str, concepts: list[str], size: int):
    """SEGA on SDXL in torch (diffusers has none): diffusers' deprecated SemanticStableDiffusionPipeline
    code around the SDXL UNet of `reference_xl_pipe` (a `build_reference_xl` pipeline), each UNet row
    conditioned on its text's pooled embedding and the prompt's time ids for a `size` x `size` image.

    Only `prompt`, "" (negative) and `concepts` can be encoded: their embeddings are computed here, on the
    device and in the dtype `reference_xl_pipe` has at this point (move it first, not the oracle)."""
    import torch

    text_oracle, unet_oracle, sega_oracle = _xl_oracle_classes()
    table = _xl_embedding_table(reference_xl_pipe, [prompt, "", *concepts])
    unet = reference_xl_pipe.unet
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=unet.dtype, device=unet.device)
    pipe = sega_oracle(vae=reference_xl_pipe.vae, text_encoder=text_oracle(table),
                       tokenizer=reference_xl_pipe.tokenizer,
                       unet=unet_oracle(reference_xl_pipe.unet, table, time_ids),
                       scheduler=reference_xl_pipe.scheduler, safety_checker=None, feature_extractor=None,
                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class OwnLengthTokenizer:
    """A CLIP tokenizer whose `return_length` counts each text's own tokens (plus start/end): under
    transformers 5 it reports the padded length (77), so diffusers' LEDITS++ sums 75 token maps per concept
    (README: LEDITS++ deviations). With this the reference computes the masks as sega-jax does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, texts, **kwargs):
        import torch

        out = self.tokenizer(texts, **kwargs)
        if kwargs.get("return_length"):
            own = self.tokenizer(texts, truncation=True, max_length=self.tokenizer.model_max_length).input_ids
            out["length"] = torch.tensor([len(row) for row in own])
        return out


@contextlib.contextmanager
def recorded_inversion(module):
    """Record diffusers' LEDITS++ `invert` inside the block (`module`: its pipeline module): yields
    (draws, corrected), lists that fill with each `randn_tensor` result (diffusers' draw order, what
    `invert(..., noise=...)` takes stacked) and each corrected x_{t-1} (loop order)."""
    draws, corrected = [], []
    randn, compute_noise = module.randn_tensor, module.compute_noise

    def recording_randn(*args, **kwargs):
        draws.append(randn(*args, **kwargs))
        return draws[-1]

    def recording_noise(*args):
        z, x = compute_noise(*args)
        corrected.append(x.clone())
        return z, x

    module.randn_tensor, module.compute_noise = recording_randn, recording_noise
    try:
        yield draws, corrected
    finally:
        module.randn_tensor, module.compute_noise = randn, compute_noise


def smooth_photo(size: int, seed: int = 0):
    """A smooth size x size RGB picture (random 8x8 colours, bicubic up): a stand-in photo to invert."""
    from PIL import Image

    coarse = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def ledits_reference(sega):
    """diffusers' `LEditsPPPipelineStableDiffusion` on the components of a diffusers SEGA pipeline, with the
    scheduler diffusers' LEDITS++ converts to (DPM-Solver++ 2M SDE) and each concept's own token count."""
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.pipelines.ledits_pp import pipeline_leditspp_stable_diffusion as module

    scheduler = DPMSolverMultistepScheduler.from_config(
        sega.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2)
    pipe = module.LEditsPPPipelineStableDiffusion(
        vae=sega.vae, text_encoder=sega.text_encoder, tokenizer=OwnLengthTokenizer(sega.tokenizer),
        unet=sega.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
