"""Loading a diffusers pipeline folder (or a hub id, when online) into our components; no torch."""

from __future__ import annotations

import os
from pathlib import Path

from sega_jax.builtin.demo import demo_folder
from sega_jax.models.clip import load_text_encoder
from sega_jax.models.image_processing import load_feature_extractor
from sega_jax.models.safety_checker import load_safety_checker
from sega_jax.models.tokenizer import load_tokenizer
from sega_jax.models.unet import load_unet
from sega_jax.models.vae import load_vae
from sega_jax.models.weights import read_json, resolve_dtype
from sega_jax.schedulers import load_scheduler

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_CLASSES = ("StableDiffusionXLPipeline", "SemanticStableDiffusionXLPipeline",
              "LEditsPPPipelineStableDiffusionXL", "StableDiffusionXLImg2ImgPipeline")


def model_index(folder: Path) -> dict:
    """The folder's `model_index.json` ({} when it has none: a folder assembled by hand)."""
    path = folder / "model_index.json"
    return read_json(path) if path.is_file() else {}


def is_xl_folder(folder: Path) -> bool:
    """An SDXL pipeline folder: its model_index names an SDXL class, or it has `text_encoder_2/`."""
    return model_index(folder).get("_class_name") in XL_CLASSES or (folder / "text_encoder_2").is_dir()


def load_components(path_or_hub_id: str | os.PathLike, *, dtype=None, variant: str | None = None,
                    allow_pickle: bool = False, xl: bool = False, **components) -> dict:
    """The pipeline's components from a diffusers folder; those passed in `components` are used as given.

    A folder's `safety_checker/` (with `feature_extractor/`) loads unless `safety_checker=None` is passed,
    diffusers' convention. `xl`: an SDXL folder (second text encoder and tokenizer, no safety checker,
    `force_zeros_for_empty_prompt` from model_index.json); an SDXL folder without `xl` is a clear error.
    """
    resolve_dtype(dtype)  # a bad dtype fails before any file is read
    folder = resolve_folder(path_or_hub_id, variant)
    if not xl and is_xl_folder(folder):
        raise ValueError(f"{path_or_hub_id}: an SDXL pipeline folder; load it with "
                         "SemanticStableDiffusionXLPipeline.from_pretrained (or sega_jax.load_pipeline)")
    load = dict(dtype=dtype, variant=variant, allow_pickle=allow_pickle)
    loaders = {
        "unet": lambda: load_unet(folder / "unet", **load),
        "vae": lambda: load_vae(folder / "vae", **load),
        "text_encoder": lambda: load_text_encoder(folder / "text_encoder", **load),
        "tokenizer": lambda: load_tokenizer(folder / "tokenizer"),
        "scheduler": lambda: load_scheduler(folder / "scheduler"),
    }
    if xl:
        loaders["text_encoder_2"] = lambda: load_text_encoder(folder / "text_encoder_2", **load)
        loaders["tokenizer_2"] = lambda: load_tokenizer(folder / "tokenizer_2")
        parts = {name: components.pop(name) if name in components else loaders[name]() for name in loaders}
        force_zeros = model_index(folder).get("force_zeros_for_empty_prompt", True)
        parts["force_zeros_for_empty_prompt"] = components.pop("force_zeros_for_empty_prompt", force_zeros)
        if components:
            raise TypeError(f"from_pretrained: unknown component(s) {sorted(components)}")
        return parts
    has_checker = (folder / "safety_checker").is_dir() and (folder / "feature_extractor").is_dir()
    if has_checker:
        loaders["safety_checker"] = lambda: load_safety_checker(folder / "safety_checker", **load)
        loaders["feature_extractor"] = lambda: load_feature_extractor(folder / "feature_extractor")
    parts = {name: components.pop(name) if name in components else loaders[name]() for name in loaders}
    parts.setdefault("safety_checker", components.pop("safety_checker", None))
    parts.setdefault("feature_extractor", components.pop("feature_extractor", None))
    if components:
        raise TypeError(f"from_pretrained: unknown component(s) {sorted(components)}")
    return parts


def resolve_folder(path_or_hub_id: str | os.PathLike, variant: str | None) -> Path:
    """A local pipeline folder as is; "demo" the trained demo model shipped in the package (unless a
    folder of that name is here); an 'owner/name' hub id downloaded (only what we load)."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if str(path_or_hub_id) == "demo":
        return demo_folder(check=True)
    if (
        path.exists()
        or str(path_or_hub_id).startswith((".", "/", "~"))
        or str(path_or_hub_id).count("/") != 1
    ):
        raise FileNotFoundError(
            f"{path_or_hub_id}: not a diffusers pipeline folder (expected a folder with "
            f"{', '.join(COMPONENTS)}) nor a hub id like 'owner/name'"
        )
    from huggingface_hub import snapshot_download

    patterns = _hub_patterns(variant)
    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=patterns))
    except Exception as err:  # huggingface_hub raises many types for offline / missing repos
        raise OSError(
            f"{path_or_hub_id}: could not download from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Offline? Pass a local diffusers folder instead, e.g. one saved with "
            "diffusers' `save_pretrained`."
        ) from err


def _hub_patterns(variant: str | None) -> list[str]:
    """Only the component files we load: not the root's single-file checkpoints, not the other
    variant's weights. `-*` matches the shards named by a `*.safetensors.index.json`."""
    tag = f".{variant}" if variant else ""
    weights = [f"*/{name}{tag}{suffix}" for name in ("diffusion_pytorch_model", "model")
               for suffix in (".safetensors", "-*-of-*.safetensors")]
    return ["model_index.json", "*/*.json", "*/*.txt", *weights]
