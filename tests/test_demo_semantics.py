"""What SEGA edits do, measured on pixels of the shipped `demo` model (sega_jax/assets/demo, trained by
scripts/train_demo.py on drawn shapes), with the pixel classifier of `sega_jax.builtin.demo`; the README's
figures; the generation quality (the prompted colour and shape in >= 80% of 50 seeds per prompt). No torch:
this runs in both CI legs.

The base is `PROMPT` on `N_SEEDS` seeds in one batch. The edit is SEGA's attribute swap, two concepts:
away from "red" and toward "blue" (`EDIT`); every edit reuses one compiled program (two concepts, `STEPS`
steps), since edit settings are traced inputs; the reverse test adds the one-concept program.

Editing drawn images after inversion (LEDITS++, null-text): tests/test_demo_inversion.py.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import demo_figures
from sega_jax.builtin import demo
from sega_jax.pipelines.inputs import IneffectiveEditWarning

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle on a white background"
N_SEEDS, SEED, STEPS = 8, 100, demo_figures.STEPS
SWAP = dict(editing_prompt=["red", "blue"], reverse_editing_direction=[True, False])
# one concept, the colour the shape has, from step 2 (the README's swap starts at step 4: this model lays
# the shape out in its first steps, and one reversed concept needs the earlier start to leave red)
AWAY_FROM_RED = dict(editing_prompt=["red"], reverse_editing_direction=[True], edit_guidance_scale=15.0,
                     edit_threshold=0.5, edit_warmup_steps=2)
EDIT = dict(SWAP, **{k: v for k, v in demo_figures.FIGURE_CALL.items() if k not in SWAP})
BACK = dict(EDIT, reverse_editing_direction=[False, True])  # toward red, away from blue
RED, BLUE = (np.asarray(demo.COLOURS[c], np.float32) for c in ("red", "blue"))


@pytest.fixture(scope="module")
def pipe():
    return demo_figures.load()


def run(pipe, **kwargs):
    return pipe(prompt=PROMPT, num_images_per_prompt=N_SEEDS, num_inference_steps=STEPS, seed=SEED,
                output_type="np", **kwargs)


def generate(pipe, **kwargs) -> np.ndarray:
    """uint8 (N_SEEDS, 32, 32, 3) of PROMPT, with one edit concept if given."""
    return to_uint8(run(pipe, **kwargs).images)


def to_uint8(images) -> np.ndarray:
    return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def plain(pipe) -> np.ndarray:
    # guidance scale 0: the one-concept program with the edit switched off (the plain image, exactly)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IneffectiveEditWarning)
        return generate(pipe, **dict(EDIT, edit_guidance_scale=0.0))


@pytest.fixture(scope="module")
def masks(plain) -> np.ndarray:
    return np.stack([demo.shape_mask(image) for image in plain])


def shape_distance(images: np.ndarray, masks: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Per image: the mean RGB distance to `rgb` over the plain image's shape pixels."""
    d = np.linalg.norm(images.astype(np.float32) - rgb, axis=-1)
    return np.array([d[i][masks[i]].mean() for i in range(len(images))])


def changed_pixels(a: np.ndarray, b: np.ndarray) -> int:
    return int((np.abs(a.astype(np.int32) - b.astype(np.int32)).max(-1) > 40).sum())


def test_plain_images_are_the_prompt(plain):
    found = [demo.classify(image) for image in plain]
    assert sum(f["colour"] == "red" and f["shape"] == "circle" for f in found) >= N_SEEDS - 1, found
    assert all(f["background"] == "white" for f in found), found


def test_colour_edit_moves_the_shape_toward_the_colour(pipe, plain, masks):
    edited = generate(pipe, **EDIT)
    before, after = shape_distance(plain, masks, BLUE), shape_distance(edited, masks, BLUE)
    print(f"distance of the shape to blue: {before.mean():.0f} -> {after.mean():.0f}")
    # 7 of 8 seeds, as the classifier count below: on seed 103 this model keeps the red (2026-12-02)
    assert (after < before - 60).sum() >= N_SEEDS - 1, (before, after)
    colours = [demo.classify(image)["colour"] for image in edited]
    assert colours.count("blue") >= N_SEEDS - 1, colours


def test_background_changes_much_less_than_the_shape(pipe, plain, masks):
    edited = generate(pipe, **EDIT)
    change = np.abs(edited.astype(np.float32) - plain.astype(np.float32)).mean(-1)
    # background: away from the shape in both images (2 px margin for the softened edge)
    moved = masks | np.stack([demo.shape_mask(image) for image in edited])
    grown = moved.copy()
    for axis in (1, 2):
        for shift in (-2, -1, 1, 2):
            grown |= np.roll(moved, shift, axis=axis)
    shape_change, background_change = change[masks].mean(), change[~grown].mean()
    ratio = shape_change / max(background_change, 1e-3)
    print(f"mean |change| per pixel: shape {shape_change:.1f}, background {background_change:.2f} "
          f"(ratio {ratio:.0f})")
    assert ratio > 10, (shape_change, background_change)


def test_reverse_moves_the_colour_away_from_the_concept(pipe, plain, masks):
    """"red" reversed on a red circle moves the shape's colour away from red; the same concept toward red
    leaves it near red (it is red already). 32 seeds (batches 100-103), scale 15, threshold 0.5: the mean
    distance of the shape's pixels to red grows by 148-241 reversed, by 1-26 toward (2026-12-02)."""
    away = generate(pipe, **AWAY_FROM_RED)
    toward = generate(pipe, **dict(AWAY_FROM_RED, reverse_editing_direction=[False]))
    base, near, far = (shape_distance(x, masks, RED) for x in (plain, toward, away))
    print(f"distance of the shape to red: plain {base.mean():.0f}, toward {near.mean():.0f}, "
          f"reverse {far.mean():.0f}")
    assert (far > base + 80).all() and (far > near + 80).all(), (base, near, far)
    assert (near < base + 40).all(), (base, near)
    colours = [demo.classify(image)["colour"] for image in away]
    assert "red" not in colours, colours


def test_higher_threshold_guides_fewer_latents_and_changes_the_image_less(pipe, plain):
    """SEGA's threshold keeps each step's guidance where |guidance| reaches the threshold's quantile, so a
    higher threshold guides fewer latent elements (by construction, per step) and the image changes less.
    The count of pixels changed by > 40 levels is not monotonic (8 seeds: 4072 / 3858 / 4988 at 0.5 / 0.8 /
    0.95): at 0.95 the shape stays mostly red and the few guided elements tint background pixels by 40-60
    levels. Measured on 32 seeds (batches 100-103, 2026-12-02), per batch at 0.5 / 0.8 / 0.95: share of
    guided latent elements 0.88 / 0.52-0.55 / 0.25-0.26 (decreasing for every image), mean |change| per
    pixel 61.2-66.6 / 51.8-55.2 / 45.4-48.4 levels (gaps >= 5.7)."""
    thresholds = (0.5, 0.8, 0.95)
    outs = [run(pipe, **{**EDIT, "edit_threshold": t}) for t in thresholds]
    guided = np.stack([(np.asarray(o.sem_guidance) != 0).mean(axis=(0, 2, 3, 4)) for o in outs])  # (3, N)
    edited = [to_uint8(o.images) for o in outs]
    change = [np.abs(e.astype(np.float32) - plain.astype(np.float32)).mean() for e in edited]
    print("share of guided latent elements:", guided.mean(1).round(2).tolist(),
          "mean |change| per pixel:", np.round(change, 1).tolist(),
          "pixels changed by > 40:", [changed_pixels(e, plain) for e in edited])
    assert (np.diff(guided, axis=0) < 0).all(), guided
    assert change[0] > change[1] + 3 and change[1] > change[2] + 3, change


def test_warmup_delays_and_cooldown_stops_the_edit(pipe, plain, masks):
    window = {**EDIT, "edit_warmup_steps": 12, "edit_cooldown_steps": 18}
    # without momentum the per-step guidance is exactly zero outside [warmup, cooldown)
    out = run(pipe, **window, edit_momentum_scale=0.0)
    g = np.abs(np.asarray(out.sem_guidance)).reshape(len(out.sem_guidance), -1).max(-1)
    print("max |sem_guidance| per step, no momentum:", np.round(g, 3).tolist())
    assert (g[:12] == 0).all() and (g[12:18] > 0).all() and (g[18:] == 0).all(), g
    # with momentum (default 0.1) only the momentum's decaying remainder is applied after cooldown
    out = run(pipe, **window)
    g = np.abs(np.asarray(out.sem_guidance)).reshape(len(out.sem_guidance), -1).max(-1)
    print("max |sem_guidance| per step, momentum 0.1:", np.round(g, 3).tolist())
    assert (g[:12] == 0).all() and (np.diff(g[18:]) < 0).all() and g[18] < 0.5 * g[12:18].max(), g
    # the delayed, shortened edit changes the colour less than the full one
    full = shape_distance(generate(pipe, **EDIT), masks, BLUE)
    late = shape_distance(to_uint8(out.images), masks, BLUE)
    print(f"distance of the shape to blue: full edit {full.mean():.0f}, steps 12-18 {late.mean():.0f}")
    assert late.mean() > full.mean() + 20, (full, late)


def test_readme_figures_are_what_the_script_writes(tmp_path, pipe):
    found = demo_figures.write_figures(tmp_path, pipe=pipe)
    assert found["plain"]["colour"] == "red" and found["plain"]["shape"] == "circle", found
    assert found["edit"]["colour"] == "blue" and found["edit"]["shape"] == "circle", found
    for name in ("demo_plain.png", "demo_edit.png"):
        ours = np.asarray(Image.open(tmp_path / name), np.int32)
        shipped = np.asarray(Image.open(ROOT / "docs" / name), np.int32)
        # a few levels of float noise between jax versions, never a different picture
        assert ours.shape == shipped.shape and np.abs(ours - shipped).max() <= 8, name


def test_generation_quality_80_percent_of_50_seeds(pipe):
    """400 images, one call (~15 s): 98-100% per prompt with the model of 2026-12-03 (the yellow star was 66%
    before its retraining)."""
    start = time.perf_counter()
    results = demo_figures.quality(pipe, 50)
    print(f"\n{50} seeds per prompt ({time.perf_counter() - start:.0f} s):")
    for prompt, r in results.items():
        print(f"  {prompt:45s} colour {r['colour']:.0%}  shape {r['shape']:.0%}  both {r['both']:.0%}")
    assert all(r["both"] >= 0.8 for r in results.values()), results
