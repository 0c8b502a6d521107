"""What every pipeline family shares: the job, the output, the compiled programs, the family-free steps.

- `DenoiseJob` (one prepared call) and `SemanticStableDiffusionPipelineOutput` (diffusers' output);
- the compiled programs: the SEGA loop (`TRACE_COUNT` counts its traces), `encode_text` (a CLIP text
  encoder), `encode_image` / `decode` (the VAE), and `denoiser` (a UNet as the sampler's eps function);
- `PipelineBase`, the steps of a call that do not depend on the family: `run` (progress bar, callback),
  `denoise`, noise drawing, `finish` (decode, safety checker, output), schedulers, LoRA and textual
  inversion, and public accessors for the split models. A family's class (`sega.sd`, `sega.sdxl`,
  `ledits_pp`) adds its own `__init__`, `prepare` and text conditioning.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from sega_jax.core.guidance import EditParams
from sega_jax.core.sampler import SampleOutput, sega_sample
from sega_jax.loaders import lora
from sega_jax.loaders.concepts import load_textual_inversion
from sega_jax.models.safety_checker import run_safety_checker as check_safety
from sega_jax.pipelines import inputs
from sega_jax.runtime import traces, xla_options
from sega_jax.schedulers import scheduler_from_name

TRACE_COUNT = traces.counter("sega", "denoise")  # traces (= compilations) of the denoising loop
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
def encode_text(graph, state, ids):
    """A CLIP text encoder's hidden states for token ids (B, L)."""
    return nnx.merge(graph, state)(ids)


@xla_options.jit(static_argnames=("graph",))
def encode_image(graph, state, images: jax.Array, scaling_factor) -> jax.Array:
    """The VAE posterior mean, scaled: NHWC latents in fp32."""
    dtype = jax.tree.leaves(state)[0].dtype
    mean, _ = nnx.merge(graph, state).encode(images.astype(dtype))
    return scaling_factor * mean.astype(jnp.float32)


@xla_options.jit(static_argnames=("graph", "upcast"))
def decode(graph, state, latents, scaling_factor, upcast=False):
    """NHWC latents -> NHWC images in [0, 1] (float32)."""
    if upcast:  # diffusers' `force_upcast`: fp16 VAE weights decode in fp32
        state = jax.tree.map(lambda p: p.astype(jnp.float32), state)
        latents = latents.astype(jnp.float32)
    image = nnx.merge(graph, state).decode(latents / scaling_factor)
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


class PipelineBase:
    """The family-independent steps of a pipeline call; a family's `__init__` sets the components and
    their splits (`_unet`, `_vae`, `_text`, `_checker`), `vae_scale_factor` and `_progress`."""

    # diffusers' SD pipelines decode fp16 latents with the fp16 VAE; its SDXL ones honour `force_upcast`.
    honours_force_upcast = False

    @property
    def unet_parts(self) -> tuple:
        """The UNet as `nnx.split` gives it, (graphdef, state): what the compiled programs take."""
        return self._unet

    @property
    def vae_parts(self) -> tuple:
        """The VAE as `nnx.split` gives it, (graphdef, state)."""
        return self._vae

    def set_scheduler(self, scheduler) -> None:
        """Swap the scheduler: an object, a diffusers class name or a short name ("dpm++2m-karras")."""
        if isinstance(scheduler, str):
            scheduler = scheduler_from_name(scheduler, self.scheduler.config)
        self.scheduler = scheduler

    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress = kwargs

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
        return load_textual_inversion(self, pretrained_model_name_or_path, token, weight_name=weight_name,
                                      allow_pickle=allow_pickle, tokenizer=tokenizer,
                                      text_encoder=text_encoder)

    def _refresh_text_encoders(self) -> None:
        """Re-split the text encoders after their parameters changed (LoRA, new token rows)."""
        self._text = nnx.split(self.text_encoder)
        if getattr(self, "text_encoder_2", None) is not None:
            self._text_2 = nnx.split(self.text_encoder_2)

    # -- noise, progress, decoding and output ------------------------------------------------------------

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
            images = np.asarray(decode(self._vae[0], self._vae[1], latents, self.vae.config.scaling_factor,
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
