"""What the `sega-jax` verbs share: the parser with one-line errors, flag types, the compilation-cache flag
and warnings printed as one line. May import `settings` and what lies below, never another entry point."""

from __future__ import annotations

import argparse
import os
import sys

from sega_jax.runtime.cache import ENV_VAR, enable_compilation_cache
from sega_jax.settings import CLIError, parse_integer

PROG = "sega-jax"
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


def flag_type(kind, what: str, **bounds):
    """An argparse `type` that reports bad values as argparse errors with our wording."""

    def convert(text: str):
        try:
            return kind(text, what, **bounds)
        except CLIError as err:  # argparse prefixes "argument --flag: " itself
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{what} ")) from None

    convert.__name__ = what
    return convert


def size_flag(text: str, what: str) -> int:
    value = parse_integer(text, what, minimum=8)
    if value % 8:
        raise CLIError(f"{what} must be a multiple of 8, got {value}")
    return value


def dtype_flag(text: str, what: str) -> str:
    names = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
             "float16": "float16", "fp16": "float16"}
    if text.lower() not in names:
        raise CLIError(f"{what} must be one of float32, bfloat16, float16, got {text!r}")
    return names[text.lower()]


def configure_cache(no_cache: bool) -> None:
    if no_cache:
        os.environ[ENV_VAR] = "off"  # also for the pipeline's own call
        return
    enable_compilation_cache()  # before the model loads: its small cast programs are cached too


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if not isinstance(err, KeyError) else f"missing {text}"


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)
