"""SEGA: `SegaPipeline`, the SEGA pipeline of any family, and `SemanticStableDiffusionPipeline` (SD 1.x/2.x).

`SegaPipeline` prepares a call (`prepare`: the argument checks, the family's text conditioning from its
`conditioning` component, noise) into a `DenoiseJob` and runs the compiled SEGA loop on it (`run` with the
progress bar and callback, `denoise`; `TRACE_COUNT` counts the loop's traces). A family's class adds its
`__init__` (the components), `from_pretrained` and `__call__` with diffusers' arguments: here SD's, with
`invert` (null-text inversion, via `null_text`); `sega.sdxl` has SDXL's. The components, noise, decoding,
the safety checker and LoRA are `PipelineBase`'s (`sega_jax.pipelines.base`); `DenoiseJob` and
`SemanticStableDiffusionPipelineOutput` are re-exported here.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sega_jax.core.guidance import EditParams
from sega_jax.core.sampler import SampleOutput, sega_sample
from sega_jax.loaders.folders import load_components
from sega_jax.pipelines import inputs, null_text
from sega_jax.pipelines.base import (
    DenoiseJob,
    PipelineBase,
    SemanticStableDiffusionPipelineOutput,
    denoiser,
)
from sega_jax.pipelines.conditioning import SDConditioning
from sega_jax.runtime import traces, xla_options

__all__ = ["TRACE_COUNT", "DenoiseJob", "SegaPipeline", "SemanticStableDiffusionPipeline",
           "SemanticStableDiffusionPipelineOutput"]

TRACE_COUNT = traces.counter("sega", "denoise")  # traces (= compilations) of the denoising loop
_HOST_HOOKS: list = []  # the running call's per-step host hook; a fixed function keeps the jit cache hot


def _host_step(i, t, *latents) -> None:
    if _HOST_HOOKS:
        _HOST_HOOKS[-1](int(i), t, *latents)


@xla_options.jit(
    static_argnames=("graph", "scheduler", "num_concepts", "do_cfg", "record", "host", "emit_latents"),
)
def _denoise(graph, state, scheduler, schedule, noise, context, params, image_keys, eta, replay, *,
             num_concepts, do_cfg, record, host, emit_latents, step_uncond=None):
    """The SEGA loop (`core.sampler.sega_sample`) with the UNet's split parts; `host`: call the running
    `run`'s progress hook at each step."""
    TRACE_COUNT["denoise"] += 1
    return sega_sample(denoiser(nnx.merge(graph, state)), scheduler, schedule, noise, context, params,
                       num_concepts=num_concepts, do_cfg=do_cfg, image_keys=image_keys, eta=eta,
                       replay=replay, record_estimates=record, on_step=_host_step if host else None,
                       emit_latents=emit_latents, shared_latents=True, step_uncond=step_uncond)


class SegaPipeline(PipelineBase):
    """SEGA on the family's `conditioning` (its `concepts` and `context` give the loop's copies)."""

    def run(self, job: DenoiseJob, callback=None, callback_steps: int = 1, output_type: str = "pil",
            return_dict: bool = True, run_safety_checker: bool = True):
        """Denoise a prepared job (with the progress bar and `callback`) and finish it, as `__call__`."""
        hook = self._hook(job.steps, callback, callback_steps, job.schedule)
        _HOST_HOOKS.append(hook)
        try:
            # With no callback and no progress bar, the loop makes no host call at all.
            host = callback is not None or not self._progress.get("disable", False)
            out = self.denoise(job, host=host, emit_latents=callback is not None)
            jax.block_until_ready(out.latents)
            jax.effects_barrier()
        finally:
            _HOST_HOOKS.pop()
            hook.close()
        return self.finish(out, output_type, return_dict, job.seed, run_safety_checker=run_safety_checker)

    def denoise(self, job: DenoiseJob, *, host: bool = False, emit_latents: bool = False) -> SampleOutput:
        """Run the compiled SEGA loop for a prepared job (latents in NHWC)."""
        return _denoise(
            self._unet[0], self._unet[1], job.scheduler or self.scheduler, job.schedule, job.noise,
            job.context, job.params, job.image_keys, job.eta, job.replay, num_concepts=job.num_concepts,
            do_cfg=job.do_cfg, record=job.record, host=host, emit_latents=emit_latents,
            step_uncond=job.step_uncond,
        )

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
        **text_args,
    ) -> DenoiseJob:
        """Validate the arguments and do all host-side work (tokenize, encode, draw noise) for one call.

        `image_indices` (one int per image) choose which per-seed noise each image gets; by default
        0..B-1, so image j of a call is the same image whatever else is in the batch. `conditioning`: a
        pipeline family's own text-conditioning arguments, handed to its conditioning's `context`.
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
        concepts = self.conditioning.concepts(editing_prompt, editing_prompt_embeddings,
                                              clip_skip=text_args.get("clip_skip"))
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
        shape = (batch, self.latent_channels, h, w)
        replay = self._replay(sem_guidance, loop_steps, steps, shape) if do_cfg else None
        context = self.conditioning.context(prompts, negative_prompt, prompt, per_prompt, do_cfg, concepts,
                                            size=(h * self.vae_scale_factor, w * self.vae_scale_factor),
                                            **text_args)
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


class SemanticStableDiffusionPipeline(SegaPipeline):
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
        super().__init__(unet, vae, SDConditioning(text_encoder, tokenizer), scheduler, safety_checker,
                         feature_extractor, requires_safety_checker)

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

    def text_embeddings(self, texts: list[str], truncation: bool = False) -> jax.Array:
        """The text encoder's hidden states (B, L, D) for `texts` (as the prompts are encoded)."""
        return self.conditioning.encode(texts, truncation=truncation)

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

    def invert(self, image, prompt: str = "", num_inference_steps: int = 50, guidance_scale: float = 7.5,
               method: str = "null-text", **kwargs):
        """DDIM or null-text inversion of photo(s) (PIL, or float arrays in [0, 1]) -> `null_text.Inversion`,
        for `pipe(prompt, ..., inversion=inv)`; `kwargs`: `null_text.invert`'s optimisation settings."""
        return null_text.invert(self, image, prompt, num_inference_steps, guidance_scale, method, **kwargs)
