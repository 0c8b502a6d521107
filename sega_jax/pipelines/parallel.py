"""Data-parallel SEGA sampling across devices (and hosts): `pmap` and sharded `jit`, one shared body.

Both entry points run the same per-device function: every image gets its own noise, text context, PRNG
key and `EditParams` (so a batch may mix edit settings), the UNet loop runs on the device's slice of the
batch, and optionally the VAE decodes it there too. They differ only in the wrapper: `jax.pmap` over the
devices, or `jax.jit` of a `shard_map` over a ('data',) `Mesh` with `NamedSharding` inputs (context split on
its axis 1, noise/keys/params on axis 0, replay on axis 1; weights replicated).

The batch is padded to a multiple of the device count (repeating the last image) and unpadded on return.
Weights are replicated onto a device set once per pipeline and cached. An image's noise depends only on
(seed, image index) (`pipe.prepare(image_indices=...)`), so it is the same image whatever the device
count, entry point or process. With `jax.distributed` initialised, `generate` gives each process its share
of the batch (`process_share`); the processes need no communication. The device set, the mesh axis, the
partition specs and the replicated weights are `sega_jax.pipelines.placement`'s (`resolve_devices`,
`process_share` and `REPLICATIONS` are re-exported here).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from sega_jax.core.guidance import EditParams
from sega_jax.core.sampler import SampleOutput, sega_sample
from sega_jax.pipelines import inputs
from sega_jax.pipelines.base import DenoiseJob, denoiser
from sega_jax.pipelines.placement import (
    AXIS,
    MODES,
    merge_from_pmap,
    process_share,
    replicated,
    resolve_devices,
    spec,
    split_for_pmap,
)
from sega_jax.pipelines.placement import REPLICATIONS as REPLICATIONS  # re-exported: tests read it here
from sega_jax.runtime import traces, xla_options

TRACE_COUNT = traces.counter("parallel", "jit", "pmap")  # traces of the per-device body, per entry point

# Batch axis of each input of the per-device body (None: replicated).
_IN_AXES = dict(unet=None, vae=None, schedule=None, noise=0, context=1, params=0, keys=0, eta=None, replay=1)

# diffusers' defaults for the edit settings a sweep may vary (one source: `EditParams.create`).
EDIT_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(EditParams.create).parameters.items()
    if name.startswith("edit_") or name == "reverse_editing_direction"
}
SETTING_KEYS = ("guidance_scale", *EDIT_DEFAULTS)


class ParallelResult(NamedTuple):
    sample: SampleOutput  # pipeline layout: latents (B, h, w, 4), sem_guidance (steps, B, h, w, 4), ...
    images: jax.Array | None  # (B, H, W, 3) in [0, 1] when decoded on the devices


# -- batches ------------------------------------------------------------------------------------------


def batch_size(job: DenoiseJob) -> int:
    return int(job.noise.shape[0])


def per_image_params(params: EditParams, batch: int) -> EditParams:
    """Give every image its own copy of shared (unbatched) edit settings; batched ones pass through."""
    if jnp.ndim(params.guidance_scale) == 1:
        return params
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *jnp.shape(x))), params)


def select_images(job: DenoiseJob, indices: Sequence[int] | np.ndarray) -> DenoiseJob:
    """The job restricted to (or padded by repeating) the images at `indices`."""
    index = jnp.asarray(np.asarray(indices, np.int32))
    params = per_image_params(job.params, batch_size(job))
    return job._replace(
        noise=job.noise[index],
        context=jax.tree.map(lambda c: c[:, index], job.context),
        params=jax.tree.map(lambda x: x[index], params),
        image_keys=job.image_keys[index],
        replay=None if job.replay is None else job.replay[:, index],
    )


def pad_to(job: DenoiseJob, total: int) -> DenoiseJob:
    """Pad the batch to `total` images by repeating the last one (a fixed shape: no recompilation)."""
    batch = batch_size(job)
    if total < batch:
        raise ValueError(f"cannot pad a batch of {batch} down to {total}")
    return select_images(job, np.minimum(np.arange(total), batch - 1))


# -- edit settings ----------------------------------------------------------------------------------


def check_setting(num_concepts: int, setting: Mapping[str, Any]) -> dict:
    """Validate one edit setting (any of `SETTING_KEYS`); returns it with per-concept lists expanded."""
    unknown = sorted(set(setting) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(f"unknown edit setting(s) {unknown}; known: {list(SETTING_KEYS)}")
    edits = {key: setting[key] for key in EDIT_DEFAULTS if key in setting}
    checked = inputs.edit_settings(num_concepts, **{**EDIT_DEFAULTS, **edits})
    out = {key: checked[key] for key in edits}
    if "guidance_scale" in setting:
        out["guidance_scale"] = inputs.check_number(setting["guidance_scale"], "guidance_scale")
    return out


def stack_settings(base: EditParams, settings: Sequence[Mapping[str, Any]]) -> EditParams:
    """EditParams with a leading settings axis: each setting overrides the given fields of `base`."""
    if not settings:
        raise ValueError("no edit settings given")
    num_concepts = int(base.edit_guidance_scale.shape[-1])
    stacked = []
    for setting in settings:
        checked = check_setting(num_concepts, setting)
        full = EditParams.create(num_concepts, **{**EDIT_DEFAULTS, **checked})
        stacked.append(base._replace(**{key: getattr(full, key) for key in checked}))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *stacked)


def tile_settings(job: DenoiseJob, settings: EditParams) -> DenoiseJob:
    """S settings x B images as one batch of S*B images, setting-major, each with its own params."""
    count, batch = int(settings.guidance_scale.shape[0]), batch_size(job)
    tiled = select_images(job, np.tile(np.arange(batch), count))
    params = jax.tree.map(lambda x: jnp.repeat(x, batch, axis=0), settings)
    cfg = np.asarray(params.guidance_scale) > 1.0
    if job.do_cfg and not cfg.all() or not job.do_cfg and cfg.any():
        raise ValueError(
            "every setting's guidance_scale must be on the same side of 1 as the job's (classifier-free "
            "guidance on or off is part of the compiled program)"
        )
    return tiled._replace(params=params)


# -- the shared per-device body and its two wrappers -------------------------------------------------


class _Static(NamedTuple):
    unet: Any  # graphdefs (hashable)
    vae: Any  # None: no decoding on the devices
    scaling_factor: float
    scheduler: Any
    num_concepts: int
    do_cfg: bool
    record: bool
    upcast: bool = False  # decode in fp32 (diffusers' `force_upcast`, as `pipe.finish` does)

    @property
    def out_axes(self) -> tuple:
        """Batch axis of each output, as a tree shaped like the body's (sample, images)."""
        return _sample_axes(self.record), None if self.vae is None else 0


def _sample_axes(record: bool) -> SampleOutput:
    return SampleOutput(0, 1, (1, 1, 2) if record else None)


def _unbatch(x: jax.Array, axis: int) -> jax.Array:
    """vmap over single-image samples gives (N, ..., 1 at axis+1, ...): back to the batch at `axis`."""
    return jnp.moveaxis(jnp.squeeze(x, axis + 1), 0, axis)


def _body(static: _Static, counter: str):
    def run(unet_state, vae_state, schedule, noise, context, params, keys, eta, replay):
        TRACE_COUNT[counter] += 1
        unet = denoiser(nnx.merge(static.unet, unet_state))

        def one(noise_i, context_i, params_i, key_i, replay_i):
            return sega_sample(
                unet,
                static.scheduler,
                schedule,
                noise_i[None],
                jax.tree.map(lambda c: c[:, None], context_i),
                params_i,
                num_concepts=static.num_concepts,
                do_cfg=static.do_cfg,
                image_keys=key_i[None],
                eta=eta,
                replay=None if replay_i is None else replay_i[:, None],
                record_estimates=static.record,
                shared_latents=True,
            )

        out = jax.vmap(one, in_axes=(0, 1, 0, 0, 1))(noise, context, params, keys, replay)
        out = jax.tree.map(_unbatch, out, _sample_axes(static.record))
        if static.vae is None:
            return out, None
        latents = out.latents
        if static.upcast:
            vae_state = jax.tree.map(lambda p: p.astype(jnp.float32), vae_state)
            latents = latents.astype(jnp.float32)
        vae = nnx.merge(static.vae, vae_state)
        images = vae.decode(latents / static.scaling_factor).astype(jnp.float32)
        return out, jnp.clip(images / 2 + 0.5, 0.0, 1.0)

    return run


def upcasts_decode(pipe) -> bool:
    """Whether the pipeline decodes in fp32: its family honours the VAE's `force_upcast` (SDXL, as in
    diffusers) and the VAE weights are fp16."""
    vae = pipe.vae
    return bool(pipe.honours_force_upcast and vae.config.force_upcast and vae.dtype == jnp.float16)


@functools.lru_cache(maxsize=64)
def _compiled(static: _Static, mode: str, devices: tuple, half_precision: bool = False):
    body = _body(static, mode)
    if mode == "pmap":
        return jax.pmap(
            body, AXIS, in_axes=tuple(_IN_AXES.values()), out_axes=static.out_axes, devices=devices
        )
    mesh = Mesh(np.asarray(devices), (AXIS,))
    to_spec = lambda axes: jax.tree.map(spec, axes, is_leaf=lambda x: x is None)
    in_specs = tuple(spec(axis) for axis in _IN_AXES.values())
    mapped = jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=to_spec(static.out_axes), check_vma=False
    )
    return jax.jit(mapped, compiler_options=xla_options.compiler_options(half_precision))


def _place(args: tuple, mode: str, devices: tuple) -> tuple:
    if mode == "pmap":
        return tuple(
            jax.tree.map(lambda x, a=axis: split_for_pmap(x, a, len(devices)), arg)
            for arg, axis in zip(args, _IN_AXES.values(), strict=True)
        )
    mesh = Mesh(np.asarray(devices), (AXIS,))
    put = lambda arg, axis: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(axis))), arg)
    return tuple(
        arg if axis is None else put(arg, axis) for arg, axis in zip(args, _IN_AXES.values(), strict=True)
    )


def _unpad(x, axis: int, batch: int):
    return None if x is None else jax.lax.slice_in_dim(x, 0, batch, axis=axis)


def run(
    pipe,
    job: DenoiseJob,
    *,
    mode: str = "jit",
    devices: Sequence[Any] | int | None = None,
    per_device_batch: int | None = None,
    decode: bool = False,
) -> ParallelResult:
    """Run a prepared job data-parallel over `devices` (default: all local ones).

    `per_device_batch` fixes the padded shape (devices x per_device_batch images), so batches of varying
    size share one compiled program; by default the batch is padded to the next multiple of the device
    count. `decode=True` also decodes on the devices (`images` in [0, 1]).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    devices = resolve_devices(devices)
    batch, count = batch_size(job), len(devices)
    if batch == 0:
        raise ValueError("the job has no images")
    per_device = -(-batch // count) if per_device_batch is None else per_device_batch
    if per_device * count < batch:
        raise ValueError(f"{batch} images do not fit {count} devices x per_device_batch={per_device}")
    padded = pad_to(job, per_device * count)
    static = _Static(
        unet=pipe.unet_parts[0],
        vae=pipe.vae_parts[0] if decode else None,
        scaling_factor=float(pipe.vae.config.scaling_factor),
        scheduler=pipe.scheduler,
        num_concepts=job.num_concepts,
        do_cfg=job.do_cfg,
        record=job.record,
        upcast=decode and upcasts_decode(pipe),
    )
    vae_state = replicated(pipe, devices, "vae") if decode else None
    args = (
        replicated(pipe, devices),
        vae_state,
        job.schedule,
        padded.noise,
        padded.context,
        padded.params,
        padded.image_keys,
        padded.eta,
        padded.replay,
    )
    half = xla_options.has_half_precision(args)  # bf16/fp16 weights: no hoisted fp32 copies (xla_options)
    out = _compiled(static, mode, devices, half)(*_place(args, mode, devices))
    if mode == "pmap":
        out = jax.tree.map(merge_from_pmap, out, static.out_axes)
    return ParallelResult(*jax.tree.map(lambda x, a: _unpad(x, a, batch), out, static.out_axes))


def denoise(
    pipe, job: DenoiseJob, *, mode: str = "jit", devices: Sequence[Any] | int | None = None
) -> SampleOutput:
    """`pipe.denoise(job)` data-parallel over devices: the same SampleOutput."""
    return run(pipe, job, mode=mode, devices=devices).sample


def generate(
    pipe,
    prompt,
    *,
    mode: str = "jit",
    devices: Sequence[Any] | int | None = None,
    output_type: str = "pil",
    return_dict: bool = True,
    run_safety_checker: bool = True,
    **kwargs,
):
    """`pipe(prompt, **kwargs)` (diffusers' arguments, `seed`/`prng_key`) data-parallel over devices.

    Returns the pipeline's output type. With several processes (`jax.distributed`), each process
    generates and returns only its share of the batch, `process_share(batch)`.
    """
    if output_type not in inputs.OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {inputs.OUTPUT_TYPES}, got {output_type!r}")
    job = pipe.prepare(prompt, **kwargs)
    if jax.process_count() > 1:
        share = process_share(batch_size(job))
        if not len(share):
            raise ValueError(
                f"process {jax.process_index()} of {jax.process_count()} gets none of the "
                f"{batch_size(job)} images: generate at least one image per process"
            )
        job = select_images(job, share)
    out = denoise(pipe, job, mode=mode, devices=devices)
    return pipe.finish(out, output_type, return_dict, job.seed, run_safety_checker=run_safety_checker)


def sweep_edits(
    pipe,
    job: DenoiseJob,
    settings: Sequence[Mapping[str, Any]] | EditParams,
    *,
    mode: str = "jit",
    devices: Sequence[Any] | int | None = None,
) -> SampleOutput:
    """One compiled call for many edit settings of the same job (same prompts, seeds and concepts).

    `settings`: dicts overriding any of `SETTING_KEYS` (per-concept values as a scalar or a list), or an
    EditParams with a leading settings axis (`stack_settings`). Values are traced: new values with the
    same number of settings reuse the compiled program. Returns latents (S, B, h, w, 4) and
    sem_guidance (steps, S, B, h, w, 4) (estimates split the same way).
    """
    if not isinstance(settings, EditParams):
        settings = stack_settings(job.params, settings)
    count = int(settings.guidance_scale.shape[0])
    out = denoise(pipe, tile_settings(job, settings), mode=mode, devices=devices)
    split = lambda x, axis: x.reshape(*x.shape[:axis], count, -1, *x.shape[axis + 1 :])
    return jax.tree.map(split, out, _sample_axes(job.record))
