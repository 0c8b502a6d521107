"""The `demo` model: a small text-to-image latent diffusion model trained on drawn shapes, shipped offline.

`scripts/train_demo.py` trains it (optax, our own NNX modules) on the scenes drawn here: one shape
(circle, square, triangle, star) in one colour (red, green, blue, yellow), small or large, at one of five
positions, on a white, black or gray background, captioned like "a small red circle on a white background,
top left". The trained folder ships in the package (`sega_jax/assets/demo`, diffusers' layout, fp16) and
loads with `load_pipeline("demo")` / `sega-jax generate --model demo` (the CLI's default) with no network.

Besides the drawing, this module holds the simple pixel classifier that the tests and
`scripts/demo_figures.py` use to check what the model draws and what an edit changes.
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sega_jax.models.clip import CLIPTextConfig
from sega_jax.models.unet import UNetConfig
from sega_jax.models.vae import VAEConfig

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SIZES = {"small": 5.0, "large": 9.0}  # radius in pixels on the 32 px image
# Offsets from the centre as a share of the image, for small shapes; large ones move half as far.
POSITIONS = {"center": (0.0, 0.0), "top left": (-0.24, -0.24), "top right": (0.24, -0.24),
             "bottom left": (-0.24, 0.24), "bottom right": (0.24, 0.24)}
SUPERSAMPLE = 4
# The tokenizer's model_max_length (SD: 77): the captions need at most 14 tokens, and a short context makes
# the text encoder and the cross-attention cheap to train. Longer prompts are cut, with a warning.
MAX_TOKENS = 20

DEMO_VAE = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),  # three levels: 4x downsampling, 32 px images -> 8x8 latents
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    mid_block_add_attention=False,
)
DEMO_UNET = UNetConfig(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=(1, 1),
    norm_num_groups=16,
    cross_attention_dim=(64, 64),
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(4, 4),
    sample_size=IMAGE_SIZE // 4,
)
DEMO_TEXT = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
)


DEMO_NOTICE = (
    "note: model 'demo' is a small model trained on drawn shapes (32x32 px; prompts like \"a large red "
    "circle on a white background, top left\", edits like \"blue\"), shipped in the package. For real "
    "images pass --model with a local diffusers folder or a Hugging Face hub id (needs network), or set "
    "$SEGA_JAX_MODEL."
)


def demo_folder(check: bool = False) -> Path:
    """The shipped demo model's diffusers folder (package data); with `check`, a FileNotFoundError saying
    how to make it when this installation has none."""
    folder = Path(str(importlib.resources.files("sega_jax") / "assets" / "demo"))
    if check and not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"model 'demo': no trained demo model in this installation ({folder}); "
                                "train it with `python scripts/train_demo.py --out sega_jax/assets/demo`")
    return folder


BUILTIN_MODELS = ("demo", "tiny")  # model names that need no folder and no network


def shipped_model() -> str:
    """The model the CLI, the app and the notebook's offline mode use when none is named: 'demo' when the
    trained demo model ships in this installation, else 'tiny' (random weights)."""
    return "demo" if (demo_folder() / "model_index.json").is_file() else "tiny"


# -- scenes --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str
    dx: float = 0.0  # jitter of the centre, pixels
    dy: float = 0.0
    scale: float = 1.0  # jitter of the radius

    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background, self.size, self.position)


def caption(shape: str | None, colour: str | None, background: str | None = None, size: str | None = None,
            position: str | None = None) -> str:
    """"a small red circle on a white background, top left"; any attribute may be left out (None)."""
    words = ["a"] + [w for w in (size, colour) if w] + [shape or "shape"]
    text = " ".join(words)
    if background:
        text += f" on a {background} background"
    if position:
        text += f", {position}"
    return text


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _triangle(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a), cy + r * math.sin(a))
            for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon(_triangle(cx, cy + 0.2 * r, 1.15 * r), fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy + 0.1 * r, 1.2 * r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")


def draw(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as uint8 RGB (size, size, 3), drawn 4x supersampled and box-filtered down."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    fx, fy = POSITIONS[scene.position]
    reach = 1.0 if scene.size == "small" else 0.5
    unit = big / IMAGE_SIZE
    cx, cy = (0.5 + reach * fx) * big + scene.dx * unit, (0.5 + reach * fy) * big + scene.dy * unit
    r = SIZES[scene.size] * scene.scale * unit
    _draw_shape(ImageDraw.Draw(image), scene.shape, cx, cy, r, COLOURS[scene.colour])
    return np.asarray(image.resize((size, size), Image.BOX))


def random_scene(rng: np.random.Generator) -> Scene:
    pick = lambda options: options[int(rng.integers(len(options)))]
    return Scene(shape=pick(SHAPES), colour=pick(list(COLOURS)), background=pick(list(BACKGROUNDS)),
                 size=pick(list(SIZES)), position=pick(list(POSITIONS)),
                 dx=float(rng.uniform(-1.5, 1.5)), dy=float(rng.uniform(-1.5, 1.5)),
                 scale=float(rng.uniform(0.9, 1.1)))


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of the scene with attributes dropped at random, so that short concepts ("blue", "a
    star") mean something on their own (a colour alone for 12%: SEGA's colour edits are those concepts);
    empty for 10% (classifier-free guidance's unconditional)."""
    u = rng.uniform()
    if u < 0.10:
        return ""
    if u < 0.22:
        return scene.colour
    if u < 0.28:
        return scene.shape
    keep = rng.uniform(size=5) < (0.9, 0.9, 0.6, 0.6, 0.6)
    return caption(scene.shape if keep[0] else None, scene.colour if keep[1] else None,
                   scene.background if keep[2] else None, scene.size if keep[3] else None,
                   scene.position if keep[4] else None)


def dataset(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """n random scenes (deterministic in seed): uint8 images (n, 32, 32, 3) and their scenes."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return np.stack([draw(s) for s in scenes]), scenes


# -- a pixel classifier -------------------------------------------------------------------------------------


def _as_uint8(image) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
    return array[..., :3]


def background_colour(image) -> np.ndarray:
    """The median colour of the image's border pixels (float RGB 0..255)."""
    a = _as_uint8(image).astype(np.float32)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    return np.median(border, axis=0)


def shape_mask(image, threshold: float = 60.0) -> np.ndarray:
    """Pixels far (Euclidean RGB distance > threshold) from the border's median colour."""
    a = _as_uint8(image).astype(np.float32)
    return np.linalg.norm(a - background_colour(image), axis=-1) > threshold


def nearest(rgb, palette: dict[str, tuple[int, int, int]]) -> str:
    rgb = np.asarray(rgb, np.float32)
    return min(palette, key=lambda name: float(np.linalg.norm(rgb - np.asarray(palette[name], np.float32))))


def _template(shape: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The shape drawn to fill the bounding box (y0, y1, x0, x1), inclusive, as a boolean mask."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    y0, y1, x0, x1 = box
    # the shape's own bounding box at unit radius, centre 0: mapped onto the pixel box
    probe = Image.new("L", (400, 400), 0)
    _draw_shape(ImageDraw.Draw(probe), shape, 200, 200, 100, 255)
    ys, xs = np.nonzero(np.asarray(probe))
    sy, sx = (y1 + 1 - y0) * SUPERSAMPLE / (ys.max() + 1 - ys.min()), (x1 + 1 - x0) * SUPERSAMPLE / (
        xs.max() + 1 - xs.min())
    crop = Image.fromarray(np.asarray(probe)[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    w, h = max(1, round(crop.width * sx)), max(1, round(crop.height * sy))
    canvas.paste(crop.resize((w, h), Image.BILINEAR), (x0 * SUPERSAMPLE, y0 * SUPERSAMPLE))
    return np.asarray(canvas.resize((size, size), Image.BOX)) > 127


def classify(image) -> dict:
    """What a simple pixel classifier sees: {"colour", "shape", "background", "area", "iou"} (colour and
    shape None when no shape stands out from the background)."""
    a = _as_uint8(image)
    background = nearest(background_colour(a), BACKGROUNDS)
    mask = shape_mask(a)
    result = {"background": background, "area": int(mask.sum()), "colour": None, "shape": None, "iou": 0.0}
    if mask.sum() < 6:
        return result
    result["colour"] = nearest(np.median(a[mask].astype(np.float32), axis=0), COLOURS)
    ys, xs = np.nonzero(mask)
    box = (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max()))
    scores = {}
    for shape in SHAPES:
        t = _template(shape, box, a.shape[0])
        scores[shape] = float((t & mask).sum() / max(1, (t | mask).sum()))
    result["shape"] = max(scores, key=scores.get)
    result["iou"] = scores[result["shape"]]
    return result
