"""LEDITS++ with a LoRA (UNet + text encoder) against diffusers' `LEditsPPPipelineStableDiffusion` with the
same LoRA: inversion with the reference's noise draws injected, then edits, on test_ledits' tiny model. The
reference's UNet LoRA is loaded by its `load_lora_weights`, its text-encoder LoRA by peft (diffusers' own
text-encoder path needs a newer peft than transformers 5 accepts here; see tests/test_lora.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from sega_jax import LEditsPPPipelineStableDiffusion
from tests.test_ledits import EDITS, MARGIN, SKIP, STEPS, TOL, build_reference, photo, quantile_margin, rel
from tests.test_lora import TE_CFG, UNET_CFG, random_lora, with_peft


def invert_recording(ref, module) -> np.ndarray:
    """The reference inverted with a seeded generator; its noise draws, (draws, B, 4, h, w)."""
    draws, randn = [], module.randn_tensor
    module.randn_tensor = lambda *args, **kwargs: draws.append(randn(*args, **kwargs)) or draws[-1]
    try:
        ref.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, generator=torch.Generator().manual_seed(0))
    finally:
        module.randn_tensor = randn
    return torch.stack(draws).numpy()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder, files = tmp_path_factory.mktemp("lora-ledits"), tmp_path_factory.mktemp("lora-ledits-files")
    ref, module = build_reference(folder)
    unet_state, te_state = random_lora(ref.unet, UNET_CFG, 1), random_lora(ref.text_encoder, TE_CFG, 3)
    save = StableDiffusionPipeline.save_lora_weights
    save(files / "unet", unet_lora_layers=unet_state, unet_lora_adapter_metadata=UNET_CFG.to_dict())
    save(files / "both", unet_lora_layers=unet_state, text_encoder_lora_layers=te_state,
         unet_lora_adapter_metadata=UNET_CFG.to_dict(), text_encoder_lora_adapter_metadata=TE_CFG.to_dict())
    ref.load_lora_weights(files / "unet")
    ref.text_encoder = with_peft(ref.text_encoder, TE_CFG, te_state)
    noise = invert_recording(ref, module)
    pipe = LEditsPPPipelineStableDiffusion.from_pretrained(folder, requires_safety_checker=False)
    pipe.set_scheduler("DPMSolverMultistepScheduler")  # the folder's DDIM, as diffusers' pipeline converts it
    pipe.set_progress_bar_config(disable=True)
    plain = pipe.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, noise=noise)
    plain_edit = np.asarray(pipe(output_type="latent", **EDITS).images)
    pipe.load_lora_weights(files / "both")
    inversion = pipe.invert(photo(), num_inversion_steps=STEPS, skip=SKIP, noise=noise)
    return dict(ref=ref, pipe=pipe, inversion=inversion, plain=plain, plain_edit=plain_edit)


def test_inversion_with_a_lora_matches_diffusers(case):
    ref, inv, plain = case["ref"], case["inversion"], case["plain"]
    assert rel(inv.init_latents, ref.init_latents.numpy()) < TOL
    zs = ref.zs.numpy()
    for i in range(STEPS - 1):
        assert rel(inv.zs[i], zs[i]) < TOL, i
        assert rel(plain.zs[i], zs[i]) > 100 * TOL, i  # the LoRA changed the noise maps: a real check


def test_edit_with_a_lora_matches_diffusers(case):
    with quantile_margin() as margin:
        theirs = case["ref"](output_type="latent", **EDITS).images.numpy()
    assert margin[0] > MARGIN, f"ill-conditioned case: an element {margin[0]:.1e} from a mask's quantile"
    ours = case["pipe"](output_type="latent", **EDITS).images
    assert rel(ours, theirs) < TOL
    assert rel(case["plain_edit"], theirs) > 100 * TOL  # without the LoRA: another result
