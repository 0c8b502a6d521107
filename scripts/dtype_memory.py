"""Resident memory of a SEGA run per weight dtype (issue 16): one fresh process per dtype, phase by phase.

    python3 scripts/dtype_memory.py FOLDER [--size 512] [--steps 2] [--concepts 2] [--dtypes float32 bfloat16]
                                           [--cache DIR]

FOLDER is a diffusers SD folder (e.g. the SD 1.5 architecture that `scripts/benchmark.py --save-folder`
writes, fp32 on disk as diffusers saves it). Each process loads the pipeline in one dtype and calls it twice
(the first call compiles unless `--cache` holds its programs). Per phase it prints the process's peak
resident memory (VmHWM, reset between phases through /proc/self/clear_refs, so no sampling is missed) and
what stays resident after it (anonymous memory and mapped file pages apart), then the ratio of each dtype's
peaks to fp32's.

By default the compilation cache is off, so the first call compiles in the process (XLA's compiler heap is in
its peak). `--cache DIR` uses DIR as the cache (the library's default is a cache on): run it twice, and the
second run's processes load their programs from DIR, as a user's second session does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MB = 2**20


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def measure(folder: str, dtype: str, size: int, steps: int, concepts: int) -> dict:
    """Runs in the child process: the phases' peaks and what stays resident after each, in bytes."""
    phases = {}

    def phase(name, run):
        _reset_peak()
        result = run()
        after = _status()
        phases[name] = {"peak": after["VmHWM"], "rss": after["VmRSS"], "anon": after["RssAnon"],
                        "file": after["RssFile"]}
        return result

    phase("imports", lambda: __import__("sega_jax"))
    from sega_jax import SemanticStableDiffusionPipeline
    from sega_jax.bench.sega import CONCEPTS, PROMPT

    pipe = phase("load", lambda: SemanticStableDiffusionPipeline.from_pretrained(
        folder, dtype=None if dtype == "float32" else dtype, requires_safety_checker=False))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, num_inference_steps=steps, height=size, width=size, seed=0,
                  editing_prompt=CONCEPTS[:concepts] or None, edit_warmup_steps=[1] * concepts,
                  edit_guidance_scale=[5.0] * concepts, edit_threshold=[0.95] * concepts,
                  output_type="latent")
    phase("first call", lambda: pipe(**kwargs).images)
    phase("second call", lambda: pipe(**kwargs).images)
    return phases


def _child_env(cache: str) -> dict[str, str]:
    """The child's environment: this checkout's `sega_jax` first on its path (not an older installed copy,
    which measured stale code once: BENCHMARKS.md, section 1i) and the compilation cache folder."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "SEGA_JAX_CACHE_DIR": cache, "PYTHONPATH": path}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--concepts", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--cache", default="off", help="the compilation cache folder (default: off)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.folder, args.child, args.size, args.steps, args.concepts)))
        return 0
    results = {}
    for dtype in args.dtypes:
        out = subprocess.run([sys.executable, __file__, args.folder, "--size", str(args.size), "--steps",
                              str(args.steps), "--concepts", str(args.concepts), "--child", dtype],
                             check=True, stdout=subprocess.PIPE, text=True,
                             env=_child_env(args.cache)).stdout
        results[dtype] = json.loads(out.strip().splitlines()[-1])
        print(f"\n{dtype}: phase peak / resident after (anonymous + file pages), MB")
        for name, p in results[dtype].items():
            print(f"  {name:24s} peak {p['peak'] / MB:7.0f}   after {p['rss'] / MB:7.0f} "
                  f"({p['anon'] / MB:.0f} + {p['file'] / MB:.0f})")
    if "float32" in results:
        base = results["float32"]
        for dtype in args.dtypes[1:]:
            ratios = ", ".join(f"{name} {results[dtype][name]['peak'] / base[name]['peak']:.2f}x"
                               for name in base)
            print(f"{dtype} / float32 peaks: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
