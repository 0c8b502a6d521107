"""The pipeline runs the safety checker like diffusers: same flags, flagged images blacked out."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion import safety_checker as ref_sc

from sega_jax import SemanticStableDiffusionPipeline
from sega_jax.testing.reference import build_reference
from tests.helpers import max_rel_diff
from tests.test_safety_checker import RefProcessor, _random_checker

PROMPTS = ["a photo of the face of a woman", "a castle", "a dog", "a boat"]
KWARGS = dict(
    prompt=PROMPTS,
    num_inference_steps=3,
    height=16,
    width=16,
    editing_prompt=["smiling"],
    edit_warmup_steps=1,
    output_type="np",
)


def noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), 4, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd-checker")
    reference = build_reference()
    plain = reference(latents=torch.from_numpy(noise()), **KWARGS).images
    checker, processor = _random_checker(), RefProcessor(size={"shortest_edge": 32}, crop_size=32)
    # Thresholds between the images' own concept-0 scores: two images flagged, two not.
    from diffusers.image_processor import VaeImageProcessor

    pil = VaeImageProcessor.numpy_to_pil(plain)
    with torch.no_grad():
        embeds = checker.visual_projection(
            checker.vision_model(processor(pil, return_tensors="pt").pixel_values)[1]
        )
        cos = ref_sc.cosine_distance(embeds, checker.concept_embeds).numpy()
        thresholds = cos.max(0) + 0.05
        ordered = np.sort(cos[:, 0])
        thresholds[0] = (ordered[1] + ordered[2]) / 2
        checker.concept_embeds_weights.copy_(torch.from_numpy(thresholds.astype(np.float32)))
        checker.special_care_embeds_weights.fill_(1.0)
    reference.safety_checker, reference.feature_extractor = checker, processor
    reference.register_to_config(requires_safety_checker=True)
    reference.register_modules(safety_checker=checker, feature_extractor=processor)
    reference.save_pretrained(folder)
    ours = SemanticStableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ours, reference, plain


def test_flags_and_blacked_out_images_match_diffusers(pipes):
    ours, reference, plain = pipes
    got = ours(latents=noise(), **KWARGS)
    expected = reference(latents=torch.from_numpy(noise()), **KWARGS)
    assert got.nsfw_content_detected == expected.nsfw_content_detected
    assert sum(got.nsfw_content_detected) == 2
    assert max_rel_diff(got.images, expected.images) <= 1e-3
    for image, flagged in zip(got.images, got.nsfw_content_detected, strict=True):
        assert (not image.any()) == flagged


def test_safety_checker_can_be_switched_off_per_call_and_at_load(pipes, tmp_path):
    ours, reference, plain = pipes
    unchecked = ours(latents=noise(), run_safety_checker=False, **KWARGS)
    assert unchecked.nsfw_content_detected is None
    assert max_rel_diff(unchecked.images, plain) <= 1e-3
    reference.save_pretrained(tmp_path)
    without = SemanticStableDiffusionPipeline.from_pretrained(
        tmp_path, safety_checker=None, requires_safety_checker=False
    )
    assert without.safety_checker is None


def test_missing_checker_warns_unless_not_required(tmp_path, caplog):
    build_reference().save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sega_jax.pipelines.sega.sd"):
        SemanticStableDiffusionPipeline.from_pretrained(tmp_path)
    assert "disabled the safety checker" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sega_jax.pipelines.sega.sd"):
        SemanticStableDiffusionPipeline.from_pretrained(tmp_path, requires_safety_checker=False)
    assert "safety checker" not in caplog.text
