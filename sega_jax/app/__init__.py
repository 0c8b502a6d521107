"""`sega-jax app`: the interactive semantic editor in the browser (Gradio: the optional extra sega-jax[app]).

`session` holds one loaded pipeline and its caches (no Gradio); `core` the input checks, compile counting and
photo helpers; `ui` the Gradio layout. This package may import `settings`, `pipelines` and what lies below;
never `cli`, `sweep` or `bench`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from sega_jax.app.session import Session, require_gradio
from sega_jax.app.ui import blocks
from sega_jax.pipelines import load_pipeline
from sega_jax.settings import MODEL_ENV, default_model

__all__ = ["Session", "build", "build_parser", "main"]


def build(pipe, model: str | None = None, folder: str | os.PathLike | None = None):
    """The app's Gradio Blocks for a loaded pipeline (any family): `build(pipe).launch()` in a notebook.
    `model` is the name the PNG metadata records; `folder` where the PNGs go (a temporary one by default)."""
    require_gradio()
    return blocks(Session(pipe, model, folder))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sega-jax app", description="The interactive semantic editor in the browser (Gradio): generate "
        "with SEGA concepts, sweep a strength, edit a photo with LEDITS++.")
    parser.add_argument("--model", help="a diffusers folder, a hub id, 'demo' or 'tiny' (default: "
                                        f"${MODEL_ENV}, else 'demo' when shipped, else 'tiny')")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="the port (default 7860)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weights and activations (default float32)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`sega-jax app [--model M] [--host H] [--port P]`: load the model, serve until interrupted."""
    args = build_parser().parse_args(argv)
    require_gradio()  # before the model loads: a missing extra is reported at once

    model = args.model or default_model()
    pipe = load_pipeline(model, dtype=args.dtype, progress=False, requires_safety_checker=False)
    app = build(pipe, model)
    print(f"sega-jax app: {model} ({type(pipe).__name__}) on http://{args.host}:{args.port}", flush=True)
    app.launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
