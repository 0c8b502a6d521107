"""SemanticStableDiffusionPipeline: SEGA on Stable Diffusion 1.x/2.x with diffusers' arguments.

One class, as in diffusers; it is long because `__call__` and `prepare` both spell out diffusers' 25
arguments. Here: loading a folder, SD's text conditioning (one CLIP encoder: prompts, negative prompts and
editing concepts), the argument checks of `prepare` and null-text inversion (`invert`, via `null_text`).
What every family shares (the job, the output, the compiled loop, noise, decoding, the safety checker,
LoRA) is in `sega_jax.pipelines.base`; `DenoiseJob`, `SemanticStableDiffusionPipelineOutput` and
`TRACE_COUNT` are re-exported here.
"""

from __future__ import annotations

import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sega_jax.core.guidance import EditParams
from sega_jax.loaders.folders import load_components
from sega_jax.models.tokenizer import tokenize
from sega_jax.pipelines import inputs, null_text
from sega_jax.pipelines.base import (
    TRACE_COUNT,
    DenoiseJob,
    PipelineBase,
    SemanticStableDiffusionPipelineOutput,
    encode_text,
)
from sega_jax.runtime.cache import enable_compilation_cache

__all__ = ["TRACE_COUNT", "DenoiseJob", "SemanticStableDiffusionPipeline",
           "SemanticStableDiffusionPipelineOutput"]

logger = logging.getLogger(__name__)


class SemanticStableDiffusionPipeline(PipelineBase):
    """Stable Diffusion with semantic guidance; `__call__` takes diffusers' arguments (see the README)."""

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker: bool = True,
    ):
        enable_compilation_cache()  # the persistent XLA cache, unless SEGA_JAX_CACHE_DIR=off
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.safety_checker, self.feature_extractor = safety_checker, feature_extractor
        self._unet = nnx.split(unet)
        self._vae = nnx.split(vae)
        self._text = nnx.split(text_encoder)
        self._checker = None if safety_checker is None else nnx.split(safety_checker)
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                "a `safety_checker` needs its `feature_extractor` (the CLIP image preprocessing)"
            )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._progress = {}
        if safety_checker is None and requires_safety_checker:
            logger.warning(
                "You have disabled the safety checker for %s by passing `safety_checker=None`. "
                "Pass `requires_safety_checker=False` to silence this warning.",
                type(self).__name__,
            )

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        dtype=None,
        variant: str | None = None,
        allow_pickle: bool = False,
        requires_safety_checker: bool = True,
        **components,
    ) -> SemanticStableDiffusionPipeline:
        """Load a diffusers-format pipeline folder (or a hub id, when online). `dtype` casts all weights
        ("float32" default, "bfloat16", "float16"); components may be passed in to replace loaded ones."""
        parts = load_components(path_or_hub_id, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                                **components)
        return cls(**parts, requires_safety_checker=requires_safety_checker)

    def _encode(self, texts: list[str], truncation: bool = False) -> jax.Array:
        ids = tokenize(self.tokenizer, texts, truncation=truncation)
        return encode_text(self._text[0], self._text[1], jnp.asarray(ids))

    def text_embeddings(self, texts: list[str], truncation: bool = False) -> jax.Array:
        """The text encoder's hidden states (B, L, D) for `texts` (as the prompts are encoded)."""
        return self._encode(texts, truncation=truncation)

    def __call__(
        self,
        prompt,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents=None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
        editing_prompt=None,
        editing_prompt_embeddings=None,
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
        run_safety_checker: bool = True,
        inversion=None,
    ):
        if callback is not None and not callable(callback):
            raise TypeError("`callback` must be callable as callback(step, timestep, latents)")
        callback_steps = inputs.check_int(callback_steps, "callback_steps", minimum=1)
        if output_type not in inputs.OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {inputs.OUTPUT_TYPES}, got {output_type!r}")
        job = self.prepare(
            prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            eta=eta,
            generator=generator,
            latents=latents,
            editing_prompt=editing_prompt,
            editing_prompt_embeddings=editing_prompt_embeddings,
            reverse_editing_direction=reverse_editing_direction,
            edit_guidance_scale=edit_guidance_scale,
            edit_warmup_steps=edit_warmup_steps,
            edit_cooldown_steps=edit_cooldown_steps,
            edit_threshold=edit_threshold,
            edit_momentum_scale=edit_momentum_scale,
            edit_mom_beta=edit_mom_beta,
            edit_weights=edit_weights,
            sem_guidance=sem_guidance,
            seed=seed,
            prng_key=prng_key,
            return_estimates=return_estimates,
            **({} if inversion is None else {"inversion": inversion}),
        )
        return self.run(job, callback, callback_steps, output_type, return_dict, run_safety_checker)

    def prepare(
        self,
        prompt,
        *,
        height=None,
        width=None,
        num_inference_steps=50,
        guidance_scale=7.5,
        negative_prompt=None,
        num_images_per_prompt=1,
        eta=0.0,
        generator=None,
        latents=None,
        editing_prompt=None,
        editing_prompt_embeddings=None,
        reverse_editing_direction=False,
        edit_guidance_scale=5,
        edit_warmup_steps=10,
        edit_cooldown_steps=None,
        edit_threshold=0.9,
        edit_momentum_scale=0.1,
        edit_mom_beta=0.4,
        edit_weights=None,
        sem_guidance=None,
        seed=None,
        prng_key=None,
        return_estimates=False,
        image_indices=None,
        inversion=None,
        **conditioning,
    ) -> DenoiseJob:
        """Validate the arguments and do all host-side work (tokenize, encode, draw noise) for one call.

        `image_indices` (one int per image) choose which per-seed noise each image gets; by default
        0..B-1, so image j of a call is the same image whatever else is in the batch. `conditioning`: a
        pipeline family's own text-conditioning arguments, handed to its `_context`.
        """
        inputs.check_generator(generator)
        inputs.check_finite(
            eta=eta, guidance_scale=guidance_scale, edit_guidance_scale=edit_guidance_scale,
            edit_threshold=edit_threshold, edit_momentum_scale=edit_momentum_scale,
            edit_mom_beta=edit_mom_beta, edit_weights=edit_weights, latents=latents,
            sem_guidance=sem_guidance, editing_prompt_embeddings=editing_prompt_embeddings,
        )  # before any text encoding or compilation
        prompts = inputs.prompt_list(prompt)
        per_prompt = inputs.check_int(num_images_per_prompt, "num_images_per_prompt", minimum=1)
        steps = inputs.check_int(num_inference_steps, "num_inference_steps", minimum=1)
        h, w = self._latent_size(height, width)
        batch = len(prompts) * per_prompt
        guidance_scale = inputs.check_number(guidance_scale, "guidance_scale")
        do_cfg = guidance_scale > 1.0
        concepts = self._concepts(editing_prompt, editing_prompt_embeddings, len(prompts), per_prompt,
                                  **conditioning)
        num_concepts = 0 if concepts is None else jax.tree.leaves(concepts)[0].shape[0]
        settings = inputs.edit_settings(
            num_concepts,
            edit_guidance_scale=edit_guidance_scale,
            edit_threshold=edit_threshold,
            edit_warmup_steps=edit_warmup_steps,
            edit_cooldown_steps=edit_cooldown_steps,
            reverse_editing_direction=reverse_editing_direction,
            edit_weights=edit_weights,
            edit_momentum_scale=edit_momentum_scale,
            edit_mom_beta=edit_mom_beta,
        )
        if num_concepts and not do_cfg:
            warnings.warn(
                "editing prompts need classifier-free guidance: with guidance_scale <= 1 they are "
                "ignored, as in diffusers",
                UserWarning,
                stacklevel=3,
            )
            num_concepts, concepts = 0, None
        params = EditParams.create(
            num_concepts, guidance_scale=guidance_scale, **(settings if num_concepts else {})
        )
        schedule = self.scheduler.set_timesteps(steps)
        loop_steps = int(schedule.timesteps.shape[0])
        if num_concepts:
            names = inputs.concept_names(editing_prompt, num_concepts)
            inputs.warn_ineffective_concepts(settings, loop_steps, names, stacklevel=3)
        replay = self._replay(sem_guidance, loop_steps, steps, (batch, 4, h, w)) if do_cfg else None
        context = self._context(prompts, negative_prompt, prompt, per_prompt, do_cfg, concepts,
                                size=(h * self.vae_scale_factor, w * self.vae_scale_factor), **conditioning)
        noise, keys, seed = self._noise(None if inversion else latents, seed, prng_key, batch, h, w,
                                        image_indices)
        scheduler = step_uncond = None
        if inversion is not None:  # null_text: start latents, DDIM, per-step uncond embeddings
            noise, scheduler, schedule, step_uncond = null_text.job_inputs(inversion, steps, batch, do_cfg,
                                                                           latents)
        return DenoiseJob(
            noise=noise,
            context=context,
            params=params,
            image_keys=keys,
            eta=jnp.float32(inputs.check_number(eta, "eta")),
            replay=replay,
            schedule=schedule,
            num_concepts=num_concepts,
            do_cfg=do_cfg,
            record=bool(return_estimates) and do_cfg,
            seed=seed,
            scheduler=scheduler,
            step_uncond=step_uncond,
        )

    def invert(self, image, prompt: str = "", num_inference_steps: int = 50, guidance_scale: float = 7.5,
               method: str = "null-text", **kwargs):
        """DDIM or null-text inversion of photo(s) (PIL, or float arrays in [0, 1]) -> `null_text.Inversion`,
        for `pipe(prompt, ..., inversion=inv)`; `kwargs`: `null_text.invert`'s optimisation settings."""
        return null_text.invert(self, image, prompt, num_inference_steps, guidance_scale, method, **kwargs)

    # -- the steps of __call__ -------------------------------------------------------------------------

    def _latent_size(self, height, width) -> tuple[int, int]:
        default = (self.unet.config.sample_size or 64) * self.vae_scale_factor
        sizes = []
        for name, value in (("height", height), ("width", width)):
            value = default if value is None else inputs.check_int(value, name, minimum=self.vae_scale_factor)
            if value % 8 or value % self.vae_scale_factor:
                raise ValueError(
                    f"`{name}` has to be divisible by {max(8, self.vae_scale_factor)} but is {value}"
                )
            sizes.append(value // self.vae_scale_factor)
        return sizes[0], sizes[1]

    def _concepts(self, editing_prompt, embeddings, num_prompts: int, per_prompt: int) -> jax.Array | None:
        """One embedding per concept (K, L, D); `_context` pairs each with every image."""
        if editing_prompt is not None and embeddings is not None and len(editing_prompt):
            raise ValueError("pass either `editing_prompt` or `editing_prompt_embeddings`, not both")
        if editing_prompt:
            encoded = self._encode(inputs.prompt_list(editing_prompt, "editing_prompt"))
        elif embeddings is not None:
            encoded = jnp.asarray(np.asarray(embeddings, np.float32))
            expected = (self.tokenizer.model_max_length, self.text_encoder.config.hidden_size)
            if encoded.ndim != 3 or encoded.shape[0] < 1 or tuple(encoded.shape[1:]) != expected:
                raise ValueError(
                    f"`editing_prompt_embeddings` must have shape (num_concepts, {expected[0]}, "
                    f"{expected[1]}), got {tuple(encoded.shape)}"
                )
        else:
            return None
        return encoded

    def _context(self, prompts, negative_prompt, prompt, per_prompt, do_cfg, concepts, size) -> jax.Array:
        """(copies, B, L, D): [uncond, text, concept 0, ...], each for every image.

        Each concept is paired with every image, like the reference's tokenised path. (Deviation: the
        reference's `editing_prompt_embeddings` path repeats concept-major and mispairs for several prompts.)
        """
        text = jnp.repeat(self._encode(prompts), per_prompt, axis=0)
        if not do_cfg:
            return text[None]
        negatives = inputs.negative_prompts(negative_prompt, prompt, len(prompts))
        uncond = jnp.repeat(self._encode(negatives, truncation=True), per_prompt, axis=0)
        parts = [uncond[None], text[None]]
        if concepts is not None:
            parts.append(
                jnp.broadcast_to(concepts[:, None].astype(text.dtype), (concepts.shape[0], *text.shape))
            )
        return jnp.concatenate(parts)

    def _replay(self, sem_guidance, loop_steps: int, steps: int, shape) -> jax.Array | None:
        if sem_guidance is None:
            return None
        if len(sem_guidance) not in (loop_steps, steps + 1):
            raise ValueError(
                f"`sem_guidance` needs one entry per denoising step ({loop_steps}"
                f"{f' or {steps + 1}' if steps + 1 != loop_steps else ''}), got {len(sem_guidance)}"
            )
        entries = [
            inputs.check_array(g, f"sem_guidance[{i}]", shape)
            for i, g in enumerate(list(sem_guidance)[:loop_steps])
        ]
        return jnp.asarray(np.stack(entries).transpose(0, 1, 3, 4, 2))
