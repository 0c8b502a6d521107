"""The SEGA step against a line-for-line transcription of diffusers' guidance block (torch, NCHW)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sega_jax.core.guidance import EditParams, order_statistic, sega_step, spatial_quantile
from tests.helpers import max_rel_diff, nchw_to_nhwc


def reference_guidance(
    i,
    uncond,
    text,
    edits,
    momentum,
    *,
    guidance_scale,
    edit_guidance_scale,
    edit_threshold,
    reverse_editing_direction,
    edit_weights,
    edit_warmup_steps,
    edit_cooldown_steps,
    edit_momentum_scale,
    edit_mom_beta,
):
    """The body of diffusers' SEGA loop for step i (pipeline_semantic_stable_diffusion.py), unchanged
    in meaning; returns (noise_pred, edit_momentum, sem_guidance[i])."""
    noise_guidance = guidance_scale * (text - uncond)
    sem = torch.zeros_like(text)
    concept_weights = torch.zeros((len(edits), noise_guidance.shape[0]))
    noise_guidance_edit = torch.zeros((len(edits), *noise_guidance.shape))
    warmup_inds = []
    for c, edit in enumerate(edits):
        cooldown = i + 1 if edit_cooldown_steps is None else edit_cooldown_steps[c]
        if i >= edit_warmup_steps[c]:
            warmup_inds.append(c)
        if i >= cooldown:
            continue
        tmp = edit - uncond
        if reverse_editing_direction[c]:
            tmp = tmp * -1
        concept_weights[c, :] = edit_weights[c]
        tmp = tmp * edit_guidance_scale[c]
        q = torch.quantile(torch.abs(tmp).flatten(start_dim=2), edit_threshold[c], dim=2, keepdim=False)
        tmp = torch.where(torch.abs(tmp) >= q[:, :, None, None], tmp, torch.zeros_like(tmp))
        noise_guidance_edit[c] = tmp
    warmup_inds = torch.tensor(warmup_inds, dtype=torch.long)
    if len(edits) > warmup_inds.shape[0] > 0:
        w = torch.index_select(concept_weights, 0, warmup_inds)
        w = torch.where(w < 0, torch.zeros_like(w), w)
        w = w / w.sum(dim=0)
        g = torch.einsum("cb,cbijk->bijk", w, torch.index_select(noise_guidance_edit, 0, warmup_inds))
        noise_guidance = noise_guidance + g
        sem = g
    concept_weights = torch.nan_to_num(torch.where(concept_weights < 0, 0.0, concept_weights))
    edit = torch.einsum("cb,cbijk->bijk", concept_weights, noise_guidance_edit)
    edit = edit + edit_momentum_scale * momentum
    momentum = edit_mom_beta * momentum + (1 - edit_mom_beta) * edit
    if warmup_inds.shape[0] == len(edits):
        noise_guidance = noise_guidance + edit
        sem = edit
    return uncond + noise_guidance, momentum, sem


SETTINGS = {
    "seed-page": dict(
        edit_guidance_scale=[5, 5, 5, 5],
        edit_threshold=[0.99, 0.975, 0.925, 0.96],
        reverse_editing_direction=[False, True, False, False],
        edit_weights=[1.0, 1.0, 1.0, 1.0],
        edit_warmup_steps=[2, 2, 2, 2],
        edit_cooldown_steps=None,
    ),
    "staggered-warmup-cooldown": dict(
        edit_guidance_scale=[3, 7, 4],
        edit_threshold=[0.9, 0.5, 0.0],
        reverse_editing_direction=[True, False, False],
        edit_weights=[0.5, 2.0, -1.0],
        edit_warmup_steps=[0, 2, 4],
        edit_cooldown_steps=[3, 6, 5],
    ),
    "one-concept": dict(
        edit_guidance_scale=[6],
        edit_threshold=[1.0],
        reverse_editing_direction=[False],
        edit_weights=[1.0],
        edit_warmup_steps=[1],
        edit_cooldown_steps=[4],
    ),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_sega_step_trajectory_matches_reference(name):
    setting = SETTINGS[name]
    k, steps, shape = len(setting["edit_threshold"]), 7, (2, 4, 8, 6)
    rng = np.random.default_rng(0)
    common = dict(guidance_scale=7.5, edit_momentum_scale=0.3, edit_mom_beta=0.6)
    params = EditParams.create(k, **common, **setting)
    step_fn = jax.jit(sega_step)
    momentum_ref, momentum = torch.zeros(shape), jnp.zeros(nchw_to_nhwc(np.zeros(shape)).shape)
    for i in range(steps):
        uncond, text = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
        edits = rng.standard_normal((k, *shape), dtype=np.float32)
        expected, momentum_ref, sem_ref = reference_guidance(
            i,
            torch.from_numpy(uncond),
            torch.from_numpy(text),
            list(torch.from_numpy(edits)),
            momentum_ref,
            **common,
            **setting,
        )
        got, momentum, sem = step_fn(
            nchw_to_nhwc(uncond),
            nchw_to_nhwc(text),
            np.stack([nchw_to_nhwc(e) for e in edits]),
            momentum,
            jnp.int32(i),
            params,
        )
        assert max_rel_diff(got, nchw_to_nhwc(expected.numpy())) <= 1e-6, f"step {i}"
        assert max_rel_diff(momentum, nchw_to_nhwc(momentum_ref.numpy())) <= 1e-6, f"momentum at step {i}"
        assert max_rel_diff(sem, nchw_to_nhwc(sem_ref.numpy())) <= 1e-6, f"sem_guidance at step {i}"


def test_all_warm_concepts_with_zero_weight_give_zero_guidance_where_reference_gives_nan():
    """Deviation 1: the reference divides 0 by 0 when every warmed-up concept has weight 0."""
    setting = dict(
        edit_guidance_scale=[5, 5],
        edit_threshold=[0.5, 0.5],
        reverse_editing_direction=[False] * 2,
        edit_weights=[0.0, 1.0],
        edit_warmup_steps=[0, 3],
        edit_cooldown_steps=None,
    )
    common = dict(guidance_scale=7.5, edit_momentum_scale=0.1, edit_mom_beta=0.4)
    rng = np.random.default_rng(1)
    uncond, text = (rng.standard_normal((1, 4, 4, 4), dtype=np.float32) for _ in range(2))
    edits = rng.standard_normal((2, 1, 4, 4, 4), dtype=np.float32)
    expected, _, _ = reference_guidance(
        1,
        torch.from_numpy(uncond),
        torch.from_numpy(text),
        list(torch.from_numpy(edits)),
        torch.zeros(1, 4, 4, 4),
        **common,
        **setting,
    )
    assert torch.isnan(expected).all()
    got, _, sem = sega_step(
        nchw_to_nhwc(uncond),
        nchw_to_nhwc(text),
        np.stack([nchw_to_nhwc(e) for e in edits]),
        jnp.zeros((1, 4, 4, 4)),
        jnp.int32(1),
        EditParams.create(2, **common, **setting),
    )
    assert np.isfinite(np.asarray(got)).all()
    assert not np.asarray(sem).any()
    np.testing.assert_allclose(got, nchw_to_nhwc(uncond + 7.5 * (text - uncond)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.9, 0.925, 0.975, 0.99, 1.0, 0.123456, 0.31, 0.77, 0.4321])
def test_spatial_quantile_equals_torch_quantile_with_ties(q):
    rng = np.random.default_rng(2)
    x = np.round(np.abs(rng.standard_normal((3, 2, 4, 9, 7), dtype=np.float32)), 1)  # many ties
    expected = torch.quantile(torch.from_numpy(x).flatten(start_dim=3), q, dim=3).numpy()
    got = spatial_quantile(jnp.asarray(np.moveaxis(x, 2, -1)), jnp.full((3, 2), q, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_spatial_quantile_equals_torch_with_signs_zeros_and_extremes():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 16, 16), dtype=np.float32) * np.float32(1e3)
    x[0, 0, :5] = 0.0
    x[0, 1, :3] = -0.0
    x[1, 0, 0, :4] = [np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny, -1e-40]
    x[1, 2] = 7.0  # a constant row
    for q in (0.0, 0.01, 0.5, 0.95, 1.0):
        expected = torch.quantile(torch.from_numpy(x).flatten(start_dim=2), q, dim=2).numpy()
        got = spatial_quantile(jnp.asarray(np.moveaxis(x, 1, -1)), jnp.float32(q))
        np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("n", [1, 2, 7, 1024])
def test_order_statistic_equals_sorting(n):
    rows = np.random.default_rng(n).standard_normal((3, 5, n), dtype=np.float32)
    rows[0, 0] = np.round(rows[0, 0])  # ties
    ranks = np.random.default_rng(0).integers(0, n, (3, 5)).astype(np.int32)
    expected = np.take_along_axis(np.sort(rows, axis=-1), ranks[..., None], -1)[..., 0]
    got = order_statistic(jnp.asarray(rows), jnp.asarray(ranks))
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_no_concepts_is_plain_classifier_free_guidance():
    rng = np.random.default_rng(3)
    uncond, text = (rng.standard_normal((2, 4, 4, 3), dtype=np.float32) for _ in range(2))
    got, momentum, sem = sega_step(
        uncond,
        text,
        jnp.zeros((0, 2, 4, 4, 3)),
        jnp.zeros((2, 4, 4, 3)),
        jnp.int32(0),
        EditParams.create(0, guidance_scale=3.0),
    )
    np.testing.assert_allclose(got, uncond + 3.0 * (text - uncond), rtol=1e-6)
    assert not np.asarray(sem).any() and not np.asarray(momentum).any()
