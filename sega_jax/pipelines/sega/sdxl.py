"""SemanticStableDiffusionXLPipeline: SEGA on SDXL (which diffusers never had), on the shared SEGA core.

Text conditioning follows diffusers' `StableDiffusionXLPipeline.encode_prompt` line for line: both
encoders' penultimate hidden states side by side, the second encoder's projected pooled output, zeros for
an absent negative prompt when the folder says `force_zeros_for_empty_prompt`, and the micro-conditioning
time ids (original size, crop, target size). Each editing concept is its own copy in the UNet batch with
its own hidden states and pooled embedding from both encoders, sharing the prompt's time ids, as
diffusers' LEDITS++ for SDXL conditions its concepts. Everything else (the SEGA loop, guidance, decoding,
outputs) is the core's.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sega_jax.loaders.folders import load_components
from sega_jax.models.tokenizer import tokenize
from sega_jax.pipelines import inputs
from sega_jax.pipelines.sega.sd import DenoiseJob, SemanticStableDiffusionPipeline
from sega_jax.runtime import xla_options

Array = jax.Array
SizeLike = tuple[int, int] | list[int] | None


@xla_options.jit(static_argnames=("graphs", "clip_skip"))
def _encode_xl(graphs, states, ids, ids_2, clip_skip=None):
    """{"context": both encoders' hidden states concatenated, "text_embeds": encoder 2's projection}."""
    first = nnx.merge(graphs[0], states[0]).encode_for_sdxl(ids, clip_skip=clip_skip)
    second = nnx.merge(graphs[1], states[1]).encode_for_sdxl(ids_2, clip_skip=clip_skip)
    hidden = jnp.concatenate([first.prompt_embeds, second.prompt_embeds.astype(first.prompt_embeds.dtype)],
                             axis=-1)
    return {"context": hidden, "text_embeds": second.text_embeds}


class SemanticStableDiffusionXLPipeline(SemanticStableDiffusionPipeline):
    """SDXL with semantic guidance: `StableDiffusionXLPipeline.__call__`'s arguments plus SEGA's."""

    honours_force_upcast = True  # as diffusers' SDXL pipelines: an fp16 VAE decodes in fp32

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 force_zeros_for_empty_prompt: bool = True):
        if unet.config.addition_embed_type != "text_time":
            raise ValueError("SemanticStableDiffusionXLPipeline needs an SDXL UNet (addition_embed_type="
                             "'text_time'); for SD 1.x/2.x use SemanticStableDiffusionPipeline")
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, requires_safety_checker=False)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self._text_2 = nnx.split(text_encoder_2)
        self._check_embedding_size()

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, dtype=None, variant: str | None = None,
                        allow_pickle: bool = False, **components) -> SemanticStableDiffusionXLPipeline:
        """Load an SDXL diffusers folder (`text_encoder_2/`, `tokenizer_2/`; or a hub id when online)."""
        parts = load_components(path_or_hub_id, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                                xl=True, **components)
        return cls(**parts)

    def _check_embedding_size(self) -> None:
        cfg = self.unet.config
        passed = cfg.addition_time_embed_dim * 6 + self.text_encoder_2.config.projection_dim
        if passed != cfg.projection_class_embeddings_input_dim:
            raise ValueError(f"Model expects an added time embedding vector of length "
                             f"{cfg.projection_class_embeddings_input_dim}, but a vector of {passed} was "
                             "created: check `unet.config.addition_time_embed_dim` and "
                             "`text_encoder_2.config.projection_dim`")

    def _encode_xl(self, texts: list[str], texts_2: list[str], clip_skip: int | None = None) -> dict:
        ids = tokenize(self.tokenizer, texts, truncation=True)
        ids_2 = tokenize(self.tokenizer_2, texts_2, truncation=True)
        graphs, states = (self._text[0], self._text_2[0]), (self._text[1], self._text_2[1])
        return _encode_xl(graphs, states, jnp.asarray(ids), jnp.asarray(ids_2), clip_skip=clip_skip)

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
        """The core's `prepare` with SDXL's conditioning and defaults (guidance_scale 5.0, as `__call__`);
        `guidance_rescale` (diffusers' `rescale_noise_cfg`, applied to the final guided prediction) is a
        traced setting like the edit scales."""
        inputs.check_finite(  # the core's `prepare` checks the rest
            guidance_rescale=guidance_rescale, editing_prompt_embeddings=editing_prompt_embeddings,
            editing_pooled_prompt_embeds=editing_pooled_prompt_embeds)
        rescale = inputs.check_number(guidance_rescale, "guidance_rescale")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"`guidance_rescale` must be in [0, 1], got {guidance_rescale!r}")
        clip_skip = inputs.check_int(clip_skip, "clip_skip", allow_none=True) or None
        embeddings = self._concept_embeddings(editing_prompt_embeddings, editing_pooled_prompt_embeds)
        job = super().prepare(prompt, guidance_scale=guidance_scale, editing_prompt_embeddings=embeddings,
                              clip_skip=clip_skip, **kwargs)
        return job._replace(params=job.params._replace(guidance_rescale=jnp.float32(rescale)))

    # -- the core's hooks -------------------------------------------------------------------------------

    def _concept_embeddings(self, hidden, pooled) -> dict | None:
        if hidden is None and pooled is None:
            return None
        if hidden is None or pooled is None:
            raise ValueError("SDXL concepts need both `editing_prompt_embeddings` (K, 77, hidden of both "
                             "encoders) and `editing_pooled_prompt_embeds` (K, projection_dim)")
        return {"context": hidden, "text_embeds": pooled}

    def _concepts(self, editing_prompt, embeddings, num_prompts: int, per_prompt: int, *,
                  clip_skip: int | None = None, **_context_arguments) -> dict | None:
        """One conditioning per concept: {"context": (K, L, D), "text_embeds": (K, P)}. (The other
        conditioning arguments are `_context`'s.)"""
        if editing_prompt is not None and embeddings is not None and len(editing_prompt):
            raise ValueError("pass either `editing_prompt` or `editing_prompt_embeddings`, not both")
        if editing_prompt:
            texts = inputs.prompt_list(editing_prompt, "editing_prompt")
            return self._encode_xl(texts, texts, clip_skip)
        if embeddings is None:
            return None
        num = np.shape(embeddings["context"])[0] if np.ndim(embeddings["context"]) else 0
        expected = (max(num, 1), self.tokenizer.model_max_length, self.unet.config.cross_attention_dim[0])
        hidden = inputs.check_array(embeddings["context"], "editing_prompt_embeddings", expected)
        pooled = inputs.check_array(embeddings["text_embeds"], "editing_pooled_prompt_embeds",
                                    (hidden.shape[0], self.text_encoder_2.config.projection_dim))
        return {"context": jnp.asarray(hidden), "text_embeds": jnp.asarray(pooled)}

    def _context(self, prompts, negative_prompt, prompt, per_prompt, do_cfg, concepts, size, *,
                 prompt_2=None, negative_prompt_2=None, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None, negative_original_size=None, negative_crops_coords_top_left=(0, 0),
                 negative_target_size=None, clip_skip=None) -> dict:
        """{"context": (copies, B, L, D), "text_embeds": (copies, B, P), "time_ids": (copies, B, 6)} for the
        copies [uncond, text, concept 0, ...], each for every image."""
        prompts_2 = inputs.prompt_list(prompt_2, "prompt_2") if prompt_2 else prompts
        if len(prompts_2) != len(prompts):
            raise ValueError(f"`prompt_2` has {len(prompts_2)} entries for {len(prompts)} prompts")
        time_ids = micro_conditioning_ids(original_size or size, crops_coords_top_left, target_size or size,
                                          "")
        text = self._encode_xl(prompts, prompts_2, clip_skip)
        text["time_ids"] = jnp.broadcast_to(time_ids, (len(prompts), 6))
        copies = [text]
        if do_cfg:
            uncond = self._negative(negative_prompt, negative_prompt_2, prompts, text)
            uncond["time_ids"] = text["time_ids"]
            if negative_original_size is not None and negative_target_size is not None:
                negative_ids = micro_conditioning_ids(negative_original_size, negative_crops_coords_top_left,
                                         negative_target_size, "negative_")
                uncond["time_ids"] = jnp.broadcast_to(negative_ids, text["time_ids"].shape)
            copies = [uncond, text]
        # (copies, B, ...): each copy repeated per image, then every concept paired with every image.
        stacked = jax.tree.map(lambda *xs: jnp.repeat(jnp.stack(xs), per_prompt, axis=1), *copies)
        if concepts is None or not do_cfg:
            return stacked
        concepts = dict(concepts, time_ids=jnp.broadcast_to(time_ids, (len(concepts["context"]), 6)))
        tiled = jax.tree.map(
            lambda c, s: jnp.broadcast_to(c[:, None].astype(s.dtype), (c.shape[0], *s.shape[1:])),
            concepts, stacked)
        return jax.tree.map(lambda s, c: jnp.concatenate([s, c]), stacked, tiled)

    def _negative(self, negative_prompt, negative_prompt_2, prompts: list[str], text: dict) -> dict:
        """diffusers' negative branch: zeros when no negative prompt is given and the folder asks for it;
        else both encoders on the negative prompts (penultimate layer, never clip-skipped)."""
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            return {key: jnp.zeros_like(text[key]) for key in ("context", "text_embeds")}
        # diffusers' SDXL broadcasts a string over the batch before comparing types with the prompt list.
        batch = len(text["context"])
        listed = lambda p: [p] * batch if isinstance(p, str) else p
        negatives = inputs.negative_prompts(listed(negative_prompt or ""), prompts, batch)
        negative_2 = listed(negative_prompt_2 or negative_prompt or "")
        negatives_2 = inputs.negative_prompts(negative_2, prompts, batch)
        return self._encode_xl(negatives, negatives_2)


def micro_conditioning_ids(original_size, crops_coords_top_left, target_size, prefix: str) -> Array:
    """SDXL's six micro-conditioning ids: original (h, w), crop (top, left), target (h, w)."""
    values: list[Any] = []
    for name, value in (("original_size", original_size), ("crops_coords_top_left", crops_coords_top_left),
                        ("target_size", target_size)):
        pair = list(value) if isinstance(value, (tuple, list, np.ndarray)) else None
        if pair is None or len(pair) != 2:
            raise ValueError(f"`{prefix}{name}` must be a pair of numbers, got {value!r}")
        values += [inputs.check_number(v, f"{prefix}{name}") for v in pair]
    return jnp.asarray(values, jnp.float32)
