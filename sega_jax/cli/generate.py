"""The `sega-jax` command: `generate` (SEGA images as PNGs that carry their settings), `sweep`, `bench`.

Heavy imports (JAX, the models) happen only inside the subcommands, so `--help` and bad flags are instant.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from sega_jax.builtin.demo import BUILTIN_MODELS, DEMO_NOTICE
from sega_jax.settings import (
    DEFAULTS,
    FORMAT,
    METADATA_KEY,
    MODEL_ENV,
    NEVER,
    SETTING_KEYS,
    XL_FLAGS,
    XL_PIPELINE,
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

__all__ = ["DEFAULTS", "FORMAT", "METADATA_KEY", "MODEL_ENV", "NEVER", "SETTING_KEYS", "XL_FLAGS", "CLIError",
           "Edit", "build_parser", "call_kwargs", "check_family", "edit_kwargs", "main", "parameters_text",
           "parse_edit", "png_info", "prepare_kwargs", "read_png_settings", "resolve_settings",
           "sampler_name"]

PROG = "sega-jax"
EXTERNAL = {
    "edit": ("sega_jax.cli.edit", "edit a photo with LEDITS++ (invert it once, then semantic concepts)"),
    "sweep": ("sega_jax.sweep.command",
              "seed x edit-strength sweeps over all devices (resumable, multi-host)"),
    "bench": ("sega_jax.bench.sega", "time sega-jax against diffusers on the same model"),
    "app": ("sega_jax.app", "the semantic editor in the browser (Gradio: pip install \"sega-jax[app]\")"),
}
EDIT_HELP = """\
Edit syntax: --edit "TEXT[@OPTIONS]", repeatable, one concept per flag. TEXT may contain commas; OPTIONS
is a comma-separated list of
  scale=5          edit guidance scale (edit_guidance_scale)
  threshold=0.9    quantile in [0, 1]: the share of latent entries left unedited (edit_threshold)
  warmup=10        steps before the edit is applied (edit_warmup_steps)
  cooldown=none    step from which it is no longer applied; none = never (edit_cooldown_steps)
  weight=1         the concept's weight (edit_weights)
  reverse          push away from the concept instead (reverse_editing_direction; or reverse=false)
(the defaults shown are diffusers'). A TEXT containing '@' ends with an '@': "me@home@" or
"me@home@scale=3". Example:
  sega-jax generate --prompt "a photo of the face of a woman" \\
      --edit "smiling, smile@scale=4,threshold=0.99,warmup=5" --edit "glasses@scale=5,threshold=0.975" \\
      --edit "curls, wavy hair@reverse" --seed 21 --out out/

Every PNG carries its settings (an A1111-style `parameters` text and JSON under `sega_jax`):
`sega-jax generate --from-png out/sega_21_0.png` reproduces it; other flags override the file's settings.
The model is --model, else $SEGA_JAX_MODEL, else 'demo' (the small trained model shipped in the package,
when this installation has it) or 'tiny' (random weights); neither needs a download. An SDXL folder
(or hub id) runs SemanticStableDiffusionXLPipeline: its guidance default is 5.0 (SD: 7.5), and it takes the
SDXL-only flags --prompt-2, --negative-prompt-2, --guidance-rescale, --original-size, --target-size and
--crops-coords-top-left (an error on an SD model)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`sega-jax generate: error: ...`) instead of usage + error."""

    def error(self, message: str):
        raise CLIError(f"{message} (see {self.prog} --help)")


# -- the parser --------------------------------------------------------------------------------------------


def _arg(kind, what: str, **bounds):
    """An argparse `type` that reports bad values as argparse errors with our wording."""

    def convert(text: str):
        try:
            return kind(text, what, **bounds)
        except CLIError as err:  # argparse prefixes "argument --flag: " itself
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{what} ")) from None

    convert.__name__ = what
    return convert


def _size(text: str, what: str) -> int:
    value = parse_integer(text, what, minimum=8)
    if value % 8:
        raise CLIError(f"{what} must be a multiple of 8, got {value}")
    return value


def _dtype(text: str, what: str) -> str:
    names = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
             "float16": "float16", "fp16": "float16"}
    if text.lower() not in names:
        raise CLIError(f"{what} must be one of float32, bfloat16, float16, got {text!r}")
    return names[text.lower()]


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
    add("--edit", action="append", metavar="TEXT[@OPTIONS]", type=_arg(_edit, "--edit"),
        help="an editing concept with its settings (repeatable; syntax below)")
    add("--steps", type=_arg(parse_integer, "--steps", minimum=1, maximum=1000),
        help="denoising steps (num_inference_steps; default 50)")
    add("--guidance", type=_arg(parse_finite, "--guidance"),
        help="classifier-free guidance scale (default: the pipeline's, 7.5 for SD, 5.0 for SDXL)")
    add("--scheduler", help="ddim, pndm, plms, lms, lms-karras, euler, euler-karras, euler-a, dpm++2m, "
                            "dpm++2m-karras or a diffusers class name (default: the model's own)")
    add("--height", type=_arg(_size, "--height"), help="image height, a multiple of 8 (default: the model's)")
    add("--width", type=_arg(_size, "--width"), help="image width, a multiple of 8 (default: the model's)")
    add("--seed", type=_arg(parse_integer, "--seed", maximum=2**32 - 1),
        help="random seed in [0, 2**32) (default: a random one, printed and saved in the PNG)")
    add("--n", type=_arg(parse_integer, "--n", minimum=1, maximum=1024), help="images per prompt (default 1)")
    add("--dtype", type=_arg(_dtype, "--dtype"), help="float32 (default), bfloat16 or float16")
    add("--eta", type=_arg(parse_finite, "--eta"), help="DDIM eta (default 0)")
    add("--momentum-scale", type=_arg(parse_finite, "--momentum-scale"),
        help="SEGA momentum scale (edit_momentum_scale; default 0.1)")
    add("--mom-beta", type=_arg(parse_finite, "--mom-beta"),
        help="SEGA momentum beta (edit_mom_beta; default 0.4)")
    add("--lora", action="append", metavar="FILE[@SCALE]", type=_arg(lora_setting, "--lora"),
        help="LoRA weights (diffusers or kohya .safetensors) at SCALE (default 1; repeatable)")
    add("--no-safety-checker", dest="safety_checker", action="store_false",
        help="skip the model's safety checker (when its folder has one)")
    xl = p.add_argument_group("SDXL only (an error on an SD 1.x/2.x model)")
    xl.add_argument("--prompt-2", help="the prompt for the second text encoder (default: --prompt)")
    xl.add_argument("--negative-prompt-2", help="the negative prompt for the second text encoder")
    xl.add_argument("--guidance-rescale", type=_arg(_rescale, "--guidance-rescale"),
                    help="rescale the guided prediction towards the text one's std, in [0, 1] (default 0)")
    xl.add_argument("--original-size", type=_arg(_pair, "--original-size"), metavar="H,W",
                    help="micro-conditioning original size, height,width (default: the image size)")
    xl.add_argument("--target-size", type=_arg(_pair, "--target-size"), metavar="H,W",
                    help="micro-conditioning target size, height,width (default: the image size)")
    xl.add_argument("--crops-coords-top-left", type=_arg(_pair, "--crops-coords-top-left"),
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
    from sega_jax.builtin import tiny

    if settings["model"] in BUILTIN_MODELS:
        print(tiny.TINY_NOTICE if settings["model"] == "tiny" else DEMO_NOTICE, flush=True)
    return tiny.load_pipeline(settings["model"], dtype=settings["dtype"], scheduler=settings["scheduler"],
                              progress=progress)


def model_is_xl(model: str) -> bool | None:
    """Whether the model is SDXL, known without loading it ("tiny" or a local folder), else None."""
    if model in BUILTIN_MODELS:
        return False
    if Path(model).expanduser().is_dir():
        from sega_jax.loaders.folders import is_xl_folder

        return is_xl_folder(Path(model).expanduser())
    return None


def _check_early(settings: dict, out: str | None) -> None:
    """Cheap checks before the model loads: the scheduler name, SDXL-only settings, the output pattern."""
    if settings["scheduler"]:
        from sega_jax.builtin.tiny import SD_DDIM
        from sega_jax.schedulers import scheduler_from_name

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
    xl = model_is_xl(model)
    if xl is not None:
        check_family(settings, xl)
    output_paths(out, 0, range(settings["n"]))


def _write_images(pipe, settings: dict, images: list, out: str | None, only: int | None) -> list[Path]:
    indices = list(range(len(images))) if only is None else [only]
    paths = output_paths(out, settings["seed"], indices)
    for i, path in zip(indices, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        images[i].save(path, pnginfo=png_info(settings, pipe.scheduler.config, i, type(pipe).__name__))
    return paths


def default_guidance(pipe) -> float:
    """The pipeline's own `guidance_scale` default (diffusers': SD 7.5, SDXL 5.0)."""
    return float(inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)


def run_pipeline(pipe, settings: dict, args: argparse.Namespace):
    """Check the settings against the loaded family, fill the pipeline's own guidance default (unless a
    flag or the PNG gave one) and run it: the same `prepare` + `run` for every family."""
    check_family(settings, type(pipe).__name__ == XL_PIPELINE)
    if "guidance" not in vars(args) and not getattr(args, "from_png", None):
        settings["guidance"] = default_guidance(pipe)
    from sega_jax.loaders.lora import load_loras

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
    _configure_cache(getattr(args, "no_cache", False))
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


def _configure_cache(no_cache: bool) -> None:
    from sega_jax.runtime.cache import ENV_VAR, enable_compilation_cache

    if no_cache:
        os.environ[ENV_VAR] = "off"  # also for the pipeline's own call
        return
    enable_compilation_cache()  # before the model loads: its small cast programs are cached too


# -- entry point -------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if not isinstance(err, KeyError) else f"missing {text}"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


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
            from sega_jax import __version__

            print(f"sega-jax {__version__}")
            return 0
        if args.command != "generate":
            build_parser().print_help()
            return 2
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return generate(args)
    except CLIError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, FloatingPointError, ImportError, KeyError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
