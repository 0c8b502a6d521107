"""`sega-jax app`: the interactive semantic editor in the browser (Gradio: the optional extra sega-jax[app]).

Two tabs over one loaded pipeline. Generate: a prompt with up to four SEGA concepts, the result beside the
unedited image of the same seed (both PNGs carry the CLI's metadata), and a strength sweep of one concept as
one compiled call (`parallel.sweep_edits`). Edit a photo: LEDITS++ (`invert` once, cached per photo and
settings, then edit with the same concept controls), the implicit mask shown as an overlay on request.

Edit values, seeds and prompts are traced inputs of the compiled programs, so only the first call of a shape
(image size, steps, concept count) compiles; every status line says whether a call compiled and how long it
took. This module (the session) and `sega_jax.app.core` (input checks, compile counting,
photo helpers) need no Gradio; the layout is `sega_jax.app.ui`.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from sega_jax.app.core import (
    GRADIO_HINT,
    MAX_CONCEPTS,
    MAX_SEED,
    AppError,
    GenerateRequest,
    Timing,
    as_finite,
    as_integer,
    check_size,
    mask_overlay,
    read_photo,
    user_errors,
    watch,
)
from sega_jax.core.sampler import SampleOutput
from sega_jax.pipelines import family_of_pipeline, ledits_pipeline_for, parallel
from sega_jax.settings import DEFAULTS, Edit, edit_kwargs, png_info, prepare_kwargs

# -- model choice and Gradio ---------------------------------------------------------------------------------


def require_gradio():
    """The gradio module, with analytics off; a clear ImportError naming the extra when it is missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as err:
        raise ImportError(f"`sega-jax app` needs Gradio, an optional extra: {GRADIO_HINT} ({err})") from None
    return gradio


# -- the session: one pipeline, its caches -------------------------------------------------------------------


class Session:
    """The app's state: the pipeline, the unedited-image and inversion caches, and where PNGs are written.
    One call runs at a time (the compile counts are per call)."""

    def __init__(self, pipe, model: str | None = None, folder: str | os.PathLike | None = None):
        self.pipe = pipe
        self.model = model or str(getattr(pipe, "name_or_path", None) or "in-memory pipeline")
        self.folder = Path(folder or tempfile.mkdtemp(prefix="sega-jax-app-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self._unedited: dict[tuple, Image.Image] = {}
        self._inversions: dict[tuple, Any] = {}
        self._editor = None
        self.calls = 0  # numbers the status lines, so each call's line is new

    # -- facts about the model --------------------------------------------------------------------------

    @property
    def size_factor(self) -> int:
        return max(8, int(self.pipe.vae_scale_factor))

    @property
    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size or 64) * int(self.pipe.vae_scale_factor)

    @property
    def photo_size(self) -> int:
        """The side photos are edited at: the model's size, in multiples of 32 (LEDITS++ needs them)."""
        return max(32, self.default_size // 32 * 32)

    @property
    def default_guidance(self) -> float:
        return family_of_pipeline(self.pipe).default_guidance

    @property
    def editor(self):
        if self._editor is None:
            self._editor = ledits_pipeline_for(self.pipe)
        return self._editor

    # -- Generate ---------------------------------------------------------------------------------------

    def check(self, prompt: Any, negative_prompt: Any, seed: Any, steps: Any, guidance: Any, height: Any,
              width: Any, edits: Sequence[Edit] = ()) -> GenerateRequest:
        """A checked request, or AppError naming the first bad value."""
        if not str(prompt or "").strip():
            raise AppError("the prompt is empty: describe what to draw")
        if len(edits) > MAX_CONCEPTS:
            raise AppError(f"at most {MAX_CONCEPTS} concepts, got {len(edits)}")
        return GenerateRequest(
            prompt=str(prompt).strip(), negative_prompt=str(negative_prompt or "").strip() or None,
            seed=as_integer(seed, "seed", 0, MAX_SEED), steps=as_integer(steps, "steps", 1, 1000),
            guidance=as_finite(guidance, "guidance"), height=check_size(height, "height", self.size_factor),
            width=check_size(width, "width", self.size_factor), edits=tuple(edits))

    def settings(self, request: GenerateRequest, edited: bool = True) -> dict:
        """The CLI's settings for a request (what the PNG metadata records)."""
        import jax

        dtype = str(jax.tree.leaves(self.pipe.unet_parts[1])[0].dtype)
        return {**DEFAULTS, "model": self.model, "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "edit": [e.inline() for e in request.edits] if edited else [], "steps": request.steps,
                "guidance": request.guidance, "height": request.height, "width": request.width,
                "seed": request.seed, "dtype": dtype}

    def _run(self, settings: dict, notes: list[str]) -> Image.Image:
        with user_errors(notes):
            job = self.pipe.prepare(**prepare_kwargs(settings))
            return self.pipe.run(job).images[0]

    def write_png(self, image: Image.Image, settings: dict, name: str) -> Path:
        path = self.folder / f"sega_{settings['seed']}_{name}.png"
        image.save(path, pnginfo=png_info(settings, dict(self.pipe.scheduler.config), 0, type(self.pipe)))
        return path

    def generate(self, request: GenerateRequest) -> tuple[Image.Image, Image.Image, Path, Path, str]:
        """(edited, unedited, their PNG paths, status). The unedited image is cached per prompt and seed."""
        notes: list[str] = []
        plain = self.settings(request, edited=False)
        key = tuple((k, str(v)) for k, v in plain.items())
        with self.lock, watch() as timing:
            if key not in self._unedited:
                _remember(self._unedited, key, self._run(plain, notes))
            unedited = self._unedited[key]
            edited = self._run(self.settings(request), notes) if request.edits else unedited
        status = self._status(timing, f"seed {request.seed}, {len(request.edits)} concept(s)")
        paths = (self.write_png(edited, self.settings(request), "edited"),
                 self.write_png(unedited, plain, "unedited"))
        return edited, unedited, *paths, _with_notes(status, notes)

    def sweep(self, request: GenerateRequest, concept: int, strengths: Sequence[float]) -> tuple[list, str]:
        """Concept `concept` (0-based) at each strength, the others as set: one compiled call.
        Returns [(image, caption)] and the status."""
        if not request.edits:
            raise AppError("the sweep needs a concept: add one with a text")
        if not 0 <= concept < len(request.edits):
            raise AppError(f"sweep concept must be 1 to {len(request.edits)}, got {concept + 1}")
        scales = [e.scale for e in request.edits]
        settings = [{"edit_guidance_scale": scales[:concept] + [s] + scales[concept + 1:]} for s in strengths]
        notes: list[str] = []
        with self.lock, watch() as timing, user_errors(notes):
            job = self.pipe.prepare(**prepare_kwargs(self.settings(request)))
            out = parallel.sweep_edits(self.pipe, job, settings)
            flat = out.latents.reshape(-1, *out.latents.shape[2:])
            images = self.pipe.finish(SampleOutput(flat, None, None), "pil", seed=request.seed).images
        name = request.edits[concept].prompt
        captions = [f"{name}: {s:g}" for s in strengths]
        status = self._status(timing, f"sweep of {len(strengths)} strengths of '{name}' as one call")
        return list(zip(images, captions, strict=True)), _with_notes(status, notes)

    # -- Edit a photo (LEDITS++) ------------------------------------------------------------------------

    def invert(self, path: Any, source_prompt: Any, steps: Any, skip: Any, seed: Any) -> tuple[Any, str]:
        """The photo's inversion (cached per photo bytes and settings) and a status line."""
        photo, digest = read_photo(path, self.photo_size)
        steps = as_integer(steps, "inversion steps", 1, 1000)
        skip = as_finite(skip, "skip")
        if not 0.0 <= skip < 1.0:
            raise AppError(f"skip must lie in [0, 1), got {skip}")
        seed = as_integer(seed, "seed", 0, MAX_SEED)
        key = (digest, str(source_prompt or ""), steps, skip, seed, self.photo_size)
        if key in self._inversions:
            return self._inversions[key], "inversion reused (cached for this photo and settings)"
        notes: list[str] = []
        with self.lock, watch() as timing, user_errors(notes):
            inversion = self.editor.invert(photo, source_prompt=str(source_prompt or ""),
                                           num_inversion_steps=steps, skip=skip, seed=seed)
        _remember(self._inversions, key, inversion)
        status = self._status(timing, f"inverted {self.photo_size} px photo, {steps} steps")
        return inversion, _with_notes(status, notes)

    def edit_photo(self, inversion, edits: Sequence[Edit], intersect: bool,
                   show_mask: bool) -> tuple[Image.Image, Image.Image | None, str]:
        """(edited photo, the implicit mask overlay if asked, status)."""
        if not edits:
            raise AppError("add a concept with a text to edit the photo")
        if len(edits) > MAX_CONCEPTS:
            raise AppError(f"at most {MAX_CONCEPTS} concepts, got {len(edits)}")
        kwargs = edit_kwargs(edits)
        kwargs.pop("edit_weights")  # LEDITS++ has no per-concept weights
        notes: list[str] = []
        with self.lock, watch() as timing, user_errors(notes):
            out = self.editor(inversion=inversion, use_intersect_mask=bool(intersect), **kwargs)
        image = out.images[0]
        overlay = mask_overlay(image, out.sem_guidance) if show_mask else None
        status = self._status(timing, f"edited with {len(edits)} concept(s)")
        return image, overlay, _with_notes(status, notes)

    def _status(self, timing: Timing, what: str) -> str:
        self.calls += 1
        return f"#{self.calls}: {timing.text(what)}"


def _remember(cache: dict, key: tuple, value: Any, size: int = 16) -> None:
    """Keep `value` under `key`, dropping the oldest entries beyond `size`."""
    cache[key] = value
    while len(cache) > size:
        cache.pop(next(iter(cache)))


def _with_notes(status: str, notes: Sequence[str]) -> str:
    return "\n\n".join([status, *(f"Note: {note}" for note in notes)])


# -- entry points ------------------------------------------------------------------------------------------
