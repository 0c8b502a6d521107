"""Where data-parallel programs run and how their inputs are laid out over the devices.

The device set (`resolve_devices`) and each process's share of a batch (`process_share`); the ('data',) mesh
axis (`AXIS`) and the partition spec of a batch axis (`spec`); splitting a batch axis into (devices,
per-device) for `pmap` and merging it back (`split_for_pmap`, `merge_from_pmap`); and a pipeline's weights
replicated onto a device set once and cached (`replicated`, counted in `REPLICATIONS`). Used by
`parallel` (SEGA sampling) and `null_text` (inversion).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MODES = ("jit", "pmap")
AXIS = "data"
REPLICATIONS = {"count": 0}  # weight replications onto a device set; tests check they happen once

_REPLICATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_devices(devices: Sequence[Any] | int | None = None) -> tuple:
    """The devices to use: all local ones, the first `devices` local ones (an int), or those given."""
    local = tuple(jax.local_devices())
    if devices is None:
        return local
    if isinstance(devices, int):
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices={devices}: this process has {len(local)} local device(s)")
        return local[:devices]
    devices = tuple(devices)
    if not devices:
        raise ValueError("devices: empty device list")
    return devices


def process_share(
    count: int, process_index: int | None = None, process_count: int | None = None
) -> np.ndarray:
    """Indices of `count` items that this process takes: a contiguous, near-equal share."""
    index = jax.process_index() if process_index is None else process_index
    total = jax.process_count() if process_count is None else process_count
    return np.array_split(np.arange(count), total)[index]


def spec(axis):
    """The partition spec of an array whose batch is on `axis` (None: replicated)."""
    return P() if axis is None else P(*([None] * axis), AXIS)


def replicated(pipe, devices: tuple, part: str = "unet"):
    """The pipeline's `part` ("unet" or "vae") state replicated on `devices`, cached per pipeline.

    Both entry points take the same replicated arrays (pmap accepts them without copying).
    """
    source = pipe.unet_parts[1] if part == "unet" else pipe.vae_parts[1]
    cache = _REPLICATED.setdefault(pipe, {})
    key = (part, devices)
    if key not in cache or cache[key][0] is not source:
        sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), P())
        REPLICATIONS["count"] += 1
        cache[key] = (source, jax.device_put(source, sharding))
    return cache[key][1]


def split_for_pmap(x, axis: int | None, devices: int):
    """(..., B, ...) -> (..., devices, B // devices, ...) at `axis`; None or a replicated input unchanged."""
    if x is None or axis is None:
        return x
    shape = x.shape
    return x.reshape(*shape[:axis], devices, shape[axis] // devices, *shape[axis + 1 :])


def merge_from_pmap(x, axis: int):
    """`split_for_pmap` undone: (..., devices, per-device, ...) at `axis` -> (..., B, ...)."""
    if x is None:
        return x
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2 :])
