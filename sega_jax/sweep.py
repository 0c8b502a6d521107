"""Resumable, multi-host seed x edit-strength sweeps: `sega-jax sweep` / `scripts/sweep.py`.

A spec (a JSON or YAML file, and/or flags) is prompts x seeds x images per seed x edit settings (a grid
of values and/or an explicit list). Each image is written once as `p{prompt}-s{seed}-i{image}-e{setting}.png`
and recorded as one JSON line (every parameter, the file name, its sha256) in the manifest; a contact sheet
per prompt (rows: seeds, columns: settings) is drawn when all its images exist.

Resuming: images are computed in fixed groups of `batch_per_device` (one device's share), so an image is
always computed with the same batch-mates, whatever the device or process count or where a previous run
stopped, and a resumed or multi-host run writes the same bytes as one uninterrupted run on the same
devices (across device counts XLA may round differently: on CPU, 4 or 8 virtual devices move a few pixels
by 1/255). A rerun skips every image in a manifest. Files are written to a temporary name and renamed, and a
manifest line is appended (one write) only after its PNG is in place, so a kill -9 at any moment leaves no
partial PNG and at most a torn last manifest line, which the next run cuts off.

Multi-host: with `jax.distributed` initialised (or `--coordinator/--num-processes/--process-id`), process
p takes the groups g with g % num_processes == p and appends to its own `manifest.{p}-of-{n}.jsonl`; the
union of the parts equals a single-process run's `manifest.jsonl`.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import importlib.util
import io
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

SPEC_FILE = "spec.json"
DEFAULTS: dict[str, Any] = dict(
    model=None,
    dtype="float32",
    scheduler=None,
    prompts=None,
    negative_prompt=None,
    seeds=None,
    images_per_seed=1,
    height=None,
    width=None,
    num_inference_steps=50,
    guidance_scale=7.5,
    eta=0.0,
    editing_prompt=[],
    edit={},
    grid={},
    settings=[],
    run_safety_checker=True,
    batch_per_device=1,
    mode="jit",
    devices=None,
    output=None,
)
REQUIRED = ("model", "prompts", "seeds", "output")
# Keys that change how the work is run, not which images come out: they may change between runs.
RUNTIME_KEYS = ("batch_per_device", "mode", "devices", "output")
SHORT_NAMES = dict(
    guidance_scale="cfg",
    edit_guidance_scale="scale",
    edit_threshold="thr",
    edit_warmup_steps="warmup",
    edit_cooldown_steps="cooldown",
    reverse_editing_direction="reverse",
    edit_weights="weights",
    edit_momentum_scale="mom",
    edit_mom_beta="beta",
)


class SpecError(ValueError):
    """A sweep spec or output folder that cannot be run; raised before any compute."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A validated spec: `values` is the full spec dict, `settings` each setting's overrides, `checked`
    each setting's full, validated edit parameters."""

    values: dict
    settings: tuple[dict, ...]
    checked: tuple[dict, ...]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def output(self) -> Path:
        return Path(self.values["output"])

    def fingerprint(self) -> dict:
        """What decides the images (the spec minus RUNTIME_KEYS), as stored in the output folder."""
        return {key: value for key, value in self.values.items() if key not in RUNTIME_KEYS}


class Item(NamedTuple):
    prompt: int
    seed: int
    image: int
    setting: int

    @property
    def file(self) -> str:
        return f"p{self.prompt:03d}-s{self.seed}-i{self.image:02d}-e{self.setting:03d}.png"


# -- the spec ----------------------------------------------------------------------------------------


def read_spec_file(path: str | os.PathLike) -> dict:
    """A spec dict from a .json, .yaml or .yml file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"cannot read the spec {path}: {err}") from err
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ImportError as err:
        raise SpecError("YAML specs need PyYAML (pip install pyyaml); or write the spec as JSON") from err
    except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError's subclasses
        raise SpecError(f"{path}: not valid {path.suffix[1:] or 'JSON'}: {err}") from err
    except Exception as err:
        raise SpecError(f"{path}: cannot parse: {err}") from err
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_seeds(value: Any) -> list[int]:
    """A list of ints, one int, "a:b" (range a..b-1) or "1,5,9"."""
    if isinstance(value, str):
        try:
            if ":" in value:
                start, stop = (int(part) for part in value.split(":"))
                return list(range(start, stop))
            return [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise SpecError(f"seeds: cannot parse {value!r} (use a list, 'start:stop' or '1,5,9')") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return value
    raise SpecError(f"seeds: expected a list of ints or 'start:stop', got {value!r}")


def _check_scalars(values: dict) -> None:
    from sega_jax import pipeline_inputs as inputs

    if isinstance(values["prompts"], str):
        values["prompts"] = [values["prompts"]]
    if isinstance(values["editing_prompt"], str):
        values["editing_prompt"] = [values["editing_prompt"]]
    values["seeds"] = parse_seeds(values["seeds"])
    checks = [
        ("prompts", lambda v: isinstance(v, list) and v and all(isinstance(p, str) for p in v)),
        ("seeds", lambda v: v and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v)),
        ("editing_prompt", lambda v: isinstance(v, list) and all(isinstance(p, str) and p for p in v)),
        ("negative_prompt", lambda v: v is None or isinstance(v, str)),
        ("model", lambda v: isinstance(v, str) and v),
        ("edit", lambda v: isinstance(v, dict)),
        ("grid", lambda v: isinstance(v, dict)),
        ("settings", lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v)),
        ("mode", lambda v: v in ("jit", "pmap")),
        ("run_safety_checker", lambda v: isinstance(v, bool)),
        ("scheduler", lambda v: v is None or isinstance(v, str)),
        ("dtype", lambda v: v in ("float32", "bfloat16", "float16")),
    ]
    for key, ok in checks:
        if not ok(values[key]):
            raise SpecError(f"{key}: invalid value {values[key]!r}")
    if len(set(values["seeds"])) != len(values["seeds"]):
        raise SpecError(f"seeds: repeated seeds in {values['seeds']}")
    try:
        for key, minimum in (("images_per_seed", 1), ("num_inference_steps", 1), ("batch_per_device", 1)):
            inputs.check_int(values[key], key, minimum=minimum)
        for key in ("height", "width"):
            if values[key] is not None and inputs.check_int(values[key], key, minimum=8) % 8:
                raise ValueError(f"`{key}` must be a multiple of 8, got {values[key]}")
        inputs.check_int(values["devices"], "devices", minimum=1, allow_none=True)
        inputs._number(values["eta"], "eta")
        inputs._number(values["guidance_scale"], "guidance_scale")
    except ValueError as err:
        raise SpecError(str(err)) from err


def expand_settings(values: Mapping[str, Any]) -> list[dict]:
    """The grid's cartesian product (keys in the spec's order), then the explicit settings; [{}] if none."""
    grid = values["grid"]
    for key, options in grid.items():
        if not isinstance(options, list) or not options:
            raise SpecError(f"grid.{key}: needs a non-empty list of values, got {options!r}")
    product = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    settings = (product if grid else []) + list(values["settings"])
    return settings or [{}]


def _check_settings(values: dict, settings: list[dict]) -> list[dict]:
    from sega_jax.parallel import EDIT_DEFAULTS, check_setting

    concepts = len(values["editing_prompt"])
    checked = []
    for index, setting in enumerate(settings):
        merged = {"guidance_scale": values["guidance_scale"], **EDIT_DEFAULTS, **values["edit"], **setting}
        try:
            checked.append(check_setting(concepts, merged))
        except ValueError as err:
            raise SpecError(f"edit setting {index} ({setting}): {err}") from err
    cfg = {c["guidance_scale"] > 1.0 for c in checked}
    if len(cfg) > 1:
        raise SpecError("guidance_scale: all settings must be > 1, or all <= 1 (no classifier-free guidance)")
    if concepts and cfg == {False}:
        raise SpecError("editing_prompt needs classifier-free guidance: guidance_scale must be > 1")
    return checked


def load_spec(spec: Mapping[str, Any]) -> SweepSpec:
    """Validate a spec dict (unknown keys, missing keys, empty grids, bad values) without any compute."""
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        raise SpecError(f"unknown spec key(s) {unknown}; known keys: {sorted(DEFAULTS)}")
    missing = [key for key in REQUIRED if spec.get(key) is None]
    if missing:
        raise SpecError(f"missing spec key(s) {missing}")
    values = json.loads(json.dumps({**DEFAULTS, **spec}))  # a deep, JSON-clean copy
    values["output"] = str(spec["output"])
    _check_scalars(values)
    settings = expand_settings(values)
    checked = _check_settings(values, settings)
    _check_model(values["model"])
    return SweepSpec(values, tuple(settings), tuple(checked))


def _check_model(model: str) -> None:
    if model == "tiny":
        if importlib.util.find_spec("sega_jax.tiny") is None:
            raise SpecError("model 'tiny' needs sega_jax.tiny, which this installation lacks")
        return
    path = Path(model)
    if path.is_dir():
        return
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise SpecError(f"model: {model} is not a diffusers pipeline folder nor a hub id like 'owner/name'")


def items(spec: SweepSpec) -> list[Item]:
    """Every image of the sweep in its fixed order: prompt, seed, image, setting."""
    return [
        Item(p, seed, image, s)
        for p in range(len(spec.prompts))
        for seed in spec.seeds
        for image in range(spec.images_per_seed)
        for s in range(len(spec.settings))
    ]


def groups(all_items: Sequence[Item], per_device: int) -> list[list[Item]]:
    return [list(all_items[i : i + per_device]) for i in range(0, len(all_items), per_device)]


# -- the output folder: spec, manifest parts, atomic writes --------------------------------------------


def manifest_name(process_index: int = 0, process_count: int = 1) -> str:
    return "manifest.jsonl" if process_count == 1 else f"manifest.{process_index}-of-{process_count}.jsonl"


def _atomic_write(path: Path, data: bytes, tag: str) -> None:
    """Write to `.name.tag.tmp`, fsync, rename: readers and a later run see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_output(spec: SweepSpec, process_index: int = 0, process_count: int = 1) -> None:
    """Create the folder, check it is writable and holds no other sweep; store the spec; tidy leftovers
    (this process's temporary files, or all of them when it runs alone)."""
    out = spec.output
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as err:
        raise SpecError(f"output folder {out} is not writable: {err}") from err
    stored = out / SPEC_FILE
    if stored.exists():
        old = json.loads(stored.read_text())
        new = spec.fingerprint()
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise SpecError(
                f"{out} holds a sweep with a different spec (changed: {changed}); use another output "
                f"folder, or restore the spec stored in {stored}"
            )
    elif list(out.glob("manifest*.jsonl")):
        raise SpecError(f"{out} has manifests but no {SPEC_FILE}: not a folder this tool can resume")
    else:
        data = json.dumps(spec.fingerprint(), indent=1, sort_keys=True).encode()
        _atomic_write(stored, data, f"p{process_index}")
    pattern = ".*.tmp" if process_count == 1 else f".*.p{process_index}.tmp"
    for leftover in out.glob(pattern):
        leftover.unlink(missing_ok=True)


def repair_manifest(path: Path) -> None:
    """Cut off a torn last line (a run killed mid-append)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_manifest_part(path: str | os.PathLike) -> list[dict]:
    """The complete records of one manifest part (a torn last line, if any, is left out)."""
    lines = Path(path).read_bytes().split(b"\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]  # lines[-1]: b"" or torn


def read_manifest(folder: str | os.PathLike) -> list[dict]:
    """All complete records of all manifest parts, sorted by file name."""
    parts = sorted(glob.glob(os.path.join(glob.escape(str(folder)), "manifest*.jsonl")))
    return sorted((record for part in parts for record in read_manifest_part(part)), key=lambda r: r["file"])


class ManifestWriter:
    """Appends one JSON line per image with a single write (O_APPEND)."""

    def __init__(self, path: Path):
        repair_manifest(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        os.write(self.fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# -- compute -----------------------------------------------------------------------------------------


class SweepSummary(NamedTuple):
    total: int  # images in the sweep
    mine: int  # images this process is responsible for
    skipped: int  # of those, already in a manifest
    written: int
    seconds: float
    images_per_second: float  # after the first chunk (which includes compilation); nan if none


def load_pipeline(spec: SweepSpec):
    """The spec's model: a folder / hub id (from_pretrained) or "tiny" (sega_jax.tiny, random weights)."""
    if spec.model == "tiny":
        from sega_jax.tiny import tiny_pipeline

        pipe = tiny_pipeline(dtype=spec.dtype)
    else:
        from sega_jax import SemanticStableDiffusionPipeline

        pipe = SemanticStableDiffusionPipeline.from_pretrained(
            spec.model, dtype=spec.dtype, requires_safety_checker=False
        )
    if spec.scheduler:
        pipe.set_scheduler(spec.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Jobs:
    """Per-item arrays: prepared once per (prompt, seed) with the pipeline's own validation and noise."""

    def __init__(self, pipe, spec: SweepSpec):
        from sega_jax.guidance import EditParams

        self.pipe, self.spec, self.cache = pipe, spec, {}
        concepts = len(spec.editing_prompt)
        self.params = [EditParams.create(concepts, **checked) for checked in spec.checked]

    def job(self, prompt: int, seed: int):
        key = (prompt, seed)
        if key not in self.cache:
            if len(self.cache) > 64:
                self.cache.clear()
            spec = self.spec
            self.cache[key] = self.pipe.prepare(
                spec.prompts[prompt],
                negative_prompt=spec.negative_prompt,
                height=spec.height,
                width=spec.width,
                num_inference_steps=spec.num_inference_steps,
                guidance_scale=spec.checked[0]["guidance_scale"],
                num_images_per_prompt=spec.images_per_seed,
                eta=spec.eta,
                editing_prompt=spec.editing_prompt or None,
                seed=seed,
            )
        return self.cache[key]

    def chunk(self, chunk_items: Sequence[Item]):
        """One DenoiseJob whose image j is chunk_items[j], each with its own edit setting."""
        import jax
        import jax.numpy as jnp

        pairs = [(self.job(item.prompt, item.seed), item.image) for item in chunk_items]
        pick = lambda field, axis: jnp.stack(
            [jnp.take(getattr(job, field), image, axis=axis) for job, image in pairs], axis=axis
        )
        keys = jnp.stack([job.image_keys[image] for job, image in pairs])
        params = jax.tree.map(lambda *xs: jnp.stack(xs), *[self.params[item.setting] for item in chunk_items])
        return pairs[0][0]._replace(
            noise=pick("noise", 0), context=pick("context", 1), image_keys=keys, params=params, replay=None
        )


def _padded(group: list[Item], size: int) -> list[Item]:
    return group + [group[-1]] * (size - len(group))


def _record(spec: SweepSpec, item: Item, image: Any, digest: str, nsfw: bool | None) -> dict:
    return dict(
        file=item.file,
        sha256=digest,
        prompt_index=item.prompt,
        prompt=spec.prompts[item.prompt],
        negative_prompt=spec.negative_prompt,
        seed=item.seed,
        image_index=item.image,
        setting_index=item.setting,
        setting=spec.settings[item.setting],
        editing_prompt=spec.editing_prompt,
        **spec.checked[item.setting],
        num_inference_steps=spec.num_inference_steps,
        height=image.shape[0],
        width=image.shape[1],
        eta=spec.eta,
        scheduler=spec.scheduler,
        model=spec.model,
        dtype=spec.dtype,
        nsfw=nsfw,
    )


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_chunk(pipe, spec: SweepSpec, job, devices: tuple) -> tuple[np.ndarray, list | None]:
    from sega_jax import parallel

    out = parallel.run(
        pipe, job, mode=spec.mode, devices=devices, per_device_batch=spec.batch_per_device, decode=True
    )
    images = np.asarray(out.images)
    if pipe.safety_checker is None or not spec.run_safety_checker:
        return images, None
    from sega_jax.models.safety_checker import run_safety_checker

    return run_safety_checker(pipe.safety_checker, pipe.feature_extractor, images)


def _work(spec: SweepSpec, done: set[str], process_index: int, process_count: int) -> list[list[Item]]:
    """This process's groups that still miss an image."""
    mine = groups(items(spec), spec.batch_per_device)[process_index::process_count]
    return [g for g in mine if any(item.file not in done for item in g)]


def run_sweep(
    spec: SweepSpec,
    *,
    pipe=None,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> SweepSummary:
    """Run (or resume) a sweep: this process's share of the images, then the complete contact sheets."""
    import jax

    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    prepare_output(spec, index, count)
    writer = ManifestWriter(spec.output / manifest_name(index, count))
    done = {record["file"] for record in read_manifest(spec.output)}
    mine = groups(items(spec), spec.batch_per_device)[index::count]
    todo = _work(spec, done, index, count)
    total_mine = sum(len(g) for g in mine)
    skipped = total_mine - _missing(todo, done)
    started, written, rate = time.perf_counter(), 0, float("nan")
    try:
        if todo:
            pipe = load_pipeline(spec) if pipe is None else pipe
            written, rate = _compute(spec, pipe, todo, done, writer, index, progress, total_mine)
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    write_contact_sheets(spec, index)
    return SweepSummary(len(items(spec)), total_mine, skipped, written, seconds, rate)


def _missing(todo: Iterable[list[Item]], done: set[str]) -> int:
    return sum(item.file not in done for g in todo for item in g)


def _compute(spec, pipe, todo, done, writer, index, progress, total_mine) -> tuple[int, float]:
    """Run this process's remaining groups; returns (images written, images/s after the first chunk)."""
    from tqdm.auto import tqdm

    from sega_jax import parallel

    devices = parallel.resolve_devices(spec.devices)
    jobs, size = _Jobs(pipe, spec), spec.batch_per_device
    skipped = total_mine - _missing(todo, done)
    bar = tqdm(total=total_mine, initial=skipped, unit="img", desc="sweep", disable=not progress)
    written, first_chunk = 0, None
    for start in range(0, len(todo), len(devices)):
        chunk_groups = todo[start : start + len(devices)]
        chunk_groups += [chunk_groups[-1]] * (len(devices) - len(chunk_groups))
        chunk_items = [item for g in chunk_groups for item in _padded(g, size)]
        images, nsfw = _decode_chunk(pipe, spec, jobs.chunk(chunk_items), devices)
        for position, item in enumerate(chunk_items):
            if item.file in done:
                continue  # done earlier, or a padding copy
            data = _png(images[position])
            _atomic_write(spec.output / item.file, data, f"p{index}")
            flag = None if nsfw is None else bool(nsfw[position])
            writer.append(_record(spec, item, images[position], hashlib.sha256(data).hexdigest(), flag))
            done.add(item.file)
            written += 1
            bar.update(1)
        if first_chunk is None:  # the first chunk includes compilation: leave it out of the rate
            first_chunk = (written, time.perf_counter())
    bar.close()
    later = written - first_chunk[0]
    return written, later / (time.perf_counter() - first_chunk[1]) if later else float("nan")


# -- contact sheets ----------------------------------------------------------------------------------


def setting_labels(settings: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Per setting, one short "name value" line per key whose value differs between settings."""
    names = dict.fromkeys(k for s in settings for k in s)
    keys = [k for k in names if len({_text(s.get(k)) for s in settings}) > 1]
    if not keys:
        return [[f"setting {i}"] for i in range(len(settings))]
    return [[f"{SHORT_NAMES.get(k, k)} {_text(s.get(k, '-'))}" for k in keys] for s in settings]


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "/".join(_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def contact_sheet(spec: SweepSpec, prompt: int):
    """The prompt's images as a grid (rows: seed/image, columns: settings) with labels, as a PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line = 12 + 2
    rows = [(seed, image) for seed in spec.seeds for image in range(spec.images_per_seed)]
    first = Image.open(spec.output / Item(prompt, rows[0][0], rows[0][1], 0).file)
    cell_w = min(max(first.width, 96), 256)
    cell_h = round(first.height * cell_w / first.width)
    labels = setting_labels(spec.settings)
    names = [f"seed {seed}" + (f" #{image}" if spec.images_per_seed > 1 else "") for seed, image in rows]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(max(probe.textlength(n, font=font) for n in names)) + 12
    top = line * (1 + max(len(lines) for lines in labels)) + 8
    sheet = Image.new("RGB", (left + cell_w * len(labels), top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), _fit(draw, spec.prompts[prompt], sheet.width - 8, font), fill="black", font=font)
    for column, lines in enumerate(labels):
        for k, text in enumerate(lines):
            xy = (left + column * cell_w + 2, 4 + line * (k + 1))
            draw.text(xy, _fit(draw, text, cell_w - 4, font), fill="black", font=font)
    for row, ((seed, image), name) in enumerate(zip(rows, names, strict=True)):
        draw.text((4, top + row * cell_h + cell_h // 2 - 6), name, fill="black", font=font)
        for column in range(len(labels)):
            tile = Image.open(spec.output / Item(prompt, seed, image, column).file).convert("RGB")
            resample = Image.Resampling.NEAREST if tile.width < cell_w else Image.Resampling.LANCZOS
            sheet.paste(tile.resize((cell_w, cell_h), resample), (left + column * cell_w, top + row * cell_h))
    return sheet


def _fit(draw, text: str, width: float, font) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def write_contact_sheets(spec: SweepSpec, process_index: int = 0) -> list[Path]:
    """`contact-p{prompt}.png` for every prompt whose images are all in the manifests."""
    done = {record["file"] for record in read_manifest(spec.output)}
    written = []
    for prompt in range(len(spec.prompts)):
        if all(item.file in done for item in items(spec) if item.prompt == prompt):
            buffer = io.BytesIO()
            contact_sheet(spec, prompt).save(buffer, format="PNG")
            path = spec.output / f"contact-p{prompt:03d}.png"
            _atomic_write(path, buffer.getvalue(), f"p{process_index}")
            written.append(path)
    return written


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
        "--editing-prompt 'smiling, smile' --grid 'edit_guidance_scale=[0,3,6]' --out sweeps/smile",
    )
    parser.add_argument("spec", nargs="?", help="a JSON (or YAML) spec file; flags override its keys")
    parser.add_argument("--out", help="output folder (spec key `output`)")
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
    parser.add_argument("--batch-per-device", type=int, help="images per device per call (default 1)")
    parser.add_argument("--mode", choices=("jit", "pmap"), help="sharded jit (default) or pmap")
    parser.add_argument("--devices", type=int, help="use only the first N local devices")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--check", action="store_true", help="validate the spec and output folder, then stop")
    group = parser.add_argument_group("multi-host (jax.distributed.initialize)")
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
    if all(v is None for v in given):
        return
    if any(v is None for v in given):
        raise SpecError("multi-host needs all of --coordinator, --num-processes and --process-id")
    import jax

    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )


def main(argv: list[str] | None = None) -> int:
    """`sega-jax sweep`: returns 0 when done, 2 for a bad spec or output folder."""
    args = build_parser().parse_args(argv)
    try:
        _init_distributed(args)  # before anything touches a JAX backend
        spec = load_spec(spec_from_args(args))
        if args.check:
            import jax

            prepare_output(spec, jax.process_index(), jax.process_count())
            print(f"ok: {len(items(spec))} images into {spec.output}")
            return 0
        summary = run_sweep(spec, progress=not args.no_progress)
    except SpecError as err:
        print(f"sega-jax sweep: error: {err}", file=sys.stderr)
        return 2
    rate = summary.images_per_second
    print(
        f"{summary.written} images written, {summary.skipped} already done ({summary.mine} of "
        f"{summary.total} for this process) in {summary.seconds:.1f} s"
        + ("" if rate != rate else f"; {rate:.2f} images/s after the first call (compilation)"),
        flush=True,
    )
    return 0
