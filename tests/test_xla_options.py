"""sega-jax's programs compile without YNNPACK convolutions on x86-64 CPUs, and only its own programs."""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import pytest

from sega_jax import xla_options

X86_CPU = jax.default_backend() == "cpu" and platform.machine().lower() in ("x86_64", "amd64")


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _compiled_text(options: dict) -> str:
    x, w = jnp.ones((2, 32, 32, 32)), jnp.ones((3, 3, 32, 32))  # the tiny UNet's size
    return jax.jit(_conv, compiler_options=options).lower(x, w).compile().as_text()


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch):
    monkeypatch.delenv(xla_options.ENV_VAR, raising=False)
    xla_options.compiler_options.cache_clear()
    yield
    xla_options.compiler_options.cache_clear()


@pytest.mark.skipif(not X86_CPU, reason="the option is only chosen on x86-64 CPU backends")
def test_convolutions_leave_ynnpack_only_in_our_programs():
    options = xla_options.compiler_options()
    assert options == xla_options.CPU_OPTIONS
    assert "__ynn_fusion" in _compiled_text({})  # XLA's default here: YNNPACK convolutions
    assert "__ynn_fusion" not in _compiled_text(options)


def test_env_var_restores_xla_defaults(monkeypatch):
    monkeypatch.setenv(xla_options.ENV_VAR, "1")
    assert xla_options.compiler_options() == {}


def test_jit_wrapper_matches_plain_jit_and_keeps_static_arguments():
    calls = []

    @xla_options.jit(static_argnames=("power",))
    def f(x, power):
        calls.append(power)
        return _conv(x, jnp.ones((3, 3, 4, 4))) ** power

    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 4))
    expected = _conv(x, jnp.ones((3, 3, 4, 4))) ** 2
    assert jnp.allclose(f(x, power=2), expected, rtol=1e-5, atol=1e-5)
    f(x, power=2)
    assert calls == [2]  # traced once, then served from the compiled program
    assert f.__name__ == "f"
