"""Side-by-side benchmark: sega-jax against diffusers' SemanticStableDiffusionPipeline, one process.

Both run on the same saved random-weight model with the same latents and edit settings. Prints ms per
denoising step for each, the ratio (diffusers / ours: > 1 means we are faster), our compile time and
the peak resident memory each run added. Needs the test extra (torch, diffusers).

    python3 scripts/benchmark.py --model tiny --steps 20 --concepts 4
    python3 scripts/benchmark.py --model sd15 --steps 3 --concepts 2 --size 512
    python3 scripts/benchmark.py --model sdxl --steps 2 --concepts 2 --size 512 --repeats 1
    python3 scripts/benchmark.py --model sd15 --ledits --steps 10 --concepts 2 --size 512 --repeats 1

SDXL (`sdxl-tiny`, `sdxl`: the real architecture with random weights): ours is
SemanticStableDiffusionXLPipeline; diffusers has no SEGA for SDXL, so its side is diffusers' SEGA pipeline
code around diffusers' SDXL UNet (`sega_jax.testing.reference.sega_xl_reference`, the tests' oracle), whose
text embeddings are computed before its timing starts (ours encode the text inside theirs). Two fp32 copies of
the SDXL UNet do not fit 24 GB, so for SDXL diffusers runs first and is freed before ours loads.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from sega_jax.bench import ledits as benchmark_ledits
from sega_jax.bench.common import CONCEPTS, PeakRSS, build_reference, describe_difference
from sega_jax.pipelines import SemanticStableDiffusionPipeline, SemanticStableDiffusionXLPipeline
from sega_jax.testing.reference import build_reference_xl as build
from sega_jax.testing.reference import sega_xl_reference

# The SD 1.5 UNet's forward FLOPs per sample at 512x512 (issue 8's figure); the tiny model's are negligible.
UNET_TFLOP_PER_SAMPLE = {"sd15": 0.80, "tiny": 0.0, "sdxl-tiny": 0.0, "sdxl": 0.0}  # sdxl: not measured
XL_MODELS = {"sdxl-tiny": "tiny", "sdxl": "sdxl"}  # --model -> sega_jax.testing.reference's XL_CONFIGS key
PROMPT = "a photo of the face of a woman"


def release_freed_memory() -> None:
    """Collect, then hand glibc's freed heap back to the system: torch's freed weights otherwise stay
    resident (glibc's mmap threshold grows past the size of a weight) under the next model's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build_reference_xl(model: str, folder: Path):
    """diffusers' SDXL pipeline with random weights (tiny: randomized; sdxl: diffusers' own init), saved in
    1 GB shards (safetensors copies a shard to bytes while writing it)."""
    pipe = build(XL_MODELS[model], randomized=model == "sdxl-tiny")
    pipe.save_pretrained(folder, max_shard_size="1GB")
    return pipe


def call_kwargs(args) -> dict:
    k = args.concepts
    xl = {"guidance_scale": 5.0} if args.model in XL_MODELS else {}  # the two sides' defaults differ
    return dict(
        **xl,
        prompt=PROMPT,
        num_inference_steps=args.steps,
        height=args.size,
        width=args.size,
        editing_prompt=CONCEPTS[:k] or None,
        edit_warmup_steps=[1] * k,
        edit_guidance_scale=[5.0] * k,
        edit_threshold=[0.95] * k,
        output_type=args.output_type,
    )


def load_ours(folder: Path, args):
    if args.model in XL_MODELS:
        pipe = SemanticStableDiffusionXLPipeline.from_pretrained(folder, dtype=args.dtype)
    else:
        pipe = SemanticStableDiffusionPipeline.from_pretrained(folder, dtype=args.dtype,
                                                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_ours(folder: Path, latents: np.ndarray, args) -> dict:
    pipe = load_ours(folder, args)
    with PeakRSS() as memory:
        start = time.perf_counter()
        first = pipe(latents=latents, **call_kwargs(args))
        first_s = time.perf_counter() - start
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = pipe(latents=latents, **call_kwargs(args))
            runs.append(time.perf_counter() - start)
    best = min(runs)
    return dict(
        ms_per_step=1000 * best / args.steps,
        total_s=best,
        compile_s=first_s - best,
        peak_mb=memory.peak / 2**20,
        gpu_mb=_jax_gpu_peak_mb(),
        images=out.images,
        first=first.images,
    )


def time_diffusers(reference, latents: np.ndarray, args) -> dict:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device, dtype = torch.device(args.torch_device), getattr(torch, args.torch_dtype)
    reference.to(device, dtype)
    start_latents = torch.from_numpy(latents).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = []
    with PeakRSS() as memory, torch.inference_mode():
        for _ in range(args.repeats + (device.type == "cuda")):  # on a GPU, one warm-up call
            sync()
            start = time.perf_counter()
            out = reference(latents=start_latents, **call_kwargs(args))
            sync()
            runs.append(time.perf_counter() - start)
    best = min(runs)
    images = out.images
    if isinstance(images, torch.Tensor):
        images = images.float().cpu().numpy()
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return dict(ms_per_step=1000 * best / args.steps, total_s=best, peak_mb=memory.peak / 2**20,
                gpu_mb=gpu_mb, images=images)


def unet_flops_per_step(args) -> float:
    """Model FLOPs of one denoising step: the UNet on [uncond, text, concepts...] (SD 1.5: ~0.80 TFLOP per
    sample at 64x64 latents, scaling with the latent area)."""
    batch = 2 + args.concepts
    return UNET_TFLOP_PER_SAMPLE[args.model] * 1e12 * batch * (args.size / 512) ** 2


def _jax_gpu_peak_mb() -> float | None:
    """JAX's peak GPU bytes in use, in MB; None off the GPU."""
    import jax

    if jax.default_backend() != "gpu":
        return None
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sega-jax bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "sd15", *XL_MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concepts", type=int, default=4, choices=range(0, len(CONCEPTS) + 1))
    parser.add_argument("--size", type=int, default=None,
                        help="image size (default 64 tiny and sdxl-tiny, 512 sd15 and sdxl)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="our dtype (float32 default, bfloat16)")
    parser.add_argument(
        "--output-type",
        default="latent",
        choices=("latent", "np"),
        help="latent times the denoising loop alone; np adds the VAE decode",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--torch-device", default="cpu", help="diffusers' device (cpu, cuda)")
    parser.add_argument("--torch-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s in our dtype, to report model FLOP utilisation")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--ledits", action="store_true",
                        help="LEDITS++: invert a photo (--steps inversion steps) and edit it (SD models)")
    parser.add_argument("--save-folder", type=Path, default=None,
                        help="keep the generated diffusers folder here (for --folder on a torch-free Python)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="time sega-jax alone on this saved folder (of --model's kind); needs no torch")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.model in ("tiny", "sdxl-tiny") else 512)
    if args.ledits and (args.model in XL_MODELS or args.folder is not None):
        parser.error("--ledits takes --model tiny or sd15 (and no --folder)")
    return args


def _gpu(result: dict) -> str:
    return "" if result.get("gpu_mb") is None else f"  gpu peak {result['gpu_mb']:.0f} MB"


def start_latents(reference, args) -> np.ndarray:
    return _latents(len(reference.vae.config.block_out_channels), args)


def _latents(vae_blocks: int, args) -> np.ndarray:
    side = args.size // 2 ** (vae_blocks - 1)
    return np.random.default_rng(0).standard_normal((1, 4, side, side), dtype=np.float32)


def run_saved(args) -> tuple[dict, None]:
    """Ours alone on a folder an earlier run saved (`--save-folder`): CI's torch-free Python 3.12 leg."""
    blocks = len(json.loads((args.folder / "vae" / "config.json").read_text())["block_out_channels"])
    return time_ours(args.folder, _latents(blocks, args), args), None


def run_sd(args, folder: Path) -> tuple[dict, dict | None]:
    reference = build_reference(args.model, folder)
    latents = start_latents(reference, args)
    ours = time_ours(folder, latents, args)
    theirs = None if args.skip_diffusers else time_diffusers(reference, latents, args)
    return ours, theirs


def run_xl(args, folder: Path) -> tuple[dict, dict | None]:
    """diffusers first (SEGA code around its SDXL UNet), freed before ours loads: never two copies."""
    import torch

    reference = build_reference_xl(args.model, folder)
    latents = start_latents(reference, args)
    theirs = None
    if not args.skip_diffusers:
        reference.to(torch.device(args.torch_device), getattr(torch, args.torch_dtype))
        oracle = sega_xl_reference(reference, PROMPT, CONCEPTS[:args.concepts], args.size)
        theirs = time_diffusers(oracle, latents, args)
        del oracle
    del reference
    release_freed_memory()
    return time_ours(folder, latents, args), theirs


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.ledits:
        with tempfile.TemporaryDirectory() as tmp:
            benchmark_ledits.run(args, args.save_folder or Path(tmp))
        return 0
    if args.folder is not None:
        ours, theirs = run_saved(args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.save_folder or Path(tmp)
            ours, theirs = (run_xl if args.model in XL_MODELS else run_sd)(args, folder)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}; "
        f"model={args.model} "
        f"size={args.size} steps={args.steps} concepts={args.concepts} output={args.output_type} "
        f"dtype={args.dtype or 'float32'}"
    )
    if args.model in XL_MODELS and theirs is not None:
        print("order: diffusers (SEGA code around its SDXL UNet) ran first and was freed before sega-jax "
              "loaded: the two fp32 copies are not held at once")
    print(
        f"sega-jax : {ours['ms_per_step']:9.1f} ms/step  total {ours['total_s']:.2f} s  "
        f"compile {ours['compile_s']:.2f} s  peak +{ours['peak_mb']:.0f} MB{_gpu(ours)}"
    )
    flops = unet_flops_per_step(args)
    if flops and args.peak_tflops:
        achieved = flops / (ours["ms_per_step"] / 1000) / 1e12
        print(f"sega-jax UNet: {achieved:.1f} TFLOP/s = {100 * achieved / args.peak_tflops:.1f}% of "
              f"{args.peak_tflops:g} TFLOP/s peak (model FLOP utilisation)")
    if theirs is not None:
        print(
            f"diffusers: {theirs['ms_per_step']:9.1f} ms/step  total {theirs['total_s']:.2f} s  "
            f"peak +{theirs['peak_mb']:.0f} MB{_gpu(theirs)}  ({args.torch_device}, {args.torch_dtype})"
        )
        print(f"ratio diffusers/sega-jax per step: {theirs['ms_per_step'] / ours['ms_per_step']:.2f}x")
        with contextlib.suppress(Exception):
            print(describe_difference(np.asarray(ours["images"]), np.asarray(theirs["images"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
