"""The LEDITS++ case of `sega-jax bench --ledits`: invert a photo and edit it, ours against diffusers'
`LEditsPPPipelineStableDiffusion`, one process, the same saved random-weight model.

Both sides invert the same picture with the same draws (diffusers' are recorded on an untimed first
`invert` and injected into ours), then edit with `--concepts` concepts and the default masks (intersect; the
noise mask for tiny). Timed per call (invert, edit); ours after one untimed (compiling) invert + edit pair,
diffusers' after that recording `invert`. The ratio is over invert + edit.
diffusers' tokenizer is given each concept's own token count (see README: LEDITS++ deviations), so the
outputs are comparable.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sega_jax.bench.common import CONCEPTS, PeakRSS, build_reference, describe_difference
from sega_jax.pipelines import LEditsPPPipelineStableDiffusion
from sega_jax.testing.reference import ledits_reference, recorded_inversion, smooth_photo

SKIP = 0.15  # diffusers' default


def edit_kwargs(args) -> dict:

    k = args.concepts
    # The tiny model has no cross-attention at 1/4 of the latent size: the noise-magnitude mask there.
    return dict(editing_prompt=CONCEPTS[:k], edit_guidance_scale=[5.0] * k, edit_threshold=[0.9] * k,
                reverse_editing_direction=[i % 2 == 1 for i in range(k)], output_type="latent",
                use_intersect_mask=args.model != "tiny")


def time_diffusers(reference, args) -> tuple[dict, np.ndarray]:
    """(timings, the draws of its inversion (draws, 1, 4, h, w))."""
    import torch
    from diffusers.pipelines.ledits_pp import pipeline_leditspp_stable_diffusion as module


    torch.set_num_threads(args.threads or torch.get_num_threads())
    invert = dict(num_inversion_steps=args.steps, skip=SKIP)
    with torch.inference_mode(), recorded_inversion(module) as (draws, _):
        reference.invert(smooth_photo(args.size), generator=torch.Generator().manual_seed(0), **invert)
    noise = torch.stack(draws).numpy()
    invert_s, edit_s = [], []
    with PeakRSS() as memory, torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            reference.invert(smooth_photo(args.size), generator=torch.Generator().manual_seed(0), **invert)
            invert_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = reference(**edit_kwargs(args))
            edit_s.append(time.perf_counter() - start)
    return dict(invert_s=min(invert_s), edit_s=min(edit_s), peak_mb=memory.peak / 2**20,
                images=out.images.float().numpy()), noise


def time_ours(folder: Path, noise: np.ndarray, args) -> dict:

    pipe = LEditsPPPipelineStableDiffusion.from_pretrained(folder, dtype=args.dtype,
                                                           requires_safety_checker=False)
    pipe.set_scheduler("DPMSolverMultistepScheduler")
    pipe.set_progress_bar_config(disable=True)
    invert = dict(num_inversion_steps=args.steps, skip=SKIP, noise=noise)
    invert_s, edit_s = [], []
    with PeakRSS() as memory:
        start = time.perf_counter()
        pipe.invert(smooth_photo(args.size), **invert)
        np.asarray(pipe(**edit_kwargs(args)).images)
        first_s = time.perf_counter() - start
        for _ in range(args.repeats):
            start = time.perf_counter()
            pipe.invert(smooth_photo(args.size), **invert)
            invert_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            images = np.asarray(pipe(**edit_kwargs(args)).images)
            edit_s.append(time.perf_counter() - start)
    best = min(invert_s) + min(edit_s)
    return dict(invert_s=min(invert_s), edit_s=min(edit_s), compile_s=first_s - best,
                peak_mb=memory.peak / 2**20, images=images)


def run(args, folder: Path) -> None:

    reference = ledits_reference(build_reference(args.model, folder))
    theirs, noise = (None, None) if args.skip_diffusers else time_diffusers(reference, args)
    if noise is None:
        noise = np.random.default_rng(0).standard_normal(
            (args.steps, 1, 4, args.size // 8, args.size // 8), dtype=np.float32)
    ours = time_ours(folder, noise, args)
    line = lambda name, r: (f"{name}: invert {r['invert_s']:.2f} s  edit {r['edit_s']:.2f} s  "
                            f"total {r['invert_s'] + r['edit_s']:.2f} s  peak +{r['peak_mb']:.0f} MB")
    print(f"LEDITS++ {args.model} {args.size}x{args.size}: {args.steps} inversion steps (skip {SKIP}), "
          f"{args.concepts} concepts, use_intersect_mask={args.model != 'tiny'}, "
          f"dtype={args.dtype or 'float32'}")
    print(line("sega-jax ", ours) + f"  compile {ours['compile_s']:.2f} s")
    if theirs is not None:
        print(line("diffusers", theirs) + f"  (cpu, {args.torch_dtype})")
        ratio = (theirs["invert_s"] + theirs["edit_s"]) / (ours["invert_s"] + ours["edit_s"])
        print(f"ratio diffusers/sega-jax (invert + edit): {ratio:.2f}x")
        print(describe_difference(np.asarray(ours["images"]), np.asarray(theirs["images"])))
