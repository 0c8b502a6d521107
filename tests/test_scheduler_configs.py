"""Schedulers as JAX code and as configs: one compilation inside `lax.scan`, noise from keys, bf16 samples
with fp32 math, every diffusers config key handled, clear errors, loading and swapping by name."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ea_module = pytest.importorskip("diffusers.schedulers.scheduling_euler_ancestral_discrete")

from sega_jax.schedulers import (  # noqa: E402
    SCHEDULER_ALIASES,
    SCHEDULERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    base,
    load_scheduler,
    scheduler_from_config,
    scheduler_from_name,
)
from sega_jax.schedulers.lms import lms_coefficients  # noqa: E402
from tests.scheduler_cases import (  # noqa: E402
    SD_CONFIG,
    TOL,
    CorrectlyRoundedSqrt,
    check_schedule,
    nhwc,
    normal,
    rel,
)


# ---- JAX behaviour ---------------------------------------------------------------------------------------
def _scan_loop(sched, counter):
    """The sampler's loop: scale_model_input + step in lax.scan, step index traced."""

    @jax.jit
    def loop(schedule, x, eps_seq, noise_seq, eta):
        counter["traces"] += 1

        def body(carry, inputs):
            x, state = carry
            i, eps, z = inputs
            x_in = sched.scale_model_input(schedule, x, i)
            x, state = sched.step(schedule, state, eps + 0 * x_in, i, x, eta=eta, noise=z)
            return (x, state), (x_in, x)

        n = schedule.timesteps.shape[0]
        init = (x, sched.init_state(schedule, x.shape, x.dtype))
        _, outs = jax.lax.scan(body, init, (jnp.arange(n), eps_seq, noise_seq))
        return outs

    return loop


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scan_compiles_once_and_matches(name, monkeypatch):
    """One compilation serves two schedules of the same length (other spacing, other eta); the traced
    trajectory still matches diffusers."""
    sched = SCHEDULERS[name].from_config(SD_CONFIG)
    counter = {"traces": 0}
    loop = _scan_loop(sched, counter)
    n = 10
    for spacing, eta in (("leading", 0.0), ("trailing", 0.8)):
        config = {**SD_CONFIG, "timestep_spacing": spacing}
        _, schedule, ref = check_schedule(name, config, n)
        steps = len(ref.timesteps)
        eps = np.stack([normal(1000 + i) for i in range(steps)])
        noise = np.stack([normal(5000 + i) for i in range(steps)])
        x0 = normal(0) * np.float32(ref.init_noise_sigma)
        x_in, xs = loop(schedule, nhwc(x0), _nhwc_seq(eps), _nhwc_seq(noise), eta)
        x_ref = torch.from_numpy(x0)
        for i, t in enumerate(ref.timesteps):
            assert rel(x_in[i], ref.scale_model_input(x_ref, t)) <= TOL
            kwargs = (
                {"eta": eta, "variance_noise": torch.from_numpy(noise[i])} if name == "DDIMScheduler" else {}
            )
            monkeypatch.setattr(ea_module, "randn_tensor", lambda *a, _z=noise[i], **k: torch.from_numpy(_z))
            x_ref = ref.step(torch.from_numpy(eps[i]), t, x_ref, **kwargs).prev_sample
            assert rel(xs[i], x_ref) <= TOL, (spacing, i)
    assert counter["traces"] == 1


def _nhwc_seq(a: np.ndarray) -> jax.Array:
    return jnp.asarray(a.transpose(0, 1, 3, 4, 2))


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_noise_from_key(name):
    sched = SCHEDULERS[name].from_config(SD_CONFIG)
    schedule = sched.set_timesteps(5)
    x, eps = jnp.ones((1, 8, 8, 4)), jnp.full((1, 8, 8, 4), 0.1)

    @jax.jit
    def step(key, eta):
        return sched.step(
            schedule, sched.init_state(schedule, x.shape, x.dtype), eps, 2, x, eta=eta, key=key
        )[0]

    a, b = step(jax.random.key(0), 0.5), step(jax.random.key(1), 0.5)
    assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)
    np.testing.assert_array_equal(a, step(jax.random.key(0), 0.5))
    with pytest.raises(ValueError, match="key"):
        sched.step(schedule, (), eps, 2, x, eta=0.5)
    with pytest.raises(ValueError, match="shape"):
        sched.step(schedule, (), eps, 2, x, eta=0.5, noise=jnp.zeros((1, 4, 8, 8)))


def test_ddim_eta_zero_needs_no_noise():
    sched = DDIMScheduler.from_config(SD_CONFIG)
    schedule = sched.set_timesteps(5)
    x = jnp.ones((1, 8, 8, 4))
    out, _ = sched.step(schedule, (), 0.1 * x, 0, x)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_bf16_sample_keeps_dtype_and_fp32_math(name):
    sched = SCHEDULERS[name].from_config(SD_CONFIG)
    schedule = sched.set_timesteps(4)
    x32 = nhwc(normal(0) * 3)
    eps = nhwc(normal(1))
    z = nhwc(normal(2))
    outs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        x = x32.astype(dtype)
        state = sched.init_state(schedule, x.shape, dtype)
        for i in range(len(schedule.timesteps)):
            x_in = sched.scale_model_input(schedule, x, i)
            assert x_in.dtype == dtype
            x, state = sched.step(schedule, state, eps.astype(dtype), i, x, noise=z)
            assert x.dtype == dtype
        outs[dtype] = np.asarray(x, np.float32)
    scale = np.abs(outs[jnp.float32]).max()
    assert np.abs(outs[jnp.bfloat16] - outs[jnp.float32]).max() <= 0.05 * scale


# ---- configs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_diffusers_key_is_handled_and_defaults_agree(name):
    ref_cls, ours = getattr(diffusers, name), SCHEDULERS[name]
    params = set(inspect.signature(ref_cls.__init__).parameters) - {"self"}
    fields = {f.name for f in dataclasses.fields(ours)}
    assert params == fields | set(ours._FIXED) | ours._IGNORED
    ref_defaults = ref_cls().config
    for key in fields:
        default = getattr(ours(), key)
        assert default == ref_defaults[key] or (default is False and ref_defaults[key] is None), key
    for key, allowed in ours._FIXED.items():
        assert any(ref_defaults[key] is a or ref_defaults[key] == a for a in allowed), key


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("DDIMScheduler", "beta_schedule", "cosine"),
        ("DDIMScheduler", "prediction_type", "flow_prediction"),
        ("DDIMScheduler", "timestep_spacing", "uniform"),
        ("DDIMScheduler", "thresholding", True),
        ("DDIMScheduler", "rescale_betas_zero_snr", True),
        ("DDIMScheduler", "clip_sample", "yes"),
        ("DDIMScheduler", "num_train_timesteps", 0),
        ("DDIMScheduler", "steps_offset", 1.5),
        ("PNDMScheduler", "prediction_type", "sample"),
        ("PNDMScheduler", "skip_prk_steps", "yes"),
        ("LMSDiscreteScheduler", "use_exponential_sigmas", True),
        ("EulerDiscreteScheduler", "interpolation_type", "log_linear"),
        ("EulerDiscreteScheduler", "use_beta_sigmas", True),
        ("EulerDiscreteScheduler", "final_sigmas_type", "one"),
        ("EulerDiscreteScheduler", "sigma_min", -1.0),
        ("EulerAncestralDiscreteScheduler", "prediction_type", "sample"),
        ("DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver++"),
        ("DPMSolverMultistepScheduler", "solver_order", 4),
        ("DPMSolverMultistepScheduler", "solver_type", "bh2"),
        ("DPMSolverMultistepScheduler", "use_lu_lambdas", True),
        ("DPMSolverMultistepScheduler", "variance_type", "learned_range"),
        ("DPMSolverMultistepScheduler", "trained_betas", [0.1, 0.2]),
    ],
)
def test_bad_config_value_names_the_key(name, key, value):
    with pytest.raises(ValueError, match=key):
        scheduler_from_config({**SD_CONFIG, "_class_name": name, key: value})


def test_unknown_class_and_unknown_keys():
    with pytest.raises(ValueError, match="UniPCMultistepScheduler.*supported.*DDIMScheduler"):
        scheduler_from_config({**SD_CONFIG, "_class_name": "UniPCMultistepScheduler"})
    with pytest.raises(ValueError, match="_class_name"):
        scheduler_from_config({"beta_schedule": "linear"})
    with pytest.warns(UserWarning, match="made_up_key"):
        DDIMScheduler.from_config({**SD_CONFIG, "made_up_key": 1})
    # Keys that belong to other schedulers are ignored silently, as diffusers does when swapping.
    sched = EulerDiscreteScheduler.from_config({**SD_CONFIG, "solver_order": 2, "final_sigmas_type": "zero"})
    assert sched.steps_offset == 1 and sched.beta_schedule == "scaled_linear"


def test_sd_config_and_hashable():
    sched = scheduler_from_config(SD_CONFIG)
    assert isinstance(sched, PNDMScheduler) and sched.skip_prk_steps and sched.steps_offset == 1
    assert hash(sched) == hash(PNDMScheduler.from_config(SD_CONFIG)) and sched == scheduler_from_config(
        SD_CONFIG
    )
    assert scheduler_from_config(sched.config) == sched
    trained = DDIMScheduler.from_config({**SD_CONFIG, "trained_betas": [0.01] * 1000})
    assert isinstance(hash(trained), int)


def test_load_scheduler(tmp_path):
    ref = diffusers.DPMSolverMultistepScheduler.from_config({**SD_CONFIG, "use_karras_sigmas": True})
    ref.save_config(tmp_path / "scheduler")  # includes lambda_min_clipped=-Infinity, variance_type=null, ...
    for where in (tmp_path / "scheduler", tmp_path, tmp_path / "scheduler" / "scheduler_config.json"):
        sched = load_scheduler(where)
        assert isinstance(sched, DPMSolverMultistepScheduler) and sched.use_karras_sigmas
        assert sched.lambda_min_clipped == -math.inf
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_scheduler(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/scheduler_config\.json"):
        load_scheduler(bad)
    (bad / "scheduler_config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        load_scheduler(bad)


@pytest.mark.parametrize(
    "name,cls,karras",
    [
        ("euler", EulerDiscreteScheduler, False),
        ("EulerDiscreteScheduler", EulerDiscreteScheduler, False),
        ("euler_karras", EulerDiscreteScheduler, True),
        ("Euler A", EulerAncestralDiscreteScheduler, None),
        ("ddim", DDIMScheduler, None),
        ("lms", LMSDiscreteScheduler, False),
        ("dpm++2m-karras", DPMSolverMultistepScheduler, True),
        ("DPMSolverMultistepScheduler", DPMSolverMultistepScheduler, False),
        ("dpmsolvermultistepscheduler", DPMSolverMultistepScheduler, False),
    ],
)
def test_scheduler_from_name(name, cls, karras):
    sched = scheduler_from_name(name, SD_CONFIG)
    assert type(sched) is cls and sched.beta_schedule == "scaled_linear" and sched.steps_offset == 1
    if karras is not None:
        assert sched.use_karras_sigmas is karras
    # As diffusers' XScheduler.from_config(pipe.scheduler.config): same config, same schedule.
    ref = getattr(diffusers, cls.__name__).from_config({**SD_CONFIG, **sched.config})
    with CorrectlyRoundedSqrt():
        ref.set_timesteps(7)
    np.testing.assert_array_equal(np.asarray(sched.set_timesteps(7).timesteps), ref.timesteps.numpy())


@pytest.mark.parametrize("name", ["euler", "euler-a", "lms", "dpm++2m-karras", "DDIMScheduler", "pndm"])
def test_swapping_a_loaded_sd15_scheduler_takes_the_new_classes_defaults_like_diffusers(name):
    """`pipe.set_scheduler(name)` on SD 1.5's loaded scheduler, as diffusers'
    `XScheduler.from_config(pipe.scheduler.config)`: keys SD 1.5's file does not give (timestep_spacing:
    "leading" for PNDM/DDIM, "linspace" for the others) take the new class's defaults, not PNDM's."""
    loaded = scheduler_from_config(SD_CONFIG)
    swapped = scheduler_from_name(name, loaded.config)
    _, overrides = dict(SCHEDULER_ALIASES).get(name, (None, {}))
    ref_loaded = diffusers.PNDMScheduler.from_config(SD_CONFIG)
    ref = getattr(diffusers, type(swapped).__name__).from_config(ref_loaded.config, **overrides)
    assert swapped.timestep_spacing == ref.config.timestep_spacing
    with CorrectlyRoundedSqrt():
        ref.set_timesteps(7)
    np.testing.assert_array_equal(np.asarray(swapped.set_timesteps(7).timesteps), ref.timesteps.numpy())
    # A key the file did give is kept whatever the new class's default.
    explicit = scheduler_from_config({**SD_CONFIG, "timestep_spacing": "trailing"})
    assert scheduler_from_name(name, explicit.config).timestep_spacing == "trailing"


def test_scheduler_from_name_keeps_class_name_settings_and_rejects_unknown():
    dpm3 = {**SD_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}
    assert scheduler_from_name("DPMSolverMultistepScheduler", dpm3).solver_order == 3
    assert scheduler_from_name("dpm++2m", dpm3).solver_order == 2
    with pytest.raises(ValueError, match="unknown scheduler 'heun'.*euler"):
        scheduler_from_name("heun", SD_CONFIG)


def test_torch_linspace_emulation():
    for start, end, n in [(1e-4, 0.02, 1000), (0.00085**0.5, 0.012**0.5, 1000), (0.1, 0.3, 7), (0.5, 0.5, 1)]:
        expected = torch.linspace(start, end, n, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(base.torch_linspace_f32(start, end, n), expected)


def test_lms_coefficients_match_quadrature():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    sigmas = np.array([14.6, 7.1, 3.2, 1.4, 0.6, 0.2, 0.0])
    coeffs = lms_coefficients(sigmas)
    for t in range(len(sigmas) - 1):
        order = min(t + 1, 4)
        for j in range(order):

            def basis(tau, t=t, j=j, order=order):
                return np.prod(
                    [(tau - sigmas[t - k]) / (sigmas[t - j] - sigmas[t - k]) for k in range(order) if k != j]
                )

            expected = scipy_integrate.quad(basis, sigmas[t], sigmas[t + 1], epsrel=1e-12)[0]
            assert coeffs[t, j] == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert (coeffs[t, order:] == 0).all()
