"""SemanticStableDiffusionPipeline: diffusers' arguments, one compiled SEGA loop, all I/O on the host.

One class, as in diffusers; it is long because `__call__` and `prepare` both spell out diffusers' 25
arguments. Loading lives in `loading.py`, argument checks in `pipeline_inputs.py`, the loop in `sampler.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from sega_jax.core.guidance import EditParams
from sega_jax.core.sampler import SampleOutput, sega_sample
from sega_jax.loaders import lora
from sega_jax.loaders.folders import load_components
from sega_jax.models.safety_checker import run_safety_checker as check_safety
from sega_jax.models.tokenizer import tokenize
from sega_jax.pipelines import inputs
from sega_jax.runtime import xla_options
from sega_jax.runtime.cache import enable_compilation_cache
from sega_jax.schedulers import scheduler_from_name

logger = logging.getLogger(__name__)

TRACE_COUNT = {"denoise": 0}  # how many times the denoising loop was traced (compiled); tests read it
_HOST_HOOKS: list = []  # the running call's per-step host hook; a fixed function keeps the jit cache hot


@dataclasses.dataclass
class SemanticStableDiffusionPipelineOutput:
    """diffusers' output (`images`, `nsfw_content_detected`) plus what diffusers keeps on the pipeline.

    `sem_guidance` is (steps, B, 4, h, w) in diffusers' layout and can be passed back as the
    `sem_guidance` argument; the estimates are filled when `return_estimates=True`.
    """

    images: Any
    nsfw_content_detected: list[bool] | None
    sem_guidance: np.ndarray | None = None
    uncond_estimates: np.ndarray | None = None
    text_estimates: np.ndarray | None = None
    edit_estimates: np.ndarray | None = None
    seed: int | None = None


class DenoiseJob(NamedTuple):
    """Everything one compiled SEGA loop needs: arrays (batch-leading, except `context`, which is
    (copies, B, L, D), and `replay`, (steps, B, h, w, 4)) plus the static settings."""

    noise: jax.Array
    context: jax.Array
    params: EditParams
    image_keys: jax.Array
    eta: jax.Array
    replay: jax.Array | None
    schedule: Any
    num_concepts: int
    do_cfg: bool
    record: bool
    seed: int | None
    scheduler: Any = None  # None: the pipeline's; an inversion's DDIM scheduler otherwise
    step_uncond: jax.Array | None = None  # (steps, B, L, D) null-text inversion's uncond embeddings

    @property
    def steps(self) -> int:
        return int(self.schedule.timesteps.shape[0])


def _host_step(i, t, *latents) -> None:
    if _HOST_HOOKS:
        _HOST_HOOKS[-1](int(i), t, *latents)


@xla_options.jit(
    static_argnames=("graph", "scheduler", "num_concepts", "do_cfg", "record", "host", "emit_latents"),
)
def _denoise(
    graph,
    state,
    scheduler,
    schedule,
    noise,
    context,
    params,
    image_keys,
    eta,
    replay,
    *,
    num_concepts,
    do_cfg,
    record,
    host,
    emit_latents,
    step_uncond=None,
):
    TRACE_COUNT["denoise"] += 1
    return sega_sample(
        denoiser(nnx.merge(graph, state)),
        scheduler,
        schedule,
        noise,
        context,
        params,
        num_concepts=num_concepts,
        do_cfg=do_cfg,
        image_keys=image_keys,
        eta=eta,
        replay=replay,
        record_estimates=record,
        on_step=_host_step if host else None,
        emit_latents=emit_latents,
        shared_latents=True,
        step_uncond=step_uncond,
    )


def denoiser(unet):
    """The sampler's `eps(latents, t, context)` for a UNet: a dict context carries the UNet's keyword
    conditioning beside the hidden states (SDXL: {"context", "text_embeds", "time_ids"})."""
    return lambda x, t, c: unet(x, t, **c) if isinstance(c, dict) else unet(x, t, c)


@xla_options.jit(static_argnames=("graph",))
def _encode_text(graph, state, ids):
    return nnx.merge(graph, state)(ids)


@xla_options.jit(static_argnames=("graph", "upcast"))
def _decode(graph, state, latents, scaling_factor, upcast=False):
    if upcast:  # diffusers' `force_upcast`: fp16 VAE weights decode in fp32
        state = jax.tree.map(lambda p: p.astype(jnp.float32), state)
        latents = latents.astype(jnp.float32)
    image = nnx.merge(graph, state).decode(latents / scaling_factor)
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


class SemanticStableDiffusionPipeline:
    """Stable Diffusion with semantic guidance; `__call__` takes diffusers' arguments (see the README)."""

    # diffusers' SD pipelines decode fp16 latents with the fp16 VAE; its SDXL ones honour `force_upcast`.
    honours_force_upcast = False

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

    def set_scheduler(self, scheduler) -> None:
        """Swap the scheduler: an object, a diffusers class name or a short name ("dpm++2m-karras")."""
        if isinstance(scheduler, str):
            scheduler = scheduler_from_name(scheduler, self.scheduler.config)
        self.scheduler = scheduler

    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress = kwargs

    def _encode(self, texts: list[str], truncation: bool = False) -> jax.Array:
        ids = tokenize(self.tokenizer, texts, truncation=truncation)
        return _encode_text(self._text[0], self._text[1], jnp.asarray(ids))

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
        guidance_scale = inputs._number(guidance_scale, "guidance_scale")
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
            from sega_jax.pipelines.null_text import job_inputs

            noise, scheduler, schedule, step_uncond = job_inputs(inversion, steps, batch, do_cfg, latents)
        return DenoiseJob(
            noise=noise,
            context=context,
            params=params,
            image_keys=keys,
            eta=jnp.float32(inputs._number(eta, "eta")),
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
        from sega_jax.pipelines.null_text import invert

        return invert(self, image, prompt, num_inference_steps, guidance_scale, method, **kwargs)

    def denoise(self, job: DenoiseJob, *, host: bool = False, emit_latents: bool = False) -> SampleOutput:
        """Run the compiled SEGA loop for a prepared job (latents in NHWC)."""
        return _denoise(
            self._unet[0],
            self._unet[1],
            job.scheduler or self.scheduler,
            job.schedule,
            job.noise,
            job.context,
            job.params,
            job.image_keys,
            job.eta,
            job.replay,
            num_concepts=job.num_concepts,
            do_cfg=job.do_cfg,
            record=job.record,
            host=host,
            emit_latents=emit_latents,
            step_uncond=job.step_uncond,
        )

    # -- LoRA (sega_jax.loaders.lora): adapters are merged into the weights on the host whenever they change

    def load_lora_weights(self, path_or_dict, adapter_name: str | None = None, weight_name: str | None = None,
                          *, allow_pickle: bool = False) -> None:
        """diffusers' LoRA files (diffusers/peft or kohya keys) for the UNet and text encoder(s)."""
        state = lora.load(self._lora_state, path_or_dict, self._lora_models(), name=adapter_name,
                          weight_name=weight_name, allow_pickle=allow_pickle,
                          layers_per_block=self.unet.config.layers_per_block[0])
        self._set_lora(state)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        """Use only these adapters, at these weights (a float or one per adapter; default 1.0)."""
        self._set_lora(lora.activate(self._lora_state, adapter_names, adapter_weights))

    def get_active_adapters(self) -> list[str]:
        return list(self._lora_state.active) + list(self._lora_state.fused)

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        self._set_lora(lora.fuse(self._lora_state, lora_scale, adapter_names))

    def unfuse_lora(self) -> None:
        self._set_lora(lora.unfuse(self._lora_state))

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the original weights come back, except what `fuse_lora` merged."""
        state = self._lora_state
        self._set_lora(lora.LoraState(adapters=state.adapters, fused=state.fused, originals=state.originals))
        self._lora = lora.LoraState()

    @property
    def _lora_state(self) -> lora.LoraState:
        return getattr(self, "_lora", None) or lora.LoraState()

    def _lora_models(self) -> dict:
        models = {name: getattr(self, name, None) for name in lora.COMPONENTS}
        return {name: model for name, model in models.items() if model is not None}

    def _set_lora(self, state: lora.LoraState) -> None:
        lora.apply(state, self._lora_models(), previous=self._lora_state)
        self._lora = state
        self._unet = nnx.split(self.unet)
        self._refresh_text_encoders()

    # -- learned concepts (sega_jax.loaders.concepts): textual inversion tokens --------------------------

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, *, weight_name=None,
                               allow_pickle: bool = False, tokenizer=None, text_encoder=None) -> list[str]:
        """diffusers' textual inversion files (and A1111's): new tokens for prompts and SEGA concepts."""
        from sega_jax.loaders.concepts import load_textual_inversion

        return load_textual_inversion(self, pretrained_model_name_or_path, token, weight_name=weight_name,
                                      allow_pickle=allow_pickle, tokenizer=tokenizer,
                                      text_encoder=text_encoder)

    def _refresh_text_encoders(self) -> None:
        """Re-split the text encoders after their parameters changed (LoRA, new token rows)."""
        self._text = nnx.split(self.text_encoder)
        if getattr(self, "text_encoder_2", None) is not None:
            self._text_2 = nnx.split(self.text_encoder_2)

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

    def _noise(self, latents, seed, prng_key, batch: int, h: int, w: int, image_indices=None):
        """(noise NHWC, per-image keys, seed). Image j's noise depends only on (seed or key, j)."""
        if seed is not None and prng_key is not None:
            raise ValueError("pass either `seed` or `prng_key`, not both")
        if prng_key is None:
            seed = secrets.randbelow(2**31) if seed is None else inputs.check_int(seed, "seed")
            prng_key = jax.random.key(seed)
        elif not jnp.issubdtype(jnp.asarray(prng_key).dtype, jax.dtypes.prng_key):
            prng_key = jax.random.wrap_key_data(jnp.asarray(prng_key, jnp.uint32))
        indices = np.arange(batch) if image_indices is None else np.asarray(image_indices)
        if indices.shape != (batch,) or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(
                f"`image_indices` must be {batch} integers (one per image), got {image_indices!r}"
            )
        keys = jax.vmap(lambda j: jax.random.fold_in(prng_key, j))(jnp.asarray(indices, jnp.uint32))
        if latents is None:
            draw = lambda k: jax.random.normal(jax.random.fold_in(k, 0), (4, h, w), jnp.float32)
            noise = jax.vmap(draw)(keys)
        else:
            noise = jnp.asarray(inputs.check_array(latents, "latents", (batch, 4, h, w)))
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        return jnp.transpose(noise, (0, 2, 3, 1)), step_keys, seed

    def _hook(self, loop_steps: int, callback, callback_steps: int, schedule):
        from tqdm.auto import tqdm

        bar = tqdm(total=loop_steps, **self._progress)
        timesteps = np.asarray(schedule.timesteps)

        def hook(i, t, *latents):
            bar.update(1)
            if callback is not None and i % callback_steps == 0:
                callback(i, timesteps[i], np.transpose(np.asarray(latents[0]), (0, 3, 1, 2)))

        hook.close = bar.close
        return hook

    def check_safety(self, images: np.ndarray, run: bool = True) -> tuple[np.ndarray, list[bool] | None]:
        """(images, nsfw flags) for decoded NHWC images in [0, 1]: flagged ones blacked out by the loaded
        safety checker (compiled once); unchanged with None flags when none is loaded or `run` is False."""
        if self.safety_checker is None or not run:
            return images, None
        return check_safety(self.safety_checker, self.feature_extractor, images, split=self._checker)

    def finish(
        self,
        out: SampleOutput,
        output_type: str = "pil",
        return_dict: bool = True,
        seed=None,
        *,
        run_safety_checker: bool = True,
    ):
        """Decode (unless "latent"), check for non-finite values, run the safety checker (when loaded and
        not switched off) and build diffusers' output."""
        latents = out.latents
        to_nchw = lambda a: None if a is None else np.moveaxis(np.asarray(a), -1, -3)
        if output_type == "latent":
            images = to_nchw(latents)
        else:
            upcast = (self.honours_force_upcast and self.vae.config.force_upcast
                      and self.vae.dtype == jnp.float16)
            images = np.asarray(_decode(self._vae[0], self._vae[1], latents, self.vae.config.scaling_factor,
                                        upcast=upcast))
        if not np.isfinite(np.asarray(images)).all():
            dtypes = {leaf.dtype for leaf in jax.tree.leaves((self._unet[1], self._vae[1]))}
            raise inputs.non_finite_output(bool(np.isfinite(np.asarray(latents)).all()), dtypes)
        nsfw = None
        if output_type != "latent":
            images, nsfw = self.check_safety(images, run_safety_checker)
        if output_type == "pil":
            images = [Image.fromarray(np.round(img * 255).astype(np.uint8)) for img in images]
        if not return_dict:
            return images, nsfw
        estimates = out.estimates or (None, None, None)
        return SemanticStableDiffusionPipelineOutput(
            images=images,
            nsfw_content_detected=nsfw,
            sem_guidance=to_nchw(out.sem_guidance),
            uncond_estimates=to_nchw(estimates[0]),
            text_estimates=to_nchw(estimates[1]),
            edit_estimates=to_nchw(estimates[2]),
            seed=seed,
        )
