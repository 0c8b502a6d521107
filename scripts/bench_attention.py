"""Benchmark the attention backends against each other and against PyTorch's SDPA on this machine.

    python scripts/bench_attention.py                       # SD's and the tiny model's shapes, all variants
    python scripts/bench_attention.py --shapes 3,4096,8,40 --variants xla,chunked,torch --rounds 5

Shapes are (batch, length, heads, head_dim) self-attention, or B,L,H,D,KEYS for cross-attention onto KEYS
tokens (77: the text encoder's), in fp32. Every variant is jitted and warmed up
once, then the variants are timed in interleaved rounds in a rotating order (so load from other processes
hits all of them alike), and the best wall time per variant is printed (ms) with its max relative
difference to "xla".
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sega_jax.models import attention as A  # noqa: E402

SHAPES = ["3,4096,8,40", "3,1024,8,80", "1,4096,1,512", "3,4096,8,40,77", "3,256,8,160", "6,1024,4,8",
          "6,1024,4,8,77"]
VARIANTS = {
    "xla": A.xla_attention,  # the plain einsum/softmax path
    "jax.nn(xla)": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
    "chunked": A.chunked_attention,  # the defaults the automatic choice uses
    "chunked q256": functools.partial(A.chunked_attention, q_chunk=256),
    "chunked q512": functools.partial(A.chunked_attention, q_chunk=512),
    "chunked q2048": functools.partial(A.chunked_attention, q_chunk=2048),
    "chunked q4096": functools.partial(A.chunked_attention, q_chunk=4096),
    "chunked k1024": functools.partial(A.chunked_attention, q_chunk=1024, k_chunk=1024),  # online softmax
    "batched": A.batched_attention,  # the CPU choice for short key sequences
    "auto": A.dot_product_attention,
}


def _torch_sdpa(q, k, v, threads):
    import torch

    torch.set_num_threads(threads)
    tq, tk, tv = (torch.from_numpy(np.array(t)).transpose(1, 2).contiguous() for t in (q, k, v))

    def run():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    return run, lambda out: out.transpose(1, 2).numpy()


def bench(shape, names, rounds, threads):
    b, length, h, d, keys = shape
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (b, length, h, d), jnp.float32)
    k, v = (jax.random.normal(key, (b, keys, h, d), jnp.float32) for key in (kk, kv))
    runs, outs = {}, {}
    for name in names:
        if name == "torch":
            try:
                run, to_np = _torch_sdpa(q, k, v, threads)
            except ImportError:
                print("torch not installed: skipping it", file=sys.stderr)
                continue
            outs[name] = to_np(run())
        else:
            fn = jax.jit(VARIANTS[name])
            run = lambda fn=fn: fn(q, k, v).block_until_ready()
            outs[name] = np.asarray(run())  # warm-up (compiles)
        runs[name] = run
    ref = outs.get("xla")
    best = dict.fromkeys(runs, float("inf"))
    order = list(runs)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:  # rotate: no fixed neighbour
            run = runs[name]
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    rows = []
    for name in runs:
        diff = "" if ref is None else f"{np.abs(outs[name] - ref).max() / np.abs(ref).max():.1e}"
        rows.append((name, best[name] * 1e3, diff))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=" ".join(SHAPES), help="space-separated B,L,H,D[,KEYS]")
    parser.add_argument("--variants", default=",".join([*VARIANTS, "torch"]),
                        help=f"comma-separated, from {[*VARIANTS, 'torch']}")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (best is kept)")
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n != "torch" and n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
          f"best of {args.rounds} after warm-up; diff = max|x - xla| / max|xla|")
    for spec in args.shapes.split():
        b, length, h, d, *rest = (int(x) for x in spec.split(","))
        shape = (b, length, h, d, rest[0] if rest else length)
        auto = A.select_implementation((b, length, h, d), (b, shape[4], h, d), jnp.float32)
        print(f"\n(B, L, H, D, keys) = {shape}   auto -> {auto}")
        print("| variant | ms | diff vs xla |\n|---|---:|---:|")
        for name, ms, diff in bench(shape, names, args.rounds, args.torch_threads):
            print(f"| {name} | {ms:.1f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
