"""SDXL through the shared entry points: `sega-jax generate` / `sega-jax sweep`, `parallel.generate` (pmap and
sharded jit on CPU devices) and `parallel.sweep_edits` give what the SDXL pipeline's own call gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sega_jax import load_pipeline
from sega_jax.cli import generate as cli
from sega_jax.pipelines import parallel
from sega_jax.sweep import command as sweep
from sega_jax.testing.reference import save_reference_xl

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of the face of a woman"
SMALL = dict(height=16, width=16, num_inference_steps=2)  # the tiny SDXL VAE downsamples 2x: 8x8 latents


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sdxl-paths")
    save_reference_xl(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    xl = load_pipeline(folder)
    xl.set_progress_bar_config(disable=True)
    return xl


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.int16)


def as_uint8(images: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(images) * 255).astype(np.int16)


# -- sega-jax generate -----------------------------------------------------------------------------------


XL_FLAGS = ["--prompt-2", "an oil painting", "--negative-prompt-2", "blurry", "--guidance-rescale", "0.5",
            "--original-size", "32,24", "--target-size", "16x16", "--crops-coords-top-left", "2,1"]
XL_CALL = dict(prompt_2="an oil painting", negative_prompt_2="blurry", guidance_rescale=0.5,
               original_size=(32, 24), target_size=(16, 16), crops_coords_top_left=(2, 1))


@pytest.fixture(scope="module")
def generated(folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cli-xl")
    argv = ["generate", "--model", str(folder), "--prompt", PROMPT, "--negative-prompt", "ugly", *XL_FLAGS,
            "--edit", "glasses@scale=4,warmup=1", "--steps", "2", "--height", "16", "--width", "16",
            "--n", "2", "--seed", "5", "--out", str(out / "{seed}-{index}.png"), "--no-cache"]
    return dict(out=out, status=cli.main(argv))


def test_cli_generate_on_sdxl_equals_the_pipeline_with_its_own_guidance_default(generated, pipe):
    assert generated["status"] == 0
    files = sorted(generated["out"].glob("*.png"))
    assert [f.name for f in files] == ["5-0.png", "5-1.png"]
    expected = pipe(PROMPT, negative_prompt="ugly", editing_prompt=["glasses"], edit_guidance_scale=[4.0],
                    edit_warmup_steps=[1], num_images_per_prompt=2, seed=5, output_type="np", **SMALL,
                    **XL_CALL).images
    for index, path in enumerate(files):
        assert np.abs(pixels(path) - as_uint8(expected[index])).max() <= 1, path


def test_cli_png_metadata_records_the_sdxl_settings_and_reproduces_the_pixels(generated, folder, capsys):
    source = generated["out"] / "5-1.png"
    with Image.open(source) as image:
        data = json.loads(image.text[cli.METADATA_KEY])
        text = image.text["parameters"]
    assert data["pipeline"] == "SemanticStableDiffusionXLPipeline"
    settings = data["settings"]
    assert settings["guidance"] == 5.0 and "CFG scale: 5," in text  # SDXL's default, recorded
    assert settings["prompt_2"] == "an oil painting" and settings["original_size"] == [32, 24]
    assert "Prompt 2: an oil painting" in text and "CFG rescale: 0.5" in text
    assert "run_safety_checker" not in data["call"] and data["call"]["guidance_rescale"] == 0.5
    again = generated["out"] / "again.png"
    assert cli.main(["generate", "--from-png", str(source), "--out", str(again), "--no-cache"]) == 0
    assert f"identical to {source}" in capsys.readouterr().out
    assert np.array_equal(pixels(source), pixels(again))


def test_cli_refuses_sdxl_flags_on_an_sd_model(capsys):
    for flags in (["--prompt-2", "x"], ["--guidance-rescale", "0.3"], ["--original-size", "64,64"]):
        assert cli.main(["generate", "--model", "tiny", "--prompt", PROMPT, *flags]) == 2
        err = capsys.readouterr().err
        assert f"{flags[0]}: SDXL-only" in err and err.count("\n") == 1, err


# -- sega-jax sweep --------------------------------------------------------------------------------------


def test_sweep_on_sdxl_writes_the_pipelines_images(folder, pipe, tmp_path):
    out = tmp_path / "sweep"
    argv = [str(x) for x in ("--model", folder, "--prompt", PROMPT, "--seeds", "3", "--editing-prompt",
                             "glasses", "--grid", "edit_guidance_scale=[0,6]", "--set", "height=16",
                             "--set", "width=16", "--set", "num_inference_steps=2", "--set",
                             "edit={\"edit_warmup_steps\": 0}", "--out", out, "--no-progress")]
    assert sweep.main(argv) == 0
    records = sweep.read_manifest(out)
    assert [r["file"] for r in records] == ["p000-s3-i00-e000.png", "p000-s3-i00-e001.png"]
    for record, scale in zip(records, (0, 6), strict=True):
        expected = pipe(PROMPT, editing_prompt=["glasses"], edit_guidance_scale=scale, edit_warmup_steps=0,
                        guidance_scale=7.5, seed=3, output_type="np", **SMALL).images[0]
        assert np.abs(pixels(out / record["file"]) - as_uint8(expected)).max() <= 1, record["file"]
    assert not np.array_equal(pixels(out / records[0]["file"]), pixels(out / records[1]["file"]))


# -- parallel on several devices -------------------------------------------------------------------------


TWO_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from sega_jax import load_pipeline
    from sega_jax.pipelines import parallel

    assert jax.local_device_count() == 2
    pipe = load_pipeline(sys.argv[1])
    pipe.set_progress_bar_config(disable=True)
    rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
    common = dict(prompt=["a face", "a cat"], prompt_2=["oil", "ink"], num_images_per_prompt=2,
                  height=16, width=16, num_inference_steps=2, editing_prompt=["glasses", "smile"],
                  edit_warmup_steps=1, edit_guidance_scale=[4, 6], guidance_rescale=0.3,
                  original_size=(32, 32), seed=7)  # guidance_scale: the pipeline's default
    ref = pipe(output_type="np", **common)
    report = {}
    for mode in ("pmap", "jit"):
        got = parallel.generate(pipe, mode=mode, output_type="np", **common)
        report[mode] = [rel(got.images, ref.images), rel(got.sem_guidance, ref.sem_guidance)]
    job = pipe.prepare(**common)
    settings = [dict(edit_guidance_scale=0), dict(edit_guidance_scale=[3, 8], reverse_editing_direction=True)]
    swept = parallel.sweep_edits(pipe, job, settings)
    report["sweep shape"] = list(swept.latents.shape)
    alone = [pipe(output_type="latent", **{**common, **s}).images for s in settings]
    report["sweep"] = [rel(swept.latents[i], np.moveaxis(a, 1, -1)) for i, a in enumerate(alone)]
    report["settings differ"] = rel(alone[0], alone[1])
    print(json.dumps(report))
    """
)


def test_parallel_generate_and_sweep_edits_on_two_devices_equal_the_sdxl_pipeline(folder):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(folder)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode in ("pmap", "jit"):
        images, guidance = report[mode]
        # Per-device batches change XLA's summation order only (see test_parallel for the bounds).
        assert images <= 1e-5 and guidance <= 1e-4, (mode, report[mode])
    assert report["sweep shape"] == [2, 4, 8, 8, 4]  # settings, images, h, w, c
    assert max(report["sweep"]) <= 1e-5, report["sweep"]
    assert report["settings differ"] > 1e-3


def test_parallel_decode_honours_force_upcast_as_the_pipeline_does(folder):
    half = load_pipeline(folder, dtype="float16")
    assert parallel.upcasts_decode(half) and half.vae.config.force_upcast
    job = half.prepare(PROMPT, seed=2, **SMALL)
    out = parallel.run(half, job, devices=1, decode=True)
    expected = half.finish(out.sample, output_type="np").images
    np.testing.assert_allclose(np.asarray(out.images), expected, atol=1e-5)
