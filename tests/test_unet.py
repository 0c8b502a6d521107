"""UNet parity with diffusers' UNet2DConditionModel on the same saved random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from sega_jax.models.unet import UNetConfig, load_unet
from sega_jax.testing.reference import SD15_UNET, randomize
from tests.helpers import jit_module_call, max_rel_diff, nchw_to_nhwc

SD1_TINY = dict(
    block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
    norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8,
)
SD2_TINY = dict(
    block_out_channels=(16, 32, 32), layers_per_block=1, cross_attention_dim=24,
    attention_head_dim=(2, 4, 8), norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
    transformer_layers_per_block=(1, 2, 1),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), flip_sin_to_cos=False,
    freq_shift=1, sample_size=8,
)


def save_unet(folder, config: dict, seed: int = 0) -> TorchUNet:
    torch.manual_seed(seed)
    model = TorchUNet(**config).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model


def torch_forward(model: TorchUNet, sample: np.ndarray, t, context: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(sample), t, encoder_hidden_states=torch.from_numpy(context)).sample
    return out.numpy()


@jit_module_call
def jax_forward(model, sample_nhwc, t, context):
    return model(sample_nhwc, t, context)


def inputs(config: dict, batch: int, hw: tuple[int, int], seq: int = 7, seed: int = 1):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, 4, *hw), dtype=np.float32)
    context = rng.standard_normal((batch, seq, config["cross_attention_dim"]), dtype=np.float32)
    return sample, context


@pytest.mark.parametrize("config,hw,t", [
    (SD1_TINY, (16, 16), 981), (SD1_TINY, (12, 20), 1), (SD2_TINY, (16, 16), 500), (SD2_TINY, (13, 11), 37),
], ids=["sd1", "sd1-rect", "sd2", "sd2-odd"])
def test_unet_matches_diffusers_fp32(tmp_path, config, hw, t):
    reference = save_unet(tmp_path, config)
    ours = load_unet(tmp_path)
    sample, context = inputs(config, 2, hw)
    expected = torch_forward(reference, sample, t, context)
    got = jax_forward(ours, nchw_to_nhwc(sample), np.float32(t), context)
    assert max_rel_diff(got, nchw_to_nhwc(expected)) <= 1e-4


@pytest.mark.parametrize("hw", [(16, 16), (12, 20)], ids=["4-chunks-of-64", "4-chunks-of-60"])
def test_feed_forward_in_token_chunks_matches_diffusers_and_the_whole_sequence(tmp_path, monkeypatch, hw):
    """Long sequences run the feed-forward in token chunks (the memory of SD 1.5's 64x64 level): the
    chunk size is lowered here so that a tiny UNet's 16x16 level is chunked."""
    from sega_jax.models import transformer

    reference = save_unet(tmp_path, SD1_TINY)
    sample, context = inputs(SD1_TINY, 2, hw)
    expected = nchw_to_nhwc(torch_forward(reference, sample, 981, context))
    # a fresh jit per run: the chunking is decided when the UNet is traced
    run = lambda: jit_module_call(jax_forward.__wrapped__)(load_unet(tmp_path), nchw_to_nhwc(sample),  # noqa: E731
                                                           np.float32(981), context)
    whole = run()
    monkeypatch.setattr(transformer, "FEED_FORWARD_CHUNK", 64)
    assert transformer.feed_forward_chunks(hw[0] * hw[1]) == 4
    chunked = run()
    assert max_rel_diff(chunked, expected) <= 1e-4
    assert max_rel_diff(chunked, whole) <= 1e-6


PLAIN_FIRST = dict(SD1_TINY, layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


@pytest.mark.parametrize("config", [SD1_TINY, SD2_TINY, PLAIN_FIRST], ids=["sd1", "sd2", "plain-first-block"])
def test_shared_latents_answer_for_every_context_copy_like_tiled_latents(tmp_path, config):
    # SEGA's UNet batch [uncond, text, concepts...] repeats one set of latents: given them once with all
    # the copies' contexts, the UNet must answer as diffusers does for the latents tiled once per copy.
    reference = save_unet(tmp_path, config)
    ours = load_unet(tmp_path)
    sample, context = inputs(config, 2, (16, 16))
    copies = np.concatenate([context, context[::-1] * 0.5, context + 1.0])  # 3 copies x 2 images
    expected = torch_forward(reference, np.concatenate([sample] * 3), 500, copies)
    got = jax_forward(ours, nchw_to_nhwc(sample), np.float32(500), copies)
    assert got.shape == (6, 16, 16, 4)
    assert max_rel_diff(got, nchw_to_nhwc(expected)) <= 1e-4
    tiled = jax_forward(ours, nchw_to_nhwc(np.concatenate([sample] * 3)), np.float32(500), copies)
    assert max_rel_diff(got, tiled) <= 1e-5


def test_context_batch_must_be_a_multiple_of_the_sample_batch(tmp_path):
    save_unet(tmp_path, SD1_TINY)
    sample, context = inputs(SD1_TINY, 2, (8, 8))
    with pytest.raises(ValueError, match="context batch 3 is not a multiple of the sample batch 2"):
        load_unet(tmp_path)(nchw_to_nhwc(sample), np.float32(1), np.concatenate([context, context[:1]]))


def test_unet_bf16_load_stays_close(tmp_path):
    reference = save_unet(tmp_path, SD1_TINY)
    ours = load_unet(tmp_path, dtype="bf16")
    assert ours.conv_in.weight.dtype == np.dtype("bfloat16")
    sample, context = inputs(SD1_TINY, 1, (16, 16))
    expected = torch_forward(reference, sample, 500, context)
    got = np.asarray(jax_forward(ours, nchw_to_nhwc(sample), np.float32(500), context).astype("float32"))
    assert np.isfinite(got).all()
    assert max_rel_diff(got, nchw_to_nhwc(expected)) <= 5e-2


def test_unet_fp16_variant_loads(tmp_path):
    reference = save_unet(tmp_path, SD1_TINY)
    reference.half().save_pretrained(tmp_path, variant="fp16")
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    ours = load_unet(tmp_path, variant="fp16", dtype="float32")
    sample, context = inputs(SD1_TINY, 1, (16, 16))
    expected = torch_forward(reference.float(), sample, 500, context)
    got = jax_forward(ours, nchw_to_nhwc(sample), np.float32(500), context)
    assert max_rel_diff(got, nchw_to_nhwc(expected)) <= 1e-4  # same (fp16-rounded) weights on both sides


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("addition_embed_type", "text_time"),
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]), ("not_a_key", 1),
])
def test_unsupported_unet_config_names_the_key(key, value):
    config = dict(SD1_TINY, **{key: value})
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_diffusers(config)


def test_unet_config_per_block_lengths_must_match():
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig.from_diffusers(dict(SD1_TINY, attention_head_dim=[2, 2, 2]))


SD15 = SD15_UNET


@pytest.mark.heavy
def test_sd15_architecture_unet_matches_diffusers(tmp_path):
    reference = save_unet(tmp_path, SD15)
    assert 850e6 < sum(p.numel() for p in reference.parameters()) < 870e6
    ours = load_unet(tmp_path)
    sample, context = inputs(SD15, 1, (64, 64), seq=77)
    copies = np.concatenate([context, -context])  # shared latents, as the SEGA loop passes them
    expected = torch_forward(reference, np.concatenate([sample] * 2), 801, copies)
    del reference
    got = jax_forward(ours, nchw_to_nhwc(sample), np.float32(801), copies)
    assert max_rel_diff(got, nchw_to_nhwc(expected)) <= 1e-4
