# ruff: noqa: F811
"""PENDING (issue 18), not collected by pytest (run it by path): what the shipped demo model does not do
yet, each with what it measured. Move a test into tests/test_demo_semantics.py when a model passes it.

Drawn images (`SCENES`): a large red square (white, top left), a large red triangle (white, bottom right), a
large red star (gray, center), a small red circle (black, top right). The edit: SEGA's swap, away from "red"
and toward "blue". Layout kept: the shape mask's IoU with the drawing's > 0.7.

Retrained model (2026-12-03, 1500 VAE + 12000 UNet steps), grids of `python3 -m pytest
tests/demo_semantics_pending.py -s` variants:
- LEDITS++ (source prompt "", 25 steps, 3 inversion seeds x 4 scenes = 12 edits per setting, no intersect
  mask: this 2-level UNet has no cross-attention at 1/4 of the latent size): skip 0.2 / 0.3 / 0.5 x scale
  2 / 4 / 6 x threshold 0.8 / 0.9 / 0.95: blue 9-12 of 12 everywhere, layout kept in at most 5 of 12 (skip
  0.2-0.5, scale 2, threshold 0.95); the star on gray and the small circle on black lose their place
  (IoU 0-0.5) in almost every setting. The test's settings (skip 0.3, scale 2, threshold 0.9): 12/12 blue,
  3/12 layout.
- Null-text inversion (each drawing with its caption, guidance 7.5, 25 steps), then `pipe(caption,
  inversion=inv, ...)` with the swap: scale 6 / 8 / 12 x threshold 0.8 / 0.9 x warmup 4 / 6 / 8 / 10. The
  square, triangle and small circle keep their layout and turn blue at scale 8, threshold 0.9, warmup 4-8
  (IoU 0.73-0.89); the star on gray stays red there (IoU 0.17-0.23) and, where it turns blue (scale 12),
  loses its shape (IoU 0.14-0.71, with the square or triangle then below 0.7). The test's settings (scale 8,
  threshold 0.8, warmup 5) before the retraining: IoU 0.68 / 0.74 / 0.50 / 0.86; warmup 4 after it: 0.33 /
  0.58 / 0.50 / 0.65, all blue.
"""

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
