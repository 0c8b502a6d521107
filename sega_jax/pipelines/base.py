"""What every pipeline shares: the SEGA job and the output, the VAE programs, the family-free steps.

- `DenoiseJob` (one prepared SEGA call: the SEGA pipelines, `parallel` and `gradients` take it) and
  `SemanticStableDiffusionPipelineOutput` (diffusers' output, also LEDITS++'s);
- the compiled VAE programs `encode_image` / `decode`, and `denoiser` (a UNet as the sampler's eps function);
- `PipelineBase`, what every pipeline (SEGA and LEDITS++, every family) does the same way: its components
  (UNet, VAE, scheduler, safety checker and feature extractor, and the family's text conditioning from
  `pipelines.conditioning`, whose parts it shows as diffusers' attributes), noise drawing, the progress
  bar, `finish` (decode, safety checker, output), schedulers, LoRA and textual inversion. The SEGA loop
  (`prepare`, `run`, `denoise`) is `sega.sd`'s; the inversion and edit programs are `ledits_pp.sd`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sega_jax.core.guidance import EditParams
from sega_jax.core.sampler import SampleOutput
from sega_jax.loaders import lora
from sega_jax.loaders.concepts import load_textual_inversion
from sega_jax.models.image_processing import to_pil
from sega_jax.models.safety_checker import run_safety_checker as check_safety
from sega_jax.pipelines import inputs
from sega_jax.pipelines.conditioning import delegated
from sega_jax.runtime import xla_options
from sega_jax.runtime.cache import enable_compilation_cache
from sega_jax.schedulers import scheduler_from_name


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


def denoiser(unet):
    """The sampler's `eps(latents, t, context)` for a UNet: a dict context carries the UNet's keyword
    conditioning beside the hidden states (SDXL: {"context", "text_embeds", "time_ids"})."""
    return lambda x, t, c: unet(x, t, **c) if isinstance(c, dict) else unet(x, t, c)


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
    """The components and the family-independent steps of a pipeline call. `conditioning` is the family's
    text conditioning (`SDConditioning`, `SDXLConditioning`); `text_encoder` and `tokenizer` are its."""

    # diffusers' SD pipelines decode fp16 latents with the fp16 VAE; its SDXL ones honour `force_upcast`.
    honours_force_upcast = False

    text_encoder = delegated("text_encoder")
    tokenizer = delegated("tokenizer")
    _text = delegated("split", "The text encoder as `nnx.split` gives it.", settable=False)

    def __init__(self, unet, vae, conditioning, scheduler, safety_checker=None, feature_extractor=None,
                 requires_safety_checker: bool = True):
        enable_compilation_cache()  # the persistent XLA cache, unless SEGA_JAX_CACHE_DIR=off
        self.unet, self.vae, self.conditioning, self.scheduler = unet, vae, conditioning, scheduler
        self.safety_checker, self.feature_extractor = safety_checker, feature_extractor
        self._unet = nnx.split(unet)
        self._vae = nnx.split(vae)
        self._checker = None if safety_checker is None else nnx.split(safety_checker)
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                "a `safety_checker` needs its `feature_extractor` (the CLIP image preprocessing)"
            )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels  # 4 for SD and SDXL; never a literal
        self._progress = {}
        if safety_checker is None and requires_safety_checker:
            logging.getLogger(type(self).__module__).warning(  # the pipeline's module, as in diffusers
                "You have disabled the safety checker for %s by passing `safety_checker=None`. "
                "Pass `requires_safety_checker=False` to silence this warning.",
                type(self).__name__,
            )

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
        self.conditioning.refresh()  # the text encoders' new weights

    # -- learned concepts (sega_jax.loaders.concepts): textual inversion tokens --------------------------

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, *, weight_name=None,
                               allow_pickle: bool = False, tokenizer=None, text_encoder=None) -> list[str]:
        """diffusers' textual inversion files (and A1111's): new tokens for prompts and SEGA concepts."""
        return load_textual_inversion(self, pretrained_model_name_or_path, token, weight_name=weight_name,
                                      allow_pickle=allow_pickle, tokenizer=tokenizer,
                                      text_encoder=text_encoder)

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
            shape = (self.latent_channels, h, w)
            draw = lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape, jnp.float32)
            noise = jax.vmap(draw)(keys)
        else:
            noise = jnp.asarray(inputs.check_array(latents, "latents", (batch, self.latent_channels, h, w)))
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
            images = to_pil(images)
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
