"""The layout of `sega-jax app` (Gradio Blocks) over a `sega_jax.app.session.Session`: two tabs, shared
concept controls, and handlers that turn bad input into a message (a warning toast and the status line), never
a stack trace, so the server keeps serving."""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable
from typing import Any

from sega_jax.app.core import (
    DIRECTIONS,
    MAX_CONCEPTS,
    MAX_SEED,
    SWEEP_COUNTS,
    AppError,
    concepts_from_rows,
    read_photo,
    supports_attention_mask,
    sweep_strengths,
)
from sega_jax.app.session import Session, require_gradio

logger = logging.getLogger(__name__)
IMAGE_HEIGHT = 320  # px on the page (the tiny and demo models draw 64 and 32 px images)
FIELDS = 5  # per concept: text, direction, strength, threshold, warmup
HEADER = ("## sega-jax: semantic editing in the browser\nEdit values, seeds and prompts are inputs of the "
          "compiled programs: only the first call of a shape compiles, and the status line says so.")


def blocks(session: Session):
    """The app for a session (see `sega_jax.app.build`)."""
    gr = require_gradio()
    with gr.Blocks(title="sega-jax", analytics_enabled=False) as app:
        gr.Markdown(f"{HEADER}\n\nModel: `{session.model}` ({type(session.pipe).__name__})")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate_tab(gr, session)
            with gr.Tab("Edit a photo", id="photo", elem_id="tab-photo"):
                photo_tab(gr, session)
    return app


def guarded(gr, fn: Callable, outputs: int) -> Callable:
    """`fn` with AppError (and any other failure) shown as a warning and in the last output, the status;
    the other outputs are left as they were."""

    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        except AppError as err:
            message = str(err)
        except Exception as err:  # a bug or an unexpected failure: logged, shown, the server keeps serving
            logger.exception("sega-jax app: %s failed", fn.__name__)
            message = f"internal error ({type(err).__name__}): {err}"
        gr.Warning(message)
        return *[gr.skip()] * (outputs - 1), f"**Error:** {message}"

    return run


# -- the concept controls (both tabs) ------------------------------------------------------------------------


def concept_controls(gr, prefix: str, warmup: int) -> tuple[Any, list]:
    """Up to MAX_CONCEPTS concept rows (the first shown) with + / - buttons; returns (the shown count's
    State, the rows' components in order text, direction, strength, threshold, warmup)."""
    count = gr.State(1)
    groups, fields = [], []
    for i in range(MAX_CONCEPTS):
        name = f"{prefix}-concept-{i}"
        with gr.Group(visible=i == 0, elem_id=name) as group:
            with gr.Row():
                fields.append(gr.Textbox(label=f"Concept {i + 1}", placeholder="e.g. glasses", scale=3,
                                         elem_id=f"{name}-text"))
                fields.append(gr.Radio(list(DIRECTIONS), value=DIRECTIONS[0], label="direction",
                                       elem_id=f"{name}-direction"))
                fields.append(gr.Slider(0, 20, value=5, step=0.5, label="strength",
                                        elem_id=f"{name}-strength"))
            with gr.Accordion("advanced", open=False):
                fields.append(gr.Slider(0, 1, value=0.9, step=0.005, label="threshold (share left unedited)",
                                        elem_id=f"{name}-threshold"))
                fields.append(gr.Slider(0, 50, value=warmup, step=1, label="warmup steps",
                                        elem_id=f"{name}-warmup"))
        groups.append(group)
    with gr.Row():
        more = gr.Button("+ concept", size="sm", elem_id=f"{prefix}-add-concept")
        fewer = gr.Button("- concept", size="sm", elem_id=f"{prefix}-remove-concept")

    def shown(n: int):
        if n > MAX_CONCEPTS:
            gr.Warning(f"at most {MAX_CONCEPTS} concepts")
        n = min(max(n, 0), MAX_CONCEPTS)
        return n, *[gr.update(visible=i < n) for i in range(MAX_CONCEPTS)]

    more.click(lambda n: shown(n + 1), inputs=count, outputs=[count, *groups])
    fewer.click(lambda n: shown(n - 1), inputs=count, outputs=[count, *groups])
    return count, fields


def rows(values: tuple) -> list[tuple]:
    return [values[i:i + FIELDS] for i in range(0, len(values), FIELDS)]


# -- Generate ------------------------------------------------------------------------------------------------


def generate_tab(gr, session: Session) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed",
                                 elem_id="seed")
                dice = gr.Button("random seed", size="sm", elem_id="dice")
            steps = gr.Slider(1, 100, value=50, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(0, 20, value=session.default_guidance, step=0.5, label="Guidance",
                                 elem_id="guidance")
            with gr.Accordion("image size", open=False):
                height = gr.Number(value=session.default_size, precision=0, label="Height", elem_id="height")
                width = gr.Number(value=session.default_size, precision=0, label="Width", elem_id="width")
            count, fields = concept_controls(gr, "gen", warmup=10)
            run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Accordion("strength sweep: one concept at 4-8 strengths, one compiled call", open=False):
                with gr.Row():
                    which = gr.Dropdown([str(i + 1) for i in range(MAX_CONCEPTS)], value="1", label="concept",
                                        elem_id="sweep-concept")
                    low = gr.Number(value=0, label="from", elem_id="sweep-from")
                    high = gr.Number(value=10, label="to", elem_id="sweep-to")
                    many = gr.Slider(*SWEEP_COUNTS, value=SWEEP_COUNTS[0], step=1, label="strengths",
                                     elem_id="sweep-count")
                sweep = gr.Button("Sweep", elem_id="sweep")
        with gr.Column(scale=3):
            with gr.Row():
                unedited = gr.Image(label="Unedited (same seed)", format="png", interactive=False,
                                    height=IMAGE_HEIGHT, elem_id="unedited")
                edited = gr.Image(label="Edited", format="png", interactive=False, height=IMAGE_HEIGHT,
                                  elem_id="edited")
            with gr.Row():
                get_unedited = gr.DownloadButton("Download unedited PNG", elem_id="download-unedited")
                get_edited = gr.DownloadButton("Download edited PNG", elem_id="download-edited")
            status = gr.Markdown("Type a prompt, add concepts, Generate.", elem_id="gen-status")
            strip = gr.Gallery(label="Sweep", columns=SWEEP_COUNTS[1], format="png", height="auto",
                               elem_id="sweep-strip")

    settings = [prompt, negative, seed, steps, guidance, height, width, count, *fields]

    def request(prompt, negative, seed, steps, guidance, height, width, count, *values):
        edits = concepts_from_rows(count, rows(values))
        return session.check(prompt, negative, seed, steps, guidance, height, width, edits)

    def on_generate(*args):
        image, plain, edited_png, plain_png, text = session.generate(request(*args))
        return image, plain, str(edited_png), str(plain_png), text

    def on_sweep(which, low, high, many, *args):
        strengths = sweep_strengths(low, high, many)
        return session.sweep(request(*args), int(which) - 1, strengths)

    dice.click(lambda: secrets.randbelow(MAX_SEED + 1), outputs=seed)
    run.click(guarded(gr, on_generate, 5), inputs=settings,
              outputs=[edited, unedited, get_edited, get_unedited, status])
    sweep.click(guarded(gr, on_sweep, 2), inputs=[which, low, high, many, *settings], outputs=[strip, status])


# -- Edit a photo --------------------------------------------------------------------------------------------


def photo_tab(gr, session: Session) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            upload = gr.File(label="Photo (PNG, JPEG, ...)", elem_id="photo-file")
            source = gr.Textbox(label="Source prompt (optional: what the photo shows)",
                                elem_id="source-prompt")
            with gr.Accordion("inversion", open=False):
                steps = gr.Slider(1, 100, value=30, step=1, label="inversion steps",
                                  elem_id="inversion-steps")
                skip = gr.Slider(0, 0.9, value=0.15, step=0.05, label="skip", elem_id="inversion-skip")
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed",
                                 elem_id="photo-seed")
            invert = gr.Button("Invert", elem_id="invert")
            count, fields = concept_controls(gr, "photo", warmup=0)
            intersect = gr.Checkbox(supports_attention_mask(session.pipe), elem_id="intersect",
                                    label="intersect with the cross-attention mask (needs a UNet with "
                                          "attention at 1/4 of the latent size)")
            show_mask = gr.Checkbox(False, label="show the implicit mask", elem_id="show-mask")
            edit = gr.Button("Edit", variant="primary", elem_id="edit")
        with gr.Column(scale=3):
            with gr.Row():
                photo = gr.Image(label="Photo (as the model sees it)", format="png", interactive=False,
                                 height=IMAGE_HEIGHT, elem_id="photo")
                result = gr.Image(label="Edited", format="png", interactive=False, height=IMAGE_HEIGHT,
                                  elem_id="photo-edited")
                mask = gr.Image(label="Implicit mask", format="png", interactive=False, height=IMAGE_HEIGHT,
                                elem_id="photo-mask")
            status = gr.Markdown("Upload a photo, Invert, add concepts, Edit.", elem_id="photo-status")

    inversion = [upload, source, steps, skip, seed]

    def on_upload(path):
        if path is None:
            return None, "Upload a photo, Invert, add concepts, Edit."
        image, _ = read_photo(path, session.photo_size)
        return image, f"photo loaded ({image.width}x{image.height}); Invert, or Edit straight away"

    def on_invert(*args):
        inverted, text = session.invert(*args)
        return inverted.vae_reconstruction_images[0], text

    def on_edit(path, source, steps, skip, seed, intersect, show_mask, count, *values):
        inverted, first = session.invert(path, source, steps, skip, seed)
        edits = concepts_from_rows(count, rows(values))
        image, overlay, text = session.edit_photo(inverted, edits, intersect, show_mask)
        return image, overlay, f"{first}\n\n{text}"

    upload.change(guarded(gr, on_upload, 2), inputs=upload, outputs=[photo, status])
    invert.click(guarded(gr, on_invert, 2), inputs=inversion, outputs=[photo, status])
    edit.click(guarded(gr, on_edit, 3), inputs=[*inversion, intersect, show_mask, count, *fields],
               outputs=[result, mask, status])
