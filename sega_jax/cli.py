"""The `sega-jax` command: `generate` (SEGA images as PNGs that carry their settings), `sweep`, `bench`.

Heavy imports (JAX, the models) happen only inside the subcommands, so `--help` and bad flags are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "sega-jax"
MODEL_ENV = "SEGA_JAX_MODEL"
METADATA_KEY = "sega_jax"  # the PNG text chunk holding the full settings as JSON
FORMAT = "sega-jax/1"
NEVER = 10**6  # a cooldown step no loop reaches: diffusers' `edit_cooldown_steps=None`
EXTERNAL = {
    "sweep": ("sega_jax.sweep", "seed x edit-strength sweeps over all devices (resumable, multi-host)"),
    "bench": ("sega_jax.benchmark", "time sega-jax against diffusers on the same model"),
}
DEFAULTS: dict[str, Any] = dict(
    model=None,
    prompt=None,
    negative_prompt=None,
    edit=[],
    steps=50,
    guidance=7.5,
    scheduler=None,
    height=None,
    width=None,
    seed=None,
    n=1,
    dtype="float32",
    eta=0.0,
    momentum_scale=0.1,
    mom_beta=0.4,
    safety_checker=True,
)
# What a PNG's settings may set (the rest are about this run: output, cache, progress).
SETTING_KEYS = tuple(DEFAULTS)
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
The model is --model, else $SEGA_JAX_MODEL, else 'tiny' (random weights, no download)."""


class CLIError(ValueError):
    """A bad flag or value: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`sega-jax generate: error: ...`) instead of usage + error."""

    def error(self, message: str):
        raise CLIError(f"{message} (see {self.prog} --help)")


# -- edits -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Edit:
    """One editing concept and its settings (diffusers' per-concept defaults)."""

    prompt: str
    scale: float = 5.0
    threshold: float = 0.9
    warmup: int = 10
    cooldown: int | None = None
    weight: float = 1.0
    reverse: bool = False

    def inline(self) -> str:
        """The canonical `--edit` form, which `parse_edit` reads back to the same Edit."""
        options = [f"scale={_num(self.scale)}", f"threshold={_num(self.threshold)}", f"warmup={self.warmup}"]
        if self.cooldown is not None:
            options.append(f"cooldown={self.cooldown}")
        if self.weight != 1.0:
            options.append(f"weight={_num(self.weight)}")
        if self.reverse:
            options.append("reverse")
        return f"{self.prompt}@{','.join(options)}"


def _num(value: float) -> str:
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise CLIError(f"{what} must be a finite number, got {text!r}")
    return value


def _integer(text: str, what: str, minimum: int = 0, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CLIError(f"{what} must be an integer, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise CLIError(f"{what} must be an integer {bound}, got {value}")
    return value


def _boolean(text: str, what: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("", "1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise CLIError(f"{what} must be true or false, got {text!r}")


def _edit_option(key: str, value: str | None, spec: str) -> tuple[str, Any]:
    where = f"--edit {spec!r}: {key}"
    if key == "reverse":
        return key, True if value is None else _boolean(value, where)
    if value is None:
        raise CLIError(f"--edit {spec!r}: option {key!r} needs a value ({key}=...)")
    if key == "scale":
        return key, _finite(value, where)
    if key == "threshold":
        threshold = _finite(value, where)
        if not 0.0 <= threshold <= 1.0:
            raise CLIError(f"{where} must lie in [0, 1] (it is a quantile), got {value}")
        return key, threshold
    if key == "warmup":
        return key, _integer(value, where)
    if key == "cooldown":
        return key, None if value.strip().lower() in ("none", "never") else _integer(value, where)
    if key == "weight":
        return key, _finite(value, where)
    keys = "scale, threshold, warmup, cooldown, weight, reverse"
    raise CLIError(f"--edit {spec!r}: unknown option {key!r} (options: {keys})")


def parse_edit(spec: str) -> Edit:
    """`"TEXT@scale=5,threshold=0.975,warmup=10,cooldown=40,weight=1,reverse"` -> Edit."""
    text, _, options = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if not text.strip():
        raise CLIError(f"--edit {spec!r}: the concept text is empty")
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, eq, value = item.partition("=")
        key, parsed = _edit_option(key.strip().lower(), value.strip() if eq else None, spec)
        if key in values:
            raise CLIError(f"--edit {spec!r}: option {key!r} given twice")
        values[key] = parsed
    return Edit(text.strip(), **values)


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
    value = _integer(text, what, minimum=8)
    if value % 8:
        raise CLIError(f"{what} must be a multiple of 8, got {value}")
    return value


def _dtype(text: str, what: str) -> str:
    names = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
             "float16": "float16", "fp16": "float16"}
    if text.lower() not in names:
        raise CLIError(f"{what} must be one of float32, bfloat16, float16, got {text!r}")
    return names[text.lower()]


def _edit(text: str, what: str) -> str:
    parse_edit(text)  # validated now; kept as text so the PNG's settings stay in the documented form
    return text


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """Every `generate` flag. Defaults are applied after parsing (see DEFAULTS), so a PNG can fill them."""
    add = p.add_argument
    add("--model", help="a diffusers pipeline folder, a Hugging Face hub id (when online), or 'tiny' "
                        f"(random weights; the default unless ${MODEL_ENV} is set)")
    add("--prompt", help="what to draw")
    add("--negative-prompt", help="what to steer away from (diffusers' negative_prompt)")
    add("--edit", action="append", metavar="TEXT[@OPTIONS]", type=_arg(_edit, "--edit"),
        help="an editing concept with its settings (repeatable; syntax below)")
    add("--steps", type=_arg(_integer, "--steps", minimum=1, maximum=1000),
        help="denoising steps (num_inference_steps; default 50)")
    add("--guidance", type=_arg(_finite, "--guidance"), help="classifier-free guidance scale (default 7.5)")
    add("--scheduler", help="ddim, pndm, plms, lms, lms-karras, euler, euler-karras, euler-a, dpm++2m, "
                            "dpm++2m-karras or a diffusers class name (default: the model's own)")
    add("--height", type=_arg(_size, "--height"), help="image height, a multiple of 8 (default: the model's)")
    add("--width", type=_arg(_size, "--width"), help="image width, a multiple of 8 (default: the model's)")
    add("--seed", type=_arg(_integer, "--seed", maximum=2**32 - 1),
        help="random seed in [0, 2**32) (default: a random one, printed and saved in the PNG)")
    add("--n", type=_arg(_integer, "--n", minimum=1, maximum=1024), help="images per prompt (default 1)")
    add("--dtype", type=_arg(_dtype, "--dtype"), help="float32 (default), bfloat16 or float16")
    add("--eta", type=_arg(_finite, "--eta"), help="DDIM eta (default 0)")
    add("--momentum-scale", type=_arg(_finite, "--momentum-scale"),
        help="SEGA momentum scale (edit_momentum_scale; default 0.1)")
    add("--mom-beta", type=_arg(_finite, "--mom-beta"),
        help="SEGA momentum beta (edit_mom_beta; default 0.4)")
    add("--no-safety-checker", dest="safety_checker", action="store_false",
        help="skip the model's safety checker (when its folder has one)")
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


# -- settings ----------------------------------------------------------------------------------------------


def read_png_settings(path: str | os.PathLike) -> tuple[dict, int]:
    """(settings, index in its batch) from a PNG written by `sega-jax generate`."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except OSError as err:
        raise CLIError(f"--from-png {path}: cannot read it as an image ({err})") from None
    if METADATA_KEY not in text:
        raise CLIError(f"--from-png {path}: no '{METADATA_KEY}' settings in this PNG "
                       "(only PNGs written by sega-jax generate can be reproduced)")
    try:
        data = json.loads(text[METADATA_KEY])
        settings, index = data["settings"], int(data.get("index", 0))
    except (ValueError, KeyError, TypeError) as err:
        raise CLIError(f"--from-png {path}: unreadable '{METADATA_KEY}' settings ({err})") from None
    return {k: v for k, v in settings.items() if k in SETTING_KEYS}, index


def resolve_settings(args: argparse.Namespace) -> tuple[dict, int | None]:
    """Flags over the PNG's settings over the defaults; (settings, the PNG's image index or None)."""
    given = {k: v for k, v in vars(args).items() if k in SETTING_KEYS}
    from_png, index = ({}, None)
    if getattr(args, "from_png", None):
        from_png, index = read_png_settings(args.from_png)
        if "n" in given:
            index = None  # a new batch size: write the whole batch
    settings = {**DEFAULTS, **from_png, **given}
    settings["model"] = settings["model"] or os.environ.get(MODEL_ENV) or "tiny"
    if not settings["prompt"]:
        raise CLIError("--prompt is required (or --from-png FILE)")
    for spec in settings["edit"]:
        parse_edit(spec)  # a PNG's edits are checked like flags
    return settings, index


def edit_kwargs(edits: Sequence[Edit]) -> dict:
    """diffusers' per-concept arguments for the edits."""
    if not edits:
        return {}
    cooldowns = [NEVER if e.cooldown is None else e.cooldown for e in edits]
    return dict(
        editing_prompt=[e.prompt for e in edits],
        edit_guidance_scale=[e.scale for e in edits],
        edit_threshold=[e.threshold for e in edits],
        edit_warmup_steps=[e.warmup for e in edits],
        edit_cooldown_steps=None if all(e.cooldown is None for e in edits) else cooldowns,
        edit_weights=[e.weight for e in edits],
        reverse_editing_direction=[e.reverse for e in edits],
    )


def call_kwargs(settings: dict) -> dict:
    """The pipeline call (diffusers' argument names) for CLI settings."""
    return dict(
        prompt=settings["prompt"],
        negative_prompt=settings["negative_prompt"],
        num_inference_steps=settings["steps"],
        guidance_scale=settings["guidance"],
        height=settings["height"],
        width=settings["width"],
        num_images_per_prompt=settings["n"],
        eta=settings["eta"],
        seed=settings["seed"],
        edit_momentum_scale=settings["momentum_scale"],
        edit_mom_beta=settings["mom_beta"],
        run_safety_checker=settings["safety_checker"],
        **edit_kwargs([parse_edit(spec) for spec in settings["edit"]]),
    )


# -- PNG metadata ------------------------------------------------------------------------------------------


def sampler_name(config: dict) -> str:
    """The scheduler as other SD tools name it ("DDIM", "Euler a", "DPM++ 2M Karras", ...)."""
    name = config.get("_class_name", "?")
    karras = " Karras" if config.get("use_karras_sigmas") else ""
    if name == "DPMSolverMultistepScheduler":
        plus = "++" if config.get("algorithm_type") == "dpmsolver++" else ""
        return f"DPM{plus} {config.get('solver_order', 2)}M{karras}"
    if name == "PNDMScheduler":
        return "PLMS" if config.get("skip_prk_steps") else "PNDM"
    base = {"DDIMScheduler": "DDIM", "LMSDiscreteScheduler": "LMS", "EulerDiscreteScheduler": "Euler",
            "EulerAncestralDiscreteScheduler": "Euler a"}.get(name, name)
    return base + karras


def _field(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:\n"') else text


def parameters_text(settings: dict, sampler: str, index: int) -> str:
    """The A1111-style `parameters` text: prompt, negative prompt, then `Key: value` pairs."""
    lines = [settings["prompt"]]
    if settings["negative_prompt"]:
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    pairs = {
        "Steps": settings["steps"], "Sampler": sampler, "CFG scale": _num(settings["guidance"]),
        "Seed": settings["seed"], "Size": f"{settings['width']}x{settings['height']}",
        "Model": settings["model"], "Eta": _num(settings["eta"]), "Dtype": settings["dtype"],
    }
    if settings["n"] > 1:
        pairs.update({"Batch size": settings["n"], "Batch pos": index})
    if settings["edit"]:
        pairs["SEGA"] = " | ".join(settings["edit"])
        pairs["SEGA momentum"] = _num(settings["momentum_scale"])
        pairs["SEGA momentum beta"] = _num(settings["mom_beta"])
    from sega_jax import __version__

    pairs["Version"] = f"sega-jax {__version__}"
    lines.append(", ".join(f"{key}: {_field(value)}" for key, value in pairs.items()))
    return "\n".join(lines)


def png_info(settings: dict, scheduler_config: dict, index: int):
    """PNG text chunks: `parameters` (human-readable) and `sega_jax` (JSON, enough to reproduce)."""
    from PIL.PngImagePlugin import PngInfo

    from sega_jax import __version__

    info = PngInfo()
    info.add_text("parameters", parameters_text(settings, sampler_name(scheduler_config), index))
    data = {"format": FORMAT, "version": __version__, "settings": settings, "index": index,
            "scheduler_config": scheduler_config, "call": call_kwargs(settings)}
    info.add_text(METADATA_KEY, json.dumps(data, default=str))
    return info


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
    if settings["model"] == "tiny":
        from sega_jax.tiny import TINY_NOTICE, tiny_pipeline

        print(TINY_NOTICE, flush=True)
        pipe = tiny_pipeline(dtype=settings["dtype"])
    else:
        from sega_jax import SemanticStableDiffusionPipeline

        pipe = SemanticStableDiffusionPipeline.from_pretrained(
            settings["model"], dtype=settings["dtype"], requires_safety_checker=False)
    if settings["scheduler"]:
        pipe.set_scheduler(settings["scheduler"])
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def _check_early(settings: dict, out: str | None) -> None:
    """Cheap checks before the model loads: the scheduler name and the output pattern."""
    if settings["scheduler"]:
        from sega_jax.schedulers import scheduler_from_name
        from sega_jax.tiny import SD_DDIM

        try:
            scheduler_from_name(settings["scheduler"], SD_DDIM)
        except ValueError as err:
            raise CLIError(f"--scheduler: {err}") from None
    model = settings["model"]
    if model != "tiny" and not Path(model).expanduser().is_dir():
        if Path(model).exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise CLIError(f"--model {model}: no such diffusers pipeline folder (nor a hub id like "
                           "'owner/name'); use --model tiny for the offline random-weight model")
    output_paths(out, 0, range(settings["n"]))


def _write_images(pipe, settings: dict, images: list, out: str | None, only: int | None) -> list[Path]:
    indices = list(range(len(images))) if only is None else [only]
    paths = output_paths(out, settings["seed"], indices)
    for i, path in zip(indices, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        images[i].save(path, pnginfo=png_info(settings, pipe.scheduler.config, i))
    return paths


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
    if settings["model"] != "tiny" and Path(settings["model"]).expanduser().is_dir():
        settings["model"] = str(Path(settings["model"]).expanduser().resolve())
    start = time.perf_counter()
    pipe = load_pipeline(settings, getattr(args, "progress", False))
    result = pipe(**call_kwargs(settings))
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
    from sega_jax.cache import ENV_VAR, enable_compilation_cache

    if no_cache:
        os.environ[ENV_VAR] = "off"  # also for the pipeline's own call
        return
    enable_compilation_cache()


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
