"""SemanticStableDiffusionXLPipeline: SEGA on SDXL (which diffusers never had), on the shared SEGA pipeline.

`SegaPipeline` (`sega.sd`: argument checks, noise, the compiled SEGA loop, decoding, outputs) with SDXL's
text conditioning (`conditioning.SDXLConditioning`: both encoders, the pooled embeddings, the
micro-conditioning time ids, zeros for an absent negative prompt) and `StableDiffusionXLPipeline.__call__`'s
arguments. Each editing concept is its own copy in the UNet batch with its own hidden states and pooled
embedding from both encoders, sharing the prompt's time ids, as diffusers' LEDITS++ for SDXL conditions its
concepts; `guidance_rescale` is a traced setting like the edit scales.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from sega_jax.loaders.folders import load_components
from sega_jax.pipelines import inputs
from sega_jax.pipelines.base import DenoiseJob
from sega_jax.pipelines.conditioning import SDXLConditioning, delegated
from sega_jax.pipelines.sega.sd import SegaPipeline

SizeLike = tuple[int, int] | list[int] | None


class SemanticStableDiffusionXLPipeline(SegaPipeline):
    """SDXL with semantic guidance: `StableDiffusionXLPipeline.__call__`'s arguments plus SEGA's."""

    honours_force_upcast = True  # as diffusers' SDXL pipelines: an fp16 VAE decodes in fp32

    text_encoder_2 = delegated("text_encoder_2")
    tokenizer_2 = delegated("tokenizer_2")
    force_zeros_for_empty_prompt = delegated("force_zeros_for_empty_prompt")
    _text_2 = delegated("split_2", "The second text encoder as `nnx.split` gives it.", settable=False)

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 force_zeros_for_empty_prompt: bool = True):
        if unet.config.addition_embed_type != "text_time":
            raise ValueError("SemanticStableDiffusionXLPipeline needs an SDXL UNet (addition_embed_type="
                             "'text_time'); for SD 1.x/2.x use SemanticStableDiffusionPipeline")
        conditioning = SDXLConditioning(text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet.config,
                                        force_zeros_for_empty_prompt)
        super().__init__(unet, vae, conditioning, scheduler, requires_safety_checker=False)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, dtype=None, variant: str | None = None,
                        allow_pickle: bool = False, **components) -> SemanticStableDiffusionXLPipeline:
        """Load an SDXL diffusers folder (`text_encoder_2/`, `tokenizer_2/`; or a hub id when online)."""
        parts = load_components(path_or_hub_id, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                                xl=True, **components)
        return cls(**parts)

    def __call__(
        self,
        prompt,
        prompt_2=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt=None,
        negative_prompt_2=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents=None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
        guidance_rescale: float = 0.0,
        original_size: SizeLike = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: SizeLike = None,
        negative_original_size: SizeLike = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: SizeLike = None,
        clip_skip: int | None = None,
        editing_prompt=None,
        editing_prompt_embeddings=None,
        editing_pooled_prompt_embeds=None,
        reverse_editing_direction=False,
        edit_guidance_scale=5,
        edit_warmup_steps=10,
        edit_cooldown_steps=None,
        edit_threshold=0.9,
        edit_momentum_scale: float | None = 0.1,
        edit_mom_beta: float | None = 0.4,
        edit_weights=None,
        sem_guidance=None,
        *,
        seed: int | None = None,
        prng_key=None,
        return_estimates: bool = False,
    ):
        if callback is not None and not callable(callback):
            raise TypeError("`callback` must be callable as callback(step, timestep, latents)")
        callback_steps = inputs.check_int(callback_steps, "callback_steps", minimum=1)
        if output_type not in inputs.OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {inputs.OUTPUT_TYPES}, got {output_type!r}")
        job = self.prepare(
            prompt, prompt_2=prompt_2, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, num_images_per_prompt=num_images_per_prompt, eta=eta,
            generator=generator, latents=latents, guidance_rescale=guidance_rescale,
            original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size, clip_skip=clip_skip, editing_prompt=editing_prompt,
            editing_prompt_embeddings=editing_prompt_embeddings,
            editing_pooled_prompt_embeds=editing_pooled_prompt_embeds,
            reverse_editing_direction=reverse_editing_direction, edit_guidance_scale=edit_guidance_scale,
            edit_warmup_steps=edit_warmup_steps, edit_cooldown_steps=edit_cooldown_steps,
            edit_threshold=edit_threshold, edit_momentum_scale=edit_momentum_scale,
            edit_mom_beta=edit_mom_beta, edit_weights=edit_weights, sem_guidance=sem_guidance, seed=seed,
            prng_key=prng_key, return_estimates=return_estimates,
        )
        return self.run(job, callback, callback_steps, output_type, return_dict, run_safety_checker=False)

    def prepare(self, prompt, *, guidance_scale: float = 5.0, guidance_rescale: float = 0.0,
                editing_prompt_embeddings=None, editing_pooled_prompt_embeds=None,
                clip_skip: int | None = None, **kwargs) -> DenoiseJob:
        """`SegaPipeline.prepare` with SDXL's conditioning and defaults (guidance_scale 5.0, as `__call__`);
        `guidance_rescale` (diffusers' `rescale_noise_cfg`, applied to the final guided prediction) is a
        traced setting like the edit scales."""
        inputs.check_finite(  # `SegaPipeline.prepare` checks the rest
            guidance_rescale=guidance_rescale, editing_prompt_embeddings=editing_prompt_embeddings,
            editing_pooled_prompt_embeds=editing_pooled_prompt_embeds)
        rescale = inputs.check_number(guidance_rescale, "guidance_rescale")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"`guidance_rescale` must be in [0, 1], got {guidance_rescale!r}")
        clip_skip = inputs.check_int(clip_skip, "clip_skip", allow_none=True) or None
        embeddings = self.conditioning.concept_embeddings(editing_prompt_embeddings,
                                                          editing_pooled_prompt_embeds)
        job = super().prepare(prompt, guidance_scale=guidance_scale, editing_prompt_embeddings=embeddings,
                              clip_skip=clip_skip, **kwargs)
        return job._replace(params=job.params._replace(guidance_rescale=jnp.float32(rescale)))
