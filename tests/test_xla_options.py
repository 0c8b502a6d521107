"""sega-jax's programs compile without YNNPACK convolutions on x86-64 CPUs, and only its own programs."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from sega_jax.runtime import xla_options
from tests.parity_store import reference_case

ROOT = Path(__file__).resolve().parents[1]
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


# The library's own programs, compiled by a pipeline call (with a safety checker) and a sharded
# `parallel.generate`, next to a convolution jitted by "other code" in the same process; XLA dumps each
# program's compile options (`.debug_options`) and optimised HLO.
PROGRAMS_SCRIPT = '''
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sega_jax.pipelines import parallel
from sega_jax.models import safety_checker as sc
from sega_jax import load_pipeline

pipe = load_pipeline("tiny")
pipe.set_progress_bar_config(disable=True)
kw = dict(num_inference_steps=2, height=16, width=16, editing_prompt=["glasses"], edit_warmup_steps=0,
          output_type="np", seed=0)
pipe("a face", **kw)
parallel.generate(pipe, "a face", mode="jit", run_safety_checker=False, **kw)
sc.check_images(sc.load_safety_checker(sys.argv[1]), np.zeros((1, 32, 32, 3), np.float32))


def others_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


jax.jit(others_conv)(jnp.ones((2, 32, 32, 32)), jnp.ones((3, 3, 32, 32)))
'''
OURS = {"_denoise": "SEGA loop", "decode": "VAE decode", "encode_text": "text encoder",
        "_check": "safety checker", "run": "parallel.generate (sharded jit)"}


def _ynn_convolutions(hlo: str) -> tuple[int, int]:
    """(convolutions, convolutions inside a YNNPACK fusion) in an optimised HLO module's text."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        if line.startswith(("%", "ENTRY")) and line.rstrip().endswith("{"):
            name = line.split()[1 if line.startswith("ENTRY") else 0]
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)
    ynn = {m.group(1) for m in re.finditer(r"calls=(%[\w.\-]+)[^\n]*\"__ynn_fusion\"", hlo)}
    count = lambda names: sum("convolution(" in line for n in names for line in bodies[n])
    return count(bodies), count(ynn & bodies.keys())


def _checker_folder() -> Path:
    """A random safety checker (built with torch, or read from CI's parity store on the torch-free leg)."""
    def build(folder: Path) -> dict:
        from tests.test_safety_checker import _random_checker

        _random_checker().save_pretrained(folder)
        return {}

    return reference_case("xla-options-checker", build)[0]


@pytest.mark.skipif(not X86_CPU, reason="the option is only chosen on x86-64 CPU backends")
def test_our_jitted_programs_carry_the_options_and_other_code_does_not(tmp_path):
    dump = tmp_path / "dump"
    names = "|".join([*OURS, "others_conv"])
    env = {k: v for k, v in os.environ.items() if k != xla_options.ENV_VAR}
    env.update(JAX_PLATFORMS="cpu", SEGA_JAX_CACHE_DIR="off", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_module_re=^jit_({names})$")
    result = subprocess.run([sys.executable, "-c", PROGRAMS_SCRIPT, str(_checker_folder())], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    def program(name: str) -> tuple[str, str]:
        found = sorted(dump.glob(f"module_*.jit_{name}.debug_options"))
        assert found, f"no compiled program jit_{name} was dumped"
        hlo = found[0].with_name(found[0].name.replace(".debug_options", ".cpu_after_optimizations.txt"))
        return found[0].read_text(), hlo.read_text()

    wanted = sorted(f"xla_cpu_experimental_ynn_fusion_type: {v}" for v in xla_options.CPU_OPTIONS[
        "xla_cpu_experimental_ynn_fusion_type"].split(","))
    for name, what in OURS.items():
        options, hlo = program(name)
        assert sorted(line for line in options.splitlines() if "ynn_fusion_type" in line) == wanted, what
        convolutions, in_ynn = _ynn_convolutions(hlo)
        assert in_ynn == 0, f"{what}: {in_ynn} of {convolutions} convolutions left to YNNPACK"
        if name in ("_denoise", "decode", "run"):
            assert convolutions > 0, what
    options, hlo = program("others_conv")
    assert "ynn_fusion_type" not in options
    assert _ynn_convolutions(hlo) == (1, 1)  # XLA's default here: its convolution goes to YNNPACK


def _listener_with(monkeypatch, env: str | None = None):
    """`release_compiler_memory()` run afresh with a recording `malloc_trim`: (enabled, listeners, trims)."""
    trims, listeners = [], []
    monkeypatch.setattr(xla_options, "_malloc_trim", lambda: trims.append)
    monkeypatch.setattr(jax.monitoring, "register_event_duration_secs_listener", listeners.append)
    if env is None:
        monkeypatch.delenv(xla_options.RELEASE_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(xla_options.RELEASE_ENV_VAR, env)
    xla_options.release_compiler_memory.cache_clear()
    try:
        return xla_options.release_compiler_memory(), listeners, trims
    finally:
        xla_options.release_compiler_memory.cache_clear()


def test_compiler_memory_is_returned_after_long_compiles_only(monkeypatch):
    enabled, listeners, trims = _listener_with(monkeypatch)
    assert enabled and len(listeners) == 1
    listen = listeners[0]
    listen("/jax/core/compile/backend_compile_duration", 0.01)  # a small program: not worth a trim
    listen("/jax/core/compile/jaxpr_trace_duration", 30.0)  # not a compile
    assert trims == []
    listen("/jax/core/compile/backend_compile_duration", 11.3)
    assert trims == [0]


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_env_var_keeps_the_compiler_memory_listener_off(monkeypatch, value):
    enabled, listeners, _ = _listener_with(monkeypatch, value)
    assert not enabled and listeners == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_the_listener_is_installed_with_the_first_compile_options_and_trims_for_real():
    xla_options.compiler_options()
    assert xla_options.release_compiler_memory()  # cached: registered once, by compiler_options
    assert xla_options._malloc_trim()(0) in (0, 1)
