"""Null-text inversion (sega_jax.pipelines.null_text): DDIM inversion parity with diffusers'
DDIMInverseScheduler, null-text reconstruction beating plain DDIM inversion at guidance 7.5, per-image early
stop, compile-once."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from sega_jax.pipelines import null_text  # noqa: E402
from sega_jax.pipelines.sega.sd import SemanticStableDiffusionPipeline  # noqa: E402
from tests.tiny_pipeline import save_reference  # noqa: E402

STEPS = 5
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd-null-text")
    reference = save_reference(folder)
    ours = SemanticStableDiffusionPipeline.from_pretrained(folder, requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    return ours, reference


def photo(batch: int = 1, seed: int = 0) -> np.ndarray:
    """Smooth random 16x16 RGB images in [0, 1]."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.0, (batch, 4, 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)


def rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def latent_mse(pipe, inv) -> float:
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, inversion=inv, output_type="latent",
               seed=0)
    return float(np.mean((np.asarray(out.images) - inv.image_latents) ** 2))


def test_ddim_inversion_matches_diffusers_inverse_scheduler(pipes):
    pipe, reference = pipes
    inv = pipe.invert(photo(), prompt=PROMPT, num_inference_steps=STEPS, method="ddim")
    inverse = diffusers.DDIMInverseScheduler.from_config(reference.scheduler.config, clip_sample=False)
    inverse.set_timesteps(STEPS)
    np.testing.assert_array_equal(inverse.timesteps.numpy(), inv.timesteps[::-1])
    cond = pipe.text_embeddings([PROMPT])
    unet = pipe.unet
    x = torch.from_numpy(inv.image_latents.copy())
    for k, t in enumerate(inverse.timesteps):
        eps = unet(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.int32(int(t)), cond)
        eps = torch.from_numpy(np.asarray(eps, np.float32).transpose(0, 3, 1, 2).copy())
        x = inverse.step(eps, t, x).prev_sample
        diff = rel(inv.trajectory[k + 1], x.numpy())
        print(f"DDIM inversion step {k} (t={int(t)}): relative diff {diff:.2e}")
        assert diff <= 1e-4
    np.testing.assert_array_equal(inv.latents, inv.trajectory[-1])


def test_null_text_reconstructs_better_than_ddim(pipes):
    pipe, _ = pipes
    image = photo(seed=1)
    ddim = pipe.invert(image, prompt=PROMPT, num_inference_steps=STEPS, method="ddim")
    nt = pipe.invert(image, prompt=PROMPT, num_inference_steps=STEPS, method="null-text")
    assert nt.uncond_embeddings.shape == (STEPS, 1, 77, pipe.text_encoder.config.hidden_size)
    np.testing.assert_array_equal(nt.latents, ddim.latents)
    ddim_err, nt_err = latent_mse(pipe, ddim), latent_mse(pipe, nt)
    print(f"latent MSE vs the photo's latents at guidance 7.5: DDIM {ddim_err:.3e}, null-text {nt_err:.3e}")
    assert nt_err <= 0.5 * ddim_err
    # the guided trajectory the optimiser saw is the one the pipeline replays
    assert np.isfinite(nt.losses).all() and (nt.iterations >= 1).all()
    # each step's inner Adam loop lowers its loss (the last iteration's loss against the first's)
    print("per-step loss, first -> last inner iteration:",
          [f"{a:.3g} -> {b:.3g}" for a, b in zip(nt.initial_losses[:, 0], nt.losses[:, 0], strict=True)])
    several = nt.iterations > 1
    assert several.any() and (nt.losses[several] < nt.initial_losses[several]).all()
    np.testing.assert_array_equal(nt.losses[~several], nt.initial_losses[~several])


def test_per_image_early_stop_in_a_batch(pipes):
    pipe, _ = pipes
    images = photo(2, seed=2)
    probe = pipe.invert(images, prompt=PROMPT, num_inference_steps=STEPS, num_inner_steps=1,
                        early_stop=0.0, early_stop_slope=0.0)
    first = probe.losses[0]  # the loss before the first update of step 0, per image
    assert first[0] != first[1]
    low, high = int(np.argmin(first)), int(np.argmax(first))
    threshold = float(np.sqrt(first[0] * first[1]))
    inv = pipe.invert(images, prompt=PROMPT, num_inference_steps=STEPS, early_stop=threshold,
                      early_stop_slope=0.0)
    print("iterations per step and image:", inv.iterations.tolist())
    assert inv.iterations[0, low] == 1
    assert inv.iterations[0, high] > inv.iterations[0, low]
    # the stopped image is the one it would be alone
    alone = pipe.invert(images[low:low + 1], prompt=PROMPT, num_inference_steps=STEPS, early_stop=threshold,
                        early_stop_slope=0.0)
    np.testing.assert_array_equal(alone.iterations[:, 0], inv.iterations[:, low])
    np.testing.assert_allclose(alone.uncond_embeddings[:, 0], inv.uncond_embeddings[:, low], atol=1e-3)


def test_compiles_once(pipes):
    pipe, _ = pipes
    pipe.invert(photo(seed=3), prompt=PROMPT, num_inference_steps=STEPS)
    before = dict(null_text.TRACE_COUNT)
    pipe.invert(photo(seed=4), prompt=PROMPT, num_inference_steps=STEPS, learning_rate=3e-2, lr_decay=0.02,
                early_stop=1e-3, early_stop_slope=1e-4, guidance_scale=5.0)
    assert null_text.TRACE_COUNT == before
    pipe.invert(photo(seed=4), prompt=PROMPT, num_inference_steps=STEPS, num_inner_steps=3)  # control
    assert null_text.TRACE_COUNT["null_text"] == before["null_text"] + 1


def test_bad_inputs(pipes):
    pipe, _ = pipes
    with pytest.raises(ValueError, match="method"):
        pipe.invert(photo(), method="edit-friendly")
    with pytest.raises(ValueError, match="`mode` must be one of"):
        pipe.invert(photo(), mode="vmap")
    inv = pipe.invert(photo(), prompt=PROMPT, num_inference_steps=STEPS, method="ddim")
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(PROMPT, num_inference_steps=STEPS + 1, inversion=inv, output_type="latent")
    with pytest.raises(ValueError, match="not both"):
        pipe(PROMPT, num_inference_steps=STEPS, inversion=inv, latents=inv.latents, output_type="latent")
