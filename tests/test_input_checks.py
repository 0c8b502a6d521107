"""Said up front (issue 19): non-finite inputs are refused before any compilation, naming the argument; a
concept that can never take effect is warned about once per call (pipeline, CLI) or once per spec (sweep);
NaN/inf in a result says where it arose and whether float16 weights explain it."""

from __future__ import annotations

import copy
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sega_jax import SemanticStableDiffusionPipeline
from sega_jax.cli import generate as cli
from sega_jax.core.sampler import SampleOutput
from sega_jax.pipelines import inputs
from sega_jax.pipelines.inputs import IneffectiveEditWarning
from sega_jax.pipelines.sega.sd import TRACE_COUNT
from sega_jax.sweep import command as sweep
from tests.tiny_pipeline import save_reference

CONCEPTS = ["smiling", "glasses"]
# The reference tiny model: 16x16 images are 8x8 latents. This module's own shape (40x8, 2 steps) keeps the
# positive control's compilation fresh whatever other test module ran in this process before.
SIZE = dict(height=40, width=8)
LATENTS = (1, 4, 20, 4)
GOOD = dict(prompt="a face", num_inference_steps=2, editing_prompt=CONCEPTS, output_type="latent", **SIZE)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    save_reference(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    ours = SemanticStableDiffusionPipeline.from_pretrained(folder, requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    return ours


def caught(run) -> tuple[object, list[str]]:
    """(run()'s result, the IneffectiveEditWarning messages it raised; every one, duplicates included)."""
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        result = run()
    return result, [str(w.message) for w in log if issubclass(w.category, IneffectiveEditWarning)]


# -- non-finite inputs: refused before any compilation, naming the argument --------------------------------


def _with(index: tuple, value: float, shape: tuple = LATENTS, dtype=np.float32) -> np.ndarray:
    array = np.zeros(shape, dtype)
    array[index] = value
    return array


NAN, INF = float("nan"), float("inf")
EMBEDDINGS = (2, 77, 32)
NON_FINITE = [
    (dict(eta=NAN), r"`eta` must be a finite number"),
    (dict(eta=jnp.float32(INF)), r"`eta` must be a finite number"),
    (dict(guidance_scale=INF), r"`guidance_scale` must be a finite number"),
    (dict(edit_guidance_scale=[5, NAN]), r"`edit_guidance_scale\[1\]` must be a finite number"),
    (dict(edit_guidance_scale=-INF), r"`edit_guidance_scale` must be a finite number"),
    (dict(edit_threshold=[NAN, 0.9]), r"`edit_threshold\[0\]` must be a finite number"),
    (dict(edit_momentum_scale=INF), r"`edit_momentum_scale` must be a finite number"),
    (dict(edit_mom_beta=NAN), r"`edit_mom_beta` must be a finite number"),
    (dict(edit_weights=[1.0, -INF]), r"`edit_weights\[1\]` must be a finite number"),
    (dict(edit_weights=np.array([NAN, 1.0])), r"`edit_weights` contains 1 non-finite"),
    (dict(latents=_with((0, 2, 3, 1), NAN)), r"`latents` contains 1 non-finite .* index \(0, 2, 3, 1\)"),
    (dict(latents=jnp.asarray(_with((0, 0, 0, 0), INF))), r"`latents` contains 1 non-finite"),
    (dict(latents=_with((0, 1, 1, 1), 1e39, dtype=np.float64)), r"`latents` .*NaN or inf in float32"),
    (dict(sem_guidance=[np.zeros(LATENTS), _with((0, 3, 0, 0), NAN)]), r"`sem_guidance\[1\]` contains 1"),
    (dict(sem_guidance=np.stack([_with((0, 0, 5, 2), INF)] * 2)), r"`sem_guidance` contains 2 non-finite"),
    (
        dict(editing_prompt=None, editing_prompt_embeddings=_with((1, 4, 7), NAN, EMBEDDINGS)),
        r"`editing_prompt_embeddings` contains 1 non-finite .* index \(1, 4, 7\)",
    ),
]


@pytest.mark.parametrize("bad,match", NON_FINITE, ids=[re.sub(r"\W", "", m)[:30] for _, m in NON_FINITE])
def test_non_finite_input_is_refused_before_any_compilation(pipe, monkeypatch, bad, match):
    # Not even the text encoder runs: the check comes first in `prepare`.
    monkeypatch.setattr(pipe.conditioning, "encode",
                        lambda *a, **k: pytest.fail("encoded text before the checks"))
    before = TRACE_COUNT["denoise"]
    with pytest.raises(ValueError, match=match):
        pipe(**{**GOOD, **bad})
    assert TRACE_COUNT["denoise"] == before


def test_the_same_inputs_finite_are_accepted_and_compile_once(pipe):
    """The positive control: finite versions of the refused arrays and scalars pass the checks, and the
    counter the refusals leave alone goes up by one for this module's fresh shape (and not again)."""
    finite = dict(
        eta=0.5,
        edit_guidance_scale=[5, 3],
        edit_weights=np.array([1.0, 2.0]),
        edit_warmup_steps=0,
        latents=np.full(LATENTS, 0.5, np.float64),
        sem_guidance=[np.zeros(LATENTS, np.float32)] * 2,
        editing_prompt=None,
        editing_prompt_embeddings=np.ones(EMBEDDINGS, np.float32),
    )
    before = TRACE_COUNT["denoise"]
    out, messages = caught(lambda: pipe(seed=0, **{**GOOD, **finite}))
    assert TRACE_COUNT["denoise"] == before + 1
    assert np.isfinite(out.images).all() and messages == []
    pipe(seed=1, **{**GOOD, **finite, "eta": 0.0})
    assert TRACE_COUNT["denoise"] == before + 1


def test_check_finite_leaves_non_numbers_to_the_arguments_own_checks():
    inputs.check_finite(a=None, b=True, c="text", d=[1, 2.5], e=np.arange(3), f=[object()], g=())
    with pytest.raises(ValueError, match=r"`x\[1\]\[0\]` must be a finite number"):
        inputs.check_finite(x=[[1.0], [NAN]])


# -- concepts that can never take effect: one warning per call ----------------------------------------------


INEFFECTIVE = [
    (dict(edit_warmup_steps=[3, 0]), ["'smiling'"], "edit_warmup_steps=3 is not below the 3 denoising steps"),
    (dict(edit_warmup_steps=[0, 7]), ["'glasses'"], "edit_warmup_steps=7 is not below the 3"),
    (dict(edit_warmup_steps=1, edit_cooldown_steps=[1, 3]), ["'smiling'"],
     "edit_cooldown_steps=1 is at or before its edit_warmup_steps=1"),
    (dict(edit_warmup_steps=[2, 0], edit_cooldown_steps=[0, 3]), ["'smiling'"],
     "edit_cooldown_steps=0 is at or before"),
    (dict(edit_warmup_steps=0, edit_weights=[0.0, 1.0]), ["'smiling'"], "edit_weights=0 "),
    (dict(edit_warmup_steps=0, edit_weights=[1.0, -0.5]), ["'glasses'"], "edit_weights=-0.5 "),
    (dict(edit_warmup_steps=0, edit_guidance_scale=[5, 0]), ["'glasses'"], "edit_guidance_scale=0"),
    (dict(edit_warmup_steps=[9, 0], edit_guidance_scale=[5, 0]), ["'smiling'", "'glasses'"],
     "edit_warmup_steps=9 is not below"),
    (dict(editing_prompt=["smiling"], edit_warmup_steps=0, edit_weights=[0]), ["'smiling'"],
     "edit_weights=0"),
    (dict(editing_prompt=None, editing_prompt_embeddings=np.ones(EMBEDDINGS, np.float32),
          edit_warmup_steps=[0, 3]), ["#1"], "edit_warmup_steps=3"),
]


@pytest.mark.parametrize("settings,named,reason", INEFFECTIVE, ids=[str(i) for i in range(len(INEFFECTIVE))])
def test_a_concept_that_can_never_take_effect_gets_one_warning(pipe, settings, named, reason):
    kwargs = dict(prompt="a face", num_inference_steps=3, editing_prompt=CONCEPTS, **SIZE)
    kwargs.update(settings)
    job, messages = caught(lambda: pipe.prepare(**kwargs))
    assert len(messages) == 1, messages  # one per call, however many concepts and reasons
    for name in named:
        assert f"{name}:" in messages[0]
    others = {"'smiling'", "'glasses'", "#0", "#1"} - set(named)
    assert not any(f"{name}:" in messages[0] for name in others), messages[0]
    assert reason in messages[0] and "never take effect" in messages[0]
    assert job.num_concepts == len(kwargs.get("editing_prompt") or [0, 0])  # behaviour unchanged


EFFECTIVE = [
    dict(edit_warmup_steps=2),  # the last loop step (2 of 0..2) still applies it
    dict(edit_warmup_steps=[0, 1], edit_cooldown_steps=[1, 2]),  # cooldown just after warmup
    dict(edit_warmup_steps=0, edit_weights=[0.01, 1.0], edit_guidance_scale=[-1, 0.5]),
    dict(edit_warmup_steps=0, edit_threshold=1.0, edit_momentum_scale=0, edit_mom_beta=0),
]


@pytest.mark.parametrize("settings", EFFECTIVE, ids=[str(i) for i in range(len(EFFECTIVE))])
def test_concepts_that_can_take_effect_are_not_warned_about(pipe, settings):
    kwargs = dict(prompt="a face", num_inference_steps=3, editing_prompt=CONCEPTS, **SIZE, **settings)
    _, messages = caught(lambda: pipe.prepare(**kwargs))
    assert messages == []


def test_the_warning_counts_the_loop_steps_of_the_scheduler(pipe):
    """PLMS runs N + 1 loop iterations for N steps: warmup N still applies at its last iteration."""
    kwargs = dict(prompt="a face", num_inference_steps=4, editing_prompt=["smiling"], edit_warmup_steps=4)
    assert len(caught(lambda: pipe.prepare(**kwargs))[1]) == 1  # DDIM: 4 iterations
    plms = copy.copy(pipe)
    plms.set_scheduler("plms")
    assert caught(lambda: plms.prepare(**kwargs))[1] == []
    assert len(caught(lambda: plms.prepare(**{**kwargs, "edit_warmup_steps": 5}))[1]) == 1


def test_without_classifier_free_guidance_only_the_dropped_edits_are_warned_about(pipe):
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        pipe.prepare("a face", guidance_scale=1.0, editing_prompt=CONCEPTS, edit_warmup_steps=99, **SIZE)
    assert [w.category for w in log] == [UserWarning] and "classifier-free" in str(log[0].message)


def test_the_pipeline_call_warns_once_and_adds_nothing(pipe):
    """Warned before the loop compiles; the behaviour is diffusers' (no semantic guidance at any step)."""
    before, messages, compiled_yet = TRACE_COUNT["denoise"], [], []

    def record(message, category, *args, **kwargs):
        if issubclass(category, IneffectiveEditWarning):
            messages.append(str(message))
            compiled_yet.append(TRACE_COUNT["denoise"] != before)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        out = pipe(seed=0, **{**GOOD, "height": 16, "width": 16, "edit_warmup_steps": [2, 0],
                              "edit_guidance_scale": [4, 0]})
    assert compiled_yet == [False]  # one warning, before the loop was traced
    assert "'smiling': edit_warmup_steps=2" in messages[0]
    assert "'glasses': edit_guidance_scale=0" in messages[0]
    assert not np.asarray(out.sem_guidance).any()  # nothing reached the image, as in diffusers


# -- the CLI and the sweep ---------------------------------------------------------------------------------


def warning_lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_cli_prints_the_warning_once(folder, tmp_path, capsys):
    argv = ["generate", "--model", str(folder), "--prompt", "a face", "--steps", "2", "--height", "16",
            "--width", "16", "--seed", "0", "--out", str(tmp_path / "a.png")]
    assert cli.main([*argv, "--edit", "smiling@warmup=2", "--edit", "glasses@scale=0,warmup=0"]) == 0
    lines = warning_lines(capsys.readouterr().err, "sega-jax: warning:")
    assert len(lines) == 1, lines
    assert "'smiling': edit_warmup_steps=2 is not below the 2 denoising steps" in lines[0]
    assert "'glasses': edit_guidance_scale=0" in lines[0]
    assert cli.main([*argv, "--edit", "smiling@warmup=1", "--edit", "glasses@scale=3,warmup=0"]) == 0
    assert warning_lines(capsys.readouterr().err, "sega-jax: warning:") == []


def test_sweep_warns_once_per_spec_before_it_starts(folder, tmp_path, monkeypatch, capsys):
    """The issue's sweep: the default warmup (10) is past the last step, so every column is the same."""
    shown, compute = [], sweep._compute
    at_start = []
    monkeypatch.setattr(sweep, "_show_warning", lambda message, *a, **k: shown.append(str(message)))
    monkeypatch.setattr(sweep, "_compute", lambda *a, **k: (at_start.append(len(shown)), compute(*a, **k))[1])
    argv = ["--model", str(folder), "--prompt", "a face", "--seeds", "0:2", "--editing-prompt", "smiling",
            "--grid", "edit_guidance_scale=[0,3]", "--set", "num_inference_steps=2", "--set", "height=16",
            "--set", "width=16", "--out", str(tmp_path / "out"), "--no-progress"]
    assert sweep.main(argv) == 0
    assert len(list((tmp_path / "out").glob("p000-*.png"))) == 4
    assert at_start == [1]  # warned before the first image
    assert len(shown) == 1, shown  # ... and never again, not per (prompt, seed) or image
    assert "'smiling' in settings 0, 1: edit_warmup_steps=10 is not below the 2 denoising steps" in shown[0]
    assert "'smiling' in setting 0: edit_guidance_scale=0" in shown[0]


def test_sweep_prints_the_warning_as_one_line(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "_compute", lambda *a, **k: (0, math.nan))
    argv = ["--model", str(folder), "--prompt", "a face", "--seeds", "0", "--editing-prompt", "smiling",
            "--set", "num_inference_steps=2", "--set", 'edit={"edit_warmup_steps": 1, "edit_weights": [0]}',
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert sweep.main(argv) == 0
    lines = warning_lines(capsys.readouterr().err, "sega-jax sweep: warning:")
    assert len(lines) == 1 and "'smiling' in setting 0: edit_weights=0" in lines[0], lines
    argv[argv.index("--set") + 3] = 'edit={"edit_warmup_steps": 1}'
    assert sweep.main(argv[:-3] + ["--out", str(tmp_path / "out2"), "--no-progress"]) == 0
    assert warning_lines(capsys.readouterr().err, "sega-jax sweep: warning:") == []


# -- NaN/inf out: where it arose, and float16 blamed only with float16 weights ----------------------------


def _nan_latents(shape=(1, 8, 8, 4)) -> SampleOutput:
    return SampleOutput(latents=jnp.full(shape, jnp.nan), sem_guidance=jnp.zeros((1, *shape)), estimates=None)


def _cast(pipe, dtype):
    """A twin of `pipe` whose UNet and VAE weights are `dtype` (only `finish` runs with them here)."""
    twin = copy.copy(pipe)
    cast = lambda split: (split[0], jax.tree.map(lambda x: x.astype(dtype), split[1]))
    twin._unet, twin._vae = cast(pipe._unet), cast(pipe._vae)
    return twin


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_latents_from_non_fp16_weights_do_not_blame_fp16(pipe, dtype):
    twin = pipe if dtype == "float32" else _cast(pipe, jnp.bfloat16)
    with pytest.raises(FloatingPointError) as err:
        twin.finish(_nan_latents(), "latent")
    message = str(err.value)
    assert "denoising loop" in message and "every input was finite" in message
    assert f"weights are {dtype}" in message and "not a float16 overflow" in message
    assert "load with dtype" not in message


def test_non_finite_latents_from_fp16_weights_suggest_bf16_or_fp32(pipe):
    with pytest.raises(FloatingPointError, match=r"float16 weights .* dtype='bfloat16' or 'float32'"):
        _cast(pipe, jnp.float16).finish(_nan_latents(), "latent")


def test_non_finite_images_from_finite_latents_point_at_the_vae(pipe):
    twin = copy.copy(pipe)
    graph, state = pipe._vae
    twin._vae = (graph, jax.tree.map(lambda x: x * jnp.nan, state))
    finite = SampleOutput(latents=jnp.zeros((1, 8, 8, 4)), sem_guidance=jnp.zeros((1, 1, 8, 8, 4)),
                          estimates=None)
    with pytest.raises(FloatingPointError) as err:
        twin.finish(finite, "np")
    message = str(err.value)
    assert "VAE decoder turned finite latents" in message and "weights are float32" in message
    assert "float16 weights" not in message


def test_fp16_vae_message_names_the_vae_overflow():
    message = str(inputs.non_finite_output(True, [np.float16, np.int32]))
    assert "VAE decoder" in message and "VAE overflowing" in message and "'bfloat16'" in message
