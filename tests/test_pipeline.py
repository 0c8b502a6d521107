"""Whole-pipeline parity with diffusers' SemanticStableDiffusionPipeline on the same saved tiny model: edits,
images, sizes, seeds and keys, prompt lists, replayed and embedded concepts, other schedulers (behaviour
beyond parity: test_pipeline_behaviour.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from sega_jax.core.sampler import step_noise
from sega_jax.schedulers import scheduler_from_config
from tests.helpers import max_rel_diff
from tests.sega_cases import CONCEPTS, FACE, SEED_PAGE, STEPS, build_pipes, check_latents, noise, run_both


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return build_pipes(tmp_path_factory)


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


def test_non_square_images_match_diffusers(pipes):
    """16 high, 24 wide: a height/width swap anywhere changes the shapes or the numbers."""
    ours, reference = pipes
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 12), dtype=np.float32)
    kwargs = dict(SEED_PAGE, num_inference_steps=STEPS, height=16, width=24, output_type="np")
    got = ours(latents=latents, **kwargs)
    expected = reference(latents=torch.from_numpy(latents), **kwargs)
    assert got.images.shape == expected.images.shape == (1, 16, 24, 3)
    assert max_rel_diff(got.images, expected.images) <= 1e-3
    assert got.sem_guidance.shape == (STEPS, 1, 4, 8, 12)
    assert max_rel_diff(got.sem_guidance, reference.sem_guidance[:STEPS].numpy()) <= 1e-4
    pil = ours(latents=latents, **dict(kwargs, output_type="pil")).images
    assert [image.size for image in pil] == [(24, 16)]  # PIL sizes are (width, height)


def test_return_dict_false_returns_images_and_nsfw_flags(pipes):
    ours, _ = pipes
    kwargs = dict(prompt=FACE, num_inference_steps=STEPS, height=16, width=16, output_type="np", seed=2)
    images, nsfw = ours(return_dict=False, **kwargs)
    assert nsfw is None  # no safety checker in this folder
    np.testing.assert_array_equal(images, ours(**kwargs).images)


def test_seed_none_draws_a_seed_and_returns_it(pipes):
    ours, _ = pipes
    kwargs = dict(prompt=FACE, num_inference_steps=STEPS, height=16, width=16, output_type="latent")
    first, second = ours(**kwargs), ours(seed=None, **kwargs)
    assert isinstance(first.seed, int) and isinstance(second.seed, int) and first.seed != second.seed
    np.testing.assert_array_equal(ours(seed=first.seed, **kwargs).images, first.images)
    assert np.abs(first.images - second.images).max() > 1e-3


def test_prng_key_gives_the_images_of_its_seed(pipes):
    ours, _ = pipes
    kwargs = dict(prompt=FACE, num_inference_steps=STEPS, height=16, width=16, output_type="latent",
                  num_images_per_prompt=2)
    by_seed = ours(seed=7, **kwargs).images
    np.testing.assert_array_equal(ours(prng_key=jax.random.key(7), **kwargs).images, by_seed)
    raw = jax.random.PRNGKey(7)  # uint32 key data, as older JAX code passes it
    np.testing.assert_array_equal(ours(prng_key=raw, **kwargs).images, by_seed)
    assert np.abs(ours(prng_key=jax.random.key(8), **kwargs).images - by_seed).max() > 1e-3


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


def test_returned_sem_guidance_replayed_onto_the_same_seed_reproduces_the_edit(pipes):
    ours, _ = pipes
    kwargs = dict(prompt=FACE, num_inference_steps=STEPS, height=16, width=16, output_type="latent")
    edited = ours(seed=1, editing_prompt=CONCEPTS[:2], edit_warmup_steps=[0, 1], **kwargs)
    replayed = ours(seed=1, sem_guidance=edited.sem_guidance, **kwargs)
    assert max_rel_diff(replayed.images, edited.images) <= 1e-5
    assert edited.sem_guidance.shape == (STEPS, 1, 4, 8, 8) and np.abs(edited.sem_guidance).max() > 0


def test_returned_sem_guidance_replays_onto_another_seed(pipes):
    """The README's `pipe(..., sem_guidance=out.sem_guidance, seed=1)`: the edit found on seed 0 is added
    on seed 1's noise, as diffusers adds it given the same noise and the same guidance."""
    ours, reference = pipes
    kwargs = dict(prompt=FACE, num_inference_steps=STEPS, height=16, width=16, output_type="latent")
    edited = ours(seed=0, editing_prompt=CONCEPTS[:2], edit_warmup_steps=[0, 1], **kwargs)
    replayed = ours(seed=1, sem_guidance=edited.sem_guidance, **kwargs)
    plain = ours(seed=1, **kwargs)
    seed_1_noise = np.asarray(ours.prepare(FACE, height=16, width=16, seed=1).noise).transpose(0, 3, 1, 2)
    replay = list(torch.from_numpy(edited.sem_guidance))
    expected = reference(latents=torch.from_numpy(seed_1_noise), sem_guidance=replay, **kwargs).images.numpy()
    assert max_rel_diff(replayed.images, expected) <= 1e-4
    assert max_rel_diff(plain.images, expected) > 1e-2       # the replayed edit changed seed 1's image
    assert max_rel_diff(edited.images, expected) > 1e-1      # and it is seed 1's image, not seed 0's


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


@pytest.mark.parametrize(
    "name,scheduler_cls,extra",
    [
        ("euler", EulerDiscreteScheduler, {}),
        ("euler-a", EulerAncestralDiscreteScheduler, {}),
        ("dpm++2m-karras", DPMSolverMultistepScheduler,
         {"solver_order": 2, "algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    ],
)
def test_pipeline_matches_diffusers_with_schedulers_set_by_name(pipes, monkeypatch, name, scheduler_cls,
                                                                extra):
    """`pipe.set_scheduler(name)` (the README's), against diffusers' `from_config` swap of the scheduler
    loaded from the same folder. Euler ancestral draws noise every step: diffusers is handed the noise
    sega-jax draws for (seed 0, image 0, step i)."""
    ours, reference = pipes
    original = (ours.scheduler, reference.scheduler)
    ours.set_scheduler(name)
    loaded = type(reference.scheduler).from_pretrained(reference.folder, subfolder="scheduler")
    reference.scheduler = scheduler_cls.from_config(loaded.config, **extra)
    kwargs = dict(CASES["staggered-warmup-cooldown-reverse-weights"], num_inference_steps=STEPS, height=16,
                  width=16, output_type="latent")
    prepare_kwargs = {k: v for k, v in kwargs.items() if k != "output_type"}
    keys = ours.prepare(seed=0, latents=noise(1), **prepare_kwargs).image_keys
    draws = []

    def ours_noise(*args, **kwargs):
        draws.append(len(draws))
        return torch.from_numpy(np.asarray(step_noise(keys, draws[-1], (8, 8, 4))).transpose(0, 3, 1, 2))

    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", ours_noise)
    try:
        assert type(ours.scheduler).__name__ == scheduler_cls.__name__
        got = ours(seed=0, latents=noise(1), **kwargs)
        expected = reference(latents=torch.from_numpy(noise(1)), **kwargs)
        check_latents(got, expected, reference)
    finally:
        ours.scheduler, reference.scheduler = original
    assert len(draws) == (STEPS if name == "euler-a" else 0)
