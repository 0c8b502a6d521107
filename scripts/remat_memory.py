"""Backward-pass memory of `jax.grad` through the SEGA loop, with and without per-step remat.

Compiles (does not run) the gradient of a loss on the final latents with respect to the edit scales, at two
step counts, and prints XLA's temporary-buffer size for each, and its growth per extra step. The UNet's
weights are an argument of the program (not constants), as in research code that trains or sweeps them.

    python3 scripts/remat_memory.py FOLDER [--size 512] [--concepts 2]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sega_jax import SemanticStableDiffusionPipeline
from sega_jax.bench.sega import CONCEPTS
from sega_jax.core.sampler import sega_sample
from sega_jax.pipelines.base import denoiser


def temp_bytes(pipe, steps: int, size: int, concepts: int, remat: bool) -> int:
    job = pipe.prepare("a photo of the face of a woman", editing_prompt=CONCEPTS[:concepts], seed=0,
                       num_inference_steps=steps, height=size, width=size, edit_warmup_steps=0)
    graph, state = pipe.unet_parts

    def loss(scales, state):
        out = sega_sample(denoiser(nnx.merge(graph, state)), pipe.scheduler, job.schedule, job.noise,
                          job.context, job.params._replace(edit_guidance_scale=scales),
                          num_concepts=job.num_concepts, do_cfg=job.do_cfg, image_keys=job.image_keys,
                          eta=job.eta, replay=job.replay, shared_latents=True, remat=remat)
        return jnp.mean(out.latents ** 2)

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss)).lower(job.params.edit_guidance_scale, state).compile()
    size_bytes = compiled.memory_analysis().temp_size_in_bytes
    print(f"steps={steps} remat={remat}: temporaries {size_bytes / 2**20:.1f} MiB "
          f"(compiled in {time.perf_counter() - start:.0f} s)", flush=True)
    return size_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--concepts", type=int, default=2)
    args = parser.parse_args()
    pipe = SemanticStableDiffusionPipeline.from_pretrained(args.folder, requires_safety_checker=False)
    for remat in (True, False):
        two, three = (temp_bytes(pipe, n, args.size, args.concepts, remat) for n in (2, 3))
        print(f"remat={remat}: {(three - two) / 2**20:.2f} MiB more per step; "
              f"{three / 2**20:.0f} MiB at 3 steps")


if __name__ == "__main__":
    main()
