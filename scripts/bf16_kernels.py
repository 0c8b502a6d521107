"""XLA:CPU's bf16 and fp32 matmul and 3x3 conv on SD 1.5's shapes (issue 16), as scripts/onednn_bf16.c times
oneDNN's: GFLOP/s per operand dtype and accumulator, median of `--repeats` calls.

    python3 scripts/bf16_kernels.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

MATMUL = (16384, 320, 2560)  # (4 x 64 x 64 tokens, 320) @ (320, 2 x 1280): SD 1.5's GEGLU at 64x64
CONV = (4, 64, 64, 320, 320)  # 3x3, NHWC, 320 -> 320 channels: SD 1.5's first level


def _time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def rows() -> list[tuple[str, object, tuple, float]]:
    m, k, n = MATMUL
    b, h, w, cin, cout = CONV
    key = jax.random.key(0)
    out = []
    for dtype in (jnp.bfloat16, jnp.float32):
        name = jnp.dtype(dtype).name
        a, x = (jax.random.normal(key, s, dtype) for s in ((m, k), (b, h, w, cin)))
        bm, kw = (jax.random.normal(key, s, dtype) for s in ((k, n), (3, 3, cin, cout)))
        for acc in {dtype, jnp.float32}:
            label = f"{name}->{jnp.dtype(acc).name}"
            out.append((f"matmul {m}x{k}x{n} {label}",
                        jax.jit(lambda a, b, acc=acc: jnp.matmul(a, b, preferred_element_type=acc)), (a, bm),
                        2.0 * m * k * n))
            out.append((f"conv3x3 ({b},{h},{w},{cin})->{cout} {label}",
                        jax.jit(lambda x, k, acc=acc: jax.lax.conv_general_dilated(
                            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                            preferred_element_type=acc)), (x, kw), 2.0 * b * h * w * cin * cout * 9))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    for name, fn, operands, flops in rows():
        seconds = _time(fn, operands, args.repeats)
        print(f"{name:44s} {1e3 * seconds:8.2f} ms  {flops / seconds / 1e9:7.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
