"""What the whole-pipeline SEGA tests share: the seed page's example, both pipelines on one saved tiny model,
the same start latents for both, and the latent / sem_guidance comparison at the 1e-4 bar."""

from __future__ import annotations

import numpy as np
import torch

from sega_jax import SemanticStableDiffusionPipeline
from tests.helpers import max_rel_diff
from tests.tiny_pipeline import save_reference

FACE = "a photo of the face of a woman"
CONCEPTS = ["smiling, smile", "glasses, wearing glasses", "curls, wavy hair, curly hair", "beard, full beard"]
# The seed page's example (scaled to 6 steps; its doc passes 5 weights for 4 concepts, fixed here).
SEED_PAGE = dict(
    prompt=FACE,
    guidance_scale=7,
    editing_prompt=CONCEPTS,
    reverse_editing_direction=[False, False, False, False],
    edit_warmup_steps=[2, 2, 2, 2],
    edit_guidance_scale=[4, 5, 5, 5.4],
    edit_threshold=[0.99, 0.975, 0.925, 0.96],
    edit_momentum_scale=0.3,
    edit_mom_beta=0.6,
    edit_weights=[1, 1, 1, 1],
)
STEPS = 6


def build_pipes(tmp_path_factory):
    """(ours, diffusers' reference) on the same saved tiny SD model; the reference keeps its folder."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    reference = save_reference(folder)
    reference.folder = folder
    ours = SemanticStableDiffusionPipeline.from_pretrained(folder, requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    return ours, reference


def noise(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, 8, 8), dtype=np.float32)


def run_both(pipes, batch: int = 1, output_type: str = "latent", **kwargs):
    ours, reference = pipes
    latents = noise(batch)
    kwargs = dict(num_inference_steps=STEPS, height=16, width=16, output_type=output_type, **kwargs)
    got = ours(latents=latents, **kwargs)
    expected = reference(latents=torch.from_numpy(latents), **kwargs)
    return got, expected, reference


def check_latents(got, expected, reference, steps: int = STEPS):
    assert max_rel_diff(got.images, expected.images.numpy()) <= 1e-4
    if reference.sem_guidance is not None:
        assert max_rel_diff(got.sem_guidance, reference.sem_guidance[: len(got.sem_guidance)].numpy()) <= 1e-4
