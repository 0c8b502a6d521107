"""A sweep's work: per-item arrays prepared with the pipeline's own validation and noise, stacked into one
call per chunk, and the LoRA weights each chunk runs with (see `sega_jax.sweep.command`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

from sega_jax.core.guidance import EditParams
from sega_jax.loaders.lora import load_loras
from sega_jax.pipelines.inputs import IneffectiveEditWarning
from sega_jax.settings import parse_lora
from sega_jax.sweep.spec import Item, SweepSpec


@contextlib.contextmanager
def spec_loras(pipe, spec: SweepSpec) -> Iterator[None]:
    """The spec's LoRAs loaded into the pipeline (`lora_0`, ... at their scales), unloaded afterwards."""
    if not spec.lora:
        yield
        return
    load_loras(pipe, [parse_lora(text) for text in spec.lora])
    try:
        yield
    finally:
        pipe.unload_lora_weights()


class Jobs:
    """Per-item arrays: prepared once per (prompt, seed) with the pipeline's own validation and noise."""

    def __init__(self, pipe, spec: SweepSpec):
        self.pipe, self.spec, self.cache = pipe, spec, {}
        concepts = len(spec.editing_prompt)
        self.params = [EditParams.create(concepts, **checked) for checked in spec.checked]
        self.loras = tuple(spec.lora)  # the scales `load_loras` set

    def use_loras(self, setting: int) -> None:
        """The setting's LoRA scales on the pipeline: merged into the weights, which are jit arguments, so
        no new compile; the text conditioning of the old weights is dropped."""
        loras = self.spec.loras[setting]
        if loras != self.loras:
            names = [f"lora_{i}" for i in range(len(loras))]
            self.pipe.set_adapters(names, [parse_lora(text)[1] for text in loras])
            self.loras = loras
            self.cache.clear()

    def job(self, prompt: int, seed: int):
        key = (prompt, seed)
        if key not in self.cache:
            if len(self.cache) > 64:
                self.cache.clear()
            spec = self.spec
            with warnings.catch_warnings():  # the spec's own settings were checked once, up front
                warnings.simplefilter("ignore", IneffectiveEditWarning)
                self.cache[key] = self.pipe.prepare(
                    spec.prompts[prompt],
                    negative_prompt=spec.negative_prompt,
                    height=spec.height,
                    width=spec.width,
                    num_inference_steps=spec.num_inference_steps,
                    guidance_scale=spec.checked[0]["guidance_scale"],
                    num_images_per_prompt=spec.images_per_seed,
                    eta=spec.eta,
                    editing_prompt=spec.editing_prompt or None,
                    seed=seed,
                )
        return self.cache[key]

    def chunk(self, chunk_items: Sequence[Item]):
        """One DenoiseJob whose image j is chunk_items[j], each with its own edit setting."""
        import jax
        import jax.numpy as jnp

        pairs = [(self.job(item.prompt, item.seed), item.image) for item in chunk_items]
        images = [image for _, image in pairs]
        stack = lambda axis: lambda *xs: jnp.stack(
            [jnp.take(x, i, axis=axis) for x, i in zip(xs, images, strict=True)], axis=axis
        )
        pick = lambda field, axis: jax.tree.map(stack(axis), *[getattr(job, field) for job, _ in pairs])
        keys = jnp.stack([job.image_keys[image] for job, image in pairs])
        params = jax.tree.map(lambda *xs: jnp.stack(xs), *[self.params[item.setting] for item in chunk_items])
        return pairs[0][0]._replace(
            noise=pick("noise", 0), context=pick("context", 1), image_keys=keys, params=params, replay=None
        )
