"""Whole-pipeline parity with diffusers' SemanticStableDiffusionPipeline on the same saved tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LMSDiscreteScheduler, PNDMScheduler

from sega_jax import SemanticStableDiffusionPipeline
from sega_jax.pipeline import TRACE_COUNT
from sega_jax.schedulers import scheduler_from_config
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


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    reference = save_reference(folder)
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


CASES = {
    "seed-page-4-concepts": SEED_PAGE,
    "staggered-warmup-cooldown-reverse-weights": dict(
        prompt=FACE,
        editing_prompt=CONCEPTS[:3],
        edit_warmup_steps=[0, 2, 3],
        edit_cooldown_steps=[4, 5, 6],
        reverse_editing_direction=[True, False, True],
        edit_weights=[0.5, 2.0, 1.0],
        edit_guidance_scale=[6, 3, 7],
        edit_threshold=[0.9, 0.8, 0.95],
    ),
    "scalar-settings-one-concept": dict(
        prompt=FACE,
        editing_prompt="glasses",
        edit_warmup_steps=1,
        edit_cooldown_steps=4,
        reverse_editing_direction=True,
    ),
    "no-edits": dict(prompt=FACE),
}


@pytest.mark.parametrize("case", CASES)
def test_pipeline_latents_match_diffusers(pipes, case):
    check_latents(*run_both(pipes, **CASES[case]))


def test_pipeline_images_match_diffusers(pipes):
    got, expected, _ = run_both(pipes, output_type="np", **SEED_PAGE)
    assert got.images.shape == expected.images.shape == (1, 16, 16, 3)
    assert max_rel_diff(got.images, expected.images) <= 1e-3


def test_prompt_list_with_negative_prompts_and_several_images_per_prompt(pipes):
    kwargs = dict(
        prompt=[FACE, "a castle"],
        negative_prompt=["blurry", "low quality"],
        num_images_per_prompt=2,
        editing_prompt=CONCEPTS[:2],
        edit_warmup_steps=[1, 2],
        edit_threshold=[0.9, 0.7],
    )
    check_latents(*run_both(pipes, batch=4, **kwargs))


def test_sem_guidance_argument_replays_like_diffusers(pipes):
    replay = np.random.default_rng(5).standard_normal((STEPS + 1, 1, 4, 8, 8)).astype(np.float32) * 0.1
    ours, reference = pipes
    latents = noise(1)
    kwargs = dict(
        prompt=FACE,
        num_inference_steps=STEPS,
        height=16,
        width=16,
        output_type="latent",
        editing_prompt=CONCEPTS[:1],
        edit_warmup_steps=1,
    )
    got = ours(latents=latents, sem_guidance=replay, **kwargs)
    expected = reference(
        latents=torch.from_numpy(latents), sem_guidance=list(torch.from_numpy(replay)), **kwargs
    )
    assert max_rel_diff(got.images, expected.images.numpy()) <= 1e-4


def test_returned_sem_guidance_replays_onto_another_seed(pipes):
    ours, _ = pipes
    kwargs = dict(prompt=FACE, num_inference_steps=STEPS, height=16, width=16, output_type="latent")
    edited = ours(seed=1, editing_prompt=CONCEPTS[:2], edit_warmup_steps=[0, 1], **kwargs)
    replayed = ours(seed=1, sem_guidance=edited.sem_guidance, **kwargs)
    assert max_rel_diff(replayed.images, edited.images) <= 1e-5
    assert edited.sem_guidance.shape == (STEPS, 1, 4, 8, 8) and np.abs(edited.sem_guidance).max() > 0


def test_editing_prompt_embeddings_match_the_tokenised_path(pipes):
    ours, reference = pipes
    embeddings = reference.text_encoder(
        reference.tokenizer(CONCEPTS[:2], padding="max_length", max_length=77, return_tensors="pt").input_ids
    )[0].detach()
    common = dict(
        prompt=FACE,
        edit_warmup_steps=[1, 1],
        num_inference_steps=STEPS,
        height=16,
        width=16,
        output_type="latent",
    )
    got = ours(latents=noise(1), editing_prompt_embeddings=embeddings.numpy(), **common)
    expected = reference(latents=torch.from_numpy(noise(1)), editing_prompt_embeddings=embeddings, **common)
    check_latents(got, expected, reference)
    tokenised = ours(latents=noise(1), editing_prompt=CONCEPTS[:2], **common)
    assert max_rel_diff(got.images, tokenised.images) <= 1e-5


def test_embeddings_pair_concepts_with_the_right_images_for_several_prompts(pipes):
    """Deviation 2: the reference repeats embeddings concept-major (wrong pairing for batch > 1)."""
    ours, reference = pipes
    ids = reference.tokenizer(
        CONCEPTS[:2], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    embeddings = reference.text_encoder(ids)[0].detach()
    common = dict(
        prompt=[FACE, "a castle"],
        edit_warmup_steps=[0, 0],
        edit_threshold=[0.5, 0.5],
        num_inference_steps=STEPS,
        height=16,
        width=16,
        output_type="latent",
    )
    ours_emb = ours(latents=noise(2), editing_prompt_embeddings=embeddings.numpy(), **common)
    expected = reference(latents=torch.from_numpy(noise(2)), editing_prompt=CONCEPTS[:2], **common).images
    reference_emb = reference(
        latents=torch.from_numpy(noise(2)), editing_prompt_embeddings=embeddings, **common
    ).images
    assert max_rel_diff(ours_emb.images, expected.numpy()) <= 1e-4
    assert max_rel_diff(reference_emb.numpy(), expected.numpy()) > 1e-3  # the reference's mispairing


@pytest.mark.parametrize(
    "scheduler_cls,extra",
    [(PNDMScheduler, {"skip_prk_steps": True}), (LMSDiscreteScheduler, {})],
    ids=["plms", "lms"],
)
def test_pipeline_matches_diffusers_with_other_schedulers(pipes, scheduler_cls, extra):
    ours, reference = pipes
    original = (ours.scheduler, reference.scheduler)
    reference.scheduler = scheduler_cls.from_config(reference.scheduler.config, **extra)
    ours.set_scheduler(scheduler_from_config(dict(reference.scheduler.config)))
    try:
        check_latents(*run_both(pipes, **CASES["staggered-warmup-cooldown-reverse-weights"]))
    finally:
        ours.scheduler, reference.scheduler = original


def test_guidance_scale_at_most_one_drops_edits_with_a_warning(pipes):
    with pytest.warns(UserWarning, match="classifier-free guidance"):
        got, expected, _ = run_both(pipes, prompt=FACE, guidance_scale=1.0, editing_prompt=CONCEPTS[:2])
    assert max_rel_diff(got.images, expected.images.numpy()) <= 1e-4


def test_zero_weight_warm_concepts_give_finite_output_where_diffusers_gives_nan(pipes):
    """Deviation 1: 0/0 in the partial-warmup normalisation is NaN in the reference, 0 here."""
    kwargs = dict(prompt=FACE, editing_prompt=CONCEPTS[:2], edit_warmup_steps=[0, 3], edit_weights=[0.0, 1.0])
    got, expected, _ = run_both(pipes, **kwargs)
    assert torch.isnan(expected.images).all()
    assert np.isfinite(got.images).all()
    # at step 0..2 only the zero-weight concept is warm: no guidance applied, exactly as if it were absent
    assert not np.abs(got.sem_guidance[:3]).any()


def test_mismatched_per_concept_list_is_a_value_error(pipes):
    """Deviation 3: the seed page passes 5 weights for 4 concepts; the reference silently ignores one."""
    ours, _ = pipes
    with pytest.raises(ValueError, match="edit_weights.*5 entries.*4 editing concepts"):
        ours(**dict(SEED_PAGE, edit_weights=[1, 1, 1, 1, 1]), num_inference_steps=2, height=16, width=16)


def test_changing_edit_values_does_not_recompile(pipes):
    ours, _ = pipes
    common = dict(
        prompt=FACE,
        num_inference_steps=STEPS,
        height=16,
        width=16,
        output_type="latent",
        editing_prompt=CONCEPTS[:2],
    )
    ours(seed=0, **common)
    before = TRACE_COUNT["denoise"]
    for i, (scale, thr, warm, cool, rev, w) in enumerate(
        [(3, 0.5, 0, 5, True, 2.0), (9, 0.99, 4, None, False, 0.5)]
    ):
        ours(
            seed=i,
            guidance_scale=4 + i,
            edit_guidance_scale=[scale, 1],
            edit_threshold=[thr, 0.8],
            edit_warmup_steps=[warm, 1],
            edit_cooldown_steps=cool,
            reverse_editing_direction=[rev, False],
            edit_weights=[w, 1.0],
            edit_momentum_scale=0.5 * i,
            edit_mom_beta=0.1 * i,
            eta=0.3 * i,
            **common,
        )
    assert TRACE_COUNT["denoise"] == before


def test_same_seed_and_index_give_the_same_image_whatever_the_batch(pipes):
    ours, _ = pipes
    common = dict(num_inference_steps=2, height=16, width=16, output_type="latent", seed=3)
    single = ours(prompt=FACE, **common).images
    batch = ours(prompt=FACE, num_images_per_prompt=3, **common).images
    assert max_rel_diff(batch[0], single[0]) <= 1e-5  # batch size only changes XLA's summation order
    assert np.abs(batch[1] - batch[0]).max() > 1e-3


def test_estimates_are_returned_like_the_reference_keeps_them(pipes):
    ours, reference = pipes
    common = dict(
        prompt=FACE,
        editing_prompt=CONCEPTS[:2],
        num_inference_steps=STEPS,
        height=16,
        width=16,
        output_type="latent",
    )
    got = ours(latents=noise(1), return_estimates=True, **common)
    reference(latents=torch.from_numpy(noise(1)), **common)
    assert got.edit_estimates.shape == (STEPS, 2, 1, 4, 8, 8)
    assert max_rel_diff(got.uncond_estimates, reference.uncond_estimates[:STEPS].numpy()) <= 1e-4
    assert max_rel_diff(got.text_estimates, reference.text_estimates[:STEPS].numpy()) <= 1e-4
    assert max_rel_diff(got.edit_estimates, reference.edit_estimates[:STEPS].numpy()) <= 1e-4


def test_callback_sees_every_callback_steps_step_with_diffusers_layout_latents(pipes):
    ours, _ = pipes
    seen = []
    ours(
        prompt=FACE,
        num_inference_steps=5,
        height=16,
        width=16,
        output_type="latent",
        seed=0,
        callback=lambda i, t, latents: seen.append((i, int(t), latents.shape)),
        callback_steps=2,
    )
    assert [s[0] for s in seen] == [0, 2, 4]
    assert all(shape == (1, 4, 8, 8) for _, _, shape in seen)


def test_bf16_pipeline_runs_close_to_fp32(pipes, tmp_path_factory):
    ours, reference = pipes
    folder = tmp_path_factory.mktemp("tiny-bf16")
    reference.save_pretrained(folder)
    bf16 = SemanticStableDiffusionPipeline.from_pretrained(
        folder, dtype="bfloat16", requires_safety_checker=False
    )
    bf16.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=FACE,
        num_inference_steps=STEPS,
        height=16,
        width=16,
        output_type="np",
        seed=0,
        editing_prompt=CONCEPTS[:2],
        edit_warmup_steps=[1, 1],
    )
    got = bf16(**kwargs).images
    expected = ours(**kwargs).images
    assert np.isfinite(got).all()
    assert np.abs(got - expected).mean() <= 0.05
