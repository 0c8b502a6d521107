"""Shared test utilities: the parity measure every reference test uses."""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx


def max_rel_diff(ours, reference) -> float:
    """max |ours - reference| / max |reference| (the project's parity measure)."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, f"shape {ours.shape} != reference {reference.shape}"
    scale = np.abs(reference).max()
    return float(np.abs(ours - reference).max() / (scale if scale > 0 else 1.0))


def beyond_one_rounding(got, exact, dtype) -> float:
    """How far `got` (in half-precision `dtype`) is beyond one rounding of the fp32 `exact`: the largest
    |got - exact| - u |exact| (u: `dtype`'s unit roundoff), relative to max |exact|. Rounded once, it is fp32
    noise (arithmetic in another order)."""
    got, exact = np.asarray(got, np.float64), np.asarray(exact, np.float64)
    unit = 2.0 ** -(np.finfo(dtype).nmant + 1)
    return float((np.abs(got - exact) - unit * np.abs(exact)).max() / np.abs(exact).max())


def in_fp32(module: nnx.Module) -> nnx.Module:
    """A copy of `module` with every parameter upcast to fp32 (exactly): the fp32 computation a
    half-precision module's result is one rounding of."""
    state = jax.tree.map(lambda p: p.astype(np.float32), nnx.state(module))
    return nnx.merge(nnx.graphdef(module), state)


def jit_module_call(fn: Callable) -> Callable:
    """`fn(module, *args)` compiled the way the pipelines compile models: `jax.jit` over the module's split
    state. (`nnx.jit` returns the module's state as outputs too: on XLA:CPU that holds a second copy of
    every weight through the call, 10 GB more for the SDXL UNet.)"""

    @functools.partial(jax.jit, static_argnums=0)
    def apply(graph, state, *args):
        return fn(nnx.merge(graph, state), *args)

    @functools.wraps(fn)
    def call(module, *args):
        return apply(*nnx.split(module), *args)

    return call


def nchw_to_nhwc(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


@contextlib.contextmanager
def reserved_port():
    """A TCP port for a `jax.distributed` coordinator, held for the whole `with` block.

    Choosing a free port and closing it before the coordinator binds it races with everything else on the
    machine. Here a socket bound to the port (SO_REUSEPORT, not listening) keeps it out of the kernel's hands
    for other programs, while the coordinator's gRPC server, which also sets SO_REUSEPORT, can bind it.
    """
    with socket.socket(socket.AF_INET6) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("::", 0))
        yield holder.getsockname()[1]
