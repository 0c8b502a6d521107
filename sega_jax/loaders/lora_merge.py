"""LoRA adapter state and merging: `LoraState` (the adapters a pipeline holds, which are active or fused,
the original weights) and the arithmetic that merges each layer's `scale * up @ down` into our weights.

The weight delta is computed straight in our layout (`sega_jax.models.weights`: linear (in, out), conv HWIO);
the public entry points are in `sega_jax.loaders.lora`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sega_jax.loaders.lora_formats import Adapter, LoraError, LoraLayer
from sega_jax.models.weights import from_torch_layout, torch_parameter_layouts


@dataclasses.dataclass
class LoraState:
    """The adapters a pipeline holds. `originals`: each touched weight before any LoRA (restored exactly);
    `active`: adapter -> weight (unfused); `fused`: adapter -> (lora_scale, weight) merged by `fuse_lora`.
    Both are merged into the weights the same way, on the host, whenever they change (see the README)."""

    adapters: dict[str, Adapter] = dataclasses.field(default_factory=dict)
    active: dict[str, float] = dataclasses.field(default_factory=dict)
    fused: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    originals: dict[str, dict[str, object]] = dataclasses.field(default_factory=dict)


def layer_delta(layer: LoraLayer, kind: str, shape: tuple[int, ...], coefficient: float = 1.0,
                key: str = "") -> np.ndarray:
    """`coefficient * scale * up @ down` computed straight in our layout (fp32, contiguous) for a weight of
    `shape` and layout `kind` (linear (in, out); conv HWIO)."""
    down, up = layer.down.astype(np.float32), layer.up.astype(np.float32)
    rank = down.shape[0]
    up2 = up.reshape(up.shape[0], rank) * np.float32(coefficient * layer.scale)  # (out, r)
    if kind == "linear":
        delta = np.dot(down.reshape(rank, -1).T, up2.T)  # (in, out)
    elif kind == "conv":
        spatial = down if down.ndim == 4 else down[:, :, None, None]
        delta = np.tensordot(spatial.transpose(2, 3, 1, 0), up2.T, axes=1)  # (kh, kw, in, out)
    else:
        raise LoraError(f"{key}: LoRA on a {kind!r} parameter is not supported")
    if tuple(delta.shape) != tuple(shape):
        raise LoraError(f"{key}: the LoRA update has shape {delta.shape} in our layout, the weight {shape}")
    return delta


def effective(state: LoraState) -> dict[str, float]:
    """Adapter -> the coefficient its update is merged with (active weight, or lora_scale x weight)."""
    merged = {**state.active, **{n: s * w for n, (s, w) in state.fused.items()}}
    return {n: c for n, c in merged.items() if c != 0}


def merged_weights(state: LoraState, component: str, kinds: Mapping[str, str]) -> dict[str, object]:
    """Each touched weight of `component`: its original plus every fused and active adapter's update."""
    coefficients = effective(state)
    out = {}
    for key, original in state.originals.get(component, {}).items():
        terms = [(c, state.adapters[n][component][key]) for n, c in coefficients.items()
                 if key in state.adapters[n].get(component, {})]
        if not terms:
            out[key] = original
            continue
        update = layer_delta(terms[0][1], kinds[key], original.shape, terms[0][0], key)
        for coefficient, layer in terms[1:]:
            update += layer_delta(layer, kinds[key], original.shape, coefficient, key)
        out[key] = jnp.asarray(np.asarray(original, np.float32) + update, original.dtype)
    return out


def check_shapes(adapter: Adapter, models: Mapping[str, nnx.Module], source: str = "LoRA") -> None:
    """Every layer's update fits its weight (raises before anything is changed; computes no update)."""
    for component, layers in adapter.items():
        table = torch_parameter_layouts(models[component])
        for key, layer in layers.items():
            param, kind = table[key]
            fits = layer.down.ndim >= 2 and layer.up.ndim >= 2 and layer.up.shape[1] == layer.down.shape[0]
            shape = (layer.up.shape[0], *layer.down.shape[1:])
            if fits and kind == "conv" and len(shape) == 2:
                shape = (*shape, 1, 1)
            ours = from_torch_layout(np.broadcast_to(np.float32(0), shape), kind).shape if fits else None
            if ours != tuple(param.shape):
                raise LoraError(f"{source}: {component}.{key}: lora_A {layer.down.shape} and lora_B "
                                f"{layer.up.shape} do not fit the weight (ours {tuple(param.shape)})")


def apply(state: LoraState, models: Mapping[str, nnx.Module], previous: LoraState | None = None) -> None:
    """Write the merged weights into the models' parameters (originals recorded on first touch); nothing
    to do when the merged coefficients equal those of `previous` (e.g. `fuse_lora` at scale 1)."""
    if previous is not None and effective(previous) == effective(state) \
            and previous.adapters.keys() == state.adapters.keys():
        return
    for component, model in models.items():
        table = torch_parameter_layouts(model)
        originals = state.originals.setdefault(component, {})
        for adapter in state.adapters.values():
            for key in adapter.get(component, {}):
                originals.setdefault(key, table[key][0][...])
        kinds = {key: table[key][1] for key in originals}
        for key, value in merged_weights(state, component, kinds).items():
            table[key][0].set_value(value)
