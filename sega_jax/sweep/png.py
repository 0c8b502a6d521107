"""What each sweep image carries: its manifest record, and PNG metadata in `sega-jax generate`'s format (so
`sega-jax generate --from-png` on a sweep PNG reproduces it, LoRAs included; see `sega_jax.settings`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from sega_jax.settings import DEFAULTS as GENERATE_DEFAULTS
from sega_jax.settings import Edit, png_info
from sega_jax.sweep.spec import Item, SweepSpec


def record(spec: SweepSpec, item: Item, image: np.ndarray, digest: str, nsfw: bool | None) -> dict:
    """The manifest line of one image: every parameter, its file and its sha256."""
    return dict(
        file=item.file,
        sha256=digest,
        prompt_index=item.prompt,
        prompt=spec.prompts[item.prompt],
        negative_prompt=spec.negative_prompt,
        seed=item.seed,
        image_index=item.image,
        setting_index=item.setting,
        setting=spec.settings[item.setting],
        editing_prompt=spec.editing_prompt,
        **spec.checked[item.setting],
        lora=list(spec.loras[item.setting]),
        num_inference_steps=spec.num_inference_steps,
        height=image.shape[0],
        width=image.shape[1],
        eta=spec.eta,
        scheduler=spec.scheduler,
        model=spec.model,
        dtype=spec.dtype,
        nsfw=nsfw,
        batch_per_device=spec.batch_per_device,  # the work-group size: which images were computed together
    )


def edits(concepts: list[str], checked: dict) -> list[str]:
    """A setting's edit parameters as `generate --edit` specs, one per concept."""
    cooldowns, weights = checked["edit_cooldown_steps"], checked["edit_weights"]
    return [
        Edit(
            prompt,
            scale=checked["edit_guidance_scale"][c],
            threshold=checked["edit_threshold"][c],
            warmup=checked["edit_warmup_steps"][c],
            cooldown=None if cooldowns is None else cooldowns[c],
            weight=1.0 if weights is None else weights[c],
            reverse=checked["reverse_editing_direction"][c],
        ).inline()
        for c, prompt in enumerate(concepts)
    ]


def _model(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model  # a folder is found again from any directory


def generate_settings(spec: SweepSpec, item: Item, size: tuple[int, int]) -> dict[str, Any]:
    """The `sega-jax generate` settings that make this image (image `item.image` of the seed's batch)."""
    checked = spec.checked[item.setting]
    return {
        **GENERATE_DEFAULTS,
        "model": _model(spec.model),
        "prompt": spec.prompts[item.prompt],
        "negative_prompt": spec.negative_prompt,
        "edit": edits(spec.editing_prompt, checked),
        "steps": spec.num_inference_steps,
        "guidance": checked["guidance_scale"],
        "scheduler": spec.scheduler,
        "height": size[0],
        "width": size[1],
        "seed": item.seed,
        "n": spec.images_per_seed,
        "dtype": spec.dtype,
        "eta": spec.eta,
        "momentum_scale": checked["edit_momentum_scale"],
        "mom_beta": checked["edit_mom_beta"],
        "safety_checker": spec.run_safety_checker,
        "lora": list(spec.loras[item.setting]),
    }


def png(image: np.ndarray, spec: SweepSpec, item: Item, pipe) -> bytes:
    """The image as PNG bytes with `generate`'s metadata (its `parameters` text and `sega_jax` JSON)."""
    from PIL import Image

    settings = generate_settings(spec, item, image.shape[:2])
    info = png_info(settings, pipe.scheduler.config, item.image, type(pipe))
    buffer = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
