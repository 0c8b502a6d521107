"""Figures of the shipped `demo` model: the README's image and its SEGA edit, and the quality check.

    python scripts/demo_figures.py                     # docs/demo_plain.png, docs/demo_edit.png
    python scripts/demo_figures.py --quality --n 50    # the prompted colour and shape in >= 80% of seeds?

The README figures are exactly what the README's first command writes (the same prompt, edit, seed and
steps, `FIGURE` below), upscaled 8x (nearest) so that the 32x32 px images are visible on the page.

The quality check generates `--n` seeds (one batch) for each prompt of `QUALITY_PROMPTS` and asks the
pixel classifier of `sega_jax.builtin.demo` for the shape's colour and kind; it prints the share that match
the prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sega_jax, not an installed one

from sega_jax.builtin import demo  # noqa: E402

# The README's first command: sega-jax generate --prompt ... --edit "red@reverse,..." --edit "blue@..."
# SEGA's attribute swap: away from the prompt's colour and toward the new one, two concepts at once (a
# "blue" concept alone pushes this model's red shapes to yellow, a latent mixture of the two).
FIGURE = {"prompt": "a large red circle on a white background", "edits": ["red", "blue"],
          "reverse": [True, False], "scale": 8.0, "threshold": 0.8, "warmup": 4, "seed": 3, "steps": 25}
FIGURE_EDITS = [f"{text}@{'reverse,' if reverse else ''}scale={FIGURE['scale']:g},"
                f"threshold={FIGURE['threshold']:g},warmup={FIGURE['warmup']}"
                for text, reverse in zip(FIGURE["edits"], FIGURE["reverse"], strict=True)]
# The same edit as pipeline arguments.
FIGURE_CALL = dict(editing_prompt=FIGURE["edits"], reverse_editing_direction=FIGURE["reverse"],
                   edit_guidance_scale=FIGURE["scale"], edit_threshold=FIGURE["threshold"],
                   edit_warmup_steps=FIGURE["warmup"])
QUALITY_PROMPTS = [demo.caption(shape, colour, background, "large")
                   for shape, colour, background in (("circle", "red", "white"), ("square", "blue", "white"),
                                                     ("triangle", "green", "black"),
                                                     ("star", "yellow", "gray"), ("circle", "blue", "black"),
                                                     ("square", "yellow", "white"),
                                                     ("triangle", "red", "gray"), ("star", "green", "white"))]
STEPS, GUIDANCE = 25, 7.5


def load(folder: str | None = None):
    from sega_jax.pipelines import load_pipeline

    pipe = load_pipeline(folder or "demo")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def upscale(image: np.ndarray, factor: int = 8) -> np.ndarray:
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def figure_images(pipe) -> tuple[np.ndarray, np.ndarray]:
    """The README's plain image and its edit (uint8 32x32x3 each), as the CLI makes them."""
    common = dict(prompt=FIGURE["prompt"], num_inference_steps=FIGURE["steps"], seed=FIGURE["seed"],
                  output_type="np")
    plain = pipe(**common).images[0]
    edit = pipe(**common, **FIGURE_CALL).images[0]
    to8 = lambda x: np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)
    return to8(plain), to8(edit)


def write_figures(out: Path, folder: str | None = None, pipe=None) -> dict:
    """Writes demo_plain.png and demo_edit.png into `out`; returns what the classifier sees in each."""
    from PIL import Image

    plain, edit = figure_images(pipe if pipe is not None else load(folder))
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(upscale(plain)).save(out / "demo_plain.png")
    Image.fromarray(upscale(edit)).save(out / "demo_edit.png")
    return {"plain": demo.classify(plain), "edit": demo.classify(edit)}


def quality(pipe, n: int, prompts: list[str] = QUALITY_PROMPTS, seed: int = 0) -> dict:
    """Per prompt: the share of n seeds whose colour, shape and both match the prompt. One call (one
    compiled program) draws all len(prompts) * n images."""
    images = pipe(prompt=list(prompts), num_images_per_prompt=n, num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE, seed=seed, output_type="np").images
    results = {}
    for k, prompt in enumerate(prompts):
        words = prompt.split()
        colour = next(w for w in words if w in demo.COLOURS)
        shape = next(w for w in words if w in demo.SHAPES)
        found = [demo.classify(image) for image in images[k * n:(k + 1) * n]]
        colours = np.array([f["colour"] == colour for f in found])
        shapes = np.array([f["shape"] == shape for f in found])
        results[prompt] = {"colour": float(colours.mean()), "shape": float(shapes.mean()),
                           "both": float((colours & shapes).mean())}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs", help="where the README figures go")
    p.add_argument("--model", default=None, help="a demo-like folder (default: the shipped demo model)")
    p.add_argument("--quality", action="store_true", help="run the quality check instead of the figures")
    p.add_argument("--n", type=int, default=50, help="seeds per prompt for --quality")
    p.add_argument("--grid", default=None, help="with --quality: also save a grid of the first 8 seeds here")
    args = p.parse_args(argv)
    if not args.quality:
        found = write_figures(Path(args.out), args.model)
        print(json.dumps(found))
        return 0
    start = time.perf_counter()
    results = quality(load(args.model), args.n)
    for prompt, r in results.items():
        print(f"{prompt:55s} colour {r['colour']:.0%}  shape {r['shape']:.0%}  both {r['both']:.0%}")
    both = [r["both"] for r in results.values()]
    print(f"{args.n} seeds x {len(results)} prompts, {STEPS} DDIM steps, guidance {GUIDANCE}: "
          f"colour and shape right in {np.mean(both):.1%} overall, worst prompt {min(both):.0%} "
          f"({time.perf_counter() - start:.0f} s)")
    if args.grid:
        from PIL import Image

        pipe = load(args.model)
        rows = [pipe(prompt=prompt, num_images_per_prompt=8, num_inference_steps=STEPS, seed=0,
                     output_type="np").images for prompt in QUALITY_PROMPTS]
        grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
        Image.fromarray(upscale(np.clip(np.round(grid * 255), 0, 255).astype(np.uint8), 4)).save(args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
