"""Whole-pipeline parity with diffusers' SemanticStableDiffusionPipeline on the same saved tiny model."""

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

from sega_jax import SemanticStableDiffusionPipeline
from sega_jax.core.sampler import step_noise
from sega_jax.pipelines.sega.sd import TRACE_COUNT
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


def test_guidance_scale_at_most_one_drops_edits_with_a_warning(pipes):
    with pytest.warns(UserWarning, match="classifier-free guidance"):
        got, expected, _ = run_both(pipes, prompt=FACE, guidance_scale=1.0, editing_prompt=CONCEPTS[:2])
    assert max_rel_diff(got.images, expected.images.numpy()) <= 1e-4


def test_zero_weight_warm_concepts_give_finite_output_where_diffusers_gives_nan(pipes):
    """Deviation 1: 0/0 in the partial-warmup normalisation is NaN in the reference, 0 here."""
    kwargs = dict(prompt=FACE, editing_prompt=CONCEPTS[:2], edit_warmup_steps=[0, 3], edit_weights=[0.0, 1.0])
    got, expected, reference = run_both(pipes, **kwargs)
    assert torch.isnan(expected.images).all()
    assert np.isfinite(got.images).all()
    # at step 0..2 only the zero-weight concept is warm: no guidance applied, exactly as if it were absent
    assert not np.abs(got.sem_guidance[:3]).any()
    # The whole trajectory: a zero-weight concept adds nothing to the momentum either, so the run is
    # diffusers' run with concept 1 alone (warm at step 3; its momentum builds from step 0).
    _, alone, _ = run_both(pipes, prompt=FACE, editing_prompt=CONCEPTS[1:2], edit_warmup_steps=3)
    check_latents(got, alone, reference)
    unedited = run_both(pipes, prompt=FACE)[1].images.numpy()
    assert max_rel_diff(got.images, unedited) > 1e-2         # concept 1's edit did change the image


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
    # Positive control: the counter does count. A new concept count and shape is a new program, compiled
    # once (3 concepts on 8x72 pixels in 5 steps: a program no other test compiles).
    three = dict(common, editing_prompt=CONCEPTS[:3], num_inference_steps=5, height=8, width=72)
    ours(seed=0, **three)
    assert TRACE_COUNT["denoise"] == before + 1
    ours(seed=1, edit_guidance_scale=[2, 3, 4], edit_threshold=0.6, **three)
    assert TRACE_COUNT["denoise"] == before + 1


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


def test_callback_gets_the_steps_timesteps_and_latents_diffusers_callback_gets(pipes):
    calls = {"ours": [], "diffusers": []}

    def callback(i, t, latents):
        if isinstance(latents, torch.Tensor):
            calls["diffusers"].append((i, int(t), latents.numpy().copy()))
        else:
            calls["ours"].append((i, int(t), np.array(latents)))

    kwargs = dict(prompt=FACE, editing_prompt=CONCEPTS[:2], edit_warmup_steps=[1, 2], callback_steps=2)
    got, expected, _ = run_both(pipes, callback=callback, **kwargs)
    steps = [(i, t) for i, t, _ in calls["ours"]]
    assert steps == [(i, t) for i, t, _ in calls["diffusers"]] and [i for i, _ in steps] == [0, 2, 4]
    assert len({t for _, t in steps}) == 3
    for (_, _, ours), (_, _, theirs) in zip(calls["ours"], calls["diffusers"], strict=True):
        assert max_rel_diff(ours, theirs) <= 1e-4
    assert max_rel_diff(calls["ours"][-1][2], got.images) > 1e-3  # step 4's latents, not the final ones


def test_progress_bar_is_on_by_default_and_can_be_switched_off(pipes, capsys):
    _, reference = pipes
    fresh = SemanticStableDiffusionPipeline.from_pretrained(reference.folder, requires_safety_checker=False)
    kwargs = dict(prompt=FACE, num_inference_steps=STEPS, height=16, width=16, output_type="latent", seed=0)
    capsys.readouterr()
    fresh(**kwargs)
    assert f"{STEPS}/{STEPS} [" in capsys.readouterr().err  # diffusers' default: a per-step bar
    fresh.set_progress_bar_config(disable=True)
    fresh(**kwargs)
    assert f"/{STEPS} [" not in capsys.readouterr().err


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
    # The latents, against gaps that a wrong result would show: bf16 is within BOUND of fp32 (measured
    # 0.036), while another seed (1.4) or the same run without its edits (scale 0, 0.18) is farther away.
    bound = 0.08
    latent = dict(kwargs, output_type="latent")
    expected = ours(**latent).images
    assert max_rel_diff(bf16(**latent).images, expected) <= bound
    assert max_rel_diff(ours(**dict(latent, seed=1)).images, expected) > 10 * bound
    assert max_rel_diff(ours(**latent, edit_guidance_scale=0).images, expected) > bound
