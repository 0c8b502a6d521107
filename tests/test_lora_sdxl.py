"""LoRA weights on a tiny random SDXL pipeline: the UNet and both text encoders against diffusers (and peft
for the encoders), from diffusers/peft files and from kohya files in the original (SGM) layout."""

from __future__ import annotations

import copy

import pytest
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from safetensors.torch import save_file

from sega_jax import load_pipeline
from sega_jax.testing.reference import save_reference_xl
from tests.helpers import max_rel_diff
from tests.lora_cases import TE_CFG, clip_name, kohya, random_lora, run_ours, run_torch, with_peft

# -- SDXL ------------------------------------------------------------------------------------------------


def sgm_name(module: str, layers_per_block: int = 1) -> str:
    """diffusers' UNet module path in the original (SGM) layout kohya's SDXL trainers write."""
    per = layers_per_block + 1
    parts = module.split(".")
    if parts[0] == "down_blocks":
        i = 1 + int(parts[1]) * per + int(parts[3])
        return f"input_blocks.{i}.{1 if parts[2] == 'attentions' else 0}.{'.'.join(parts[4:])}"
    if parts[0] == "up_blocks":
        i = int(parts[1]) * per + int(parts[3])
        return f"output_blocks.{i}.{1 if parts[2] == 'attentions' else 0}.{'.'.join(parts[4:])}"
    if parts[0] == "mid_block":
        index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        return f"middle_block.{index}.{'.'.join(parts[3:])}"
    raise AssertionError(module)


XL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
XL_UNET_CFG = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=XL_TARGETS)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-xl")
    reference = save_reference_xl(folder)
    ours = load_pipeline(folder)
    ours.set_progress_bar_config(disable=True)
    unet_state = random_lora(reference.unet, XL_UNET_CFG, 11)
    te_state = random_lora(reference.text_encoder, TE_CFG, 12)
    te2_state = random_lora(reference.text_encoder_2, TE_CFG, 13)
    files = tmp_path_factory.mktemp("lora-xl-files")
    StableDiffusionXLPipeline.save_lora_weights(
        files / "all", unet_lora_layers=unet_state, text_encoder_lora_layers=te_state,
        text_encoder_2_lora_layers=te2_state, unet_lora_adapter_metadata=XL_UNET_CFG.to_dict(),
        text_encoder_lora_adapter_metadata=TE_CFG.to_dict(),
        text_encoder_2_lora_adapter_metadata=TE_CFG.to_dict())
    StableDiffusionXLPipeline.save_lora_weights(files / "unet", unet_lora_layers=unet_state,
                                                unet_lora_adapter_metadata=XL_UNET_CFG.to_dict())
    save_file(kohya("lora_unet_", unet_state, 2, sgm_name), files / "kohya_unet.safetensors")
    save_file({**kohya("lora_unet_", unet_state, 2, sgm_name), **kohya("lora_te1_", te_state, 4, clip_name),
               **kohya("lora_te2_", te2_state, 4, clip_name)}, files / "kohya_all.safetensors")
    return dict(ours=ours, reference=reference, files=files, te_state=te_state, te2_state=te2_state)


def torch_xl(xl, **replace) -> StableDiffusionXLPipeline:
    parts = {**xl["reference"].components, "unet": copy.deepcopy(xl["reference"].unet), **replace}
    return StableDiffusionXLPipeline(**parts)


def test_sdxl_unet_and_both_text_encoders_match(xl):
    ours, ref = xl["ours"], xl["reference"]
    reference = torch_xl(xl, text_encoder=with_peft(ref.text_encoder, TE_CFG, xl["te_state"]),
                         text_encoder_2=with_peft(ref.text_encoder_2, TE_CFG, xl["te2_state"]))
    reference.load_lora_weights(xl["files"] / "unet")
    expected = run_torch(reference)
    try:
        ours.load_lora_weights(xl["files"] / "all")
        got = run_ours(ours)
        assert max_rel_diff(got, expected) <= 1e-4
        ours.unload_lora_weights()
        ours.load_lora_weights(xl["files"] / "kohya_all.safetensors")
        assert max_rel_diff(run_ours(ours), got) <= 1e-6
    finally:
        ours.unload_lora_weights()


def test_sdxl_kohya_sgm_names_match_diffusers_kohya_loader(xl):
    ours = xl["ours"]
    reference = torch_xl(xl)
    reference.load_lora_weights(xl["files"] / "kohya_unet.safetensors")
    expected = run_torch(reference)
    try:
        ours.load_lora_weights(xl["files"] / "kohya_unet.safetensors", adapter_name="k")
        ours.fuse_lora()
        assert max_rel_diff(run_ours(ours), expected) <= 1e-4
    finally:
        ours.unfuse_lora()
        ours.unload_lora_weights()
