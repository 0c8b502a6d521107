"""The README's folder promises through `from_pretrained`, each against diffusers or the plain fp32 folder:
an SD 2.x folder, `variant="fp16"`, sharded checkpoints, pickled `.bin` with `allow_pickle=True`, float16
weights and the VAE-overflow error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sega_jax import SemanticStableDiffusionPipeline
from sega_jax.builtin.tiny import SD_DDIM
from sega_jax.models.weights import WeightLoadError
from sega_jax.testing.reference import TINY_TEXT, TINY_UNET, TINY_VAE, randomize
from tests.helpers import max_rel_diff
from tests.tiny_pipeline import build_reference

CALL = dict(
    prompt="a photo of the face of a woman",
    editing_prompt=["smiling, smile", "glasses"],
    edit_warmup_steps=[1, 2],
    num_inference_steps=4,
    height=16,
    width=16,
    output_type="latent",
)


def noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8), dtype=np.float32)


def load(folder, **kwargs) -> SemanticStableDiffusionPipeline:
    pipe = SemanticStableDiffusionPipeline.from_pretrained(folder, requires_safety_checker=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' tiny pipeline, its plain folder and the latents sega-jax gives from that folder."""
    ref = build_reference()
    folder = tmp_path_factory.mktemp("plain")
    ref.save_pretrained(folder)
    expected = load(folder)(latents=noise(), **CALL).images
    return ref, expected


def test_fp16_variant_folder_loads_with_variant_fp16(reference, tmp_path):
    ref, expected = reference
    ref.save_pretrained(tmp_path, variant="fp16")  # *.fp16.safetensors only
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert max_rel_diff(load(tmp_path, variant="fp16")(latents=noise(), **CALL).images, expected) <= 1e-6
    with pytest.raises(WeightLoadError, match="no weights found"):
        load(tmp_path)  # without variant= the plain files are looked for


def test_sharded_checkpoints_load_through_their_index(reference, tmp_path):
    ref, expected = reference
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    for index in ("unet/diffusion_pytorch_model.safetensors.index.json",
                  "vae/diffusion_pytorch_model.safetensors.index.json",
                  "text_encoder/model.safetensors.index.json"):
        assert (tmp_path / index).is_file(), index
    assert len(list((tmp_path / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 2
    assert max_rel_diff(load(tmp_path)(latents=noise(), **CALL).images, expected) <= 1e-6


def test_pickled_bin_checkpoints_load_only_with_allow_pickle(reference, tmp_path):
    ref, expected = reference
    ref.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(WeightLoadError, match="allow_pickle=True"):
        load(tmp_path)
    assert max_rel_diff(load(tmp_path, allow_pickle=True)(latents=noise(), **CALL).images, expected) <= 1e-6


def test_float16_weights_run_close_to_float32(reference, tmp_path):
    ref, _ = reference
    ref.save_pretrained(tmp_path)
    fp16 = load(tmp_path, dtype="float16")
    assert fp16.unet.conv_in.weight.dtype == np.float16
    # Dense edits (threshold 0): with CALL's quantile thresholds, fp16 rounding flips elements of SEGA's
    # masks and the loop amplifies the flips into a machine-dependent gap (0.0086 on one Xeon, 0.033 on one
    # with AVX512-FP16), while the dense edit measures the precision itself.
    call = dict(CALL, edit_threshold=0.0)
    expected = load(tmp_path)(latents=noise(), **call).images
    got = fp16(latents=noise(), **call).images
    # Measured 0.0032; the gaps a wrong result would show: other noise (0.95), no edits (0.095).
    bound = 0.02
    assert max_rel_diff(got, expected) <= bound
    assert max_rel_diff(load(tmp_path)(latents=noise(1), **call).images, expected) > 10 * bound
    assert max_rel_diff(fp16(latents=noise(), **call, edit_guidance_scale=0).images, expected) > bound


def test_float16_vae_overflow_is_a_clear_error(reference, tmp_path):
    ref, _ = reference
    ref.save_pretrained(tmp_path)
    kwargs = dict(CALL, output_type="np")
    huge = noise() * 3000  # finite latents through the loop (max ~3.6e4), beyond float16 in the decoder
    with pytest.raises(FloatingPointError, match="VAE decoder turned finite latents.*float16.*bfloat16"):
        load(tmp_path, dtype="float16")(latents=huge, **kwargs)
    assert np.isfinite(load(tmp_path)(latents=huge, **kwargs).images).all()  # float32 decodes them


def build_sd2_reference():
    """diffusers' SEGA pipeline on an SD 2.x-shaped tiny model: linear projections and per-block head counts
    in the UNet, upcast attention (2.1), OpenCLIP's exact gelu, a tokenizer padding with "!", v-prediction."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.semantic_stable_diffusion import SemanticStableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from sega_jax.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(TINY_UNET, attention_head_dim=(2, 4), use_linear_projection=True,
                                       upcast_attention=True))
    vae = AutoencoderKL(**TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(**dict(TINY_TEXT, hidden_act="gelu")))
    for i, module in enumerate((unet, vae, text)):
        randomize(module, 10 + i)
    pipe = SemanticStableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text.eval(), tokenizer=clip_tokenizer(pad_token="!"), unet=unet.eval(),
        scheduler=DDIMScheduler.from_config({**SD_DDIM, "prediction_type": "v_prediction"}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd2_folder_matches_diffusers(tmp_path):
    ref = build_sd2_reference()
    ref.save_pretrained(tmp_path)
    ours = load(tmp_path)
    assert ours.unet.config.use_linear_projection
    assert ours.scheduler.config["prediction_type"] == "v_prediction"
    assert ours.tokenizer.pad_token == "!"
    got = ours(latents=noise(), **CALL)
    expected = ref(latents=torch.from_numpy(noise()), **CALL)
    assert max_rel_diff(got.images, expected.images.numpy()) <= 1e-4
    assert max_rel_diff(got.sem_guidance, ref.sem_guidance[: CALL["num_inference_steps"]].numpy()) <= 1e-4
