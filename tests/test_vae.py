"""AutoencoderKL parity against diffusers' PyTorch twin, loaded from `save_pretrained` folders."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.torch import load_file, save_file

from sega_jax.models.vae import VAEConfig, load_vae
from tests.helpers import jit_module_call, max_rel_diff, nchw_to_nhwc, nhwc_to_nchw

SD_TINY = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, latent_channels=4,
               sample_size=32)
THREE_BLOCKS = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=4, latent_channels=3,
                    use_quant_conv=False, sample_size=40)
NO_ATTENTION = dict(block_out_channels=(8, 16), layers_per_block=3, norm_num_groups=4, latent_channels=2,
                    in_channels=2, out_channels=5, use_post_quant_conv=False, mid_block_add_attention=False)
CASES = {  # name: (config, image height/width, batch)
    "sd_tiny_32x32": (SD_TINY, (32, 32), 2),
    "three_blocks_no_quant_conv_24x40": (THREE_BLOCKS, (24, 40), 1),
    "no_attention_no_post_quant_13x18": (NO_ATTENTION, (13, 18), 1),
}


def torch_twin(config: dict, seed: int = 0) -> TorchAutoencoderKL:
    """A diffusers AutoencoderKL with random weights and non-trivial norm affines and biases."""
    n = len(config["block_out_channels"])
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                               up_block_types=("UpDecoderBlock2D",) * n, **config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif "norm" in name:  # GroupNorm weights
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model.eval()


def reference(model: TorchAutoencoderKL, images: np.ndarray, latents: np.ndarray):
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(nhwc_to_nchw(images).copy())).latent_dist
        decoded = model.decode(torch.from_numpy(nhwc_to_nchw(latents).copy())).sample
    return nchw_to_nhwc(posterior.mean), nchw_to_nhwc(posterior.logvar), nchw_to_nhwc(decoded)


@jit_module_call
def run(vae, images, latents):
    return (*vae.encode(images), vae.decode(latents))


def inputs(config: dict, size: tuple[int, int], batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (batch, *size, config.get("in_channels", 3))).astype(np.float32)
    down = 2 ** (len(config["block_out_channels"]) - 1)
    latent_shape = (batch, size[0] // down, size[1] // down, config["latent_channels"])
    return images, rng.standard_normal(latent_shape).astype(np.float32)


def worst_diff(vae, twin, images, latents) -> float:
    ours = run(vae, jnp.asarray(images), jnp.asarray(latents))
    refs = reference(twin, images, latents)
    return max(max_rel_diff(np.asarray(o, np.float32), r) for o, r in zip(ours, refs, strict=True))


@pytest.fixture(scope="module")
def sd_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_sd_tiny")
    twin = torch_twin(SD_TINY)
    twin.save_pretrained(folder)
    return folder, twin


@pytest.mark.parametrize("case", CASES)
def test_parity_fp32(case, tmp_path):
    config, size, batch = CASES[case]
    twin = torch_twin(config)
    twin.save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    assert vae.encoder.conv_in.weight.dtype == jnp.float32
    diff = worst_diff(vae, twin, *inputs(config, size, batch))
    print(f"{case}: max rel diff {diff:.2e}")
    assert diff <= 1e-4


def test_encode_shapes_and_logvar_clamp(sd_tiny):
    folder, _ = sd_tiny
    vae = load_vae(folder)
    images, _ = inputs(SD_TINY, (24, 40), 1)
    mean, logvar = vae.encode(jnp.asarray(images) * 1e4)  # huge inputs push logvar past the clamp
    assert mean.shape == logvar.shape == (1, 12, 20, 4)
    assert float(logvar.min()) >= -30.0 and float(logvar.max()) <= 20.0


def test_fp16_variant(tmp_path):
    twin = torch_twin(SD_TINY).half()
    twin.save_pretrained(tmp_path, variant="fp16")
    vae = load_vae(tmp_path, variant="fp16")  # fp16 weights, computed in fp32
    assert vae.decoder.conv_out.weight.dtype == jnp.float32
    images, latents = inputs(SD_TINY, (32, 32), 1)
    rounded = twin.float()  # torch in fp32 on the same fp16-rounded weights
    exact = worst_diff(vae, rounded, images, latents)
    print(f"fp16 variant vs torch fp32 on the rounded weights: max rel diff {exact:.2e}")
    assert exact <= 1e-4
    vae16 = load_vae(tmp_path, variant="fp16", dtype="float16")
    assert vae16.decoder.conv_out.weight.dtype == jnp.float16
    half = worst_diff(vae16, rounded, images, latents)
    print(f"fp16 variant computed in fp16: max rel diff {half:.2e}")
    assert half <= 1e-2


def test_bf16_load(sd_tiny):
    folder, twin = sd_tiny
    vae = load_vae(folder, dtype=jnp.bfloat16)
    assert vae.encoder.mid_block.attentions[0].to_q.weight.dtype == jnp.bfloat16
    images, latents = inputs(SD_TINY, (32, 32), 2)
    diff = worst_diff(vae, twin, images, latents)
    # The yardstick: diffusers itself run in bf16 on the same weights (about 2.5e-2 on this net).
    twin_bf16 = torch_twin(SD_TINY).to(torch.bfloat16)
    refs = reference(twin, images, latents)
    with torch.no_grad():
        posterior = twin_bf16.encode(torch.from_numpy(nhwc_to_nchw(images)).bfloat16()).latent_dist
        decoded = twin_bf16.decode(torch.from_numpy(nhwc_to_nchw(latents)).bfloat16()).sample
    torch_bf16 = max(max_rel_diff(nchw_to_nhwc(t.float()), r)
                     for t, r in zip((posterior.mean, posterior.logvar, decoded), refs, strict=True))
    print(f"bf16: max rel diff {diff:.2e} (diffusers in bf16: {torch_bf16:.2e})")
    assert diff <= max(2e-2, 1.5 * torch_bf16)


def test_legacy_attention_names(sd_tiny, tmp_path):
    folder, twin = sd_tiny
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in load_file(folder / "diffusion_pytorch_model.safetensors").items():
        for new, old in legacy.items():
            key = key.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old}.")
        tensors[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in tensors
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    images, latents = inputs(SD_TINY, (32, 32), 1)
    diff = worst_diff(load_vae(tmp_path), twin, images, latents)
    print(f"legacy names: max rel diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("key, value", [
    ("act_fn", "gelu"),
    ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
    ("shift_factor", 0.1159),
    ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
    ("latents_std", [1.0, 1.0, 1.0, 1.0]),
    ("norm_type", "spatial"),
    ("use_quant_conv", "yes"),
    ("layers_per_block", 0),
])
def test_unsupported_config_raises(key, value):
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.0", **SD_TINY,
              "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
              "force_upcast": True, "shift_factor": None, key: value}
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_diffusers(config)


def test_unsupported_config_raises_from_folder(sd_tiny, tmp_path):
    folder, _ = sd_tiny
    config = json.loads((folder / "config.json").read_text())
    config["scaling_factor"] = 0.13025
    assert VAEConfig.from_diffusers(config).scaling_factor == 0.13025
    config["shift_factor"] = 0.0609
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shift_factor"):
        load_vae(tmp_path)


def test_tiny_models_8x_vae_matches_diffusers(tmp_path):
    """sega_jax.builtin.tiny's four-level (8x) VAE, saved as a diffusers folder by `save_tiny`, against
    diffusers' AutoencoderKL loading that folder: encode (mean, logvar) and decode, on a non-square image."""
    from sega_jax.builtin.tiny import save_tiny, tiny_models

    folder = save_tiny(tmp_path / "tiny")
    twin = TorchAutoencoderKL.from_pretrained(folder / "vae").eval()
    vae = tiny_models(0)[1]
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (1, 32, 48, 3)).astype(np.float32)
    latents = rng.standard_normal((1, 4, 6, 4)).astype(np.float32)  # NHWC: 4 high, 6 wide
    mean, logvar, decoded = run(vae, jnp.asarray(images), jnp.asarray(latents))
    assert mean.shape == (1, 4, 6, 4) and decoded.shape == (1, 32, 48, 3)  # 8x down, 8x up
    for ours, theirs in zip((mean, logvar, decoded), reference(twin, images, latents), strict=True):
        assert max_rel_diff(np.asarray(ours), theirs) <= 1e-4
