"""LoRA file formats: reading a LoRA file, folder or dict, and mapping its keys onto our weight keys.

Formats (SD 1.x/2.x and SDXL):
- diffusers / peft: `unet.<module>.lora_A.weight` / `lora_B.weight` (and `text_encoder.`, `text_encoder_2.`),
  alpha from the file's `lora_adapter_metadata` (`lora_alpha`, `alpha_pattern`, `use_rslora`) or a
  `<module>.alpha` tensor, else alpha = rank (scale 1), as diffusers. The older diffusers names
  (`.lora.down/.lora.up`, `attn1.processor.to_q_lora.down`, `q_proj.lora_linear_layer.down`) are read too.
- kohya / A1111: `lora_unet_<flat_module>.lora_down.weight` / `lora_up.weight` / `alpha`, `lora_te_` (SD),
  `lora_te1_` / `lora_te2_` (SDXL), module names in diffusers' layout or in the original (SGM/LDM)
  `input_blocks_4_1_...` layout.

Also here: the parsed adapter's types (`LoraLayer`, `Adapter`) and `LoraError`. The public entry points are in
`sega_jax.loaders.lora`; the merging arithmetic in `sega_jax.loaders.lora_merge`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from sega_jax.models.weights import read_safetensors, torch_parameter_layouts

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DEFAULT_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
_PEFT = re.compile(r"^(.*)\.(lora_A|lora_B)\.weight$")
_KOHYA = re.compile(r"^(.*)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# diffusers' older names -> peft's (module path, role).
_LEGACY = [(re.compile(r"\.processor\.(to_q|to_k|to_v)_lora\.(down|up)\.weight$"), r".\1.\2.weight"),
           (re.compile(r"\.processor\.to_out_lora\.(down|up)\.weight$"), r".to_out.0.\1.weight"),
           (re.compile(r"\.lora_linear_layer\.(down|up)\.weight$"), r".\1.weight"),
           (re.compile(r"\.lora\.(down|up)\.weight$"), r".\1.weight")]
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this pipeline; the message names the keys or file."""


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One LoRA layer in torch's layout: down (r, in[, kh, kw]), up (out, r[, 1, 1]), scale alpha/r."""

    down: np.ndarray
    up: np.ndarray
    scale: float


Adapter = dict[str, dict[str, LoraLayer]]  # component -> our weight key -> layer


# -- reading -------------------------------------------------------------------------------------------


def _safetensors_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    raw = header.get("__metadata__", {}).get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy() if value.dtype.is_floating_point else value.numpy()
    return np.asarray(value)


def _lora_file(path: Path, weight_name: str | None) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise LoraError(f"{path}: LoRA file or folder not found")
    names = (weight_name,) if weight_name else DEFAULT_WEIGHT_NAMES
    for name in names:
        if (path / name).is_file():
            return path / name
    raise LoraError(f"{path}: no LoRA weights found (looked for {', '.join(names)})")


def read_lora(source, weight_name: str | None = None, *,
              allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, diffusers' adapter metadata) from a dict, a file, or a folder (+ `weight_name`)."""
    if isinstance(source, Mapping):
        return {k: _to_numpy(v) for k, v in source.items()}, {}
    path = _lora_file(Path(source), weight_name)
    if path.suffix == ".safetensors":
        return dict(read_safetensors(path)), _safetensors_metadata(path)
    if not allow_pickle:
        raise LoraError(f"{path}: not a .safetensors file; a pickled file can execute code when loaded. Pass "
                        "allow_pickle=True to read it (with torch's weights_only=True), or convert it.")
    import torch  # only for opted-in pickled files

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: _to_numpy(v) for k, v in state.items()}, {}


# -- key mapping -----------------------------------------------------------------------------------------


def _module_names(model: nnx.Module) -> dict[str, tuple[str, str]]:
    """Our module path -> (its weight key, layout kind), for every layer with a `weight`."""
    return {key[: -len(".weight")]: (key, kind) for key, (_, kind) in torch_parameter_layouts(model).items()
            if key.endswith(".weight")}


def _resolve(name: str, modules: Mapping[str, tuple[str, str]]) -> str | None:
    for candidate in (name, f"text_model.{name}"):  # transformers 5 leaves `text_model.` off CLIP's keys
        if candidate in modules:
            return candidate
    return None


def _pattern_value(patterns: Mapping, name: str, default):
    """peft's `rank_pattern` / `alpha_pattern` lookup: a key matches a module path suffix (a regex)."""
    for key, value in patterns.items():
        if name == key or re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_scale(metadata: dict, component: str, name: str, rank: int, alpha_tensor) -> float:
    get = lambda k, d=None: metadata.get(f"{component}.{k}", d)
    if alpha_tensor is not None:
        alpha = float(np.asarray(alpha_tensor))
    elif get("lora_alpha") is not None:
        alpha = float(_pattern_value(get("alpha_pattern") or {}, name, get("lora_alpha")))
    else:
        alpha = float(rank)
    return alpha / (np.sqrt(rank) if get("use_rslora") else rank)


def _legacy_to_peft(key: str) -> str:
    for pattern, repl in _LEGACY:
        if pattern.search(key):
            key = pattern.sub(repl, key)
            return key.replace(".down.weight", ".lora_A.weight").replace(".up.weight", ".lora_B.weight")
    return key


def _group_peft(tensors: dict[str, np.ndarray]) -> tuple[dict, list[str]]:
    """{(component, module): {"lora_A"|"lora_B"|"alpha": tensor}} and the keys that fit no pattern."""
    groups, unknown = {}, []
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        peft_key = _legacy_to_peft(rest)
        match = _PEFT.match(peft_key)
        role = match and match.group(2)
        module = match and match.group(1)
        if not match and peft_key.endswith(".alpha"):
            module, role = peft_key[: -len(".alpha")], "alpha"
        if component not in COMPONENTS or not role:
            unknown.append(key)
            continue
        group = groups.setdefault((component, module), {"keys": []})
        group[role] = value
        group["keys"].append(key)
    return groups, unknown


def _sgm_to_diffusers(flat: str, layers_per_block: int) -> str:
    """kohya's original-UNet names (`input_blocks_4_1_...`) in diffusers' flat names (`down_blocks_1_...`)."""
    per = layers_per_block + 1
    if m := re.match(r"input_blocks_(\d+)_(\d+)_(.*)$", flat):
        i, inner, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        block, layer = (i - 1) // per, (i - 1) % per
        if layer == layers_per_block:
            return f"down_blocks_{block}_downsamplers_0_{rest.replace('op', 'conv', 1)}"
        return f"down_blocks_{block}_{'attentions' if inner else 'resnets'}_{layer}_{_sgm_resnet(rest)}"
    if m := re.match(r"middle_block_(\d)_(.*)$", flat):
        part = {"0": "resnets_0", "1": "attentions_0", "2": "resnets_1"}[m.group(1)]
        return f"mid_block_{part}_{_sgm_resnet(m.group(2))}"
    if m := re.match(r"output_blocks_(\d+)_(\d+)_(.*)$", flat):
        i, inner, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        block, layer = i // per, i % per
        if rest == "conv" and inner > 0:  # the block's upsampler (after its attention, if any)
            return f"up_blocks_{block}_upsamplers_0_conv"
        return f"up_blocks_{block}_{'attentions' if inner else 'resnets'}_{layer}_{_sgm_resnet(rest)}"
    return flat


def _sgm_resnet(rest: str) -> str:
    return _SGM_RESNET.get(rest, rest)


def _group_kohya(tensors: dict[str, np.ndarray], flat_names: dict[str, dict[str, str]],
                 layers_per_block: int) -> tuple[dict, list[str]]:
    groups, unknown = {}, []
    for key, value in tensors.items():
        prefix = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        match = _KOHYA.match(key)
        if prefix is None or match is None:
            unknown.append(key)
            continue
        component = KOHYA_PREFIXES[prefix]
        flat = match.group(1)[len(prefix):]
        flat = _sgm_to_diffusers(flat, layers_per_block) if component == "unet" else flat
        module = flat_names.get(component, {}).get(flat)
        if module is None:
            unknown.append(key)
            continue
        role = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B"}.get(match.group(2), "alpha")
        group = groups.setdefault((component, module), {"keys": []})
        group[role] = value
        group["keys"].append(key)
    return groups, unknown


def _flat_names(modules: dict[str, dict[str, tuple[str, str]]]) -> dict[str, dict[str, str]]:
    table = {}
    for component, names in modules.items():
        flat = table.setdefault(component, {})
        for name in names:
            for alias in {name, name.removeprefix("text_model.")}:
                flat.setdefault(alias.replace(".", "_"), name)
    return table


def _names(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def parse_adapter(tensors: dict[str, np.ndarray], metadata: dict, models: Mapping[str, nnx.Module],
                  layers_per_block: int = 2, source: str = "LoRA") -> Adapter:
    """Map a LoRA state dict onto `models` ({"unet": ..., "text_encoder": ..., ...}); every key must fit."""
    modules = {name: _module_names(model) for name, model in models.items()}
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors):
        groups, unknown = _group_kohya(tensors, _flat_names(modules), layers_per_block)
    else:
        groups, unknown = _group_peft(tensors)
    if any("lora_magnitude_vector" in k or k.endswith(".dora_scale") for k in tensors):
        raise LoraError(f"{source}: DoRA adapters (magnitude vectors) are not supported")
    adapter: Adapter = {}
    for (component, module), parts in groups.items():
        name = _resolve(module, modules.get(component, {}))
        if name is None:
            unknown += parts["keys"]
            continue
        if not {"lora_A", "lora_B"} <= set(parts):
            unknown += [f"{k} (lora_A/lora_B incomplete)" for k in parts["keys"]]
            continue
        down, up = parts["lora_A"], parts["lora_B"]
        scale = _peft_scale(metadata, component, module, down.shape[0], parts.get("alpha"))
        adapter.setdefault(component, {})[modules[component][name][0]] = LoraLayer(down, up, scale)
    if unknown:
        raise LoraError(f"{source}: {len(unknown)} key(s) match no LoRA layer of this pipeline "
                        f"({', '.join(sorted(models))}): {_names(sorted(unknown))}")
    return adapter
