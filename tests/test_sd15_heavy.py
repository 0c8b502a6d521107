"""The SD 1.5 architecture (860M-parameter UNet, its VAE and CLIP ViT-L text encoder; diffusers' own
initialisation with random norms) once through the photo-editing paths, at 256x256:
- LEDITS++: `invert` + `__call__` against diffusers' `LEditsPPPipelineStableDiffusion` on the same weights,
  with the reference's inversion draws injected;
- null-text inversion against plain DDIM inversion at guidance 7.5 (latent MSE and PSNR against the photo's
  VAE round trip).
The reference and our LEDITS++ pipeline are dropped before the null-text test loads its own, so at most two
fp32 copies of the weights are alive at once.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


from sega_jax import LEditsPPPipelineStableDiffusion, SemanticStableDiffusionPipeline  # noqa: E402
from sega_jax.testing.reference import ledits_reference, recorded_inversion, smooth_photo  # noqa: E402
from tests.test_ledits import EDITS, MARGIN, quantile_margin, rel  # noqa: E402
from tests.test_sdxl_heavy import randomize_norms  # noqa: E402

pytestmark = pytest.mark.heavy

SIZE, STEPS, SKIP, TOL = 256, 4, 0.25, 1e-4
PROMPT = "a photo of a house"


def photo(seed: int = 0):
    return smooth_photo(SIZE, seed)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> dict:
    """diffusers' SD 1.5-architecture SEGA pipeline (norms randomised), saved to a folder ours loads."""
    from sega_jax.testing.reference import build_reference

    folder = tmp_path_factory.mktemp("sd15")
    reference = build_reference("sd15", randomized=False)
    for i, part in enumerate((reference.unet, reference.vae, reference.text_encoder)):
        randomize_norms(part, i)
    assert 850e6 < sum(p.numel() for p in reference.unet.parameters()) < 870e6
    reference.save_pretrained(folder)
    return dict(folder=folder, reference=reference)


def test_ledits_invert_and_edit_match_diffusers_on_the_sd15_architecture(sd15):
    from diffusers.pipelines.ledits_pp import pipeline_leditspp_stable_diffusion as module

    sega = sd15["reference"]
    ref = ledits_reference(sega)
    with recorded_inversion(module) as (draws, _):
        ref.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, generator=torch.Generator().manual_seed(0))
    noise = torch.stack(draws).numpy()
    assert noise.shape == (STEPS, 1, 4, SIZE // 8, SIZE // 8)
    with quantile_margin() as margin:
        theirs = ref(output_type="latent", **EDITS).images.numpy()
    assert margin[0] > MARGIN, f"ill-conditioned case: an element {margin[0]:.1e} from a mask's quantile"
    plain = ref(output_type="latent").images.numpy()
    expected = dict(init=ref.init_latents.numpy(), zs=ref.zs.numpy())
    del ref, sd15["reference"], sega  # one fp32 copy of the weights from here on

    pipe = LEditsPPPipelineStableDiffusion.from_pretrained(sd15["folder"], requires_safety_checker=False)
    pipe.set_scheduler("DPMSolverMultistepScheduler")
    pipe.set_progress_bar_config(disable=True)
    inv = pipe.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, noise=noise)
    ours = pipe(output_type="latent", **EDITS).images
    diffs = dict(init=rel(inv.init_latents, expected["init"]), zs=rel(inv.zs[:-1], expected["zs"][:-1]),
                 edited=rel(ours, theirs))
    print("SD 1.5 LEDITS++ relative diffs:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) < TOL, diffs
    assert rel(theirs, plain) > 100 * TOL  # the edit moved the latents


def psnr(a, b) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def test_null_text_halves_ddim_inversion_error_on_the_sd15_architecture(sd15):
    from sega_jax.pipelines.base import decode as vae_decode

    sd15.pop("reference", None)
    pipe = SemanticStableDiffusionPipeline.from_pretrained(sd15["folder"], requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    decode = lambda nchw: np.asarray(vae_decode(*pipe._vae, np.moveaxis(np.asarray(nchw), 1, -1),
                                                pipe.vae.config.scaling_factor))
    mse, image_psnr = {}, {}
    for method in ("ddim", "null-text"):
        inv = pipe.invert(photo(1), prompt=PROMPT, num_inference_steps=3, method=method)
        latents = pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, inversion=inv,
                       output_type="latent").images
        mse[method] = float(np.mean((np.asarray(latents) - inv.image_latents) ** 2))
        image_psnr[method] = psnr(decode(latents), decode(inv.image_latents))  # vs the photo's VAE round trip
    print(f"SD 1.5, 3 steps, guidance 7.5: latent MSE DDIM {mse['ddim']:.4g}, "
          f"null-text {mse['null-text']:.4g}; PSNR DDIM {image_psnr['ddim']:.2f} dB, "
          f"null-text {image_psnr['null-text']:.2f} dB")
    assert mse["null-text"] <= 0.5 * mse["ddim"]
    assert image_psnr["null-text"] > image_psnr["ddim"]
