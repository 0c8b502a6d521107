"""`sega-jax edit`: LEDITS++ on a photo from the command line equals the Python API, with its settings in the
PNG; bad input is one line and exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sega_jax.cli.edit import load_ledits_pipeline
from sega_jax.cli.generate import main

STEPS = 4
# The tiny UNet has no cross-attention at 1/4 of the latent size, where LEDITS++ reads its attention masks:
# the noise mask alone (a test below shows the message for the default masks).
NOISE_MASK = {"use_cross_attn_mask": False, "use_intersect_mask": False}


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "circle.png"
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((16, 12, 48, 44), fill=(220, 40, 40))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def pipe():
    return load_ledits_pipeline("tiny")


def run_cli(*flags: str) -> int:
    return main(["edit", "--model", "tiny", "--steps", str(STEPS), "--mask-mode", "noise", *flags])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.int16)


def api_edit(pipe, photo, **call) -> np.ndarray:
    with Image.open(photo) as image:
        inversion = pipe.invert(image.convert("RGB"), source_prompt="a red circle", num_inversion_steps=STEPS,
                                seed=3)
    return np.asarray(pipe(inversion=inversion, **NOISE_MASK, **call).images[0].convert("RGB"), np.int16)


def test_edit_writes_the_pipelines_edit_with_its_settings(tmp_path, photo, pipe, capsys):
    out = tmp_path / "out"
    assert run_cli("--image", str(photo), "--source-prompt", "a red circle", "--seed", "3",
                   "--edit", "blue@scale=4,threshold=0.8", "--edit", "square@reverse,warmup=1",
                   "--out", str(out)) == 0
    path = out / "ledits_circle_3.png"
    assert str(path) in capsys.readouterr().out
    # LEDITS++'s per-concept defaults (scale 5, threshold 0.9, warmup 0) fill what a spec leaves out.
    expected = api_edit(pipe, photo, editing_prompt=["blue", "square"], edit_guidance_scale=[4.0, 5.0],
                        edit_threshold=[0.8, 0.9], edit_warmup_steps=[0, 1],
                        reverse_editing_direction=[False, True])
    assert np.array_equal(pixels(path), expected)
    unedited = api_edit(pipe, photo)
    assert np.abs(pixels(path) - unedited).max() > 0  # the concepts did something

    with Image.open(path) as image:
        data = json.loads(image.text["sega_jax"])
        parameters = image.text["parameters"]
    assert data["command"] == "edit" and data["pipeline"] == "LEditsPPPipelineStableDiffusion"
    assert data["settings"]["edit"] == ["blue@scale=4,threshold=0.8,warmup=0",
                                        "square@scale=5,threshold=0.9,warmup=1,reverse"]
    assert data["invert"]["seed"] == 3 and data["invert"]["num_inversion_steps"] == STEPS
    assert parameters.startswith("a red circle\n") and "Seed: 3" in parameters
    assert "LEDITS++: blue@scale=4" in parameters


def test_a_black_mask_leaves_the_reconstruction_and_a_mask_is_the_user_mask(tmp_path, photo, pipe):
    black, left = tmp_path / "black.png", tmp_path / "left.png"
    Image.new("L", (64, 64), 0).save(black)
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    Image.fromarray(half).save(left)
    flags = ("--image", str(photo), "--source-prompt", "a red circle", "--seed", "3",
             "--edit", "blue@scale=8")
    assert run_cli(*flags, "--mask", str(black), "--out", str(tmp_path / "black_out.png")) == 0
    assert run_cli(*flags, "--mask", str(left), "--out", str(tmp_path / "left_out.png")) == 0
    assert np.abs(pixels(tmp_path / "black_out.png") - api_edit(pipe, photo)).max() <= 1
    user_mask = np.zeros((1, 1, 8, 8), np.float32)
    user_mask[..., :4] = 1.0  # the left half, at the latents' 8x8
    expected = api_edit(pipe, photo, editing_prompt=["blue"], edit_guidance_scale=8.0, user_mask=user_mask)
    assert np.array_equal(pixels(tmp_path / "left_out.png"), expected)
    assert np.abs(expected - api_edit(pipe, photo)).max() > 0


def test_ddim_reaches_the_pipeline(tmp_path, photo, pipe):
    flags = ("--image", str(photo), "--seed", "3", "--edit", "blue", "--scheduler", "ddim",
             "--out", str(tmp_path / "ddim.png"))
    assert run_cli(*flags) == 0
    ddim = load_ledits_pipeline("tiny", scheduler="ddim")
    with Image.open(photo) as image:
        inversion = ddim.invert(image.convert("RGB"), num_inversion_steps=STEPS, seed=3)
    expected = ddim(inversion=inversion, editing_prompt=["blue"], **NOISE_MASK).images[0]
    assert np.array_equal(pixels(tmp_path / "ddim.png"), np.asarray(expected, np.int16))
    with Image.open(tmp_path / "ddim.png") as image:
        assert "Sampler: DDIM" in image.text["parameters"]


@pytest.mark.parametrize("flags,message", [
    (("--image", "{text}"), "--image {text}: cannot read it as an image"),
    (("--image", "{missing}"), "--image {missing}: cannot read it as an image"),
    (("--image", "{photo}", "--mask", "{text}"), "--mask {text}: cannot read it as an image"),
    (("--image", "{photo}", "--edit", "blue@weight=2"), "'weight' is a SEGA option"),
    (("--image", "{photo}", "--edit", "blue@strength=2"), "unknown option 'strength'"),
    (("--image", "{photo}", "--skip", "1"), "argument --skip: must lie in [0, 1), got 1"),
    (("--image", "{photo}", "--steps", "0"), "--steps"),
    (("--image", "{photo}", "--height", "40"), "height and width must be a factor of 32"),
    (("--edit", "blue",), "the following arguments are required: --image"),
    (("--image", "{photo}", "--edit", "blue", "--mask-mode", "intersect"),
     "cross-attention masks need cross-attention layers at 1/4 of the latent size"),
], ids=["not-an-image", "missing", "bad-mask", "weight", "unknown-option", "skip", "steps", "height-32",
        "no-image", "attention-mask-on-tiny"])
def test_bad_input_is_one_line_and_status_2(tmp_path, photo, capsys, flags, message):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    names = {"text": text, "missing": tmp_path / "nope.png", "photo": photo}
    out = tmp_path / "out"
    assert run_cli(*(f.format(**names) for f in flags), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("sega-jax: error: ") and err.count("\n") == 1, err
    assert message.format(**names) in err
    assert not out.exists()  # nothing half-written
