"""SEGA on SDXL: parity with diffusers' StableDiffusionXLPipeline (no edits, or edits at zero strength) and,
with edits, with a torch oracle that runs diffusers' own SEGA pipeline code around diffusers' SDXL UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from sega_jax import SemanticStableDiffusionPipeline, SemanticStableDiffusionXLPipeline, load_pipeline
from sega_jax.pipelines.sega.sd import TRACE_COUNT
from sega_jax.schedulers import scheduler_from_config
from sega_jax.testing.reference import save_reference_xl, sega_xl_reference
from tests.helpers import max_rel_diff

PROMPTS = ["a photo of the face of a woman", "a cat on a hill"]
CONCEPTS = ["smiling, smile", "glasses, wearing glasses", "curly hair"]
STEPS = 5


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    reference = save_reference_xl(folder)
    ours = load_pipeline(folder)
    ours.set_progress_bar_config(disable=True)
    return ours, reference, folder


def noise(batch: int, seed: int = 0, hw=(8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, *hw), dtype=np.float32)


def run_both(pipes, batch: int, ours_only: dict | None = None, hw=(8, 8), **kwargs):
    ours, reference, _ = pipes
    latents = noise(batch, hw=hw)
    kwargs = dict(num_inference_steps=STEPS, height=hw[0] * 2, width=hw[1] * 2, output_type="latent",
                  **kwargs)
    got = ours(latents=latents, **kwargs, **(ours_only or {}))
    expected = reference(latents=torch.from_numpy(latents), **kwargs).images.numpy()
    return got, expected


def test_load_pipeline_picks_the_xl_class_and_the_sd_class_refuses_an_xl_folder(pipes):
    ours, _, folder = pipes
    assert type(ours) is SemanticStableDiffusionXLPipeline
    assert ours.force_zeros_for_empty_prompt and ours.vae.config.scaling_factor == pytest.approx(0.13025)
    with pytest.raises(ValueError, match="SemanticStableDiffusionXLPipeline"):
        SemanticStableDiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("case", [
    dict(prompt=PROMPTS[0]),
    dict(prompt=PROMPTS, negative_prompt=["ugly", "blurry"]),
    dict(prompt=PROMPTS, negative_prompt="ugly", negative_prompt_2=["bad", "worse"], num_images_per_prompt=2),
    dict(prompt=PROMPTS, prompt_2=["oil painting", "watercolour"], original_size=(64, 48),
         crops_coords_top_left=(4, 2), target_size=(32, 24)),
    dict(prompt=PROMPTS[0], negative_prompt="ugly", negative_original_size=(16, 16),
         negative_crops_coords_top_left=(1, 3), negative_target_size=(8, 8)),
    dict(prompt=PROMPTS[1], guidance_rescale=0.7, guidance_scale=7.0),
    dict(prompt=PROMPTS[1], guidance_scale=1.0),
    dict(prompt=PROMPTS[1], clip_skip=1, negative_prompt="ugly"),
], ids=["zeros-negative", "negatives", "negative-2-and-images", "prompt-2-and-sizes", "negative-sizes",
        "rescale", "no-cfg", "clip-skip"])
def test_without_edits_latents_equal_diffusers_sdxl(pipes, case):
    batch = (1 if isinstance(case["prompt"], str) else 2) * case.get("num_images_per_prompt", 1)
    got, expected = run_both(pipes, batch, **case)
    assert max_rel_diff(got.images, expected) <= 1e-4


def test_negative_sizes_pair_with_every_image_where_diffusers_mispairs_them(pipes):
    """Deviation: diffusers tiles [negative time ids, time ids] over the whole CFG batch, so for 2+ images
    the unconditional copies get alternating negative and positive ids. Here each image's uncond copy gets
    the negative ids: the batch equals diffusers' one-image runs."""
    ours, reference, _ = pipes
    sizes = dict(negative_original_size=(16, 16), negative_target_size=(8, 8), negative_prompt="ugly",
                 num_inference_steps=STEPS, height=16, width=16, output_type="latent")
    latents = noise(2)
    got = ours(prompt=PROMPTS, latents=latents, **sizes).images
    for i in range(2):
        alone = reference(prompt=PROMPTS[i], latents=torch.from_numpy(latents[i:i + 1]), **sizes).images
        assert max_rel_diff(got[i:i + 1], alone.numpy()) <= 1e-4
    mispaired = reference(prompt=PROMPTS, latents=torch.from_numpy(latents), **sizes).images.numpy()
    assert max_rel_diff(got, mispaired) > 1e-2


def test_non_square_latents_equal_diffusers_sdxl(pipes):
    got, expected = run_both(pipes, 1, hw=(8, 12), prompt=PROMPTS[0])
    assert got.images.shape == (1, 4, 8, 12)
    assert max_rel_diff(got.images, expected) <= 1e-4


def test_edits_at_zero_strength_equal_diffusers_sdxl_without_edits(pipes):
    edits = dict(editing_prompt=CONCEPTS[:2], edit_guidance_scale=0.0, edit_warmup_steps=0)
    got, expected = run_both(pipes, 2, ours_only=edits, prompt=PROMPTS, negative_prompt="ugly")
    assert max_rel_diff(got.images, expected) <= 1e-4
    assert not np.abs(got.sem_guidance).any()


@pytest.mark.parametrize("scheduler", [EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler,
                                       DDIMScheduler])
def test_schedulers_sdxl_folders_ship_equal_diffusers(pipes, scheduler):
    ours, reference, _ = pipes
    original_ours, original_ref = ours.scheduler, reference.scheduler
    reference.scheduler = scheduler.from_config(reference.scheduler.config)
    ours.scheduler = scheduler_from_config(dict(reference.scheduler.config, _class_name=scheduler.__name__))
    try:
        latents = noise(1)
        kwargs = dict(prompt=PROMPTS[0], num_inference_steps=STEPS, height=16, width=16, output_type="latent")
        got = ours(latents=latents, seed=3, **kwargs).images
        expected = reference(latents=torch.from_numpy(latents), **kwargs).images.numpy()
        if scheduler is EulerAncestralDiscreteScheduler:  # its per-step noise is JAX's, not torch's
            assert got.shape == expected.shape and np.isfinite(got).all()
        else:
            assert max_rel_diff(got, expected) <= 1e-4
    finally:
        ours.scheduler, reference.scheduler = original_ours, original_ref


# -- with edits: diffusers' SEGA pipeline code around diffusers' SDXL UNet (sega_jax.testing.reference) ------


@pytest.mark.parametrize("edits", [
    dict(edit_guidance_scale=[4.0, 6.0], edit_threshold=[0.9, 0.7], edit_warmup_steps=[1, 2],
         edit_momentum_scale=0.3, edit_mom_beta=0.6),
    dict(edit_guidance_scale=5.0, edit_threshold=0.8, edit_warmup_steps=[0, 1], edit_cooldown_steps=[4, 3],
         reverse_editing_direction=[True, False], edit_weights=[0.5, 2.0]),
], ids=["momentum-warmup", "cooldown-reverse-weights"])
def test_sega_edits_equal_diffusers_sega_code_around_the_sdxl_unet(pipes, edits):
    ours, reference, _ = pipes
    oracle = sega_xl_reference(reference, PROMPTS[0], CONCEPTS[:2], 16)
    latents = noise(1)
    kwargs = dict(prompt=PROMPTS[0], num_inference_steps=STEPS, height=16, width=16, output_type="latent",
                  guidance_scale=6.0, editing_prompt=CONCEPTS[:2], **edits)
    got = ours(latents=latents, **kwargs)
    expected = oracle(latents=torch.from_numpy(latents), **kwargs)
    assert max_rel_diff(got.images, expected.images.numpy()) <= 1e-4
    assert max_rel_diff(got.sem_guidance, oracle.sem_guidance[:STEPS].numpy()) <= 1e-4
    unedited = run_both(pipes, 1, prompt=PROMPTS[0], guidance_scale=6.0)[1]
    assert max_rel_diff(got.images, unedited) > 1e-2  # the edits did move the latents


def test_changing_edit_values_and_rescale_does_not_recompile_but_a_new_concept_count_does(pipes):
    ours, _, _ = pipes
    common = dict(prompt=PROMPTS[0], num_inference_steps=3, height=16, width=16, output_type="latent")
    ours(editing_prompt=CONCEPTS[:2], edit_warmup_steps=0, seed=0, **common)
    before = TRACE_COUNT["denoise"]
    first = ours(editing_prompt=CONCEPTS[:2], edit_warmup_steps=1, edit_guidance_scale=[2, 9],
                 guidance_rescale=0.5, seed=0, **common)
    second = ours(editing_prompt=CONCEPTS[:2], edit_warmup_steps=0, edit_threshold=0.5, seed=0, **common)
    assert TRACE_COUNT["denoise"] == before
    assert max_rel_diff(first.images, second.images) > 1e-3
    ours(editing_prompt=CONCEPTS, edit_warmup_steps=0, seed=0, **common)
    assert TRACE_COUNT["denoise"] == before + 1  # positive control: 3 concepts is a new program


def test_concept_embeddings_need_their_pooled_twin(pipes):
    ours, _, _ = pipes
    hidden = np.zeros((1, 77, ours.unet.config.cross_attention_dim[0]), np.float32)
    with pytest.raises(ValueError, match="editing_pooled_prompt_embeds"):
        ours(PROMPTS[0], num_inference_steps=2, height=16, width=16, editing_prompt_embeddings=hidden)
    with pytest.raises(ValueError, match="original_size"):
        ours(PROMPTS[0], num_inference_steps=2, height=16, width=16, original_size=(16,))


@pytest.mark.parametrize("bad,steps", [("pooled", 7), ("hidden", 8), ("rescale", 9), ("latents", 10)])
def test_non_finite_sdxl_inputs_are_refused_before_compilation(pipes, bad, steps):
    ours, _, _ = pipes
    hidden = np.zeros((1, 77, ours.unet.config.cross_attention_dim[0]), np.float32)
    pooled = np.zeros((1, ours.text_encoder_2.config.projection_dim), np.float32)
    latents = noise(1)
    {"pooled": pooled, "hidden": hidden, "latents": latents}.get(bad, np.zeros((1, 1)))[0, 0] = np.nan
    before = TRACE_COUNT["denoise"]
    name = {"pooled": "editing_pooled_prompt_embeds", "hidden": "editing_prompt_embeddings",
            "rescale": "guidance_rescale", "latents": "latents"}[bad]
    with pytest.raises(ValueError, match=f"`{name}"):
        ours(PROMPTS[0], num_inference_steps=steps, height=16, width=16, latents=latents,
             editing_prompt_embeddings=hidden, editing_pooled_prompt_embeds=pooled,
             guidance_rescale=float("nan") if bad == "rescale" else 0.0)
    assert TRACE_COUNT["denoise"] == before
    ours(PROMPTS[0], num_inference_steps=steps, height=16, width=16, latents=noise(1), output_type="latent",
         editing_prompt_embeddings=np.zeros_like(hidden), editing_pooled_prompt_embeds=np.zeros_like(pooled),
         edit_warmup_steps=0)  # the control: the same call, finite, compiles its (new) program
    assert TRACE_COUNT["denoise"] == before + 1
