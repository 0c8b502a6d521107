"""Whole-pipeline parity with diffusers that also runs where torch cannot be installed (CI's Python 3.12 leg
with the newest jax and flax): diffusers' outputs come from `tests/parity_store.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sega_jax import SemanticStableDiffusionPipeline, SemanticStableDiffusionXLPipeline
from tests.helpers import max_rel_diff
from tests.parity_store import reference_case

FACE = "a photo of the face of a woman"
CONCEPTS = ["smiling, smile", "glasses, wearing glasses", "curls, wavy hair, curly hair", "beard, full beard"]
SEED_PAGE = dict(prompt=FACE, guidance_scale=7, editing_prompt=CONCEPTS, reverse_editing_direction=False,
                 edit_warmup_steps=[2, 2, 2, 2], edit_guidance_scale=[4, 5, 5, 5.4],
                 edit_threshold=[0.99, 0.975, 0.925, 0.96], edit_momentum_scale=0.3, edit_mom_beta=0.6,
                 edit_weights=[1, 1, 1, 1])
SD_CASES = {
    "sd-seed-page": (1, "DDIMScheduler", dict(SEED_PAGE)),
    "sd-prompts-dpm": (4, "DPMSolverMultistepScheduler", dict(
        prompt=[FACE, "a cat"], negative_prompt=["ugly", "blurry"], num_images_per_prompt=2,
        editing_prompt=CONCEPTS[:2], reverse_editing_direction=[True, False], edit_cooldown_steps=[4, 6],
        edit_warmup_steps=[0, 1], edit_weights=[0.5, 2.0])),
    "sd-euler-decoded": (1, "EulerDiscreteScheduler", dict(prompt=FACE, output_type="np")),
}
SDXL_CASES = {
    "sdxl-negative-sizes": (2, dict(
        prompt=[FACE, "a cat"], prompt_2=["oil", "ink"], negative_prompt="ugly", original_size=(64, 48),
        crops_coords_top_left=(4, 2), target_size=(32, 24))),
    "sdxl-zeros-rescale": (1, dict(prompt=FACE, guidance_rescale=0.7)),
}
STEPS = 6


def latents(batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 4, 8, 8), dtype=np.float32)


def call_kwargs(kwargs: dict) -> dict:
    return dict({"output_type": "latent"}, num_inference_steps=STEPS, height=16, width=16, **kwargs)


def _build_sd(batch: int, scheduler: str, kwargs: dict):
    def build(folder: Path) -> dict[str, np.ndarray]:
        import diffusers
        import torch

        from sega_jax.testing.reference import build_reference

        reference = build_reference()
        reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
        reference.save_pretrained(folder)
        out = reference(latents=torch.from_numpy(latents(batch)), **call_kwargs(kwargs))
        images = out.images if isinstance(out.images, np.ndarray) else out.images.numpy()
        return {"images": images, "sem_guidance": np.stack([g.numpy() for g in reference.sem_guidance])
                if reference.sem_guidance is not None else np.zeros(0)}

    return build


@pytest.mark.parametrize("name", list(SD_CASES))
def test_sega_pipeline_equals_diffusers_on_this_jax(name):
    batch, scheduler, kwargs = SD_CASES[name]
    folder, expected = reference_case(name, _build_sd(batch, scheduler, kwargs))
    ours = SemanticStableDiffusionPipeline.from_pretrained(folder, requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    got = ours(latents=latents(batch), **call_kwargs(kwargs))
    assert type(ours.scheduler).__name__ == scheduler
    assert max_rel_diff(got.images, expected["images"]) <= 1e-4
    if expected["sem_guidance"].size:
        assert max_rel_diff(got.sem_guidance, expected["sem_guidance"][:STEPS]) <= 1e-4


def _build_sdxl(batch: int, kwargs: dict):
    def build(folder: Path) -> dict[str, np.ndarray]:
        import torch

        from sega_jax.testing.reference import save_reference_xl

        reference = save_reference_xl(folder)
        out = reference(latents=torch.from_numpy(latents(batch)), **call_kwargs(kwargs))
        return {"images": out.images.numpy()}

    return build


@pytest.mark.parametrize("name", list(SDXL_CASES))
def test_sdxl_pipeline_equals_diffusers_sdxl_on_this_jax(name):
    batch, kwargs = SDXL_CASES[name]
    folder, expected = reference_case(name, _build_sdxl(batch, kwargs))
    ours = SemanticStableDiffusionXLPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    got = ours(latents=latents(batch), **call_kwargs(kwargs))
    assert max_rel_diff(got.images, expected["images"]) <= 1e-4
