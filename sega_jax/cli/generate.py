"""The `sega-jax` command: `generate` (SEGA images as PNGs that carry their settings), `sweep`, `bench`.

Heavy imports (JAX, the models) happen only inside the subcommands, so `--help` and bad flags are instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from sega_jax.builtin.demo import BUILTIN_MODELS, DEMO_NOTICE
from sega_jax.builtin.tiny import SD_DDIM, TINY_NOTICE
from sega_jax.cli.common import (
    EDIT_HELP,
    PROG,
    Parser,
    configure_cache,
    dtype_flag,
    flag_type,
    one_line,
    show_warning,
    size_flag,
)
from sega_jax.loaders.lora import load_loras
from sega_jax.pipelines import registry
from sega_jax.schedulers import scheduler_from_name
from sega_jax.settings import (
    DEFAULTS,
    FORMAT,
    METADATA_KEY,
    MODEL_ENV,
    NEVER,
    SETTING_KEYS,
    XL_FLAGS,
    CLIError,
    Edit,
    call_kwargs,
    check_family,
    edit_kwargs,
    lora_setting,
    parameters_text,
    parse_edit,
    parse_finite,
    parse_integer,
    parse_lora,
    png_info,
    prepare_kwargs,
    read_png_settings,
    resolve_settings,
    sampler_name,
)
from sega_jax.version import __version__

__all__ = ["DEFAULTS", "FORMAT", "METADATA_KEY", "MODEL_ENV", "NEVER", "SETTING_KEYS", "XL_FLAGS", "CLIError",
           "Edit", "build_parser", "call_kwargs", "check_family", "edit_kwargs", "main", "parameters_text",
           "parse_edit", "png_info", "prepare_kwargs", "read_png_settings", "resolve_settings",
           "sampler_name"]

EXTERNAL = {
    "edit": ("sega_jax.cli.edit", "edit a photo with LEDITS++ (invert it once, then semantic concepts)"),
    "sweep": ("sega_jax.sweep.command",
              "seed x edit-strength sweeps over all devices (resumable, multi-host)"),
    "bench": ("sega_jax.bench.sega", "time sega-jax against diffusers on the same model"),
    "app": ("sega_jax.app", "the semantic editor in the browser (Gradio: pip install \"sega-jax[app]\")"),
}


# -- the parser --------------------------------------------------------------------------------------------


def _pair(text: str, what: str) -> list[int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2:
        raise CLIError(f"{what} must be two integers A,B, got {text!r}")
    return [parse_integer(part.strip(), what) for part in parts]


def _rescale(text: str, what: str) -> float:
    value = parse_finite(text, what)
    if not 0.0 <= value <= 1.0:
        raise CLIError(f"{what} must lie in [0, 1], got {text}")
    return value


def _edit(text: str, what: str) -> str:
    parse_edit(text)  # validated now; kept as text so the PNG's settings stay in the documented form
    return text


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Every `generate` flag. Defaults are applied after parsing (see DEFAULTS), so a PNG can fill them."""
    add = p.add_argument
    add("--model", help="a diffusers pipeline folder, a Hugging Face hub id (when online), 'demo' (the small "
                        "trained model, shipped) or 'tiny' (random weights); default: "
                        f"${MODEL_ENV}, else 'demo' when shipped, else 'tiny'")
    add("--prompt", help="what to draw")
    add("--negative-prompt", help="what to steer away from (diffusers' negative_prompt)")
    add("--edit", action="append", metavar="TEXT[@OPTIONS]", type=flag_type(_edit, "--edit"),
        help="an editing concept with its settings (repeatable; syntax below)")
    add("--steps", type=flag_type(parse_integer, "--steps", minimum=1, maximum=1000),
        help="denoising steps (num_inference_steps; default 50)")
    add("--guidance", type=flag_type(parse_finite, "--guidance"),
        help="classifier-free guidance scale (default: the pipeline's, 7.5 for SD, 5.0 for SDXL)")
    add("--scheduler", help="ddim, pndm, plms, lms, lms-karras, euler, euler-karras, euler-a, dpm++2m, "
                            "dpm++2m-karras or a diffusers class name (default: the model's own)")
    add("--height", type=flag_type(size_flag, "--height"),
        help="image height, a multiple of 8 (default: the model's)")
    add("--width", type=flag_type(size_flag, "--width"),
        help="image width, a multiple of 8 (default: the model's)")
    add("--seed", type=flag_type(parse_integer, "--seed", maximum=2**32 - 1),
        help="random seed in [0, 2**32) (default: a random one, printed and saved in the PNG)")
    add("--n", type=flag_type(parse_integer, "--n", minimum=1, maximum=1024),
        help="images per prompt (default 1)")
    add("--dtype", type=flag_type(dtype_flag, "--dtype"), help="float32 (default), bfloat16 or float16")
    add("--eta", type=flag_type(parse_finite, "--eta"), help="DDIM eta (default 0)")
    add("--momentum-scale", type=flag_type(parse_finite, "--momentum-scale"),
        help="SEGA momentum scale (edit_momentum_scale; default 0.1)")
    add("--mom-beta", type=flag_type(parse_finite, "--mom-beta"),
        help="SEGA momentum beta (edit_mom_beta; default 0.4)")
    add("--lora", action="append", metavar="FILE[@SCALE]", type=flag_type(lora_setting, "--lora"),
        help="LoRA weights (diffusers or kohya .safetensors) at SCALE (default 1; repeatable)")
    add("--no-safety-checker", dest="safety_checker", action="store_false",
        help="skip the model's safety checker (when its folder has one)")
    xl = p.add_argument_group("SDXL only (an error on an SD 1.x/2.x model)")
    xl.add_argument("--prompt-2", help="the prompt for the second text encoder (default: --prompt)")
    xl.add_argument("--negative-prompt-2", help="the negative prompt for the second text encoder")
    xl.add_argument("--guidance-rescale", type=flag_type(_rescale, "--guidance-rescale"),
                    help="rescale the guided prediction towards the text one's std, in [0, 1] (default 0)")
    xl.add_argument("--original-size", type=flag_type(_pair, "--original-size"), metavar="H,W",
                    help="micro-conditioning original size, height,width (default: the image size)")
    xl.add_argument("--target-size", type=flag_type(_pair, "--target-size"), metavar="H,W",
                    help="micro-conditioning target size, height,width (default: the image size)")
    xl.add_argument("--crops-coords-top-left", type=flag_type(_pair, "--crops-coords-top-left"),
                    metavar="TOP,LEFT", help="micro-conditioning crop coordinates (default 0,0)")
    add("--out", help="output folder (default outputs/) or file pattern such as out/face_{seed}_{index}.png")
    add("--from-png", metavar="FILE", help="reproduce the image FILE (a sega-jax PNG) from its settings")
    add("--no-cache", action="store_true", help="no persistent compilation cache (or SEGA_JAX_CACHE_DIR=off)")
    add("--progress", action="store_true",
        help="a per-step progress bar (its host callback keeps the loop out of the compilation cache)")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Semantic Guidance (SEGA) for Stable Diffusion in JAX.",
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="Run 'sega-jax COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    generate = commands.add_parser(
        "generate", help="generate images with semantic edits and write PNGs with their settings",
        description="Generate images with semantic guidance and write PNGs carrying their settings.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EDIT_HELP,
        argument_default=argparse.SUPPRESS)
    add_generate_arguments(generate)
    for name, (_, text) in EXTERNAL.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


# -- output paths ------------------------------------------------------------------------------------------


def output_paths(out: str | None, seed: int, indices: Sequence[int]) -> list[Path]:
    """Where images `indices` go: a folder (never overwriting) or a file pattern with {seed}, {index}."""
    out = out or "outputs"
    if not (out.lower().endswith(".png") or "{" in out):
        return [_free_name(Path(out), f"sega_{seed}_{i}") for i in indices]
    pattern = out
    if len(indices) > 1 and "{index" not in out and out.lower().endswith(".png"):
        pattern = out[: -len(".png")] + "_{index}.png"
    try:
        paths = [Path(pattern.format(seed=seed, index=i)) for i in indices]
    except (KeyError, IndexError, ValueError) as err:
        fields = "its fields are {seed} and {index}"
        raise CLIError(f"--out {out!r}: bad pattern ({err!r}); {fields}") from None
    if len(set(paths)) != len(paths):
        raise CLIError(f"--out {out!r}: {len(paths)} images need {{index}} in the pattern")
    return paths


def _free_name(folder: Path, stem: str) -> Path:
    path, k = folder / f"{stem}.png", 0
    while path.exists():
        k += 1
        path = folder / f"{stem}_{k}.png"
    return path


# -- generate ----------------------------------------------------------------------------------------------


def load_pipeline(settings: dict, progress: bool = False):
    """The model named by the settings, with their scheduler; a per-step progress bar if asked."""
    if settings["model"] in BUILTIN_MODELS:
        print(TINY_NOTICE if settings["model"] == "tiny" else DEMO_NOTICE, flush=True)
    return registry.load_pipeline(settings["model"], dtype=settings["dtype"], scheduler=settings["scheduler"],
                                  progress=progress, requires_safety_checker=False)


def known_pipeline_class(model: str) -> type | None:
    """The model's SEGA pipeline class when known without loading it (a built-in name or a local folder),
    else None (a hub id)."""
    if model in BUILTIN_MODELS:
        return registry.SD.sega  # both built-in models are SD-shaped
    if Path(model).expanduser().is_dir():
        return registry.pipeline_class(Path(model).expanduser())
    return None


def _check_early(settings: dict, out: str | None) -> None:
    """Cheap checks before the model loads: the scheduler name, SDXL-only settings, the output pattern."""
    if settings["scheduler"]:
        try:
            scheduler_from_name(settings["scheduler"], SD_DDIM)
        except ValueError as err:
            raise CLIError(f"--scheduler: {err}") from None
    model = settings["model"]
    if model not in BUILTIN_MODELS and not Path(model).expanduser().is_dir():
        if Path(model).exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise CLIError(f"--model {model}: no such diffusers pipeline folder (nor a hub id like "
                           "'owner/name'); offline models: --model demo (trained, shipped) or tiny "
                           "(random weights)")
    pipeline = known_pipeline_class(model)
    if pipeline is not None:
        check_family(settings, pipeline)
    output_paths(out, 0, range(settings["n"]))


def _write_images(pipe, settings: dict, images: list, out: str | None, only: int | None) -> list[Path]:
    indices = list(range(len(images))) if only is None else [only]
    paths = output_paths(out, settings["seed"], indices)
    for i, path in zip(indices, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        images[i].save(path, pnginfo=png_info(settings, pipe.scheduler.config, i, type(pipe)))
    return paths


def run_pipeline(pipe, settings: dict, args: argparse.Namespace):
    """Check the settings against the loaded family, fill the pipeline's own guidance default (unless a
    flag or the PNG gave one) and run it: the same `prepare` + `run` for every family."""
    check_family(settings, type(pipe))
    if "guidance" not in vars(args) and not getattr(args, "from_png", None):
        settings["guidance"] = registry.family_of_pipeline(pipe).default_guidance
    load_loras(pipe, [parse_lora(spec) for spec in settings.get("lora") or []])
    job = pipe.prepare(**prepare_kwargs(settings))
    return pipe.run(job, run_safety_checker=settings["safety_checker"])


def _compare(source: str, image) -> str:
    import numpy as np
    from PIL import Image

    with Image.open(source) as original:
        before = np.asarray(original.convert("RGB"), np.int16)
    after = np.asarray(image.convert("RGB"), np.int16)
    if before.shape != after.shape:
        return f"differs from {source} (size {before.shape[1]}x{before.shape[0]})"
    diff = int(np.abs(before - after).max())
    return f"identical to {source}" if diff == 0 else f"differs from {source} (max |diff| {diff}/255)"


def generate(args: argparse.Namespace) -> int:
    settings, index = resolve_settings(args)
    out = getattr(args, "out", None)
    configure_cache(getattr(args, "no_cache", False))
    _check_early(settings, out)
    if settings["model"] not in BUILTIN_MODELS and Path(settings["model"]).expanduser().is_dir():
        settings["model"] = str(Path(settings["model"]).expanduser().resolve())
    start = time.perf_counter()
    pipe = load_pipeline(settings, getattr(args, "progress", False))
    result = run_pipeline(pipe, settings, args)
    settings["seed"] = result.seed
    settings["height"], settings["width"] = result.images[0].height, result.images[0].width
    written = _write_images(pipe, settings, result.images, out, index)
    seconds = time.perf_counter() - start
    print(f"seed {result.seed}: {len(result.images)} image(s) {settings['width']}x{settings['height']}, "
          f"{settings['steps']} steps, {len(settings['edit'])} edit(s) in {seconds:.1f} s")
    for path in written:
        print(path)
    if index is not None:
        print(_compare(args.from_png, result.images[index]))
    if result.nsfw_content_detected and any(result.nsfw_content_detected):
        print("the safety checker blacked out image(s) it flagged as NSFW")
    return 0


# -- entry point -------------------------------------------------------------------------------------------


def _dispatch(command: str, argv: list[str]) -> int:
    module_name, _ = EXTERNAL[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CLIError(f"'{command}' is not available in this installation ({err})") from None
    return int(module.main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """`sega-jax COMMAND ...`; returns the exit status (0 ok, 1 failed run, 2 bad flags or values)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found" when it isn't
    try:
        if argv and argv[0] in EXTERNAL:
            return _dispatch(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        if args.version:
            print(f"sega-jax {__version__}")
            return 0
        if args.command != "generate":
            build_parser().print_help()
            return 2
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return generate(args)
    except CLIError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, FloatingPointError, ImportError, KeyError) as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
