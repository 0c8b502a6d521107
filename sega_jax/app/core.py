"""The parts of `sega-jax app` that need no Gradio: input checks (bad input becomes an `AppError`, a
message in the UI), compilation counting per call, and the photo helpers of the LEDITS++ tab."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sega_jax.runtime import traces
from sega_jax.settings import Edit

MAX_CONCEPTS = 4
SWEEP_COUNTS = (4, 8)  # the fewest and most strengths one sweep shows
MAX_SEED = 2**32 - 1
DIRECTIONS = ("add", "remove")  # remove = diffusers' reverse_editing_direction
GRADIO_HINT = 'pip install "sega-jax[app]"'


class AppError(ValueError):
    """Bad input: shown in the UI as a message (never a stack trace)."""



# -- compilation: counted, timed, reported -----------------------------------------------------------------


_XLA_COMPILES = {"count": 0, "listening": False}


def _on_jax_event(event: str, duration: float, **_: Any) -> None:
    if event.endswith("backend_compile_duration"):
        _XLA_COMPILES["count"] += 1


def loop_traces() -> int:
    """How often the compiled loops (SEGA, sweeps, LEDITS++ invert and edit) have been traced so far."""
    return traces.total("sega", "parallel", "ledits_pp")


@dataclasses.dataclass
class Timing:
    """One call's wall time, loop traces (compilations of the big programs) and XLA compilations."""

    seconds: float = 0.0
    traces: int = 0
    xla: int = 0

    def text(self, what: str) -> str:
        if self.traces:
            return (f"{what} in {self.seconds:.2f} s: compiled ({self.traces} new program(s) for this shape, "
                    f"{self.xla} XLA compilation(s)); new values of the same shape reuse it")
        return f"{what} in {self.seconds:.2f} s: no recompilation ({self.xla} XLA compilation(s))"


@contextmanager
def watch() -> Iterator[Timing]:
    """Time the block and count the loop traces and XLA compilations made inside it."""
    if not _XLA_COMPILES["listening"]:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_on_jax_event)
        _XLA_COMPILES["listening"] = True
    timing = Timing()
    start, traces, xla = time.perf_counter(), loop_traces(), _XLA_COMPILES["count"]
    try:
        yield timing
    finally:
        timing.seconds = time.perf_counter() - start
        timing.traces = loop_traces() - traces
        timing.xla = _XLA_COMPILES["count"] - xla


@contextmanager
def user_errors(notes: list[str]) -> Iterator[None]:
    """Pipeline ValueError/TypeError become AppError; its warnings are collected into `notes`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except (ValueError, TypeError) as err:
            raise AppError(" ".join(str(err).split()) or type(err).__name__) from err
    notes.extend(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))


# -- input checks ------------------------------------------------------------------------------------------


def concepts_from_rows(count: int, rows: Sequence[Sequence[Any]]) -> list[Edit]:
    """The first `count` concept rows (text, direction, strength, threshold, warmup) as Edits; empty texts
    are skipped."""
    count = int(count or 0)
    if count > MAX_CONCEPTS:
        raise AppError(f"at most {MAX_CONCEPTS} concepts, got {count}")
    edits = []
    for i, (text, direction, strength, threshold, warmup) in enumerate(rows[:count]):
        if not str(text or "").strip():
            continue
        name = f"concept {i + 1}"
        threshold = as_finite(threshold, f"{name}: threshold")
        if not 0.0 <= threshold <= 1.0:
            raise AppError(f"{name}: threshold must lie in [0, 1] (a quantile), got {threshold}")
        edits.append(Edit(str(text).strip(), scale=as_finite(strength, f"{name}: strength"),
                          threshold=threshold, warmup=as_integer(warmup, f"{name}: warmup", 0, 10**6),
                          reverse=direction == DIRECTIONS[1]))
    return edits


def as_finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AppError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise AppError(f"{what} must be a finite number, got {value!r}")
    return number


def as_integer(value: Any, what: str, minimum: int, maximum: int) -> int:
    number = as_finite(value, what)
    if number != int(number) or not minimum <= number <= maximum:
        raise AppError(f"{what} must be an integer in [{minimum}, {maximum}], got {value!r}")
    return int(number)


def check_size(value: Any, what: str, factor: int) -> int:
    """An image side: an integer multiple of `factor` (8, or the VAE's factor when larger)."""
    size = as_integer(value, what, factor, 4096)
    if size % factor:
        raise AppError(f"{what} must be a multiple of {factor}, got {size}")
    return size


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """The Generate tab's settings (checked by `Session.check`)."""

    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    edits: tuple[Edit, ...] = ()


def sweep_strengths(low: Any, high: Any, count: Any) -> list[float]:
    """`count` (4-8) evenly spaced strengths from `low` to `high`."""
    n = as_integer(count, "sweep count", *SWEEP_COUNTS)
    a, b = as_finite(low, "sweep from"), as_finite(high, "sweep to")
    return [float(round(v, 4)) for v in np.linspace(a, b, n)]


# -- photos ------------------------------------------------------------------------------------------------


def read_photo(path: str | os.PathLike | None, size: int) -> tuple[Image.Image, str]:
    """The uploaded file as an RGB photo centre-cropped and resized to `size` (the model's), and a hash of
    its bytes (the inversion cache's key)."""
    if not path:
        raise AppError("upload a photo first")
    data = Path(path).read_bytes()
    try:
        with Image.open(Path(path)) as image:
            image.load()
            photo = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        reason = str(err).replace(str(path), Path(path).name)
        raise AppError(f"{Path(path).name} is not an image this app can read ({reason})") from None
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    photo = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return photo, hashlib.sha256(data).hexdigest()


def mask_overlay(image: Image.Image, sem_guidance: np.ndarray) -> Image.Image:
    """The implicit mask (the share of steps in which the edit changed each latent pixel, (N, 1, C, h, w)
    guidance) as a red overlay on the image."""
    applied = np.abs(np.asarray(sem_guidance, np.float32)[:, 0]).sum(axis=1) > 0  # (N, h, w)
    share = applied.mean(axis=0) if applied.size else np.zeros(applied.shape[1:])
    mask = Image.fromarray(np.round(share * 160).astype(np.uint8))
    mask = mask.resize(image.size, Image.Resampling.NEAREST)
    return Image.composite(Image.new("RGB", image.size, (255, 30, 30)), image.convert("RGB"), mask)


def supports_attention_mask(pipe) -> bool:
    """Whether the UNet has cross-attention at 1/4 of the latent size (LEDITS++'s intersect mask needs it)."""
    types = pipe.unet.config.down_block_types
    return len(types) > 2 and "CrossAttn" in types[2]
