"""LEDITS++ on SDXL: `invert` and `__call__` against diffusers' `LEditsPPPipelineStableDiffusionXL` on the
tiny random SDXL model (`sega_jax.testing.reference.build_reference_xl`'s components in both, the inversion
noise captured from diffusers and injected). The helpers are the SD test's."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sega_jax import LEditsPPPipelineStableDiffusionXL  # noqa: E402
from sega_jax.pipelines.ledits_pp import sd as ledits  # noqa: E402
from sega_jax.testing.reference import OwnLengthTokenizer, recorded_inversion, save_reference_xl  # noqa: E402
from tests.test_ledits import MARGIN, TOL, photo, quantile_margin, rel  # noqa: E402

# Five steps of a five-step schedule: the first timestep (801) is above 800, where the SD reference would
# not intersect the masks and the SDXL one does.
STEPS, SKIP, ZERO_STEPS = 5, 0.1, 2


def record_invert(ref, module, **kwargs):
    """Run the reference's `invert` with a seeded generator: (its draws (N, B, 4, h, w), corrected xts)."""
    with recorded_inversion(module) as (draws, corrected):
        ref.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, num_zero_noise_steps=ZERO_STEPS,
                   generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.stack(draws).numpy(), [x.numpy() for x in corrected]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from diffusers.pipelines.ledits_pp import pipeline_leditspp_stable_diffusion_xl as module

    folder = tmp_path_factory.mktemp("ledits_xl")
    sdxl = save_reference_xl(folder)  # its Euler scheduler: both pipelines turn it into DPM-Solver++ 2M SDE
    ref = module.LEditsPPPipelineStableDiffusionXL(
        **{key: sdxl.components[key] for key in ("vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                 "tokenizer_2", "unet", "scheduler")},
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    for name in ("tokenizer", "tokenizer_2"):  # each concept's own tokens (see the SD test)
        object.__setattr__(ref, name, OwnLengthTokenizer(getattr(ref, name)))
    noise, corrected = record_invert(ref, module)
    pipe = LEditsPPPipelineStableDiffusionXL.from_pretrained(folder)
    inversion = pipe.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, num_zero_noise_steps=ZERO_STEPS,
                            noise=noise)
    return dict(ref=ref, module=module, pipe=pipe, inversion=inversion, noise=noise, corrected=corrected)


def check_inversion(ref, inv, corrected):
    np.testing.assert_array_equal(inv.timesteps, ref.inversion_steps.numpy())
    assert rel(inv.init_latents, ref.init_latents.numpy()) < TOL
    zs = ref.zs.numpy()
    print(f"inversion parity: init {rel(inv.init_latents, ref.init_latents.numpy()):.2e}, zs "
          f"{max(rel(inv.zs[i], zs[i]) for i in range(STEPS - ZERO_STEPS)):.2e}")
    for i in range(STEPS - ZERO_STEPS):
        assert rel(inv.zs[i], zs[i]) < TOL, i
    assert not zs[-ZERO_STEPS:].any() and not inv.zs[-ZERO_STEPS:].any()  # num_zero_noise_steps
    for j, x in enumerate(corrected[:-1]):  # all but the x0 slot, inf/NaN in the reference
        assert rel(inv.xts[STEPS - 1 - j], x) < TOL, j
    assert np.isfinite(inv.xts).all()


def test_inversion_matches_diffusers(case):
    assert case["noise"].shape == (STEPS, 1, 4, 32, 32)
    assert case["inversion"].timesteps[0] > 800
    check_inversion(case["ref"], case["inversion"], case["corrected"])
    assert case["pipe"].inversion is case["inversion"]


def test_inversion_with_source_and_negative_prompt_matches_diffusers(case):
    """A source prompt with guidance (the SDXL reference guides towards it) and a negative prompt (so the
    unconditional copy is encoded, not zeros); the case's inversion is restored afterwards."""
    ref, pipe = case["ref"], case["pipe"]
    kwargs = dict(source_prompt="a photo of a cat", source_guidance_scale=4.0, negative_prompt="blurry",
                  crops_coords_top_left=(4, 8))
    try:
        noise, corrected = record_invert(ref, case["module"], **kwargs)
        inv = pipe.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, num_zero_noise_steps=ZERO_STEPS,
                          noise=noise, **kwargs)
        check_inversion(ref, inv, corrected)
        assert rel(inv.zs[0], case["inversion"].zs[0]) > 100 * TOL  # the prompts changed the inversion
        theirs = ref(output_type="latent", editing_prompt=["glasses"]).images.numpy()
        assert rel(pipe(output_type="latent", editing_prompt=["glasses"]).images, theirs) < TOL
    finally:
        record_invert(ref, case["module"])
        pipe.inversion = case["inversion"]


# [0.9, 0.7] put mask elements 3.9e-6 (noise mask) and 1.6e-6 (intersect) from their quantiles: coin tosses
# between libraries on some CPUs; with 0.75 every case keeps >= 1.7e-5 (measured 2026-12-02)
EDITS = dict(editing_prompt=["a cat", "glasses"], edit_guidance_scale=[5.0, 3.0], edit_threshold=[0.9, 0.75],
             reverse_editing_direction=[False, True])


@pytest.mark.parametrize("settings", [
    dict(EDITS),  # the SDXL default: the noise-magnitude mask alone
    dict(EDITS, negative_prompt="blurry", edit_warmup_steps=[1, 0], crops_coords_top_left=(8, 0)),
    dict(EDITS, use_cross_attn_mask=True, edit_warmup_steps=[0, 1], edit_cooldown_steps=[4, 5]),
    dict(EDITS, use_intersect_mask=True),  # M1 * M2 at every step, 801 included
    dict(editing_prompt="a dog", edit_threshold=0.8, denoising_end=0.5),
], ids=["noise-mask", "negative-warmup-crop", "cross-attn-cooldown", "intersect", "one-concept-end"])
def test_edit_matches_diffusers(case, settings):
    with quantile_margin() as margin:  # a case too close to a mask's quantile compares nothing (test_ledits)
        theirs = case["ref"](output_type="latent", **settings).images.numpy()
    print(f"closest element to a mask quantile: {margin[0]:.1e} relative")
    assert margin[0] > MARGIN, f"ill-conditioned case: an element {margin[0]:.1e} from a mask's quantile"
    ours = case["pipe"](output_type="latent", **settings).images
    print(f"edit parity: {rel(ours, theirs):.2e}")
    assert rel(ours, theirs) < TOL
    untouched = case["ref"](output_type="latent").images.numpy()  # the plain reconstruction
    assert rel(theirs, untouched) > 100 * TOL  # the edit moved the latents: a real check


def test_user_mask_matches_diffusers(case):
    mask = (np.random.default_rng(1).random((1, 1, 32, 32)) > 0.5).astype(np.float32)
    theirs = case["ref"](output_type="latent", user_mask=torch.from_numpy(mask), **EDITS).images.numpy()
    ours = case["pipe"](output_type="latent", user_mask=mask, **EDITS).images
    assert rel(ours, theirs) < TOL
    assert rel(ours, case["pipe"](output_type="latent", **EDITS).images) > 100 * TOL


def test_precomputed_concepts_equal_the_prompts(case):
    """`editing_prompt_embeddings` + `editing_pooled_prompt_embeds` (which crash in the reference: its
    `encode_prompt` never assigns them) equal the tokenised concepts with the same token span."""
    pipe = case["pipe"]
    concepts = pipe.conditioning.encode(["a cat"], ["a cat"])
    own = pipe(output_type="latent", editing_prompt=["a cat"]).images
    embedded = pipe(output_type="latent", editing_prompt_embeddings=np.asarray(concepts["context"]),
                    editing_pooled_prompt_embeds=np.asarray(concepts["text_embeds"])).images
    np.testing.assert_allclose(embedded, own, rtol=0, atol=1e-6)  # noise mask: no token span involved


def test_edit_settings_do_not_recompile(case):
    pipe = case["pipe"]
    pipe(output_type="latent", use_intersect_mask=True, **EDITS)
    before = ledits.TRACE_COUNT["edit"]
    changed = dict(EDITS, edit_guidance_scale=[7.0, 1.0], edit_threshold=[0.5, 0.95],
                   edit_warmup_steps=[1, 2], guidance_rescale=0.5, crops_coords_top_left=(16, 16))
    pipe(output_type="latent", use_intersect_mask=True, **changed)
    assert ledits.TRACE_COUNT["edit"] == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(editing_prompt=None, editing_prompt_embeddings=np.zeros((1, 77, 64), np.float32)),
     "editing_pooled_prompt_embeds"),
    (dict(editing_prompt_embeddings=np.zeros((1, 77, 64), np.float32)), "not both"),
    (dict(negative_prompt_embeds=np.zeros((1, 77, 64), np.float32)), "negative_pooled_prompt_embeds"),
    (dict(crops_coords_top_left=(1, 2, 3)), "crops_coords_top_left"),
    (dict(ip_adapter_image=photo()), "ip_adapter_image"),
    (dict(guidance_rescale=2.0), "guidance_rescale"),
])
def test_bad_edit_inputs(case, kwargs, message):
    with pytest.raises(ValueError, match=message):
        case["pipe"](output_type="latent", **{"editing_prompt": ["a cat"], **kwargs})


def test_ddim_inversion_and_edit_match_diffusers(case):
    """DDIM on SDXL: diffusers' SDXL `invert` gives `add_noise` an integer timestep, so unlike the SD
    pipeline (test_ledits: IndexError, patched there) it runs as it is. Unlike the SD pipeline it does not
    force `clip_sample=False` on a DDIM config either, so a DDIM made from this folder's Euler config clamps
    x0 to [-1, 1] there; sega-jax never clips in LEDITS++ (README: deviations). Both sides switch to DDIM
    and back."""
    from diffusers import DDIMScheduler

    ref, pipe = case["ref"], case["pipe"]
    dpm = ref.scheduler
    kwargs = dict(num_inversion_steps=STEPS, skip=SKIP, num_zero_noise_steps=ZERO_STEPS)
    try:
        pipe.set_scheduler("DDIMScheduler")
        ref.scheduler = DDIMScheduler.from_config(dpm.config)
        assert ref.scheduler.config.clip_sample  # diffusers' default, kept by its SDXL pipeline
        noise, _ = record_invert(ref, case["module"])
        clipped = ref.zs.numpy()
        ref.scheduler = DDIMScheduler.from_config(dpm.config, clip_sample=False)
        noise, corrected = record_invert(ref, case["module"])
        inv = pipe.invert(photo(), noise=noise, **kwargs)
        check_inversion(ref, inv, corrected)
        assert rel(inv.zs, clipped) > 0.1  # the clipping reference is another function
        with quantile_margin() as margin:
            theirs = ref(output_type="latent", **EDITS).images.numpy()
        assert margin[0] > MARGIN, f"ill-conditioned case: an element {margin[0]:.1e} from a mask's quantile"
        ours = pipe(output_type="latent", **EDITS).images
        print(f"DDIM edit parity: {rel(ours, theirs):.2e}")
        assert rel(ours, theirs) < TOL
        assert rel(theirs, ref(output_type="latent").images.numpy()) > 100 * TOL
    finally:
        ref.scheduler = dpm
        pipe.set_scheduler("DPMSolverMultistepScheduler")
        pipe.inversion = case["inversion"]
