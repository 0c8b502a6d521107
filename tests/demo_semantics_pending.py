# ruff: noqa: F811
"""PENDING (issue 18), not collected by pytest (run it by path): what the shipped demo model (trained
2026-12-02, 1500 VAE + 6000 UNet steps) does not do yet, each with what it measured. Move a test into
tests/test_demo_semantics.py when a retrained model passes it. The reverse and threshold tests moved there
(2026-12-02): the reverse test now reverses the colour the shape has, and the threshold test measures the
guided latent share and the mean change per pixel, not the count of pixels changed by > 40 levels.

Drawn images (`SCENES`): a large red square (white, top left), a large red triangle (white, bottom right), a
large red star (gray, center), a small red circle (black, top right). The edit: SEGA's swap, away from "red"
and toward "blue". Layout kept: the shape mask's IoU with the drawing's > 0.7. Both inversions reconstruct
the drawings (no edit: IoU 0.90-1.00, background mean |change| <= 3.6 levels); the edit breaks the layout.

- LEDITS++ (2026-12-02): 3 inversion seeds x 4 scenes = 12 edits per setting, `use_intersect_mask=False`
  (this 2-level UNet has no cross-attention at 1/4 of the latent size). The source prompt (the caption)
  makes it worse: the edit's unconditional estimate is not the inversion's source-guided one (diffusers'
  design), and the drawings drift (background mean |change| 100-120 levels at skip 0.1; the old test's IoU
  0.26 on the square). With source "": scale 8 / threshold 0.8 (the README edit's settings): blue 12/12,
  layout 0/12 (the shape becomes a circle). Best settings, blue and layout kept: skip 0.3, scale 2,
  threshold 0.9 (below): 12/12 and 3/12; threshold 0.95: 10/12 and 4/12; skip 0.5, scale 2, threshold
  0.95: 9/12 and 5/12; warmup 3 or 6 steps: <= 4/12. Inversion seed 1 fails on all four scenes; the small
  circle on black loses its place (IoU ~0) in 11 of 12.
- Null-text inversion (`pipe.invert(..., method="null-text")`, each drawing with its caption, guidance 7.5,
  25 steps, 10 inner steps; last-step losses 2e-3-1e-2), then `pipe(caption, inversion=inv, ...)`: SEGA swap
  scale 8, threshold 0.8, warmup 5 (below): blue 4/4, IoU 0.68 / 0.74 / 0.50 / 0.86. Warmup 2: blue 4/4,
  IoU 0.12 / 0.73 / 0.53 / 0.75; warmup 8 or 12: fewer blue (3-4/4) and IoU 0.07-0.84; scale 15: blue 4/4,
  IoU 0.22-0.64.
- quality: "a large yellow star on a gray background" 66% of 50 seeds (colour 100%, shape 66%); the other
  seven prompts 94-100%. Needs a retrained model (not retrained here: the CPU is shared).
"""

import time

import numpy as np
import pytest

from sega_jax import LEditsPPPipelineStableDiffusion
from tests.test_demo_semantics import (  # noqa: F401
    BLUE,
    EDIT,
    STEPS,
    SWAP,
    demo,
    demo_figures,
    pipe,
    to_uint8,
)

SCENES = [demo.Scene("square", "red", "white", "large", "top left"),
          demo.Scene("triangle", "red", "white", "large", "bottom right"),
          demo.Scene("star", "red", "gray", "large", "center"),
          demo.Scene("circle", "red", "black", "small", "top right")]


@pytest.fixture(scope="module")
def drawn() -> np.ndarray:
    return np.stack([demo.draw(scene) for scene in SCENES])


def layout_and_colour(drawn: np.ndarray, edited: np.ndarray) -> tuple[list[float], list[str | None]]:
    """Per image: the IoU of the edited shape mask with the drawn one, and the edited shape's colour."""
    ious = []
    for before, after in zip(drawn, edited, strict=True):
        a, b = demo.shape_mask(before), demo.shape_mask(after)
        ious.append(float((a & b).sum() / (a | b).sum()))
    return ious, [demo.classify(image)["colour"] for image in edited]


def test_ledits_changes_a_drawn_shape_colour_and_keeps_the_layout(drawn):
    editor = LEditsPPPipelineStableDiffusion.from_pretrained(demo.demo_folder())
    editor.set_progress_bar_config(disable=True)
    images = drawn.astype(np.float32) / 255.0
    for seed in (0, 1, 2):
        editor.invert(images, source_prompt="", num_inversion_steps=STEPS, skip=0.3, seed=seed)
        out = editor(**SWAP, edit_guidance_scale=2.0, edit_threshold=0.9, output_type="np",
                     use_intersect_mask=False)
        ious, colours = layout_and_colour(drawn, to_uint8(out.images))
        print(f"LEDITS++ seed {seed}: {colours}, shape IoU {np.round(ious, 2).tolist()}")
        assert colours == ["blue"] * len(SCENES), colours
        assert min(ious) > 0.7, ious


def test_null_text_inversion_changes_a_drawn_shape_colour_and_keeps_the_layout(pipe, drawn):
    edited = []
    for scene, image in zip(SCENES, drawn, strict=True):
        inv = pipe.invert(image.astype(np.float32)[None] / 255.0, prompt=scene.caption(),
                          num_inference_steps=STEPS, guidance_scale=7.5, method="null-text")
        out = pipe(prompt=scene.caption(), num_inference_steps=STEPS, guidance_scale=7.5, inversion=inv,
                   output_type="np", **{**EDIT, "edit_warmup_steps": 5})
        edited.append(to_uint8(out.images)[0])
    ious, colours = layout_and_colour(drawn, np.stack(edited))
    print(f"null-text: {colours}, shape IoU {np.round(ious, 2).tolist()}")
    assert colours == ["blue"] * len(SCENES), colours
    assert min(ious) > 0.7, ious


def test_generation_quality_80_percent_of_50_seeds(pipe):
    start = time.perf_counter()
    results = demo_figures.quality(pipe, 50)
    print(f"\n{50} seeds per prompt ({time.perf_counter() - start:.0f} s):")
    for prompt, r in results.items():
        print(f"  {prompt:45s} colour {r['colour']:.0%}  shape {r['shape']:.0%}  both {r['both']:.0%}")
    assert all(r["both"] >= 0.8 for r in results.values()), results
