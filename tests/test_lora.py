"""LoRA weights: parity with diffusers' `load_lora_weights` (and peft for the text encoders, whose diffusers
path needs a newer peft than transformers 5 accepts here) on tiny random SD pipelines (SDXL:
test_lora_sdxl.py), for diffusers/peft and kohya files; adapters with weights, fuse/unfuse/unload, errors,
and no recompilation."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from PIL import Image
from safetensors.torch import save_file

from sega_jax import load_pipeline
from sega_jax.cli import generate as cli
from sega_jax.loaders.lora import LoraError
from sega_jax.pipelines.sega.sd import TRACE_COUNT
from sega_jax.testing.reference import save_reference
from tests.helpers import max_rel_diff
from tests.lora_cases import KW, TE_CFG, clip_name, kohya, noise, random_lora, run_ours, run_torch, with_peft

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
UNET_CFG = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS)
UNET_CFG_2 = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_k", "to_v", "conv2"])


def weights(pipe) -> dict[str, np.ndarray]:
    parts = {"unet": pipe._unet[1], "text": pipe._text[1], "text_2": getattr(pipe, "_text_2", (0, {}))[1]}
    return {f"{k}/{path}": np.asarray(v) for k, s in parts.items()
            for path, v in jax.tree_util.tree_leaves_with_path(s)}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])][:3]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-sd")
    reference = save_reference(folder)
    ours = load_pipeline(folder, requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    unet_state = random_lora(reference.unet, UNET_CFG, 1)
    unet_state_2 = random_lora(reference.unet, UNET_CFG_2, 2)
    te_state = random_lora(reference.text_encoder, TE_CFG, 3)
    files = tmp_path_factory.mktemp("lora-sd-files")
    save = StableDiffusionPipeline.save_lora_weights
    save(files / "a", unet_lora_layers=unet_state, unet_lora_adapter_metadata=UNET_CFG.to_dict())
    save(files / "b", unet_lora_layers=unet_state_2, unet_lora_adapter_metadata=UNET_CFG_2.to_dict())
    save(files / "te", unet_lora_layers=unet_state, text_encoder_lora_layers=te_state,
         unet_lora_adapter_metadata=UNET_CFG.to_dict(), text_encoder_lora_adapter_metadata=TE_CFG.to_dict())
    save_file(kohya("lora_unet_", unet_state, 8), files / "kohya_unet.safetensors")
    save_file({**kohya("lora_unet_", unet_state, 8), **kohya("lora_te_", te_state, 4, clip_name)},
              files / "kohya_te.safetensors")
    base = run_ours(ours)
    return dict(ours=ours, reference=reference, files=files, te_state=te_state, base=base, folder=folder)


@pytest.fixture
def ours(sd):
    pipe = sd["ours"]
    yield pipe
    pipe.unfuse_lora()
    pipe.unload_lora_weights()


def torch_sd(sd, **replace) -> StableDiffusionPipeline:
    parts = {**sd["reference"].components, "unet": copy.deepcopy(sd["reference"].unet), **replace}
    parts.pop("image_encoder", None)
    return StableDiffusionPipeline(**parts, image_encoder=None)


def test_unet_lora_matches_diffusers_and_changes_the_image(sd, ours):
    reference = torch_sd(sd)
    reference.load_lora_weights(sd["files"] / "a")
    expected = run_torch(reference)
    ours.load_lora_weights(sd["files"] / "a")
    got = run_ours(ours)
    assert max_rel_diff(got, expected) <= 1e-4
    assert max_rel_diff(sd["base"], expected) > 1e-2  # the LoRA matters


def test_text_encoder_lora_matches_peft_and_kohya_file_gives_the_same(sd, ours):
    reference = torch_sd(sd, text_encoder=with_peft(sd["reference"].text_encoder, TE_CFG, sd["te_state"]))
    reference.load_lora_weights(sd["files"] / "a")  # the UNet part, by diffusers
    expected = run_torch(reference)
    ours.load_lora_weights(sd["files"] / "te", adapter_name="peft")
    got = run_ours(ours)
    assert max_rel_diff(got, expected) <= 1e-4
    ours.unload_lora_weights()
    ours.load_lora_weights(sd["files"] / "kohya_te.safetensors")
    assert max_rel_diff(run_ours(ours), got) <= 1e-6


def test_kohya_unet_file_matches_diffusers_kohya_loader(sd, ours):
    reference = torch_sd(sd)
    reference.load_lora_weights(sd["files"] / "kohya_unet.safetensors")
    expected = run_torch(reference)
    ours.load_lora_weights(sd["files"], weight_name="kohya_unet.safetensors")
    assert max_rel_diff(run_ours(ours), expected) <= 1e-4


def test_two_adapters_with_weights_and_scale_zero(sd, ours):
    reference = torch_sd(sd)
    reference.load_lora_weights(sd["files"] / "a", adapter_name="a")
    reference.load_lora_weights(sd["files"] / "b", adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.7, -1.5])
    expected = run_torch(reference)
    original = weights(ours)
    ours.load_lora_weights(sd["files"] / "a", adapter_name="a")
    ours.load_lora_weights(sd["files"] / "b", adapter_name="b")
    ours.set_adapters(["a", "b"], adapter_weights=[0.7, -1.5])
    assert max_rel_diff(run_ours(ours), expected) <= 1e-4
    ours.set_adapters(["a", "b"], [0.0, 0.0])
    assert_same_weights(weights(ours), original)
    np.testing.assert_array_equal(run_ours(ours), sd["base"])


def test_sega_with_a_lora_equals_diffusers_sega_on_the_fused_weights(sd, ours):
    from diffusers.pipelines.deprecated.semantic_stable_diffusion import SemanticStableDiffusionPipeline

    carrier = torch_sd(sd)
    carrier.load_lora_weights(sd["files"] / "a")
    carrier.fuse_lora(lora_scale=0.6)
    parts = {k: v for k, v in carrier.components.items() if k != "image_encoder"}
    reference = SemanticStableDiffusionPipeline(**{**parts, "requires_safety_checker": False})
    reference.set_progress_bar_config(disable=True)
    edits = dict(editing_prompt=["smiling, smile", "glasses"], edit_guidance_scale=[4, 5],
                 edit_warmup_steps=[1, 0], edit_threshold=[0.9, 0.8], reverse_editing_direction=[False, True])
    expected = reference(latents=torch.from_numpy(noise()), **KW, **edits).images.numpy()
    ours.load_lora_weights(sd["files"] / "a")
    ours.set_adapters("default_0", 0.6)
    assert max_rel_diff(run_ours(ours, **edits), expected) <= 1e-4


def test_fuse_matches_diffusers_and_unfuse_unload_restore_exactly(sd, ours):
    reference = torch_sd(sd)
    reference.load_lora_weights(sd["files"] / "a")
    reference.fuse_lora(lora_scale=0.5)
    expected = run_torch(reference)
    original = weights(ours)
    ours.load_lora_weights(sd["files"] / "a")
    unfused = weights(ours)
    ours.fuse_lora(lora_scale=0.5)
    assert max_rel_diff(run_ours(ours), expected) <= 1e-4
    ours.unfuse_lora()
    assert_same_weights(weights(ours), unfused)
    ours.unload_lora_weights()
    assert_same_weights(weights(ours), original)


def test_unload_after_fuse_keeps_the_fused_weights_as_diffusers(sd):
    # its own pipeline: this test leaves the weights fused (as diffusers does), which the shared one must not
    ours = load_pipeline(sd["folder"], requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    ours.load_lora_weights(sd["files"] / "a")
    ours.fuse_lora()
    fused = weights(ours)
    ours.unload_lora_weights()
    assert_same_weights(weights(ours), fused)
    assert ours.get_active_adapters() == []
    ours.load_lora_weights(sd["files"] / "a")
    ours.set_adapters("default_0", -1.0)  # subtracting the same LoRA again gives the original back
    np.testing.assert_allclose(run_ours(ours), sd["base"], rtol=0, atol=1e-4)
    ours.unload_lora_weights()
    ours.load_lora_weights(sd["files"] / "a")
    ours.set_adapters("default_0", -1.0)
    ours.fuse_lora()
    ours.unload_lora_weights()  # fused -1: the original weights (up to rounding) stay
    np.testing.assert_allclose(run_ours(ours), sd["base"], rtol=0, atol=1e-4)


def test_unknown_and_misshaped_keys_are_errors_naming_them(sd, ours, tmp_path):
    original = weights(ours)
    state = {f"unet.{k}": v for k, v in random_lora(sd["reference"].unet, UNET_CFG_2, 4).items()}
    cases = {
        "unet.down_blocks.0.nonexistent.lora_A.weight": {"unet.down_blocks.0.nonexistent.lora_A.weight":
                                                         torch.zeros(2, 32)},
        "vae.decoder.conv_in.lora_A.weight": {"vae.decoder.conv_in.lora_A.weight": torch.zeros(2, 4)},
        "text_encoder_2.": {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                            torch.zeros(2, 32)},
        "lora_unet_no_such_module.lora_down.weight": {"lora_unet_no_such_module.lora_down.weight":
                                                      torch.zeros(2, 32)},
    }
    cases = {needle: {**state, **bad} for needle, bad in cases.items()}
    cases["lora_A/lora_B incomplete"] = {k: v for k, v in state.items() if "lora_B" not in k}
    for needle, bad in cases.items():
        with pytest.raises(LoraError, match=needle.replace(".", r"\.")):
            ours.load_lora_weights(bad)
    key = next(k for k in state if "lora_A" in k)
    with pytest.raises(LoraError, match="do not fit"):
        ours.load_lora_weights({**state, key: torch.zeros(2, 7)})
    assert ours.get_active_adapters() == []
    assert_same_weights(weights(ours), original)  # nothing was applied


def test_pickled_file_needs_allow_pickle(sd, ours, tmp_path):
    state = {f"unet.{k}": v for k, v in random_lora(sd["reference"].unet, UNET_CFG_2, 5).items()}
    torch.save(state, tmp_path / "pytorch_lora_weights.bin")
    with pytest.raises(LoraError, match="allow_pickle=True"):
        ours.load_lora_weights(tmp_path)
    ours.load_lora_weights(tmp_path, allow_pickle=True)
    pickled = weights(ours)
    ours.unload_lora_weights()
    ours.load_lora_weights(state)
    assert_same_weights(weights(ours), pickled)


def test_changing_adapter_weights_does_not_recompile(sd, ours):
    ours.load_lora_weights(sd["files"] / "a", adapter_name="a")
    ours.load_lora_weights(sd["files"] / "te", adapter_name="te")
    first = run_ours(ours)
    before = TRACE_COUNT["denoise"]
    ours.set_adapters(["a", "te"], [0.3, 0.9])
    second = run_ours(ours)
    ours.fuse_lora()
    run_ours(ours)
    assert TRACE_COUNT["denoise"] == before
    assert max_rel_diff(second, first) > 1e-3
    run_ours(ours, prompt=["a", "b"], latents=noise(2))  # positive control: a new shape compiles
    assert TRACE_COUNT["denoise"] == before + 1


def test_cli_lora_flag_equals_the_pipeline_and_from_png_honours_it(sd, ours, tmp_path, capsys):
    lora_file = sd["files"] / "a" / "pytorch_lora_weights.safetensors"
    flags = ["generate", "--model", str(sd["folder"]), "--prompt", "a cat", "--steps", "2", "--height", "16",
             "--width", "16", "--seed", "3"]
    out, again, plain = tmp_path / "lora.png", tmp_path / "again.png", tmp_path / "plain.png"
    assert cli.main([*flags, "--lora", f"{lora_file}@0.5", "--out", str(out)]) == 0
    png = Image.open(out)
    assert json.loads(png.text[cli.METADATA_KEY])["settings"]["lora"] == [f"{lora_file.resolve()}@0.5"]
    assert f"LoRA: {lora_file.resolve()}@0.5" in png.text["parameters"]
    ours.load_lora_weights(lora_file)
    ours.set_adapters("default_0", 0.5)
    expected = ours("a cat", num_inference_steps=2, height=16, width=16, seed=3).images[0]
    np.testing.assert_array_equal(np.asarray(png), np.asarray(expected))
    assert cli.main(["generate", "--from-png", str(out), "--out", str(again)]) == 0
    assert f"identical to {out}" in capsys.readouterr().out
    assert cli.main([*flags, "--out", str(plain)]) == 0
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(png))
    assert cli.main([*flags, "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err


def test_edit_command_lora_flag_equals_ledits_with_the_adapter(sd, tmp_path):
    from sega_jax.cli.edit import load_ledits_pipeline

    lora_file = sd["files"] / "a" / "pytorch_lora_weights.safetensors"
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photo)
    flags = ["edit", "--model", str(sd["folder"]), "--image", str(photo), "--edit", "a cat@scale=4",
             "--steps", "3", "--seed", "3", "--mask-mode", "noise"]
    out, plain = tmp_path / "lora.png", tmp_path / "plain.png"
    assert cli.main([*flags, "--lora", f"{lora_file}@0.5", "--out", str(out)]) == 0
    assert cli.main([*flags, "--out", str(plain)]) == 0
    png = Image.open(out)
    assert json.loads(png.text[cli.METADATA_KEY])["settings"]["lora"] == [f"{lora_file.resolve()}@0.5"]
    assert f"LoRA: {lora_file.resolve()}@0.5" in png.text["parameters"]
    ed = load_ledits_pipeline(str(sd["folder"]))
    ed.load_lora_weights(lora_file)
    ed.set_adapters("default_0", 0.5)
    ed.invert(Image.open(photo).convert("RGB"), num_inversion_steps=3, seed=3)
    expected = ed(editing_prompt=["a cat"], edit_guidance_scale=4.0, use_cross_attn_mask=False,
                  use_intersect_mask=False).images[0]
    np.testing.assert_array_equal(np.asarray(png), np.asarray(expected))
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(png))
