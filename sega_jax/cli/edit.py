"""`sega-jax edit`: edit a photo with LEDITS++ (invert it once, then steer it with semantic concepts).

    sega-jax edit --image photo.png --source-prompt "a cat" --edit "dog@scale=6,threshold=0.9" --out out/

The same pipelines as the Python API (`LEditsPPPipelineStableDiffusion` / `...XL`), the `--edit` syntax of
`generate` (LEDITS++'s per-concept defaults: scale 5, threshold 0.9, warmup 0), and PNGs that carry their
settings. Bad input is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sega_jax.cli.common import (
    EDIT_HELP,
    Parser,
    configure_cache,
    dtype_flag,
    flag_type,
    show_warning,
    size_flag,
)
from sega_jax.loaders.lora import load_loras
from sega_jax.pipelines import family_of, ledits_pipeline_for, load_pipeline
from sega_jax.settings import (
    FORMAT,
    METADATA_KEY,
    MODEL_ENV,
    NEVER,
    CLIError,
    Edit,
    default_model,
    lora_setting,
    parse_edit,
    parse_finite,
    parse_integer,
    parse_lora,
)
from sega_jax.version import __version__

# diffusers' LEditsPPPipelineStableDiffusion defaults (`invert` and `__call__`).
LEDITS_EDIT_DEFAULTS = {"scale": 5.0, "threshold": 0.9, "warmup": 0}
MASK_MODES = {  # --mask-mode -> (use_cross_attn_mask, use_intersect_mask)
    "intersect": (False, True),  # diffusers' default: attention mask AND noise mask
    "cross-attention": (True, False),
    "noise": (False, False),
}
SAMPLER_NAMES = {"dpm-sde": "DPM++ 2M SDE", "ddim": "DDIM"}
SCHEDULERS = {"dpm-sde": None, "ddim": "ddim"}  # None: the pipeline's DPM-Solver++ 2M SDE


@dataclass(frozen=True)
class EditJob:
    """What one `sega-jax edit` run does, in the pipeline's own terms."""

    invert: dict
    call: dict
    edits: list[Edit]
    image: Path
    mask: Path | None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sega-jax edit", description="Edit a photo with LEDITS++: invert it, then apply "
               "semantic concepts.", epilog=EDIT_HELP.split("\n\nEvery PNG")[0]
               + "\nHere the defaults are LEDITS++'s: scale=5, threshold=0.9, warmup=0; no 'weight'.",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--image", required=True, help="the photo to edit (any image file PIL reads)")
    add("--model", help=f"a diffusers SD or SDXL pipeline folder, a hub id, 'demo' or 'tiny' (default: "
                        f"${MODEL_ENV}, else 'demo' when shipped, else 'tiny')")
    add("--source-prompt", default="", help="what the photo shows (optional; guides the inversion)")
    add("--source-guidance", type=flag_type(_finite, "--source-guidance"), default=3.5,
        help="source_guidance_scale of the inversion (default 3.5)")
    add("--edit", action="append", default=[], metavar="TEXT[@OPTIONS]",
        type=flag_type(_edit_spec, "--edit"),
        help="an editing concept, repeatable (see below)")
    add("--negative-prompt", default=None, help="what the edit steers away from")
    add("--steps", type=flag_type(_integer, "--steps"), default=30, help="num_inversion_steps (default 30)")
    add("--skip", type=flag_type(_skip, "--skip"), default=0.15,
        help="share of the schedule left out at the noisy end, in [0, 1) (default 0.15)")
    add("--mask", help="an image whose white part is where edits may act (resized to the latents)")
    add("--mask-mode", choices=sorted(MASK_MODES), default="intersect",
        help="LEDITS++'s implicit masks: intersect (attention and noise; the default), cross-attention, "
             "noise")
    add("--height", type=flag_type(size_flag, "--height"), help="resize the photo to this height")
    add("--width", type=flag_type(size_flag, "--width"), help="resize the photo to this width")
    add("--seed", type=flag_type(_integer, "--seed"), help="seed of the inversion's noise (default: random)")
    add("--scheduler", choices=sorted(SCHEDULERS), default="dpm-sde", help="dpm-sde (the default) or ddim")
    add("--dtype", type=flag_type(dtype_flag, "--dtype"), default="float32",
        help="float32, bfloat16 or float16")
    add("--lora", action="append", default=[], metavar="FILE[@SCALE]",
        type=flag_type(lora_setting, "--lora"),
        help="LoRA weights (diffusers/peft or kohya .safetensors) at SCALE (default 1), repeatable")
    add("--out", help="a folder (default outputs/) or a file.png")
    add("--progress", action="store_true", help="a progress bar per step")
    add("--no-cache", action="store_true", help="do not use the persistent compilation cache")
    return p


def _finite(text: str, what: str) -> float:
    return parse_finite(text, what)


def _integer(text: str, what: str) -> int:
    return parse_integer(text, what, minimum=1 if what == "--steps" else 0)


def _skip(text: str, what: str) -> float:
    value = _finite(text, what)
    if not 0.0 <= value < 1.0:
        raise CLIError(f"{what} must lie in [0, 1), got {text}")
    return value


def _edit_spec(text: str, what: str) -> str:
    ledits_edit(text)
    return text


def ledits_edit(spec: str) -> Edit:
    """An `--edit` spec with LEDITS++'s defaults; `weight` (a SEGA-only option) is an error."""
    edit = parse_edit(spec, **LEDITS_EDIT_DEFAULTS)
    if edit.weight != 1.0:
        raise CLIError(f"--edit {spec!r}: 'weight' is a SEGA option; LEDITS++ has no per-concept weights")
    return edit


def read_image(path: str, what: str) -> Path:
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    try:
        with Image.open(file) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise CLIError(f"{what} {path}: cannot read it as an image ({' '.join(str(err).split())})") from None
    return file.resolve()


def edit_job(args: argparse.Namespace) -> EditJob:
    """The pipeline's `invert(...)` and `__call__(...)` arguments for the flags (checked, nothing loaded)."""
    edits = [ledits_edit(spec) for spec in args.edit]
    cross_attn, intersect = MASK_MODES[args.mask_mode]
    invert = dict(source_prompt=args.source_prompt, source_guidance_scale=args.source_guidance,
                  num_inversion_steps=args.steps, skip=args.skip, height=args.height, width=args.width,
                  seed=args.seed)
    call = dict(negative_prompt=args.negative_prompt, use_cross_attn_mask=cross_attn,
                use_intersect_mask=intersect)
    if edits:
        call.update(editing_prompt=[e.prompt for e in edits],
                    edit_guidance_scale=[e.scale for e in edits],
                    edit_threshold=[e.threshold for e in edits],
                    edit_warmup_steps=[e.warmup for e in edits],
                    edit_cooldown_steps=[NEVER if e.cooldown is None else e.cooldown for e in edits],
                    reverse_editing_direction=[e.reverse for e in edits])
    mask = read_image(args.mask, "--mask") if args.mask else None
    return EditJob(invert=invert, call=call, edits=edits, image=read_image(args.image, "--image"), mask=mask)


def load_ledits_pipeline(model: str, *, dtype=None, scheduler: str | None = None, progress: bool = False):
    """The LEDITS++ pipeline for a model name: "tiny" (random, built in-process), "demo", an SD or SDXL
    folder or hub id."""
    if model == "tiny":
        pipe = ledits_pipeline_for(load_pipeline("tiny", dtype=dtype))
    else:
        family = family_of(model)
        no_checker = {"requires_safety_checker": False} if family.safety_checker else {}
        pipe = family.ledits.from_pretrained(model, dtype=dtype, **no_checker)
    if scheduler:
        pipe.set_scheduler(scheduler)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def mask_array(path: Path, latent_hw: tuple[int, int]) -> np.ndarray:
    """A mask image as diffusers' `user_mask` (1, 1, h, w) in [0, 1]: the share of each latent cell it
    covers."""
    from PIL import Image

    with Image.open(path) as image:
        gray = image.convert("L").resize((latent_hw[1], latent_hw[0]), Image.Resampling.BOX)
    return (np.asarray(gray, np.float32) / 255.0)[None, None]


def run_edit(pipe, job: EditJob):
    """Invert the photo, then edit it: (the edited PIL image, the inversion)."""
    from PIL import Image

    with Image.open(job.image) as image:
        photo = image.convert("RGB")
    inversion = pipe.invert(photo, **job.invert)
    call = dict(job.call)
    if job.mask is not None:
        call["user_mask"] = mask_array(job.mask, inversion.init_latents.shape[-2:])
    result = pipe(inversion=inversion, run_safety_checker=False, **call)
    return result.images[0], inversion


def png_info(job: EditJob, settings: dict, pipe, seed: int):
    """`parameters` (A1111-style text) and `sega_jax` (JSON: the settings and the pipeline calls)."""
    from PIL.PngImagePlugin import PngInfo

    concepts = " | ".join(settings["edit"]) or "none"
    text = [settings["source_prompt"] or "(no source prompt)"]
    if settings["negative_prompt"]:
        text.append(f"Negative prompt: {settings['negative_prompt']}")
    text.append(f"Steps: {settings['steps']}, Skip: {settings['skip']:g}, Sampler: "
                f"{SAMPLER_NAMES[settings['scheduler']]}, Source CFG scale: {settings['source_guidance']:g}, "
                f"Seed: {seed}, Model: {settings['model']}, Dtype: {settings['dtype']}, Image: "
                f"{job.image.name}, LEDITS++: {concepts}, Masks: {settings['mask_mode']}, "
                + (f"LoRA: {' | '.join(settings['lora'])}, " if settings["lora"] else "") +
                f"Version: sega-jax {__version__}")
    data = {"format": FORMAT, "version": __version__, "command": "edit", "pipeline": type(pipe).__name__,
            "settings": settings, "invert": {**job.invert, "seed": seed}, "call": job.call,
            "scheduler_config": pipe.scheduler.config}
    info = PngInfo()
    info.add_text("parameters", "\n".join(text))
    info.add_text(METADATA_KEY, json.dumps(data, default=str))
    return info


def output_path(out: str | None, image: Path, seed: int) -> Path:
    """`--out` as a file (.png) or a folder (never overwriting: ledits_<photo>_<seed>[_k].png)."""
    target = Path(out or "outputs").expanduser()
    if target.suffix.lower() == ".png":
        return target
    path, k = target / f"ledits_{image.stem}_{seed}.png", 0
    while path.exists():
        k += 1
        path = target / f"ledits_{image.stem}_{seed}_{k}.png"
    return path


def edit(args: argparse.Namespace) -> int:
    job = edit_job(args)
    model = args.model or default_model()
    settings = {key: getattr(args, key) for key in ("source_prompt", "source_guidance", "negative_prompt",
                                                    "steps", "skip", "mask_mode", "height", "width",
                                                    "scheduler", "dtype")}
    settings.update(model=model, edit=[e.inline() for e in job.edits],
                    image=str(job.image), mask=None if job.mask is None else str(job.mask), lora=args.lora)
    configure_cache(args.no_cache)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        pipe = load_ledits_pipeline(model, dtype=args.dtype, scheduler=SCHEDULERS[args.scheduler],
                                    progress=args.progress)
        load_loras(pipe, [parse_lora(spec) for spec in args.lora])
        try:
            image, inversion = run_edit(pipe, job)
        except (ValueError, TypeError) as err:  # the pipelines' own checks of the photo and the settings
            raise CLIError(str(err)) from None
    path = output_path(args.out, job.image, inversion.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=png_info(job, settings, pipe, inversion.seed))
    print(f"seed {inversion.seed}: {image.width}x{image.height}, {args.steps} inversion steps, "
          f"{len(args.edit)} edit(s) in {time.perf_counter() - start:.1f} s")
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`sega-jax edit ...` (run through `sega_jax.cli.generate.main`, which turns errors into one line)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return edit(args)
