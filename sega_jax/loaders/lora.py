"""LoRA weights as diffusers loads them: read, map onto our parameters, merge.

Every layer is one (down, up, scale) in torch's layout; its weight delta `scale * up @ down` is turned into
our layout with the same table as the checkpoint loader (`sega_jax.models.weights`). Any key that is not a
LoRA tensor of a known module is an error that names it (diffusers warns and drops some): a silently dropped
layer gives a different image with no sign of why.

This module holds the entry points (`load`, `activate`, `fuse`, `unfuse`, `load_loras`) and re-exports the
rest: the file formats and key mapping live in `sega_jax.loaders.lora_formats`, the adapter state
(`LoraState`) and the merging arithmetic in `sega_jax.loaders.lora_merge`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from flax import nnx

from sega_jax.loaders.lora_formats import (
    COMPONENTS,
    DEFAULT_WEIGHT_NAMES,
    KOHYA_PREFIXES,
    Adapter,
    LoraError,
    LoraLayer,
    parse_adapter,
    read_lora,
)
from sega_jax.loaders.lora_merge import LoraState, apply, check_shapes, effective, layer_delta, merged_weights

__all__ = ["Adapter", "COMPONENTS", "DEFAULT_WEIGHT_NAMES", "KOHYA_PREFIXES", "LoraError", "LoraLayer",
           "LoraState", "activate", "adapter_name", "apply", "check_shapes", "effective", "fuse",
           "layer_delta", "load", "load_loras", "merged_weights", "parse_adapter", "read_lora", "set_active",
           "unfuse"]


def adapter_name(state: LoraState, name: str | None) -> str:
    """diffusers' default names: default_0, default_1, ..."""
    if name is None:
        return f"default_{len(state.adapters)}"
    if name in state.adapters:
        raise LoraError(f"adapter name {name!r} is already in use; pick another or unload first")
    return name


def set_active(state: LoraState, names, weights=None) -> dict[str, float]:
    """diffusers' `set_adapters`: the named adapters with weights (default 1.0); all others off."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else weights
    weights = [weights] * len(names) if isinstance(weights, (int, float)) else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"set_adapters: {len(names)} adapter name(s) but {len(weights)} weight(s)")
    missing = [n for n in names if n not in state.adapters]
    if missing:
        raise ValueError(f"set_adapters: no adapter named {', '.join(missing)} "
                         f"(loaded: {', '.join(state.adapters) or 'none'})")
    return {n: float(w) for n, w in zip(names, weights, strict=True)}


def load(state: LoraState, source, models: Mapping[str, nnx.Module], *, name: str | None = None,
         weight_name: str | None = None, allow_pickle: bool = False, layers_per_block: int = 2) -> LoraState:
    """A new state with the adapter from `source` added and active at weight 1.0 (nothing applied yet)."""
    name = adapter_name(state, name)
    label = "LoRA dict" if isinstance(source, Mapping) else os.fspath(source)
    tensors, metadata = read_lora(source, weight_name, allow_pickle=allow_pickle)
    adapter = parse_adapter(tensors, metadata, models, layers_per_block, label)
    check_shapes(adapter, models, label)
    return dataclasses.replace(state, adapters={**state.adapters, name: adapter},
                               active={**state.active, name: 1.0})


def activate(state: LoraState, names, weights=None) -> LoraState:
    """diffusers' `set_adapters`; refused while adapters are fused (unfuse first)."""
    if state.fused:
        raise LoraError("set_adapters: LoRAs are fused into the weights; call unfuse_lora() first")
    if isinstance(weights, Mapping):
        raise TypeError("set_adapters: per-component weights (dicts) are not supported; pass floats")
    return dataclasses.replace(state, active=set_active(state, names, weights))


def fuse(state: LoraState, lora_scale: float = 1.0, adapter_names=None) -> LoraState:
    """diffusers' `fuse_lora`: the active (or named) adapters merged at `lora_scale` x their weights."""
    names = list(state.active) if adapter_names is None else list(adapter_names)
    missing = [n for n in names if n not in state.active]
    if missing:
        raise LoraError(f"fuse_lora: {', '.join(missing)} not active (active: {', '.join(state.active)})")
    fused = {**state.fused, **{n: (float(lora_scale), state.active[n]) for n in names}}
    return dataclasses.replace(state, fused=fused,
                               active={n: w for n, w in state.active.items() if n not in fused})


def unfuse(state: LoraState) -> LoraState:
    """diffusers' `unfuse_lora`: fused adapters become active (unfused) again at their weights."""
    return dataclasses.replace(state, fused={},
                               active={**state.active, **{n: w for n, (_, w) in state.fused.items()}})


def load_loras(pipe, loras: list[tuple[str, float]]) -> None:
    """Load several LoRA files (`lora_0`, `lora_1`, ...) into a pipeline and set their scales."""
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora_{i}")
    if loras:
        pipe.set_adapters([f"lora_{i}" for i in range(len(loras))], [scale for _, scale in loras])
