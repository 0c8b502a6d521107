"""Every bad input is a ValueError/TypeError naming the argument, raised before any compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sega_jax import SemanticStableDiffusionPipeline
from sega_jax.pipelines.sega.sd import TRACE_COUNT
from tests.tiny_pipeline import save_reference

CONCEPTS = ["smiling", "glasses"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    save_reference(folder)
    ours = SemanticStableDiffusionPipeline.from_pretrained(folder, requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    return ours


BAD = [
    (dict(edit_weights=[1, 1, 1]), ValueError, "edit_weights"),
    (dict(edit_guidance_scale=[1]), ValueError, "edit_guidance_scale"),
    (dict(edit_threshold=[0.9, 0.9, 0.9]), ValueError, "edit_threshold"),
    (dict(edit_warmup_steps=[1, 2, 3]), ValueError, "edit_warmup_steps"),
    (dict(edit_cooldown_steps=[1]), ValueError, "edit_cooldown_steps"),
    (dict(reverse_editing_direction=[True]), ValueError, "reverse_editing_direction"),
    (dict(edit_threshold=1.5), ValueError, "edit_threshold"),
    (dict(edit_threshold=[0.5, -0.1]), ValueError, "edit_threshold"),
    (dict(edit_warmup_steps=-1), ValueError, "edit_warmup_steps"),
    (dict(edit_warmup_steps=1.5), ValueError, "edit_warmup_steps"),
    (dict(edit_cooldown_steps=-3), ValueError, "edit_cooldown_steps"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(num_inference_steps=2.5), ValueError, "num_inference_steps"),
    (dict(height=20), ValueError, "height"),
    (dict(width=12), ValueError, "width"),
    (dict(negative_prompt=["a", "b"]), TypeError, "negative_prompt"),
    (dict(prompt=["a", "b"], negative_prompt=["only one"]), ValueError, "negative_prompt"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), ValueError, "latents"),
    (dict(sem_guidance=[np.zeros((1, 4, 8, 8), np.float32)] * 2), ValueError, "sem_guidance"),
    (dict(sem_guidance=[np.zeros((1, 4, 4, 4), np.float32)] * 4), ValueError, r"sem_guidance\[0\]"),
    (
        dict(editing_prompt_embeddings=np.zeros((2, 77, 32), np.float32)),
        ValueError,
        "editing_prompt_embeddings",
    ),
    (
        dict(editing_prompt=None, editing_prompt_embeddings=np.zeros((2, 10, 32), np.float32)),
        ValueError,
        "editing_prompt_embeddings",
    ),
    (dict(generator=torch.Generator()), TypeError, "generator.*seed"),
    (dict(output_type="tensor"), ValueError, "output_type"),
    (dict(callback_steps=0), ValueError, "callback_steps"),
    (dict(callback="not callable"), TypeError, "callback"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
    (dict(prompt=42), TypeError, "prompt"),
    (dict(seed=1, prng_key=np.zeros(2, np.uint32)), ValueError, "seed"),
    (dict(edit_guidance_scale=float("nan")), ValueError, "edit_guidance_scale"),
    (dict(reverse_editing_direction=["yes", False]), ValueError, "reverse_editing_direction"),
]


GOOD = dict(
    prompt="a face",
    num_inference_steps=3,
    height=16,
    width=16,
    editing_prompt=CONCEPTS,
    output_type="latent",
)


@pytest.mark.parametrize("bad,error,match", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(pipe, bad, error, match):
    kwargs = dict(GOOD)
    kwargs.update(bad)
    before = TRACE_COUNT["denoise"]
    with pytest.raises(error, match=match):
        pipe(**kwargs)
    assert TRACE_COUNT["denoise"] == before  # rejected before any compilation


def test_trace_counter_counts_the_compilation_a_good_call_needs(pipe):
    """The positive control for "rejected before any compilation": the same counter goes up by exactly one
    for a good call in a shape no other test compiles (56x8 pixels, 2 steps), and not again for it."""
    fresh = dict(GOOD, height=56, width=8, num_inference_steps=2)
    before = TRACE_COUNT["denoise"]
    pipe(seed=0, **fresh)
    assert TRACE_COUNT["denoise"] == before + 1
    pipe(seed=1, **fresh)
    assert TRACE_COUNT["denoise"] == before + 1


def test_hub_id_offline_error_says_how_to_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local diffusers folder"):
        SemanticStableDiffusionPipeline.from_pretrained("someone/not-a-cached-model")


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_hub_download_takes_only_the_component_files_of_the_variant(monkeypatch, variant):
    import fnmatch

    import huggingface_hub

    repo = [
        "model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt", "tokenizer/vocab.json",
        "tokenizer/merges.txt", "unet/config.json", "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.json",
        "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
    ]
    taken = []

    def fake_download(repo_id, allow_patterns):
        taken.extend(f for f in repo if any(fnmatch.fnmatch(f, p) for p in allow_patterns))
        raise OSError("stop here")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(OSError):
        SemanticStableDiffusionPipeline.from_pretrained("owner/model", variant=variant)
    tag = ".fp16" if variant else ""
    assert sorted(taken) == sorted([
        "model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "unet/config.json",
        f"unet/diffusion_pytorch_model{tag}.safetensors", f"text_encoder/model{tag}.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.json",
        f"vae/diffusion_pytorch_model{tag}-00001-of-00002.safetensors",
    ])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        SemanticStableDiffusionPipeline.from_pretrained(tmp_path / "nowhere")


def test_unknown_dtype_is_rejected_before_loading(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        SemanticStableDiffusionPipeline.from_pretrained(tmp_path, dtype="int8")
