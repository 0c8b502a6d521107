"""diffusers/transformers checkpoint folders -> Flax NNX modules, with no torch at run time.

Our modules name their parameters like the checkpoint (see `sega_jax.models.layers`), so the mapping
from a checkpoint key to a parameter is the identity on names; only the tensor layout changes:

    layout      torch tensor                ours
    ---------   -------------------------   ---------------------------
    conv        (out, in, kh, kw)           (kh, kw, in, out)
    linear      (out, in) or (out, in,1,1)  (in, out)
    identity    any                         the same

Weights are read from `*.safetensors` (single, `variant` such as "fp16", or sharded with an index
file). Pickled `*.bin` files are read only when the caller passes `allow_pickle=True`, and then with
torch's `weights_only=True`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model")
PICKLE_PREFIXES = ("diffusion_pytorch_model", "pytorch_model")

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

_LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda t: np.transpose(t, (2, 3, 1, 0)),
    "linear": lambda t: np.transpose(t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t),
    "identity": lambda t: t,
}

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


class WeightLoadError(ValueError):
    """A checkpoint folder or file could not be turned into a model; the message names the file/key."""


def resolve_dtype(dtype) -> jnp.dtype | None:
    """Accept None, a jnp dtype or a name ("bf16", "float16", ...); anything else is an error."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        return jnp.dtype(DTYPES[dtype])
    resolved = jnp.dtype(dtype)
    if resolved not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {resolved}")
    return resolved


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightLoadError(f"{path}: not valid JSON ({err})") from err


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a .safetensors file into numpy arrays (memory-mapped; bf16 through ml_dtypes)."""
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightLoadError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise WeightLoadError(
                f"{path}: corrupt safetensors file (header length {header_len} > file size)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise WeightLoadError(f"{path}: corrupt safetensors file (unreadable header: {err})") from err
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len) if size > 8 + header_len else None
    tensors = {}
    for key, info in header.items():
        tensors[key] = _tensor_from_header(path, key, info, data, size - 8 - header_len)
    return tensors


def _tensor_from_header(path: Path, key: str, info: dict, data, data_size: int) -> np.ndarray:
    try:
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = tuple(int(d) for d in info["shape"])
        start, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise WeightLoadError(f"{path}: corrupt safetensors entry for tensor {key!r} ({err!r})") from err
    expected = int(np.prod(shape)) * dtype.itemsize
    if not 0 <= start <= end <= data_size or end - start != expected:
        raise WeightLoadError(
            f"{path}: corrupt safetensors file: tensor {key!r} needs bytes {start}..{end} "
            f"({expected} expected, {data_size} available)")
    if expected == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=start).reshape(shape)


def _variant_name(name: str, variant: str | None) -> str:
    """diffusers' `_add_variant`: insert the variant before the last dotted part."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant, parts[-1]])


def find_weight_files(folder: str | os.PathLike, *, variant: str | None = None,
                      allow_pickle: bool = False) -> list[Path]:
    """The weight files of one model folder, in load order. Raises naming what was looked for."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightLoadError(f"{folder}: model folder not found")
    tried = []
    for prefix in WEIGHT_PREFIXES:
        single = folder / _variant_name(f"{prefix}.safetensors", variant)
        index = folder / _variant_name(f"{prefix}.safetensors.index.json", variant)
        tried += [single.name, index.name]
        if single.is_file():
            return [single]
        if index.is_file():
            return _shards_from_index(index)
    for prefix in PICKLE_PREFIXES:
        pickled = folder / _variant_name(f"{prefix}.bin", variant)
        if pickled.is_file():
            if not allow_pickle:
                raise WeightLoadError(
                    f"{pickled}: only a pickled .bin checkpoint was found; loading it can execute code. "
                    "Pass allow_pickle=True to load it (with torch's weights_only=True), or convert it to "
                    "safetensors.")
            return [pickled]
    raise WeightLoadError(f"{folder}: no weights found (looked for {', '.join(tried)})")


def _shards_from_index(index: Path) -> list[Path]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightLoadError(f"{index}: index file has no 'weight_map'")
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise WeightLoadError(f"{shard}: shard listed in {index.name} not found")
    return shards


def _read_pickled(path: Path) -> dict[str, np.ndarray]:
    import torch  # only for opted-in .bin files

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


def read_weights(files: list[Path]) -> dict[str, tuple[np.ndarray, Path]]:
    """All tensors of a checkpoint, each with the file it came from (for error messages)."""
    tensors: dict[str, tuple[np.ndarray, Path]] = {}
    for path in files:
        loaded = _read_pickled(path) if path.suffix == ".bin" else read_safetensors(path)
        for key, value in loaded.items():
            tensors[key] = (value, path)
    return tensors


def torch_parameter_layouts(model: nnx.Module) -> dict[str, tuple[nnx.Param, str]]:
    """Checkpoint key -> (our parameter, its layout), from each layer's TORCH_LAYOUT."""
    table = {}
    for path, node in nnx.iter_graph(model):
        layout = getattr(type(node), "TORCH_LAYOUT", None)
        if layout is None:
            continue
        prefix = ".".join(str(p) for p in path)
        for name, kind in layout.items():
            param = getattr(node, name, None)
            if param is not None:
                table[f"{prefix}.{name}" if prefix else name] = (param, kind)
    return table


def assign_weights(model: nnx.Module, tensors: dict[str, tuple[np.ndarray, Path]], *, source: str,
                   dtype=None, rename: Callable[[str], str] | None = None,
                   ignore: Callable[[str], bool] | None = None) -> nnx.Module:
    """Fill every parameter of `model` from `tensors`; every tensor must be used, every shape match.

    `rename` maps legacy checkpoint keys onto ours; `ignore` marks keys that are known not to be
    parameters (e.g. transformers' `position_ids` buffer).
    """
    dtype = resolve_dtype(dtype)
    table = torch_parameter_layouts(model)
    renamed = {}
    for key, entry in tensors.items():
        if ignore is not None and ignore(key):
            continue
        new_key = rename(key) if rename else key
        if new_key in renamed:
            raise WeightLoadError(f"{entry[1]}: tensors {renamed[new_key][0]!r} and {key!r} both map to "
                                  f"parameter {new_key!r}")
        renamed[new_key] = (key, *entry)
    missing = sorted(set(table) - set(renamed))
    if missing:
        raise WeightLoadError(f"{source}: missing tensor(s) {', '.join(missing[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    unexpected = sorted(set(renamed) - set(table))
    if unexpected:
        files = sorted({str(renamed[k][2]) for k in unexpected})
        names = [renamed[k][0] for k in unexpected[:8]]
        raise WeightLoadError(f"{', '.join(files)}: unexpected tensor(s) {', '.join(names)}"
                              + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    for key, (param, kind) in table.items():
        original_key, array, path = renamed[key]
        value = _LAYOUTS[kind](np.asarray(array))
        if tuple(value.shape) != tuple(param.shape):
            raise WeightLoadError(f"{path}: tensor {original_key!r} has shape {tuple(array.shape)}, "
                                  f"expected {_torch_shape(param.shape, kind)} for this model's config")
        # Converted on the host (one rounding, as XLA's convert): `jnp.asarray(value, dtype)` would compile
        # a conversion program per tensor shape, and hold ~200 MB of them for SD 1.5 in bf16.
        target = np.dtype(dtype or param.dtype)
        if value.dtype != target:
            value = value.astype(np.float32, copy=False).astype(target)
        param.set_value(jnp.asarray(value))
        release_pages(array)
    return model


def release_pages(array: np.ndarray) -> None:
    """Drop a memory-mapped tensor's pages from this process's resident memory once it has been copied
    (the kernel keeps them in its page cache, and a later read maps them again). Without this the whole file
    stays resident beside the copies until loading ends: an fp32 SD 1.5 folder loaded in bf16 peaked at
    5.3 GB for 2.1 GB of weights (issue 16, scripts/dtype_memory.py)."""
    owner = array
    while isinstance(owner, np.ndarray) and not isinstance(owner, np.memmap):
        owner = owner.base  # a view's base; a torch-owned array (pickled .bin) ends at a Tensor
    mapping = getattr(owner, "_mmap", None) if isinstance(owner, np.memmap) else None
    if not isinstance(mapping, mmap.mmap) or array.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    mapping_start = owner.ctypes.data - owner.offset % mmap.ALLOCATIONGRANULARITY
    start = array.ctypes.data - mapping_start
    first = start - start % mmap.PAGESIZE
    end = min(len(mapping), -(-(start + array.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
    mapping.madvise(mmap.MADV_DONTNEED, first, end - first)


# Our layout -> torch's (the inverse of `_LAYOUTS`): conv HWIO -> OIHW, linear (in, out) -> (out, in).
_TO_TORCH_AXES = {"conv": (3, 2, 0, 1), "linear": (1, 0)}


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    axes = _TO_TORCH_AXES.get(kind)
    return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def from_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    """A checkpoint (torch-layout) tensor in our layout (the inverse of `to_torch_layout`)."""
    return _LAYOUTS[kind](value)


def to_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    """One of our parameters in the checkpoint's (torch's) layout, for writing a diffusers folder."""
    axes = _TO_TORCH_AXES.get(kind)
    return value if axes is None else np.transpose(value, axes)


def load_model(build: Callable[[], nnx.Module], folder: str | os.PathLike, *, dtype=None,
               variant: str | None = None, allow_pickle: bool = False,
               rename: Callable[[str], str] | None = None,
               ignore: Callable[[str], bool] | None = None) -> nnx.Module:
    """Build a model abstractly (no random init, no memory for it) and fill it from `folder`."""
    files = find_weight_files(folder, variant=variant, allow_pickle=allow_pickle)
    tensors = read_weights(files)
    model = nnx.eval_shape(build)
    return assign_weights(model, tensors, source=str(folder), dtype=dtype, rename=rename, ignore=ignore)
