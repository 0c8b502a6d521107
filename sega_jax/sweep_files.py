"""A sweep's output folder: the stored spec, manifest parts (JSON lines), atomic writes, contact sheets."""

from __future__ import annotations

import glob
import io
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sega_jax.sweep_spec import SHORT_NAMES, SPEC_FILE, Item, SpecError, SweepSpec, items

# -- the output folder: spec, manifest parts, atomic writes --------------------------------------------


def manifest_name(process_index: int = 0, process_count: int = 1) -> str:
    return "manifest.jsonl" if process_count == 1 else f"manifest.{process_index}-of-{process_count}.jsonl"


def atomic_write(path: Path, data: bytes, tag: str) -> None:
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
        atomic_write(stored, data, f"p{process_index}")
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
            atomic_write(path, buffer.getvalue(), f"p{process_index}")
            written.append(path)
    return written
