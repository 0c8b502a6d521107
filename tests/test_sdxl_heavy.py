"""The real SDXL UNet (stabilityai/stable-diffusion-xl-base-1.0's config, 2.6B parameters, random weights)
against diffusers on one forward at 64x64 latents, fp32.

Memory: one fp32 copy is 10.3 GB, so the two libraries never hold theirs at the same time. diffusers runs
first, its output is kept, its weights are written in 1 GB safetensors shards (a shard is copied to bytes
while it is written) and freed; then ours loads the folder and runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from sega_jax.bench.sega import release_freed_memory
from sega_jax.models.unet import load_unet
from sega_jax.testing.reference import SDXL_UNET
from tests.helpers import max_rel_diff, nchw_to_nhwc
from tests.test_unet import inputs
from tests.test_unet_sdxl import jax_forward, torch_forward

COPIES = 3  # SEGA's UNet batch: [uncond, text, concept], one set of latents
TIME_IDS = (512.0, 512.0, 0.0, 0.0, 512.0, 512.0)  # original size, crop, target size at 512x512


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """diffusers initialises every norm to scale 1, shift 0 (nothing else is constant): make them random so
    a swapped or ignored norm parameter changes the answer. A cheap pass: norms are 0.1% of the weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.2 * torch.randn(param.shape, generator=gen))


def constant_parameters(model: torch.nn.Module) -> list[str]:
    params = model.named_parameters()
    return [name for name, p in params if p.numel() > 1 and bool((p == p.view(-1)[0]).all())]


def added_cond() -> tuple[np.ndarray, np.ndarray]:
    """A different pooled text embedding per copy, the prompt's time ids shared (as the SEGA-XL loop does)."""
    rng = np.random.default_rng(3)
    pooled = rng.standard_normal((COPIES, SDXL_UNET["projection_class_embeddings_input_dim"] - 6 * 256),
                                 dtype=np.float32)
    return pooled, np.tile(np.asarray(TIME_IDS, np.float32), (COPIES, 1))


def diffusers_answer(folder, sample, t, context, pooled, time_ids) -> np.ndarray:
    """Build diffusers' SDXL UNet, run it on the latents tiled once per copy, save it to `folder`, free it."""
    torch.manual_seed(0)
    model = TorchUNet(**SDXL_UNET).eval()
    assert 2.5e9 < sum(p.numel() for p in model.parameters()) < 2.65e9
    randomize_norms(model)
    assert constant_parameters(model) == []
    expected = torch_forward(model, np.concatenate([sample] * COPIES), t, context, pooled, time_ids)
    model.save_pretrained(folder, max_shard_size="1GB")
    del model
    release_freed_memory()  # else glibc keeps torch's freed 10 GB resident under ours
    return expected


@pytest.mark.heavy
def test_sdxl_architecture_unet_matches_diffusers(tmp_path):
    sample, context = inputs(SDXL_UNET, 1, (64, 64), seq=77)
    context = np.concatenate([context, -context, 0.5 * context[:, ::-1]])  # one context per copy
    pooled, time_ids = added_cond()
    expected = nchw_to_nhwc(diffusers_answer(tmp_path, sample, 801, context, pooled, time_ids))
    ours = load_unet(tmp_path)
    got = np.asarray(jax_forward(ours, nchw_to_nhwc(sample), np.float32(801), context, pooled, time_ids))
    assert got.shape == (COPIES, 64, 64, 4)
    diff = max_rel_diff(got, expected)
    print(f"SDXL UNet, 3 copies at 64x64: max rel diff {diff:.2e}")
    assert diff <= 1e-4
    for copy in range(COPIES):  # each copy on its own, so one wrong copy cannot hide behind the others' scale
        assert max_rel_diff(got[copy], expected[copy]) <= 1e-4
