"""SDXL's UNet ("text_time" micro-conditioning, deep transformers, linear projection) against diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sega_jax.models.unet import UNetConfig, load_unet
from tests.helpers import jit_module_call, max_rel_diff, nchw_to_nhwc
from tests.test_unet import inputs, save_unet

POOLED = 20
TIME_DIM = 8
SDXL_TINY = dict(
    block_out_channels=(16, 32, 32), layers_per_block=1, cross_attention_dim=48, attention_head_dim=(2, 4, 8),
    transformer_layers_per_block=(1, 2, 3), norm_num_groups=8, use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM, sample_size=8,
)


def added_cond(batch: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    text_embeds = rng.standard_normal((batch, POOLED), dtype=np.float32)
    time_ids = rng.choice([0.0, 16.0, 64.0, 128.0, 512.0, 1024.0], (batch, 6)).astype(np.float32)
    return text_embeds, time_ids


def torch_forward(model, sample, t, context, text_embeds, time_ids) -> np.ndarray:
    cond = {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
    with torch.no_grad():
        out = model(torch.from_numpy(sample), t, encoder_hidden_states=torch.from_numpy(context),
                    added_cond_kwargs=cond).sample
    return out.numpy()


@jit_module_call
def jax_forward(model, sample_nhwc, t, context, text_embeds, time_ids):
    return model(sample_nhwc, t, context, text_embeds, time_ids)


@pytest.mark.parametrize("hw,t", [((16, 16), 999), ((12, 20), 7)], ids=["square", "rect"])
def test_sdxl_unet_matches_diffusers_fp32(tmp_path, hw, t):
    reference = save_unet(tmp_path, SDXL_TINY)
    ours = load_unet(tmp_path)
    assert ours.config.transformer_layers_per_block == (1, 2, 3)
    sample, context = inputs(SDXL_TINY, 2, hw)
    text_embeds, time_ids = added_cond(2)
    expected = torch_forward(reference, sample, t, context, text_embeds, time_ids)
    got = jax_forward(ours, nchw_to_nhwc(sample), np.float32(t), context, text_embeds, time_ids)
    assert max_rel_diff(got, nchw_to_nhwc(expected)) <= 1e-4
    # The micro-conditioning matters: other time ids give another answer.
    other = jax_forward(ours, nchw_to_nhwc(sample), np.float32(t), context, text_embeds, time_ids[::-1])
    assert max_rel_diff(other, got) > 1e-2


def test_sdxl_unet_answers_every_copy_with_its_own_pooled_embeds(tmp_path):
    # SEGA on SDXL: each copy (uncond, text, concepts) has its own context AND pooled embedding, so the
    # latents given once must answer like diffusers on the latents tiled once per copy.
    reference = save_unet(tmp_path, SDXL_TINY)
    ours = load_unet(tmp_path)
    sample, context = inputs(SDXL_TINY, 2, (16, 16))
    copies = np.concatenate([context, context[::-1] * 0.5, context + 1.0])
    text_embeds, time_ids = added_cond(6)
    expected = torch_forward(reference, np.concatenate([sample] * 3), 500, copies, text_embeds, time_ids)
    got = jax_forward(ours, nchw_to_nhwc(sample), np.float32(500), copies, text_embeds, time_ids)
    assert max_rel_diff(got, nchw_to_nhwc(expected)) <= 1e-4


def test_sdxl_unet_refuses_missing_or_misplaced_micro_conditioning(tmp_path):
    save_unet(tmp_path, SDXL_TINY)
    ours = load_unet(tmp_path)
    sample, context = inputs(SDXL_TINY, 2, (16, 16))
    text_embeds, time_ids = added_cond(2)
    with pytest.raises(ValueError, match="needs `text_embeds` and `time_ids`"):
        ours(nchw_to_nhwc(sample), 1.0, context)
    with pytest.raises(ValueError, match="one row per context row"):
        ours(nchw_to_nhwc(sample), 1.0, context, text_embeds[:1], time_ids[:1])
    sd = UNetConfig.from_diffusers({k: v for k, v in SDXL_TINY.items() if "addition" not in k
                                    and k != "projection_class_embeddings_input_dim"})
    assert sd.addition_embed_type is None
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNetConfig.from_diffusers(dict(SDXL_TINY, addition_embed_type="text_image"))
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        UNetConfig.from_diffusers(dict(SDXL_TINY, projection_class_embeddings_input_dim=None))
