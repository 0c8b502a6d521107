"""LEditsPPPipelineStableDiffusionXL: LEDITS++ (invert a photo, then edit it with semantic concepts) on SDXL.

diffusers' `LEditsPPPipelineStableDiffusionXL` with its arguments and defaults: `LEditsPPPipeline`
(`sega_jax.pipelines.ledits_pp.sd`: the same inversion, guidance, implicit masks and compiled programs) with
SDXL's text conditioning (`conditioning.SDXLConditioning`, as the SEGA SDXL pipeline's: both encoders'
penultimate hidden states side by side, the second encoder's pooled projection, the micro-conditioning time
ids), as the reference does:

- `invert`: the unconditional copy is the negative prompt's (zeros when none is given and the folder says
  `force_zeros_for_empty_prompt`); a non-empty source prompt guides towards itself; the last
  `num_zero_noise_steps` noise maps (the least noisy steps) are zeroed.
- `__call__`: each concept is its own copy with its own hidden states and pooled embedding and the
  unconditional copy's time ids (original and target size: the photo's; `crops_coords_top_left`); the
  attention store reads the down and up blocks' cross-attention at 1/4 of the latent size (not the mid
  block's); the masks' intersection applies at every step (the SD reference only at t <= 800);
  `use_intersect_mask` defaults to False; `denoising_end` stops early.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from sega_jax.core.inversion import LEditsPPInversion
from sega_jax.loaders.folders import load_components
from sega_jax.pipelines import inputs
from sega_jax.pipelines.conditioning import SDXLConditioning, delegated, micro_conditioning_ids
from sega_jax.pipelines.ledits_pp.sd import LEditsPPPipeline, edit_params, ledits_scheduler_kwargs


class LEditsPPPipelineStableDiffusionXL(LEditsPPPipeline):
    """LEDITS++ on SDXL: `invert(image, ...)` once, then `__call__(editing_prompt=[...], ...)`."""

    honours_force_upcast = True  # as diffusers' SDXL pipelines: an fp16 VAE decodes in fp32

    text_encoder_2 = delegated("text_encoder_2")
    tokenizer_2 = delegated("tokenizer_2")
    force_zeros_for_empty_prompt = delegated("force_zeros_for_empty_prompt")
    _text_2 = delegated("split_2", "The second text encoder as `nnx.split` gives it.", settable=False)

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker: bool | None = None):
        if unet.config.addition_embed_type != "text_time":
            raise ValueError("LEditsPPPipelineStableDiffusionXL needs an SDXL UNet (addition_embed_type="
                             "'text_time'); for SD 1.x/2.x use LEditsPPPipelineStableDiffusion")
        if image_encoder is not None:
            raise ValueError("`image_encoder` (IP-Adapter) is not supported")
        conditioning = SDXLConditioning(text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet.config,
                                        force_zeros_for_empty_prompt)
        super().__init__(unet, vae, conditioning, scheduler, requires_safety_checker=False)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, dtype=None, variant: str | None = None,
                        allow_pickle: bool = False, **components) -> LEditsPPPipelineStableDiffusionXL:
        """Load an SDXL diffusers folder (or hub id), also one saved by diffusers' LEDITS++."""
        components = ledits_scheduler_kwargs(path_or_hub_id, {"variant": variant, **components})
        components.pop("variant")
        parts = load_components(path_or_hub_id, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                                xl=True, **components)
        return cls(**parts)

    # -- invert -----------------------------------------------------------------------------------------

    def invert(self, image, source_prompt: str = "", source_guidance_scale: float = 3.5,
               negative_prompt: str | None = None, negative_prompt_2: str | None = None,
               num_inversion_steps: int = 50, skip: float = 0.15, generator=None,
               crops_coords_top_left: tuple[int, int] = (0, 0), num_zero_noise_steps: int = 3,
               cross_attention_kwargs=None, height: int | None = None, width: int | None = None,
               resize_mode: str | None = "default", crops_coords=None, *, seed: int | None = None,
               prng_key=None, noise=None) -> LEditsPPInversion:
        """As the SD pipeline's `invert` (it returns the inversion and keeps it as `__call__`'s default),
        with SDXL's negative prompts, micro-conditioning crop and `num_zero_noise_steps` (the last noise
        maps in editing order set to zero)."""
        zero = inputs.check_int(num_zero_noise_steps, "num_zero_noise_steps", minimum=0)
        micro_conditioning_ids((1, 1), crops_coords_top_left, (1, 1), "")  # a bad crop fails before any work
        source_context = functools.partial(self._source_context, negative_prompt=negative_prompt,
                                           negative_prompt_2=negative_prompt_2,
                                           crops_coords_top_left=crops_coords_top_left)
        inversion = self._run_inversion(
            image, source_context, source_prompt, source_guidance_scale, num_inversion_steps, skip,
            generator, cross_attention_kwargs, None, height, width, resize_mode, crops_coords, seed,
            prng_key, noise)
        if zero:
            zs = inversion.zs.copy()
            zs[-zero:] = 0.0
            inversion = dataclasses.replace(inversion, zs=zs)
        self.inversion = inversion
        return inversion

    def _source_context(self, source_prompt: str, guidance_scale: float, batch: int, clip_skip,
                        latent_size: tuple[int, int], *, negative_prompt, negative_prompt_2,
                        crops_coords_top_left):
        """({"context", "text_embeds", "time_ids"} each (copies, B, ...), copies): [uncond] for an empty
        source prompt (as the reference), [uncond, source] with guidance, else the source alone (the
        reference then uses the unconditional estimate alone, ignoring the prompt). `clip_skip` is None:
        diffusers' SDXL inversion has none."""
        size = tuple(n * self.vae_scale_factor for n in latent_size)
        ids = jnp.broadcast_to(micro_conditioning_ids(size, crops_coords_top_left, size, ""), (batch, 6))
        prompts = [source_prompt] * batch
        uncond = self.conditioning.negative(negative_prompt, negative_prompt_2, prompts,
                                            self.conditioning.zeros(batch))
        if source_prompt == "":
            copies = [uncond]
        else:
            text = self.conditioning.encode(prompts, prompts)
            copies = [text] if guidance_scale <= 1.0 else [uncond, text]
        copies = [dict(c, time_ids=ids) for c in copies]
        return jax.tree.map(lambda *xs: jnp.stack([x.astype(xs[0].dtype) for x in xs]), *copies), len(copies)

    # -- edit -------------------------------------------------------------------------------------------

    def __call__(self, denoising_end: float | None = None, negative_prompt=None, negative_prompt_2=None,
                 negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, ip_adapter_image=None,
                 output_type: str | None = "pil", return_dict: bool = True, cross_attention_kwargs=None,
                 guidance_rescale: float = 0.0, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, editing_prompt=None,
                 editing_prompt_embeddings=None, editing_pooled_prompt_embeds=None,
                 reverse_editing_direction=False, edit_guidance_scale=5, edit_warmup_steps=0,
                 edit_cooldown_steps=None, edit_threshold=0.9, sem_guidance=None,
                 use_cross_attn_mask: bool = False, use_intersect_mask: bool = False, user_mask=None,
                 attn_store_steps=None, store_averaged_over_steps: bool = True, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=None, *,
                 inversion: LEditsPPInversion | None = None):
        """Edit the last inverted photo(s) (or `inversion`). `attn_store_steps` and
        `store_averaged_over_steps` only fill the reference's visualisation store and change nothing."""
        if ip_adapter_image is not None or cross_attention_kwargs or callback_on_step_end is not None:
            raise ValueError("`ip_adapter_image`, `cross_attention_kwargs` and `callback_on_step_end` are "
                             "not supported")
        inversion = self._edit_inversion(
            inversion, output_type, edit_guidance_scale=edit_guidance_scale, edit_threshold=edit_threshold,
            guidance_rescale=guidance_rescale, user_mask=user_mask, sem_guidance=sem_guidance,
            editing_prompt_embeddings=editing_prompt_embeddings,
            editing_pooled_prompt_embeds=editing_pooled_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        batch, _, h, w = inversion.init_latents.shape
        clip_skip = inputs.check_int(clip_skip, "clip_skip", allow_none=True) or None
        steps = self._denoising_steps(denoising_end, inversion)
        concepts, tokens = self._edit_concepts(editing_prompt, editing_prompt_embeddings,
                                               editing_pooled_prompt_embeds, clip_skip)
        k = 0 if concepts is None else int(concepts["context"].shape[0])
        params = edit_params(k, tokens, edit_guidance_scale=edit_guidance_scale,
                             edit_threshold=edit_threshold, edit_warmup_steps=edit_warmup_steps,
                             edit_cooldown_steps=edit_cooldown_steps,
                             reverse_editing_direction=reverse_editing_direction,
                             guidance_rescale=guidance_rescale)
        size = (h * self.vae_scale_factor, w * self.vae_scale_factor)
        target = size if target_size is None else target_size
        ids = micro_conditioning_ids(size, crops_coords_top_left, target, "")
        uncond = self._edit_uncond(negative_prompt, negative_prompt_2, negative_prompt_embeds,
                                   negative_pooled_prompt_embeds, batch)
        uncond["time_ids"] = jnp.broadcast_to(ids, (batch, 6))
        context = jax.tree.map(lambda u: u[None], uncond)
        if k:
            concepts["time_ids"] = jnp.broadcast_to(ids, (k, 6))
            tiled = jax.tree.map(lambda c, u: jnp.broadcast_to(c[:, None].astype(u.dtype), (k, *u.shape)),
                                 concepts, uncond)
            context = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), context, tiled)
        out = self._edit_latents(inversion, context, k, params, user_mask, sem_guidance,
                                 cross_attn=bool(use_cross_attn_mask or use_intersect_mask),
                                 intersect=bool(use_intersect_mask), num_steps=steps,
                                 intersect_every_step=True)
        return self.finish(out, output_type, return_dict, inversion.seed, run_safety_checker=False)

    def _denoising_steps(self, denoising_end, inversion: LEditsPPInversion) -> int:
        """How many editing steps run: all, or those at timesteps >= the `denoising_end` cutoff."""
        timesteps = np.asarray(inversion.timesteps)
        if denoising_end is None:
            return len(timesteps)
        end = inputs.check_number(denoising_end, "denoising_end")
        if not 0.0 < end < 1.0:  # the reference ignores values outside (0, 1)
            return len(timesteps)
        total = int(self.scheduler.num_train_timesteps)
        cutoff = int(round(total - end * total))
        return int((timesteps >= cutoff).sum())

    def _edit_concepts(self, editing_prompt, hidden, pooled, clip_skip):
        """({"context": (K, L, D), "text_embeds": (K, P)} or None, (K,) own-token counts)."""
        if editing_prompt and (hidden is not None or pooled is not None):
            raise ValueError("pass either `editing_prompt` or `editing_prompt_embeddings`, not both")
        embeddings = self.conditioning.concept_embeddings(hidden, pooled)
        concepts = self.conditioning.concepts(editing_prompt, embeddings, clip_skip=clip_skip)
        if concepts is None:
            return None, []
        if editing_prompt:
            texts = inputs.prompt_list(editing_prompt, "editing_prompt")
            ids = self.tokenizer(texts, truncation=True, max_length=self.tokenizer.model_max_length).input_ids
            return concepts, [len(row) - 2 for row in ids]
        # No text: every token but start-of-text counts (what the reference sums under transformers 5).
        return concepts, [self.tokenizer.model_max_length - 2] * int(concepts["context"].shape[0])

    def _edit_uncond(self, negative_prompt, negative_prompt_2, embeds, pooled, batch: int) -> dict:
        if embeds is not None or pooled is not None:
            if negative_prompt is not None or negative_prompt_2 is not None:
                raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
            if embeds is None or pooled is None:
                raise ValueError("`negative_prompt_embeds` need `negative_pooled_prompt_embeds` (and the "
                                 "other way round)")
            zero = self.conditioning.zeros(batch)
            return {"context": jnp.asarray(inputs.check_array(embeds, "negative_prompt_embeds",
                                                              zero["context"].shape)),
                    "text_embeds": jnp.asarray(inputs.check_array(pooled, "negative_pooled_prompt_embeds",
                                                                  zero["text_embeds"].shape))}
        return self.conditioning.negative(negative_prompt, negative_prompt_2, [""] * batch,
                                          self.conditioning.zeros(batch))
