"""Schedulers against diffusers: whole trajectories on identical model outputs (and identical noise).

Ours run in NHWC, diffusers in NCHW, on the same numbers; every step's sample must agree to 1e-5 relative to
max |reference|, and timesteps / sigmas / init_noise_sigma must be identical (helpers:
tests/scheduler_cases.py).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ea_module = pytest.importorskip("diffusers.schedulers.scheduling_euler_ancestral_discrete")

from sega_jax.schedulers import (  # noqa: E402
    DDIMScheduler,
    PNDMScheduler,
)
from tests.scheduler_cases import (  # noqa: E402
    SD_CONFIG,
    SPACINGS,
    STEPS,
    WORST,
    cases,
    check_schedule,
    nhwc,
    normal,
    run_trajectory,
)


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print("\nworst relative diff per scheduler:", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})


# ---- trajectories ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,n,spacing", cases(("epsilon", "v_prediction", "sample"), STEPS, SPACINGS))
@pytest.mark.parametrize(
    "variant", [{"eta": 0.0}, {"eta": 0.6, "set_alpha_to_one": True, "clip_sample": True}]
)
def test_ddim(pred, n, spacing, variant):
    variant = dict(variant)
    eta = variant.pop("eta")
    config = {**SD_CONFIG, "prediction_type": pred, "timestep_spacing": spacing, **variant}
    run_trajectory("DDIMScheduler", config, n, eta=eta)


# The Runge-Kutta warm-up (skip_prk_steps=False) needs at least 4 steps: fewer are a separate test below.
PNDM_CASES = [
    (pred, n, spacing, skip_prk)
    for skip_prk in (True, False)
    for pred, n, spacing in cases(("epsilon", "v_prediction"), (1, 4, 7, 25), SPACINGS)
    if skip_prk or n >= 4
]


@pytest.mark.parametrize("pred,n,spacing,skip_prk", PNDM_CASES)
def test_pndm(pred, n, spacing, skip_prk):
    config = {**SD_CONFIG, "prediction_type": pred, "timestep_spacing": spacing, "skip_prk_steps": skip_prk}
    config["set_alpha_to_one"] = spacing == "linspace"
    run_trajectory("PNDMScheduler", config, n)
    expected = (n + 1 if n > 1 else 1) if skip_prk else n + 9  # PLMS repeats one timestep
    assert len(PNDMScheduler.from_config(config).set_timesteps(n).timesteps) == expected


@pytest.mark.parametrize("n,spacing", cases((1, 2, 3), SPACINGS))
def test_pndm_runge_kutta_warmup_with_fewer_than_four_steps_is_a_clear_error(n, spacing):
    """diffusers' PNDM crashes there (a numpy broadcasting error); ours names the setting and the minimum."""
    config = {**SD_CONFIG, "timestep_spacing": spacing, "skip_prk_steps": False}
    with pytest.raises(ValueError, match=r"skip_prk_steps=False needs num_inference_steps >= 4"):
        PNDMScheduler.from_config(config).set_timesteps(n)
    with pytest.raises(ValueError, match="broadcast"):
        diffusers.PNDMScheduler.from_config(config).set_timesteps(n)
    four = PNDMScheduler.from_config(config).set_timesteps(4)
    assert len(four.timesteps) == 4 + 9  # 4 steps are enough (n + 9 timesteps, as in test_pndm)


@pytest.mark.parametrize("pred,n,spacing", cases(("epsilon", "v_prediction", "sample"), STEPS, SPACINGS))
@pytest.mark.parametrize("karras", [False, True])
def test_lms(pred, n, spacing, karras):
    config = {**SD_CONFIG, "prediction_type": pred, "timestep_spacing": spacing, "use_karras_sigmas": karras}
    run_trajectory("LMSDiscreteScheduler", config, n)


@pytest.mark.parametrize("pred,n,spacing", cases(("epsilon", "v_prediction", "sample"), STEPS, SPACINGS))
@pytest.mark.parametrize("karras", [False, True])
def test_euler(pred, n, spacing, karras):
    config = {**SD_CONFIG, "prediction_type": pred, "timestep_spacing": spacing, "use_karras_sigmas": karras}
    run_trajectory("EulerDiscreteScheduler", config, n)


@pytest.mark.parametrize("pred,n", cases(("epsilon", "v_prediction"), (7, 25)))
@pytest.mark.parametrize(
    "variant",
    [
        {"final_sigmas_type": "sigma_min"},
        {"timestep_type": "continuous"},
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0, "final_sigmas_type": "sigma_min"},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
)
def test_euler_variants(pred, n, variant):
    run_trajectory("EulerDiscreteScheduler", {**SD_CONFIG, "prediction_type": pred, **variant}, n)


@pytest.mark.parametrize("pred,n,spacing", cases(("epsilon", "v_prediction"), STEPS, SPACINGS))
def test_euler_ancestral(pred, n, spacing, monkeypatch):
    config = {**SD_CONFIG, "prediction_type": pred, "timestep_spacing": spacing}
    run_trajectory("EulerAncestralDiscreteScheduler", config, n, monkeypatch)


@pytest.mark.parametrize("pred,n", cases(("epsilon", "v_prediction", "sample"), (1, 2, 7, 25)))
@pytest.mark.parametrize("sigmas", [*SPACINGS, "karras"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpm_solver(pred, n, sigmas, final):
    config = {**SD_CONFIG, "prediction_type": pred, "final_sigmas_type": final}
    config.update({"use_karras_sigmas": True} if sigmas == "karras" else {"timestep_spacing": sigmas})
    run_trajectory("DPMSolverMultistepScheduler", config, n)


@pytest.mark.parametrize("pred,n", cases(("epsilon", "v_prediction"), (7, 25)))
@pytest.mark.parametrize(
    "variant",
    [
        {"solver_order": 1},
        {"solver_order": 3},
        {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        {"solver_type": "heun", "use_karras_sigmas": True},
        {"lower_order_final": False, "final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
        {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
        {"lambda_min_clipped": -5.1, "beta_schedule": "linear"},
    ],
)
def test_dpm_solver_variants(pred, n, variant):
    run_trajectory("DPMSolverMultistepScheduler", {**SD_CONFIG, "prediction_type": pred, **variant}, n)


def test_dpm_solver_squaredcos_karras_schedule():
    """Karras sigmas on squaredcos_cap_v2 give timesteps truncated, not rounded. The schedule starts with a
    repeated timestep, for which diffusers' step-index lookup starts at index 1 and later runs off the end of
    its sigmas, so only the schedule is compared here; our trajectory must stay finite."""
    config = {**SD_CONFIG, "beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}
    ours, schedule, _ = check_schedule("DPMSolverMultistepScheduler", config, 7)
    x = nhwc(normal(0))
    state = ours.init_state(schedule, x.shape, x.dtype)
    for i in range(7):
        x, state = ours.step(schedule, state, nhwc(normal(1000 + i)), i, x)
    assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "trained"])
def test_alphas_cumprod_bit_exact(schedule):
    config = {**SD_CONFIG, "beta_schedule": schedule}
    if schedule == "trained":
        config["trained_betas"] = np.linspace(1e-4, 0.02, 1000).tolist()
    ref = diffusers.DDIMScheduler.from_config(config)
    np.testing.assert_array_equal(
        DDIMScheduler.from_config(config).alphas_cumprod(), ref.alphas_cumprod.numpy()
    )
