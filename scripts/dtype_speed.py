"""Our SEGA call per weight dtype, in one process, interleaved (issue 16: is bf16 slower than fp32 here?),
and the decoded images' quality against the first dtype's.

    python3 scripts/dtype_speed.py [FOLDER] [--size 64] [--steps 20] [--concepts 4] [--rounds 20]
                                   [--dtypes float32 bfloat16 float16]

FOLDER is a diffusers SD folder; without one, the benchmark's tiny model (`sega-jax bench --model tiny`) is
built in a temporary folder. Each dtype's pipeline is loaded and called once (compiling), then the calls
alternate between the dtypes for `--rounds` rounds, so that a slow stretch of a shared machine falls on
every dtype alike (separate processes differed by up to 7% run to run on a 2-core VM). Prints each dtype's
fastest and median call per denoising step (the whole call: text encoding, loop; `output_type="latent"`),
and their ratios to the first dtype's. Then each dtype's decoded image (`output_type="np"`, seed 0, in
[0, 1]) against the first dtype's: PSNR and the largest pixel difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", help="diffusers SD folder (default: the tiny benchmark model)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.set_defaults(model="tiny", output_type="latent")  # for the benchmark's `call_kwargs` (SD models)
    return parser.parse_args(argv)


def timed_calls(folder: str, args: argparse.Namespace) -> tuple[dict[str, list], dict[str, np.ndarray]]:
    """Each dtype's call times (seconds) and decoded image."""
    from sega_jax import SemanticStableDiffusionPipeline
    from sega_jax.bench.sega import call_kwargs

    kwargs = dict(call_kwargs(args), seed=0)  # the benchmark's prompt, concepts and edit settings
    pipes = {}
    for dtype in args.dtypes:
        pipe = SemanticStableDiffusionPipeline.from_pretrained(folder, dtype=dtype,
                                                               requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        np.asarray(pipe(**kwargs).images)  # compiles
        pipes[dtype] = pipe
    times = {dtype: [] for dtype in args.dtypes}
    for _ in range(args.rounds):
        for dtype, pipe in pipes.items():
            start = time.perf_counter()
            np.asarray(pipe(**kwargs).images)
            times[dtype].append(time.perf_counter() - start)
    images = {dtype: np.asarray(pipe(**dict(kwargs, output_type="np")).images, np.float64)
              for dtype, pipe in pipes.items()}
    return times, images


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = float(np.mean((image - reference) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder
        if folder is None:
            from sega_jax.bench.sega import build_reference

            folder = str(Path(scratch) / "tiny")
            build_reference("tiny", Path(folder))
        times, images = timed_calls(folder, args)
    print(f"{Path(args.folder).name if args.folder else 'tiny'}: size {args.size}, {args.steps} steps, "
          f"{args.concepts} concepts, {args.rounds} interleaved rounds (ms per step of the whole call)")
    first = args.dtypes[0]
    best = {dtype: 1000 * min(t) / args.steps for dtype, t in times.items()}
    median = {dtype: 1000 * statistics.median(t) / args.steps for dtype, t in times.items()}
    for dtype in args.dtypes:
        print(f"{dtype:>9}: fastest {best[dtype]:8.1f}  median {median[dtype]:8.1f}  "
              f"(x{best[dtype] / best[first]:.3f} / x{median[dtype] / median[first]:.3f} of {first})")
    for dtype in args.dtypes[1:]:
        print(f"{dtype:>9}: decoded image vs {first}'s: PSNR {psnr(images[dtype], images[first]):.1f} dB, "
              f"max abs diff {np.abs(images[dtype] - images[first]).max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
