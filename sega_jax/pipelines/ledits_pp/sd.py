"""LEDITS++ (invert a photo, then edit it with semantic concepts): `LEditsPPPipeline`, the LEDITS++
pipeline of any family, and `LEditsPPPipelineStableDiffusion` (SD 1.x/2.x).

diffusers' `LEditsPPPipelineStableDiffusion` with its arguments and defaults: `invert` encodes the photo
with the VAE (the posterior's mode) and runs the edit-friendly DDPM inversion (`sega_jax.core.inversion`);
`__call__` replays the scheduler from the inverted latents with the stored noise maps while the LEDITS++
guidance (`sega_jax.core.guidance_ledits`) steers it. Each is one compiled program; edit settings are traced.
`LEditsPPPipeline` holds the steps every family shares (the argument checks, the programs, the noise
maps); a family's class (here, and `ledits_pp.sdxl`) adds its arguments and builds its copies with its
`conditioning` component (`sega_jax.pipelines.conditioning`). Noise, decoding and outputs are
`PipelineBase`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sega_jax.core.guidance_ledits import LEditsParams, concept_attention, ledits_step
from sega_jax.core.inversion import (
    EditSchedule,
    LEditsPPInversion,
    edit_schedule,
    edit_step,
    invert_loop,
    ledits_scheduler,
)
from sega_jax.core.sampler import SampleOutput
from sega_jax.loaders.folders import load_components, resolve_folder
from sega_jax.models.image_processing import to_pil
from sega_jax.models.tokenizer import expand_prompt
from sega_jax.pipelines import inputs
from sega_jax.pipelines.base import PipelineBase, decode, encode_image
from sega_jax.pipelines.conditioning import SDConditioning
from sega_jax.pipelines.ledits_pp.inputs import preprocess_images, user_mask_array
from sega_jax.runtime import traces, xla_options
from sega_jax.schedulers import scheduler_from_config

TRACE_COUNT = traces.counter("ledits_pp", "invert", "edit")  # traces (= compilations) of each program


@xla_options.jit(static_argnames=("graph", "copies"))
def _invert(graph, state, schedule: EditSchedule, x0, noise, context, guidance_scale, *, copies):
    TRACE_COUNT["invert"] += 1
    unet = nnx.merge(graph, state)
    flat = _flatten(context)

    def eps(x, t):
        out = _unet_call(unet, x, t, flat).astype(jnp.float32).reshape(copies, *x.shape)
        return out[0] if copies == 1 else out[0] + guidance_scale * (out[1] - out[0])

    return invert_loop(eps, schedule, x0, noise)


@xla_options.jit(static_argnames=("graph", "num_concepts", "cross_attn", "intersect", "intersect_every_step"))
def _edit(graph, state, schedule: EditSchedule, latents, zs, context, params, user_mask, replay, replay_steps,
          *, num_concepts, cross_attn, intersect, intersect_every_step=False):
    """`intersect_every_step`: intersect the masks at every timestep (the SDXL reference), not only at
    t <= 800 (the SD one)."""
    TRACE_COUNT["edit"] += 1
    unet = nnx.merge(graph, state)
    flat = _flatten(context)
    batch, h, w, _ = latents.shape
    maps_size = (h // 4, w // 4)  # the reference's attention store keeps 1/4 of the latent size

    def body(carry, xs):
        x, previous = carry
        i, t, z = xs
        attention = None
        if cross_attn and num_concepts:
            out, maps = _unet_call(unet, x, t, flat, cross_attention_maps=maps_size)
            attention = concept_attention(_layers_and_heads(maps), num_concepts, batch,
                                          params.num_edit_tokens)
        else:
            out = _unet_call(unet, x, t, flat)
        out = out.astype(jnp.float32).reshape(1 + num_concepts, *x.shape)
        if num_concepts:
            gate = jnp.zeros_like(t) if intersect_every_step else t  # ledits_step reads t only to gate
            pred, applied = ledits_step(out[0], out[1:], i, gate, params, user_mask=user_mask,
                                        attention=attention, use_intersect_mask=intersect, replay=replay[i],
                                        replay_steps=replay_steps)
        else:
            applied = jnp.where(i < replay_steps, replay[i], 0.0)
            pred = out[0] + applied
        x, previous = edit_step(schedule, i, x, pred, previous, z)
        return (x, previous), applied

    xs = (jnp.arange(zs.shape[0], dtype=jnp.int32), schedule.timesteps, zs)
    (latents, _), applied = jax.lax.scan(body, (latents, jnp.zeros_like(latents)), xs)
    return latents, applied


def _flatten(context):
    """(copies, B, ...) -> (copies * B, ...): the UNet's rows, for an array or SDXL's dict pytree."""
    return jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:]), context)


def _unet_call(unet, x, t, flat, **kwargs):
    """The UNet on flattened conditioning: hidden states, or SDXL's {"context", "text_embeds", "time_ids"}."""
    if isinstance(flat, dict):
        return unet(x, t, flat["context"], flat["text_embeds"], flat["time_ids"], **kwargs)
    return unet(x, t, flat, **kwargs)


def ledits_scheduler_kwargs(path_or_hub_id, kwargs: dict) -> dict:
    """`from_pretrained` kwargs that also load folders saved by diffusers' LEDITS++ (`sde-dpmsolver++`)."""
    if "scheduler" not in kwargs:
        folder = resolve_folder(path_or_hub_id, kwargs.get("variant"))
        file = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(file.read_text()) if file.is_file() else {}
        if str(config.get("algorithm_type", "")).startswith("sde-"):
            scheduler = scheduler_from_config({**config, "algorithm_type": "dpmsolver++"})
            kwargs = {**kwargs, "scheduler": scheduler}
    return kwargs


def _layers_and_heads(maps: dict) -> jax.Array:
    """The down and up blocks' maps (as the reference's store: not the mid block's), (layers*heads, rows,
    h, w, L)."""
    layers = maps["down"] + maps["up"]
    if not layers:
        raise ValueError("cross-attention masks need cross-attention layers at 1/4 of the latent size in the "
                         "UNet's down or up blocks (SD's 16x16 level at 512 px); this UNet has none")
    return jnp.concatenate([jnp.swapaxes(m, 0, 1) for m in layers])


class LEditsPPPipeline(PipelineBase):
    """LEDITS++ on the family's `conditioning`: the inversion and edit steps every family shares."""

    def __init__(self, unet, vae, conditioning, scheduler, safety_checker=None, feature_extractor=None,
                 requires_safety_checker: bool = True):
        super().__init__(unet, vae, conditioning, ledits_scheduler(scheduler), safety_checker,
                         feature_extractor, requires_safety_checker)
        self.inversion: LEditsPPInversion | None = None  # the last `invert`'s: `__call__`'s default

    def set_scheduler(self, scheduler) -> None:
        """As `PipelineBase`'s; a scheduler other than DDIM becomes DPM-Solver++ 2M SDE (as in diffusers)."""
        super().set_scheduler(scheduler)
        self.scheduler = ledits_scheduler(self.scheduler)

    def _run_inversion(self, image, source_context: Callable, source_prompt, source_guidance_scale,
                       num_inversion_steps, skip, generator, cross_attention_kwargs, clip_skip, height, width,
                       resize_mode, crops_coords, seed, prng_key, noise) -> LEditsPPInversion:
        """`invert`'s checks and work, with the family's `source_context(source_prompt, guidance_scale,
        batch, clip_skip, latent_size)` -> (copies (copies, B, ...), number of copies)."""
        inputs.check_generator(generator)
        if cross_attention_kwargs:
            raise ValueError("`cross_attention_kwargs` (LoRA scales, custom processors) is not supported")
        inputs.check_finite(source_guidance_scale=source_guidance_scale, skip=skip, noise=noise)
        steps = inputs.check_int(num_inversion_steps, "num_inversion_steps", minimum=1)
        skip = inputs.check_number(skip, "skip")
        if not 0.0 <= skip < 1.0:
            raise ValueError(f"`skip` must lie in [0, 1), got {skip!r}")
        guidance_scale = inputs.check_number(source_guidance_scale, "source_guidance_scale")
        if not isinstance(source_prompt, str):
            raise TypeError(f"`source_prompt` must be a string, got {type(source_prompt).__name__}")
        clip_skip = inputs.check_int(clip_skip, "clip_skip", allow_none=True)
        for name, value in (("height", height), ("width", width)):
            if value is not None and inputs.check_int(value, name, minimum=32) % 32:
                raise ValueError("height and width must be a factor of 32.")
        images, resized = preprocess_images(image, height, width, resize_mode, crops_coords,
                                            self.vae_scale_factor)
        x0 = encode_image(self._vae[0], self._vae[1], jnp.asarray(images), self.vae.config.scaling_factor)
        batch, h, w, _ = x0.shape
        reconstruction = np.asarray(decode(self._vae[0], self._vae[1], x0, self.vae.config.scaling_factor))
        draws = self._inversion_noise(noise, seed, prng_key, steps, batch, h, w)
        context, copies = source_context(source_prompt, guidance_scale, batch, clip_skip, latent_size=(h, w))
        schedule = edit_schedule(self.scheduler, steps, skip)
        init, zs, xts = _invert(self._unet[0], self._unet[1], schedule, x0, draws[1], context,
                                jnp.float32(guidance_scale), copies=copies)
        nchw = lambda a: np.moveaxis(np.asarray(a), -1, -3)
        return LEditsPPInversion(
            init_latents=nchw(init), zs=nchw(zs), xts=nchw(xts), timesteps=np.asarray(schedule.timesteps),
            images=resized, vae_reconstruction_images=to_pil(reconstruction), source_prompt=source_prompt,
            source_guidance_scale=guidance_scale, num_inversion_steps=steps, skip=skip, schedule=schedule,
            scheduler=self.scheduler, seed=draws[0])

    def _inversion_noise(self, noise, seed, prng_key, steps: int, batch: int, h: int, w: int):
        """(seed, (N, B, h, w, 4) draws): the given `noise`, else per-image draws from the seed or key."""
        if noise is not None:
            if seed is not None or prng_key is not None:
                raise ValueError("pass `noise` or `seed` / `prng_key`, not both")
            array = inputs.check_array(noise, "noise", (steps, batch, self.latent_channels, h, w))
            return None, jnp.asarray(np.moveaxis(array, 2, -1))
        _, keys, seed = self._noise(None, seed, prng_key, batch, h, w)
        draw = lambda key: jax.random.normal(key, (steps, h, w, self.latent_channels), jnp.float32)
        return seed, jnp.swapaxes(jax.vmap(draw)(keys), 0, 1)

    def _edit_inversion(self, inversion: LEditsPPInversion | None, output_type,
                        **finite) -> LEditsPPInversion:
        """The inversion an edit starts from (`inversion`, else the last `invert`'s), once `output_type` is
        known and the numeric arguments in `finite` are finite (the checks both families' `__call__`
        share)."""
        if output_type not in inputs.OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {inputs.OUTPUT_TYPES}, got {output_type!r}")
        inversion = self.inversion if inversion is None else inversion
        if inversion is None:
            raise ValueError("You need to invert an input image first before calling the pipeline. The "
                             "`invert` method has to be called beforehand, or pass `inversion=`.")
        inputs.check_finite(**finite)
        return inversion

    def _edit_latents(self, inversion: LEditsPPInversion, context, k: int, params: LEditsParams, user_mask,
                      sem_guidance, *, cross_attn: bool, intersect: bool, num_steps: int | None = None,
                      intersect_every_step: bool = False) -> SampleOutput:
        """The compiled edit from the inversion with `context` (copies [uncond, concept 0, ...]: an array
        or SDXL's dict pytree); `num_steps`: only the first steps (diffusers' SDXL `denoising_end`)."""
        batch, _, h, w = inversion.init_latents.shape
        mask = user_mask_array(user_mask, (batch, self.latent_channels, h, w))
        steps = int(inversion.zs.shape[0]) if num_steps is None else num_steps
        schedule = inversion.schedule
        if steps != inversion.zs.shape[0]:
            schedule = jax.tree.map(lambda a: a[:steps], schedule)
        replay, replay_steps = self._ledits_replay(sem_guidance, steps, (batch, self.latent_channels, h, w))
        nhwc = lambda a, axis: jnp.asarray(np.moveaxis(a, axis, -1))
        latents, applied = _edit(
            self._unet[0], self._unet[1], schedule, nhwc(inversion.init_latents, 1),
            nhwc(inversion.zs[:steps], 2), context, params, mask, replay, jnp.int32(replay_steps),
            num_concepts=k, cross_attn=cross_attn, intersect=intersect,
            intersect_every_step=intersect_every_step)
        return SampleOutput(latents, applied, None)

    def _ledits_replay(self, sem_guidance, steps: int, shape) -> tuple[jax.Array, int]:
        """((N, B, h, w, 4) guidance to use instead of the concepts' at the first len(sem_guidance) steps,
        that length)."""
        replay = np.zeros((steps, *shape), np.float32)
        if sem_guidance is None:
            count = 0
        else:
            count = min(len(sem_guidance), steps)
            for i, g in enumerate(list(sem_guidance)[:count]):
                replay[i] = inputs.check_array(g, f"sem_guidance[{i}]", shape)
        return jnp.asarray(np.moveaxis(replay, 2, -1)), count


class LEditsPPPipelineStableDiffusion(LEditsPPPipeline):
    """LEDITS++ on SD 1.x/2.x: `invert(image, ...)` once, then `__call__(editing_prompt=[...], ...)`."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, safety_checker=None,
                 feature_extractor=None, requires_safety_checker: bool = True):
        super().__init__(unet, vae, SDConditioning(text_encoder, tokenizer), scheduler, safety_checker,
                         feature_extractor, requires_safety_checker)

    @classmethod
    def from_pretrained(cls, path_or_hub_id, **kwargs) -> LEditsPPPipelineStableDiffusion:
        """As `SemanticStableDiffusionPipeline.from_pretrained` (`dtype`, `variant`, `allow_pickle`,
        `requires_safety_checker`, components); also loads folders saved by diffusers' LEDITS++ (scheduler
        `sde-dpmsolver++`)."""
        kwargs = ledits_scheduler_kwargs(path_or_hub_id, kwargs)
        required = kwargs.pop("requires_safety_checker", True)
        return cls(**load_components(path_or_hub_id, **kwargs), requires_safety_checker=required)

    def invert(self, image, source_prompt: str = "", source_guidance_scale: float = 3.5,
               num_inversion_steps: int = 30, skip: float = 0.15, generator=None, cross_attention_kwargs=None,
               clip_skip: int | None = None, height: int | None = None, width: int | None = None,
               resize_mode: str | None = "default", crops_coords=None, *, seed: int | None = None,
               prng_key=None, noise=None) -> LEditsPPInversion:
        """Invert photo(s) (PIL images, or float arrays (B, H, W, 3) in [0, 1]); returns the inversion and
        keeps it as `__call__`'s default. `noise` (draws, B, 4, h, w): the inversion's draws in diffusers'
        order (draw k noises the k-th least noisy timestep); without it they come from `seed` / `prng_key`."""
        self.inversion = self._run_inversion(
            image, self._source_context, source_prompt, source_guidance_scale, num_inversion_steps, skip,
            generator, cross_attention_kwargs, clip_skip, height, width, resize_mode, crops_coords, seed,
            prng_key, noise)
        return self.inversion

    def _source_context(self, source_prompt: str, guidance_scale: float, batch: int, clip_skip,
                        latent_size: tuple[int, int] | None = None):
        """(copies, B, L, D) and copies: [uncond, source] with guidance, else the one estimate used.

        Deviation: the reference swaps the two embeddings (it guides away from the source prompt) and
        crashes for a guidance scale <= 1; we guide towards it, and use the source prompt alone then."""
        source = self.conditioning.encode([source_prompt] * batch, truncation=True, clip_skip=clip_skip)
        if source_prompt == "":
            return source[None], 1
        if guidance_scale <= 1.0:
            return source[None], 1
        uncond = self.conditioning.encode([""] * batch, truncation=True)
        return jnp.stack([uncond, source]), 2

    def __call__(self, negative_prompt=None, generator=None, output_type: str | None = "pil",
                 return_dict: bool = True, editing_prompt=None, editing_prompt_embeds=None,
                 negative_prompt_embeds=None, reverse_editing_direction=False, edit_guidance_scale=5,
                 edit_warmup_steps=0, edit_cooldown_steps=None, edit_threshold=0.9, user_mask=None,
                 sem_guidance=None, use_cross_attn_mask: bool = False, use_intersect_mask: bool = True,
                 attn_store_steps=None, store_averaged_over_steps: bool = True, cross_attention_kwargs=None,
                 guidance_rescale: float = 0.0, clip_skip: int | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=None, *, inversion: LEditsPPInversion | None = None,
                 run_safety_checker: bool = True):
        """Edit the last inverted photo(s) (or `inversion`). `attn_store_steps` and
        `store_averaged_over_steps` only fill the reference's visualisation store and change nothing."""
        inputs.check_generator(generator)
        if cross_attention_kwargs or callback_on_step_end is not None:
            raise ValueError("`cross_attention_kwargs` and `callback_on_step_end` are not supported")
        inversion = self._edit_inversion(inversion, output_type, edit_guidance_scale=edit_guidance_scale,
                                         edit_threshold=edit_threshold, guidance_rescale=guidance_rescale,
                                         user_mask=user_mask, sem_guidance=sem_guidance,
                                         editing_prompt_embeds=editing_prompt_embeds,
                                         negative_prompt_embeds=negative_prompt_embeds)
        batch, _, h, w = inversion.init_latents.shape
        clip_skip = inputs.check_int(clip_skip, "clip_skip", allow_none=True)
        concepts, tokens = self._ledits_concepts(editing_prompt, editing_prompt_embeds, clip_skip)
        k = 0 if concepts is None else int(concepts.shape[0])
        params = edit_params(k, tokens, edit_guidance_scale=edit_guidance_scale,
                             edit_threshold=edit_threshold, edit_warmup_steps=edit_warmup_steps,
                             edit_cooldown_steps=edit_cooldown_steps,
                             reverse_editing_direction=reverse_editing_direction,
                             guidance_rescale=guidance_rescale)
        uncond = self._uncond(negative_prompt, negative_prompt_embeds, batch)
        parts = [uncond[None]]
        if k:
            parts.append(jnp.broadcast_to(concepts[:, None].astype(uncond.dtype), (k, *uncond.shape)))
        context = jnp.concatenate(parts)
        out = self._edit_latents(inversion, context, k, params, user_mask, sem_guidance,
                                 cross_attn=bool(use_cross_attn_mask or use_intersect_mask),
                                 intersect=bool(use_intersect_mask))
        return self.finish(out, output_type, return_dict, inversion.seed,
                           run_safety_checker=run_safety_checker)

    def _ledits_concepts(self, editing_prompt, embeds, clip_skip):
        """((K, L, D) concept embeddings or None, (K,) own-token counts)."""
        if editing_prompt and embeds is not None:
            raise ValueError("pass either `editing_prompt` or `editing_prompt_embeds`, not both")
        if editing_prompt:
            texts = inputs.prompt_list(editing_prompt, "editing_prompt")
            expanded = [expand_prompt(self.tokenizer, t) for t in texts]
            ids = self.tokenizer(expanded, truncation=True,
                                 max_length=self.tokenizer.model_max_length).input_ids
            tokens = [len(row) - 2 for row in ids]
            return self.conditioning.encode(texts, truncation=True, clip_skip=clip_skip), tokens
        if embeds is None:
            return None, []
        array = self.conditioning.concept_embeddings(embeds, "editing_prompt_embeds")
        # No text: every token but start-of-text counts (what the reference sums under transformers 5).
        return array, [self.tokenizer.model_max_length - 2] * array.shape[0]

    def _uncond(self, negative_prompt, negative_prompt_embeds, batch: int) -> jax.Array:
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        if negative_prompt_embeds is not None:
            shape = (batch, self.tokenizer.model_max_length, self.text_encoder.config.hidden_size)
            return jnp.asarray(inputs.check_array(negative_prompt_embeds, "negative_prompt_embeds", shape))
        if negative_prompt is None or isinstance(negative_prompt, str):
            return self.conditioning.encode([negative_prompt or ""] * batch, truncation=True)
        negatives = inputs.prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) != batch:
            raise ValueError(f"`negative_prompt` has batch size {len(negatives)}, but expected {batch} based "
                             "on the input images")
        return self.conditioning.encode(negatives, truncation=True)


def edit_params(k: int, tokens, *, edit_guidance_scale, edit_threshold, edit_warmup_steps,
                edit_cooldown_steps, reverse_editing_direction, guidance_rescale) -> LEditsParams:
    """The checked per-concept settings as traced `LEditsParams` (`tokens`: each concept's own tokens)."""
    settings = inputs.edit_settings(
        k, edit_guidance_scale=edit_guidance_scale, edit_threshold=edit_threshold,
        edit_warmup_steps=edit_warmup_steps, edit_cooldown_steps=edit_cooldown_steps,
        reverse_editing_direction=reverse_editing_direction, edit_weights=None, edit_momentum_scale=0.0,
        edit_mom_beta=0.0)
    rescale = inputs.check_number(guidance_rescale, "guidance_rescale")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"`guidance_rescale` must be in [0, 1], got {guidance_rescale!r}")
    return LEditsParams.create(
        k, num_edit_tokens=tokens if k else 1, guidance_rescale=rescale,
        **{key: settings[key] for key in ("edit_guidance_scale", "edit_threshold", "edit_warmup_steps",
                                          "edit_cooldown_steps", "reverse_editing_direction")})
