"""The offline tiny model: SD-shaped, deterministic in its seed, reloadable from a diffusers folder."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from sega_jax import SemanticStableDiffusionPipeline, load_pipeline
from sega_jax.builtin.tiny import SD_DDIM, save_tiny, tiny_models

CALL = dict(prompt="a photo of the face of a woman", editing_prompt=["smiling, smile", "glasses"],
            edit_warmup_steps=1, num_inference_steps=3, output_type="np")


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def pipe() -> SemanticStableDiffusionPipeline:
    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_weights_are_deterministic_in_the_seed():
    first, again, other = tiny_models(0), tiny_models(0), tiny_models(1)
    for a, b, c in zip(first, again, other, strict=True):
        pa, pb, pc = _params(a), _params(b), _params(c)
        assert all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))
        assert not all(np.array_equal(x, z) for x, z in zip(pa, pc, strict=True))
        assert all(np.isfinite(x).all() for x in pa)


def test_sd_shaped(pipe):
    assert pipe.vae_scale_factor == 8  # latents (B, 4, H/8, W/8) as SD's
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.tokenizer("a photo").input_ids == [49406, 320, 1125, 49407]  # the real CLIP tokenizer
    assert pipe.scheduler.config == {**pipe.scheduler.config, **SD_DDIM}
    assert sum(x.size for x in _params(pipe.unet)) > 500_000


def test_dtype():
    unet, _, _ = tiny_models(0, "bfloat16")
    assert {x.dtype for x in _params(unet)} == {np.dtype(jax.numpy.bfloat16)}


def test_generate_is_deterministic_per_seed(pipe):
    a, b, c = pipe(**CALL, seed=0), pipe(**CALL, seed=0), pipe(**CALL, seed=1)
    assert a.images.shape == (1, 64, 64, 3) and a.seed == 0
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert a.images.std() > 0.01  # not a constant image


def test_save_tiny_reloads_the_same_pipeline(pipe, tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    assert (folder / "model_index.json").is_file()
    loaded = SemanticStableDiffusionPipeline.from_pretrained(folder, requires_safety_checker=False)
    loaded.set_progress_bar_config(disable=True)
    for ours, theirs in ((pipe.unet, loaded.unet), (pipe.vae, loaded.vae), (pipe.text_encoder,
                                                                           loaded.text_encoder)):
        assert all(np.array_equal(x, y) for x, y in zip(_params(ours), _params(theirs), strict=True))
    assert np.array_equal(pipe(**CALL, seed=0).images, loaded(**CALL, seed=0).images)

