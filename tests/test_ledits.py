"""LEDITS++ on SD: `invert` and `__call__` against diffusers' `LEditsPPPipelineStableDiffusion` on one tiny
random model (the same weights in both, the inversion noise captured from diffusers and injected), the
mask functions on injected inputs, compile counting and bad inputs."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402

from sega_jax import LEditsPPPipelineStableDiffusion  # noqa: E402
from sega_jax.core.guidance_ledits import LEditsParams, attention_mask, ledits_step, noise_mask  # noqa: E402
from sega_jax.pipelines.ledits_pp import sd as ledits  # noqa: E402
from sega_jax.pipelines.ledits_pp.inputs import preprocess_images  # noqa: E402
from sega_jax.testing.reference import OwnLengthTokenizer, recorded_inversion  # noqa: E402

# A tiny UNet with cross-attention at 1/4 of the latent size (where the reference's attention store looks).
UNET = dict(block_out_channels=(32, 32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8, sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"))
STEPS, SKIP = 4, 0.25
TOL = 1e-4


def rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def build_reference(folder):
    from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.semantic_stable_diffusion import SemanticStableDiffusionPipeline
    from diffusers.pipelines.ledits_pp import pipeline_leditspp_stable_diffusion as module
    from transformers import CLIPTextConfig, CLIPTextModel

    from sega_jax.builtin.tiny import SD_DDIM
    from sega_jax.models.tokenizer import clip_tokenizer
    from sega_jax.testing.reference import TINY_TEXT, TINY_VAE, randomize

    torch.manual_seed(0)
    unet, vae, text = UNet2DConditionModel(**UNET), AutoencoderKL(**TINY_VAE), CLIPTextModel(
        CLIPTextConfig(**TINY_TEXT))
    for i, part in enumerate((unet, vae, text)):
        randomize(part, i)
    parts = dict(vae=vae.eval(), text_encoder=text.eval(), tokenizer=clip_tokenizer(), unet=unet.eval(),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sega = SemanticStableDiffusionPipeline(scheduler=DDIMScheduler.from_config(SD_DDIM), **parts)
    sega.save_pretrained(folder)  # loads in ours; diffusers' LEDITS++ shares its components
    dpm = DPMSolverMultistepScheduler.from_config(SD_DDIM, algorithm_type="sde-dpmsolver++", solver_order=2)
    ref = module.LEditsPPPipelineStableDiffusion(scheduler=dpm, **parts)
    ref.set_progress_bar_config(disable=True)
    object.__setattr__(ref, "tokenizer", OwnLengthTokenizer(ref.tokenizer))
    return ref, module


def photo(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The reference inverted with a seeded generator (its draws and corrected latents recorded), ours
    inverted with those draws."""
    folder = tmp_path_factory.mktemp("ledits")
    ref, module = build_reference(folder)
    with recorded_inversion(module) as (draws, corrected):
        ref.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, generator=torch.Generator().manual_seed(0))
    pipe = LEditsPPPipelineStableDiffusion.from_pretrained(folder, requires_safety_checker=False)
    pipe.set_scheduler("DPMSolverMultistepScheduler")  # the folder's DDIM, as diffusers' pipeline converts it
    pipe.set_progress_bar_config(disable=True)
    noise = torch.stack(draws).numpy()
    inversion = pipe.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, noise=noise)
    return dict(ref=ref, module=module, folder=folder, pipe=pipe, inversion=inversion, noise=noise,
                corrected=[x.numpy() for x in corrected])


def test_inversion_matches_diffusers(case):
    ref, inv = case["ref"], case["inversion"]
    assert case["noise"].shape == (STEPS, 1, 4, 32, 32)
    # The reference's local xts (its corrected x_{t-1}, recorded in loop order), but for the x0 slot, where
    # its second-order update divides by a zero step ratio (inf/NaN); ours stays finite.
    check_inversion(inv, ref, case["corrected"], finite_x0=False)
    assert not inv.zs[-1].any()  # zero: the final sigma is 0
    assert not np.isfinite(case["corrected"][-1]).all() and np.isfinite(inv.xts).all()
    assert case["pipe"].inversion is inv


def check_inversion(inv, ref, corrected, finite_x0: bool) -> None:
    """Ours against the reference's last inversion: init latents, zs, the corrected xts (recorded)."""
    np.testing.assert_array_equal(inv.timesteps, ref.inversion_steps.numpy())
    assert rel(inv.init_latents, ref.init_latents.numpy()) < TOL
    zs = ref.zs.numpy()
    for i in range(STEPS):
        assert rel(inv.zs[i], zs[i]) < TOL if zs[i].any() else not inv.zs[i].any(), i
    for j, x in enumerate(corrected if finite_x0 else corrected[:-1]):
        assert rel(inv.xts[STEPS - 1 - j], x) < TOL, j


@contextlib.contextmanager
def integer_add_noise(scheduler):
    """The test's patch for diffusers' DDIM inversion crash: `invert` gives `add_noise` the timestep as a
    float tensor (`torch.Tensor([t])`), which DDIM uses as an index; pass the integer it means."""
    add_noise = scheduler.add_noise
    scheduler.add_noise = lambda x, noise, t: add_noise(x, noise, t.long())
    try:
        yield
    finally:
        del scheduler.add_noise


@pytest.fixture(scope="module")
def ddim(case):
    """The reference and ours with DDIM (the same weights), ours inverted with the reference's draws."""
    from diffusers import DDIMScheduler

    from sega_jax.builtin.tiny import SD_DDIM

    parts = dict(case["ref"].components, scheduler=DDIMScheduler.from_config(SD_DDIM))
    parts["tokenizer"] = parts["tokenizer"].tokenizer
    ref = case["module"].LEditsPPPipelineStableDiffusion(**parts)
    ref.set_progress_bar_config(disable=True)
    object.__setattr__(ref, "tokenizer", OwnLengthTokenizer(ref.tokenizer))
    with pytest.raises(IndexError, match="tensors used as indices must be long"):  # the reference's crash
        ref.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, generator=torch.Generator().manual_seed(0))
    with integer_add_noise(ref.scheduler), recorded_inversion(case["module"]) as (draws, corrected):
        ref.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, generator=torch.Generator().manual_seed(0))
    pipe = LEditsPPPipelineStableDiffusion.from_pretrained(case["folder"], requires_safety_checker=False)
    pipe.set_scheduler("DDIMScheduler")
    inversion = pipe.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, noise=torch.stack(draws).numpy())
    return dict(ref=ref, pipe=pipe, inversion=inversion, corrected=[x.numpy() for x in corrected])


def test_ddim_inversion_crashes_in_diffusers_and_matches_it_patched(ddim):
    """The crash is asserted in the fixture (unpatched reference); here the patched one's outputs, all
    xts finite for DDIM (the x0 slot included)."""
    assert type(ddim["pipe"].scheduler).__name__ == "DDIMScheduler"
    check_inversion(ddim["inversion"], ddim["ref"], ddim["corrected"], finite_x0=True)
    assert ddim["inversion"].zs[-1].any()  # DDIM's last noise map is not zero (DPM-Solver's is)


def test_ddim_edit_matches_diffusers(ddim):
    settings = dict(EDITS, edit_threshold=[0.9, 0.8])  # [0.9, 0.75]: an element 5.5e-6 from its quantile
    with quantile_margin() as margin:
        theirs = ddim["ref"](output_type="latent", **settings).images.numpy()
    assert margin[0] > MARGIN, f"ill-conditioned case: an element {margin[0]:.1e} from a mask's quantile"
    assert rel(ddim["pipe"](output_type="latent", **settings).images, theirs) < TOL
    assert rel(theirs, ddim["ref"](output_type="latent").images.numpy()) > 100 * TOL


@contextlib.contextmanager
def injected_draws(module, noise):
    """The reference's `invert` drawing the given (N, B, 4, h, w) noise instead of its generator's."""
    randn, draws = module.randn_tensor, iter(noise)
    module.randn_tensor = lambda *args, **kwargs: torch.from_numpy(np.ascontiguousarray(next(draws)))
    try:
        yield
    finally:
        module.randn_tensor = randn


def test_two_photos_in_one_call_equal_each_alone(case):
    """Ours pairs each photo with its own attention maps: a batch of two equals each photo inverted and
    edited alone with its slice of the draws, and the reference's single-photo runs. The reference's own
    batch differs from its single-photo runs under the attention mask (its store mixes the images), not
    under the noise mask alone."""
    ref, module, pipe = case["ref"], case["module"], case["pipe"]
    photos, kwargs = [photo(0), photo(1)], dict(num_inversion_steps=STEPS, skip=SKIP)
    settings = dict(EDITS, edit_threshold=[0.9, 0.85])  # every quantile margin >= 2.2e-5 (measured)
    noise_only = dict(settings, use_intersect_mask=False)
    with recorded_inversion(module) as (draws, _):
        ref.invert(photos, generator=torch.Generator().manual_seed(0), **kwargs)
    noise = torch.stack(draws).numpy()
    theirs_batch = [ref(output_type="latent", **s).images.numpy() for s in (settings, noise_only)]
    try:
        both = pipe.invert(photos, noise=noise, **kwargs)
        ours = np.asarray(pipe(output_type="latent", **settings).images)
        for i in range(2):
            alone = pipe.invert(photos[i], noise=noise[:, i:i + 1], **kwargs)
            for name in ("init_latents", "zs", "xts"):
                axis = 0 if name == "init_latents" else 1
                assert rel(np.take(getattr(both, name), [i], axis), getattr(alone, name)) < 1e-5, name
            assert rel(ours[i:i + 1], pipe(output_type="latent", **settings).images) < 1e-5
            with injected_draws(module, noise[:, i:i + 1]):
                ref.invert(photos[i], **kwargs)
            with quantile_margin() as margin:
                theirs = [ref(output_type="latent", **s).images.numpy() for s in (settings, noise_only)]
            assert margin[0] > MARGIN, f"ill-conditioned: an element {margin[0]:.1e} from a quantile"
            assert rel(ours[i:i + 1], theirs[0]) < TOL
            assert rel(theirs_batch[1][i:i + 1], theirs[1]) < TOL  # no attention: the reference agrees
            assert rel(theirs_batch[0][i:i + 1], theirs[0]) > 0.1  # attention: its batch mixes the images
    finally:
        pipe.inversion = case["inversion"]
        ref.invert(photo(), generator=torch.Generator().manual_seed(0), **kwargs)  # the case's inversion back


def wide_photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (75, 130, 3), dtype=np.uint8))


# (height, width), crops_coords: rows filled / cropped (64x64), columns (64x128), crops inside and past the
# photo (PIL pads with zeros there)
RESIZES = [((64, 64), None), ((64, 128), None), ((96, 64), (5, 3, 120, 70)), ((32, 96), (-10, 0, 100, 80))]


def test_resize_modes_equal_diffusers_preprocessing():
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8)
    by_mode = {}
    for mode in ("default", "fill", "crop"):
        for size, crop in RESIZES:
            theirs = processor.preprocess(wide_photo(), *size, resize_mode=mode, crops_coords=crop)
            ours, _ = preprocess_images([wide_photo()], *size, mode, crop, 8)
            np.testing.assert_array_equal(ours, theirs.permute(0, 2, 3, 1).numpy())
            by_mode.setdefault(mode, []).append(ours)
    for a, b in (("default", "fill"), ("fill", "crop"), ("default", "crop")):
        assert all(not np.array_equal(x, y) for x, y in zip(by_mode[a], by_mode[b], strict=True)), (a, b)


def test_invert_resizes_as_diffusers(case):
    """`invert(..., resize_mode, crops_coords)` reaches the preprocessing: its resized photo is the one
    diffusers' pipeline preprocesses and returns."""
    pipe, kwargs = case["pipe"], dict(height=64, width=64, resize_mode="fill", crops_coords=(5, 3, 120, 70))
    try:
        inv = pipe.invert(wide_photo(), num_inversion_steps=STEPS, skip=SKIP, noise=case["noise"], **kwargs)
    finally:
        pipe.inversion = case["inversion"]
    processor = case["ref"].image_processor
    theirs = processor.postprocess(processor.preprocess(wide_photo(), **kwargs), output_type="pil")[0]
    np.testing.assert_array_equal(np.asarray(inv.images[0]), np.asarray(theirs))
    assert rel(inv.init_latents, case["inversion"].init_latents) > 100 * TOL  # another photo went in


# Thresholds chosen so that every case is well-conditioned (see `quantile_margin`): with [0.9, 0.7] the
# noise-mask case put two elements 8.9e-7 apart around the 0.7 quantile, and a 1e-7 difference between the
# libraries flipped one mask entry on some CPUs (max rel diff 0.2 there, 0 here).
EDITS = dict(editing_prompt=["a cat", "glasses"], edit_guidance_scale=[5.0, 3.0], edit_threshold=[0.9, 0.75],
             reverse_editing_direction=[False, True])
MARGIN = 1e-5  # 10x fp32's relative noise between the libraries


@contextlib.contextmanager
def quantile_margin():
    """The smallest relative distance of any element to its `torch.quantile` threshold in the reference's
    masks during the block (a list that gets the value): below ~1e-6 a mask entry is a coin toss between
    libraries and CPUs, and the comparison is meaningless."""
    original, margins = torch.quantile, []

    def recording(values, q, dim=None, **kwargs):
        out = original(values, q, dim=dim, **kwargs)
        ranked = values.detach().double().sort(dim=-1).values
        pos = float(q) * (ranked.shape[-1] - 1)
        low, frac = int(np.floor(pos)), pos - np.floor(pos)
        gap = ((ranked[..., low + 1] - ranked[..., low]) / ranked[..., low].abs()).min().item()
        margins.append(min(frac, 1 - frac) * gap if frac > 0 else gap)
        return out

    found = []
    torch.quantile = recording
    try:
        yield found
    finally:
        torch.quantile = original
        found.append(min(margins, default=np.inf))


@pytest.mark.parametrize("settings", [
    dict(EDITS, use_intersect_mask=False),  # the noise-magnitude mask alone
    dict(EDITS, use_intersect_mask=False, negative_prompt="blurry", edit_warmup_steps=[1, 0]),
    dict(EDITS, use_intersect_mask=False, use_cross_attn_mask=True, edit_warmup_steps=[0, 1],
         edit_cooldown_steps=[3, 4]),  # the cross-attention mask alone
    dict(EDITS),  # the default: their intersection
    dict(editing_prompt="a dog", edit_threshold=0.8),
], ids=["noise-mask", "negative-warmup", "cross-attn-cooldown", "intersect", "one-concept"])
def test_edit_matches_diffusers(case, settings):
    with quantile_margin() as margin:
        theirs = case["ref"](output_type="latent", **settings).images.numpy()
    assert margin[0] > MARGIN, f"ill-conditioned case: an element {margin[0]:.1e} from a mask's quantile"
    ours = case["pipe"](output_type="latent", **settings).images
    assert rel(ours, theirs) < TOL
    untouched = case["ref"](output_type="latent").images.numpy()  # the plain reconstruction
    assert rel(theirs, untouched) > 100 * TOL  # the edit moved the latents: a real check


def test_user_mask_matches_diffusers(case):
    mask = (np.random.default_rng(1).random((1, 1, 32, 32)) > 0.5).astype(np.float32)
    settings = dict(EDITS, use_intersect_mask=False)
    with quantile_margin() as margin:
        theirs = case["ref"](output_type="latent", user_mask=torch.from_numpy(mask), **settings).images
    theirs = theirs.numpy()
    assert margin[0] > MARGIN, f"ill-conditioned case: an element {margin[0]:.1e} from a mask's quantile"
    ours = case["pipe"](output_type="latent", user_mask=mask, **settings).images
    assert rel(ours, theirs) < TOL
    assert rel(ours, case["pipe"](output_type="latent", **settings).images) > 100 * TOL


def test_images_and_reconstruction(case):
    out = case["pipe"](output_type="np", **EDITS)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    assert out.sem_guidance.shape == (STEPS, 1, 4, 32, 32)
    inv = case["inversion"]
    assert [im.size for im in inv.images] == [(64, 64)] and len(inv.vae_reconstruction_images) == 1


def test_intersection_only_at_timesteps_up_to_800():
    """Injected maps and estimates: above t=800 the cross-attention mask alone, at or below it M1 * M2."""
    rng = np.random.default_rng(0)
    uncond = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    edits = jnp.asarray(rng.standard_normal((1, 1, 8, 8, 4)), jnp.float32)
    attention = jnp.asarray(rng.random((1, 1, 2, 2)), jnp.float32)
    params = LEditsParams.create(1, edit_threshold=0.5)
    ones = jnp.ones((1, 8, 8, 4))
    step = lambda t: ledits_step(uncond, edits, 0, t, params, user_mask=ones, attention=attention)[1]
    guidance = (edits - uncond[None]) * 5.0
    m1 = attention_mask(attention, params.edit_threshold, (8, 8))
    m2 = noise_mask(guidance, params.edit_threshold)
    np.testing.assert_array_equal(step(801), (guidance * m1)[0])
    np.testing.assert_array_equal(step(800), (guidance * (m2 * m1))[0])
    assert not np.array_equal(step(801), step(800))


def test_edit_settings_do_not_recompile(case):
    pipe = case["pipe"]
    pipe(output_type="latent", **EDITS)
    before = ledits.TRACE_COUNT["edit"]
    changed = dict(EDITS, edit_guidance_scale=[7.0, 1.0], edit_threshold=[0.5, 0.95],
                   edit_warmup_steps=[1, 2], edit_cooldown_steps=[3, 3],
                   reverse_editing_direction=[True, False], guidance_rescale=0.5)
    a = pipe(output_type="latent", **changed).images
    b = pipe(output_type="latent", user_mask=np.zeros((1, 1, 32, 32)), **EDITS).images
    assert ledits.TRACE_COUNT["edit"] == before
    assert rel(a, b) > TOL
    pipe(output_type="latent", editing_prompt=["a cat", "glasses", "a hat"])  # positive control: 3 concepts
    assert ledits.TRACE_COUNT["edit"] == before + 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(edit_guidance_scale=[float("nan"), 1.0]), "edit_guidance_scale"),
    (dict(edit_threshold=[0.9, float("inf")]), "edit_threshold"),
    (dict(user_mask=np.full((1, 1, 32, 32), np.nan)), "user_mask"),
    (dict(user_mask=np.ones((1, 1, 16, 16))), "user_mask"),
    (dict(edit_threshold=[0.9, 1.5]), "edit_threshold"),
    (dict(edit_guidance_scale=[1.0, 2.0, 3.0]), "edit_guidance_scale"),
    (dict(guidance_rescale=2.0), "guidance_rescale"),
])
def test_bad_edit_inputs(case, kwargs, message):
    with pytest.raises(ValueError, match=message):
        case["pipe"](output_type="latent", **{**EDITS, **kwargs})


@pytest.mark.parametrize("image, kwargs, error, message", [
    (np.zeros((64, 64)), {}, ValueError, "RGB"),
    (np.zeros((64, 64, 3), np.uint8), {}, ValueError, "float"),
    (np.full((64, 64, 3), 2.0), {}, ValueError, r"\[0, 1\]"),
    (np.full((64, 64, 3), np.nan), {}, ValueError, "image"),
    (photo(0, 48), {}, ValueError, "factor of 32"),
    (photo(), dict(height=48), ValueError, "factor of 32"),
    ("photo.png", {}, TypeError, "PIL image"),
    (photo(), dict(noise=np.zeros((3, 1, 4, 32, 32))), ValueError, "noise"),
    (photo(), dict(noise=np.full((STEPS, 1, 4, 32, 32), np.inf)), ValueError, "noise"),
    (photo(), dict(source_guidance_scale=float("nan")), ValueError, "source_guidance_scale"),
    (photo(), dict(skip=1.0), ValueError, "skip"),
    (photo(), dict(generator=object()), TypeError, "generator"),
    (photo(), dict(resize_mode="stretch"), ValueError, "resize_mode"),
    (np.zeros((64, 64, 3), np.float32), dict(resize_mode="crop"), ValueError, "resize_mode"),
    (photo(), dict(crops_coords=(0, 0, 32)), ValueError, "crops_coords"),
    (photo(), dict(crops_coords=(0.5, 0, 32, 32)), ValueError, "crops_coords"),
    (photo(), dict(crops_coords=(40, 0, 8, 32)), ValueError, "crops_coords"),
])
def test_bad_invert_inputs(case, image, kwargs, error, message):
    with pytest.raises(error, match=message):
        case["pipe"].invert(image, **{"num_inversion_steps": STEPS, "skip": SKIP, **kwargs})


def test_edit_needs_an_inversion(case):
    pipe = case["pipe"]
    fresh = LEditsPPPipelineStableDiffusion(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                            pipe.scheduler, requires_safety_checker=False)
    with pytest.raises(ValueError, match="invert"):
        fresh(editing_prompt="a cat")
    out = fresh(editing_prompt="a cat", output_type="latent", inversion=case["inversion"])  # explicit one
    np.testing.assert_allclose(out.images, pipe(editing_prompt="a cat", output_type="latent").images, rtol=0,
                               atol=1e-6)
