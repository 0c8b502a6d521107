"""Resumable, multi-host seed x edit-strength sweeps: `sega-jax sweep` / `scripts/sweep.py`.

A spec (a JSON or YAML file, and/or flags) is prompts x seeds x images per seed x edit settings (a grid
of values and/or an explicit list). Each image is written once as `p{prompt}-s{seed}-i{image}-e{setting}.png`
and recorded as one JSON line (every parameter, the file name, its sha256) in the manifest; a contact sheet
per prompt (rows: seeds, columns: settings) is drawn when all its images exist.

Resuming: images are computed in fixed groups of `batch_per_device` (one device's share), so an image is
always computed with the same batch-mates, whatever the device or process count or where a previous run
stopped, and a resumed or multi-host run writes the same bytes as one uninterrupted run on the same
devices (across device counts XLA may round differently: on CPU, 4 or 8 virtual devices move a few pixels
by 1/255). A rerun skips every image in a manifest. A PNG is written whole (a local file to a temporary
name, then renamed; an object in one upload) before its manifest record, so a kill -9 at any moment leaves
no partial PNG and at most a torn last manifest line, which the next run cuts off.

Multi-host: with `jax.distributed` initialised (or `--coordinator/--num-processes/--process-id`), process
p takes the groups g with g % num_processes == p and appends to its own `manifest.{p}-of-{n}.jsonl`; the
union of the parts equals a single-process run's `manifest.jsonl`.

Shards, with no coordinator: `--shard I/N` (or $SEGA_JAX_SHARD) takes the groups g with g % N == I (split
again among the jax processes, if any) and writes its own manifest part `manifest.{I}-of-{N}`. Shards may
run at any time, anywhere, on any device count; every run skips what any part records, so a later run with
another N (or none) does whatever is still missing.

The output is a local folder or an fsspec URL (gs://, s3://, memory://, ...): see `sega_jax.sweep.store`.
`sega-jax sweep status OUT` and `sega-jax sweep sheets OUT`: `sega_jax.sweep.status`. LoRAs (`lora`, and a
setting's `lora_scale`) and each PNG's `generate --from-png` metadata: `sega_jax.sweep.spec`, `sweep_png`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
import warnings
from typing import Any, NamedTuple

import numpy as np

from sega_jax.pipelines import parallel, registry
from sega_jax.pipelines.inputs import warn_ineffective_settings
from sega_jax.sweep import png as sweep_png
from sega_jax.sweep import status as sweep_status
from sega_jax.sweep.files import (
    prepare_output,
    read_manifest,
    read_manifest_part,
    union,
    write_contact_sheets,
)
from sega_jax.sweep.jobs import Jobs, spec_loras
from sega_jax.sweep.spec import (
    Item,
    SpecError,
    SweepSpec,
    groups,
    items,
    load_spec,
    lora_class,
    read_spec_file,
)
from sega_jax.sweep.store import SHARD_ENV, ManifestWriter, Store, Worker, shard_from

__all__ = ["SpecError", "load_spec", "main", "prepare_output", "read_manifest", "read_manifest_part",
           "run_sweep", "spec_from_args", "build_parser", "write_contact_sheets"]

# -- compute -----------------------------------------------------------------------------------------


class SweepSummary(NamedTuple):
    total: int  # images in the sweep
    mine: int  # images this process is responsible for
    skipped: int  # of those, already in a manifest
    written: int
    seconds: float
    images_per_second: float  # after the first chunk (which includes compilation); nan if none


def load_pipeline(spec: SweepSpec):
    """The spec's model: a folder / hub id, "demo" or "tiny" (`sega_jax.pipelines.load_pipeline`)."""
    return registry.load_pipeline(spec.model, dtype=spec.dtype, scheduler=spec.scheduler, progress=False,
                                  requires_safety_checker=False)


def _padded(group: list[Item], size: int) -> list[Item]:
    return group + [group[-1]] * (size - len(group))


def _decode_chunk(pipe, spec: SweepSpec, job, devices: tuple) -> tuple[np.ndarray, list | None]:
    out = parallel.run(
        pipe, job, mode=spec.mode, devices=devices, per_device_batch=spec.batch_per_device, decode=True
    )
    return pipe.check_safety(np.asarray(out.images), spec.run_safety_checker)


def run_sweep(
    spec: SweepSpec,
    *,
    pipe=None,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> SweepSummary:
    """Run (or resume) a sweep: this worker's share of the images (shard `shard` = (i, n) of the work
    groups, split again among jax processes), then the contact sheets of complete prompts not drawn yet.
    A given `pipe` gets the spec's LoRAs (`lora_0`, ...) for the run; it is left with no adapters."""
    import jax

    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    worker = Worker(shard, (index, count))
    store = prepare_output(spec, worker)
    writer = store.writer(worker.part)
    done = {record["file"] for record in union(store.manifest_parts())}
    all_items = items(spec)
    mine = worker.share(groups(all_items, spec.batch_per_device, spec.settings))
    todo = [g for g in mine if any(item.file not in done for item in g)]  # groups still missing an image
    total_mine = sum(len(g) for g in mine)
    skipped = total_mine - sum(item.file not in done for g in todo for item in g)
    started, written, rate = time.perf_counter(), 0, float("nan")
    try:
        if todo:
            pipe = load_pipeline(spec) if pipe is None else pipe
            _warn_ineffective(spec, pipe)
            output = _Output(store, writer, done, worker.tag)
            with spec_loras(pipe, spec):
                written, rate = _compute(spec, pipe, todo, output, progress, total_mine, skipped)
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    write_contact_sheets(spec, store, worker.tag, redraw=False)
    return SweepSummary(len(all_items), total_mine, skipped, written, seconds, rate)


def _warn_ineffective(spec: SweepSpec, pipe) -> None:
    """One warning for the whole spec, before any image: the concepts some settings keep out of the images
    (the per-image `prepare` calls do not warn again)."""
    if spec.editing_prompt:
        loop_steps = int(pipe.scheduler.set_timesteps(spec.num_inference_steps).timesteps.shape[0])
        names = [repr(text) for text in spec.editing_prompt]
        warn_ineffective_settings(spec.checked, loop_steps, names, stacklevel=3)


class _Output(NamedTuple):
    store: Store
    writer: ManifestWriter
    done: set[str]
    tag: str


def _chunks(todo: list[list[Item]], settings, count: int):
    """Chunks of `count` groups (one per device; the last one padded), never mixing LoRA classes."""
    for _, same in itertools.groupby(todo, key=lambda group: lora_class(settings, group[0])):
        same = list(same)
        for start in range(0, len(same), count):
            chunk = same[start : start + count]
            yield chunk + [chunk[-1]] * (count - len(chunk))


def _compute(spec, pipe, todo, output: _Output, progress, total_mine, skipped) -> tuple[int, float]:
    """Run this process's remaining groups; returns (images written, images/s after the first chunk)."""
    from tqdm.auto import tqdm

    devices = parallel.resolve_devices(spec.devices)
    jobs, size = Jobs(pipe, spec), spec.batch_per_device
    bar = tqdm(total=total_mine, initial=skipped, unit="img", desc="sweep", disable=not progress)
    written, first_chunk = 0, None
    for chunk_groups in _chunks(todo, spec.settings, len(devices)):
        chunk_items = [item for g in chunk_groups for item in _padded(g, size)]
        jobs.use_loras(chunk_items[0].setting)
        images, nsfw = _decode_chunk(pipe, spec, jobs.chunk(chunk_items), devices)
        for position, item in enumerate(chunk_items):
            if item.file in output.done:
                continue  # done earlier, or a padding copy
            data = sweep_png.png(images[position], spec, item, pipe)
            output.store.write(item.file, data, output.tag)  # the image whole, then its record
            flag = None if nsfw is None else bool(nsfw[position])
            digest = hashlib.sha256(data).hexdigest()
            output.writer.append(sweep_png.record(spec, item, images[position], digest, flag))
            output.done.add(item.file)
            written += 1
            bar.update(1)
        output.writer.flush()  # an object store: this chunk's records as one object, after its images
        if first_chunk is None:  # the first chunk includes compilation: leave it out of the rate
            first_chunk = (written, time.perf_counter())
    bar.close()
    later = written - first_chunk[0]
    return written, later / (time.perf_counter() - first_chunk[1]) if later else float("nan")


# -- command line ------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SpecError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a bare string


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sega-jax sweep",
        description="Resumable prompts x seeds x edit-settings sweeps (PNGs, a manifest, contact sheets).",
        epilog="Example: sega-jax sweep --model ./sd15 --prompt 'a photo of a woman' --seeds 0:8 "
        "--editing-prompt 'smiling, smile' --grid 'edit_guidance_scale=[0,3,6]' --out sweeps/smile. "
        "Progress: sega-jax sweep status OUT; contact sheets redrawn: sega-jax sweep sheets OUT.",
    )
    parser.add_argument("spec", nargs="?", help="a JSON (or YAML) spec file; flags override its keys")
    parser.add_argument(
        "--out", help="output folder or URL: gs://bucket/prefix, s3://bucket/prefix, ... (spec key `output`)"
    )
    parser.add_argument("--model", help="a diffusers folder, a hub id, or 'tiny'")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--seeds", help="'start:stop', '1,5,9' or one int")
    parser.add_argument("--editing-prompt", action="append", help="an editing concept (repeatable)")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=JSON_LIST",
        help="an edit-setting axis, e.g. 'edit_guidance_scale=[0,3,6]' (repeatable)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="any other spec key, e.g. num_inference_steps=20 (repeatable)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        metavar="FILE[@SCALE]",
        help="LoRA weights at SCALE (default 1; repeatable; spec key `lora`); vary the scales with a grid "
        "axis, e.g. 'lora_scale=[0,0.5,1]' (one program for all)",
    )
    parser.add_argument("--batch-per-device", type=int, help="images per device per call (default 1)")
    parser.add_argument("--mode", choices=("jit", "pmap"), help="sharded jit (default) or pmap")
    parser.add_argument("--devices", type=int, help="use only the first N local devices")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--check", action="store_true", help="validate the spec and output folder, then stop")
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help=f"run only shard I of N of the work, with no coordinator (default: ${SHARD_ENV}, else all); "
        "any later run, with any N, does what is still missing",
    )
    group = parser.add_argument_group("multi-host (jax.distributed.initialize)")
    group.add_argument(
        "--distributed", action="store_true", help="initialise with what JAX detects (Cloud TPU pods, SLURM)"
    )
    group.add_argument("--coordinator", help="coordinator address host:port")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    return parser


def spec_from_args(args: argparse.Namespace) -> dict:
    spec = read_spec_file(args.spec) if args.spec else {}
    spec.update(dict(_key_value(text) for text in args.set))
    flags = dict(
        output=args.out,
        model=args.model,
        prompts=args.prompt,
        seeds=args.seeds,
        editing_prompt=args.editing_prompt,
        lora=args.lora,
        batch_per_device=args.batch_per_device,
        mode=args.mode,
        devices=args.devices,
    )
    spec.update({key: value for key, value in flags.items() if value is not None})
    if args.grid:
        spec["grid"] = {**spec.get("grid", {}), **dict(_key_value(text) for text in args.grid)}
    return spec


def _init_distributed(args: argparse.Namespace) -> None:
    given = [args.coordinator, args.num_processes, args.process_id]
    if all(v is None for v in given) and not args.distributed:
        return
    if any(v is None for v in given) and not all(v is None for v in given):
        raise SpecError("multi-host needs all of --coordinator, --num-processes and --process-id")
    import jax

    kwargs = dict(coordinator_address=args.coordinator, num_processes=args.num_processes)
    jax.distributed.initialize(**kwargs, process_id=args.process_id)  # all None: JAX detects them


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"sega-jax sweep: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`sega-jax sweep [status|sheets]`: returns 0 when done, 2 for a bad spec or output folder."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in sweep_status.COMMANDS:
        return sweep_status.main(argv)
    args = build_parser().parse_args(argv)
    try:
        shard = shard_from(args.shard)
        _init_distributed(args)  # before anything touches a JAX backend
        spec = load_spec(spec_from_args(args))
        if args.check:
            import jax

            prepare_output(spec, Worker(shard, (jax.process_index(), jax.process_count())))
            print(f"ok: {len(items(spec))} images into {spec.output}")
            return 0
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            summary = run_sweep(spec, progress=not args.no_progress, shard=shard)
    except SpecError as err:
        print(f"sega-jax sweep: error: {err}", file=sys.stderr)
        return 2
    rate = summary.images_per_second
    print(
        f"{summary.written} images written, {summary.skipped} already done ({summary.mine} of "
        f"{summary.total} for this worker) in {summary.seconds:.1f} s"
        + ("" if rate != rate else f"; {rate:.2f} images/s after the first call (compilation)"),
        flush=True,
    )
    return 0
