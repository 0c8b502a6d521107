"""A sweep's output (a folder or an object-store URL, `sega_jax.sweep.store`): the stored spec, the manifest
parts (JSON lines) and their union, contact sheets."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sega_jax.sweep.spec import SHORT_NAMES, SPEC_FILE, Item, SpecError, SweepSpec, items
from sega_jax.sweep.store import Store, Worker, open_store, parse_records

# -- the output: spec, manifest parts ------------------------------------------------------------------


def prepare_output(spec: SweepSpec, worker: Worker | None = None) -> Store:
    """Open the output, check it is writable and holds no other sweep; store the spec; tidy leftovers
    (this worker's temporary files, or all of them when it runs alone). Returns the store."""
    worker = Worker() if worker is None else worker
    store = open_store(spec.output)
    store.check_writable()
    if store.exists(SPEC_FILE):
        old = json.loads(store.read(SPEC_FILE))
        new = spec.fingerprint()
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise SpecError(
                f"{store.url} holds a sweep with a different spec (changed: {changed}); use another output "
                f"folder, or restore the spec stored in its {SPEC_FILE}"
            )
    elif store.manifest_parts():
        raise SpecError(f"{store.url} has manifests but no {SPEC_FILE}: not a folder this tool can resume")
    else:
        store.write(SPEC_FILE, json.dumps(spec.fingerprint(), indent=1, sort_keys=True).encode(), worker.tag)
    store.tidy(None if worker.alone else worker.tag)
    return store


def read_manifest_part(path: str | os.PathLike) -> list[dict]:
    """The complete records of one local manifest file (a torn last line, if any, is left out)."""
    return parse_records(Path(path).read_bytes())


def union(parts: Mapping[str, list[dict]]) -> list[dict]:
    """The records of all parts, one per file (the first found), sorted by file name."""
    records: dict[str, dict] = {}
    for name in sorted(parts):
        for record in parts[name]:
            records.setdefault(record["file"], record)
    return [records[file] for file in sorted(records)]


def read_manifest(output: str | os.PathLike) -> list[dict]:
    """All complete records of all manifest parts of a sweep's output (a folder or a URL)."""
    return union(open_store(output).manifest_parts())


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


def contact_sheet(spec: SweepSpec, prompt: int, store: Store | None = None):
    """The prompt's images as a grid (rows: seed/image, columns: settings) with labels, as a PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    store = open_store(spec.output) if store is None else store
    load = lambda *key: Image.open(io.BytesIO(store.read(Item(prompt, *key).file)))

    font = ImageFont.load_default()
    line = 12 + 2
    rows = [(seed, image) for seed in spec.seeds for image in range(spec.images_per_seed)]
    first = load(rows[0][0], rows[0][1], 0)
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
            tile = load(seed, image, column).convert("RGB")
            resample = Image.Resampling.NEAREST if tile.width < cell_w else Image.Resampling.LANCZOS
            sheet.paste(tile.resize((cell_w, cell_h), resample), (left + column * cell_w, top + row * cell_h))
    return sheet


def _fit(draw, text: str, width: float, font) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def sheet_name(prompt: int) -> str:
    return f"contact-p{prompt:03d}.png"


def complete_prompts(spec: SweepSpec, done: set[str]) -> list[int]:
    """The prompts whose images are all in `done` (a set of file names)."""
    missing = {item.prompt for item in items(spec) if item.file not in done}
    return [prompt for prompt in range(len(spec.prompts)) if prompt not in missing]


def write_contact_sheets(
    spec: SweepSpec, store: Store | None = None, tag: str = "p0", redraw: bool = True
) -> list[str]:
    """`contact-p{prompt}.png` for every prompt whose images are all in the manifests (with `redraw`
    False, only those not drawn yet); returns the names written."""
    store = open_store(spec.output) if store is None else store
    done = {record["file"] for record in union(store.manifest_parts())}
    existing = set() if redraw else set(store.names("contact-p*.png"))
    written = []
    for prompt in complete_prompts(spec, done):
        if sheet_name(prompt) not in existing:
            buffer = io.BytesIO()
            contact_sheet(spec, prompt, store).save(buffer, format="PNG")
            store.write(sheet_name(prompt), buffer.getvalue(), tag)
            written.append(sheet_name(prompt))
    return written
