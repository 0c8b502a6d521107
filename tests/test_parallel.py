"""Data-parallel generation (pmap and sharded jit) and edit-strength sweeps in one compiled call.

Multi-device checks run in a subprocess with 8 virtual CPU devices; this process stays single-device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from sega_jax.core.guidance import EditParams
from sega_jax.pipelines import parallel
from tests.helpers import reserved_port
from tests.parity_store import reference_case

ROOT = Path(__file__).resolve().parents[1]

# Runs with 8 devices; prints one JSON line of measurements.
EIGHT_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from sega_jax import SemanticStableDiffusionPipeline
    from sega_jax.pipelines import parallel

    assert jax.local_device_count() == 8
    pipe = SemanticStableDiffusionPipeline.from_pretrained(sys.argv[1], requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
    common = dict(height=16, width=16, num_inference_steps=2, editing_prompt=["glasses", "smile"],
                  edit_warmup_steps=1, edit_guidance_scale=[4, 6], seed=7, output_type="np")
    five = dict(prompt="a face", num_images_per_prompt=5)
    replay = pipe(**five, **{**common, "seed": 8}).sem_guidance
    cases = {  # name: (arguments, [(entry point, devices)])
        "5 images": (five, [("pmap", None), ("jit", None), ("jit", 3)]),
        "2 prompts x 4 images": (dict(prompt=["a face", "a cat"], num_images_per_prompt=4),
                                 [("pmap", None), ("jit", None)]),
        "5 images, estimates, replay": (dict(**five, return_estimates=True, sem_guidance=replay),
                                        [("jit", None)]),
    }
    fields = ("images", "sem_guidance", "uncond_estimates", "text_estimates", "edit_estimates")
    report = {}
    for name, (case, runs) in cases.items():
        ref = pipe(**case, **common)
        for mode, devices in runs:
            got = parallel.generate(pipe, mode=mode, devices=devices, **case, **common)
            key = f"{name} {mode} on {devices or 8} devices"
            report[key] = {f: rel(getattr(got, f), getattr(ref, f)) for f in fields
                           if getattr(ref, f) is not None}
            report[key]["same count"] = len(got.images) == len(ref.images)
    report["replications"] = parallel.REPLICATIONS["count"]
    report["traces"] = dict(parallel.TRACE_COUNT)

    # An edit-strength sweep: settings x images in one call; new values reuse the compiled program.
    kwargs = {k: v for k, v in common.items() if k != "output_type"}
    job = pipe.prepare("a face", num_images_per_prompt=2, **kwargs)
    before = parallel.TRACE_COUNT["jit"]
    settings = [dict(edit_guidance_scale=s, reverse_editing_direction=r) for s, r in ((0, False), (3, True))]
    first = parallel.sweep_edits(pipe, job, settings + [dict(edit_threshold=0.5, edit_warmup_steps=0)])
    settings = [dict(edit_guidance_scale=[2, 9], edit_weights=[1, 0.5]), dict(guidance_scale=3),
                dict(edit_cooldown_steps=1, edit_momentum_scale=0.5, edit_mom_beta=0.2)]
    second = parallel.sweep_edits(pipe, job, settings)
    report["sweep shape"] = list(second.latents.shape)
    # Each setting alone through `generate` (checked against the pipeline above; same compiled program).
    alone = lambda s: parallel.generate(pipe, "a face", num_images_per_prompt=2, output_type="latent",
                                        **{**kwargs, **s}).images
    report["sweep vs one setting at a time"] = [
        rel(second.latents[i], np.moveaxis(alone(s), 1, -1)) for i, s in enumerate(settings)
    ]
    report["sweep traces"] = parallel.TRACE_COUNT["jit"] - before
    report["settings differ"] = float(np.abs(np.asarray(first.latents[0] - first.latents[1])).max())
    print(json.dumps(report))
    print(report, file=sys.stderr)
    """
)

# One of two processes joined by jax.distributed; prints its share of a batch (and, on process 0, the
# single-process reference).
TWO_HOSTS = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[3]))
    import numpy as np
    from sega_jax import SemanticStableDiffusionPipeline
    from sega_jax.pipelines import parallel

    pipe = SemanticStableDiffusionPipeline.from_pretrained(sys.argv[1], requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a face", num_images_per_prompt=3, height=16, width=16, num_inference_steps=2, seed=5,
              editing_prompt=["glasses"], edit_warmup_steps=1, output_type="np")
    images = parallel.generate(pipe, **kw).images
    result = dict(share=parallel.process_share(3).tolist(), images=images.tolist())
    if jax.process_index() == 0:
        result["reference"] = pipe(**kw).images.tolist()
    print(json.dumps(result))
    """
)


# Null-text inversion of 3 photos over 2 of 4 devices (pmap and sharded jit) against one device, with an
# early-stop threshold between the photos' first losses so that each image stops on its own.
NULL_TEXT_TWO_DEVICES = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from sega_jax import SemanticStableDiffusionPipeline
    from sega_jax.pipelines import null_text

    pipe = SemanticStableDiffusionPipeline.from_pretrained(sys.argv[1], requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    coarse = np.random.default_rng(0).uniform(0, 1, (3, 4, 4, 3)).astype(np.float32)
    photos = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    kw = dict(prompt="a photo of a cat", num_inference_steps=4)
    first = pipe.invert(photos, **kw, num_inner_steps=1, early_stop=0.0, early_stop_slope=0.0).losses[0]
    kw.update(early_stop=float(np.sqrt(first.min() * first.max())), early_stop_slope=0.0)
    one = pipe.invert(photos, **kw)
    rel = lambda a, b: float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())
    edit = lambda inv: pipe([kw["prompt"]] * 3, num_inference_steps=4, inversion=inv, seed=0,
                            editing_prompt=["a dog"], edit_warmup_steps=1, output_type="latent").images
    report = {"iterations": one.iterations.tolist()}
    for mode in ("pmap", "jit"):
        inv = pipe.invert(photos, mode=mode, devices=2, **kw)
        report[mode] = dict(iterations=inv.iterations.tolist(), latents=rel(inv.latents, one.latents),
                            trajectory=rel(inv.trajectory, one.trajectory),
                            losses=rel(inv.losses, one.losses),
                            uncond=rel(inv.uncond_embeddings, one.uncond_embeddings),
                            edited=rel(edit(inv), edit(one)))
    report["traces"] = {k: v for k, v in null_text.TRACE_COUNT.items() if " " in k}
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    # The tiny reference model, built with torch where it is installed and read from CI's store of
    # references where it is not, so the Python 3.12 leg (newest jax) tests pmap and sharded jit too.
    def build(folder: Path) -> dict:
        from sega_jax.testing.reference import save_reference

        save_reference(folder)
        return {}

    return reference_case("parallel-model", build)[0]


def run_with_devices(code: str, *args: str, devices: int = 8) -> dict:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pmap_and_sharded_jit_match_single_device_and_sweeps_compile_once(model_folder):
    report = run_with_devices(EIGHT_DEVICES, str(model_folder))
    runs = {key: value for key, value in report.items() if " on " in key}
    assert len(runs) == 6
    assert len(runs["5 images, estimates, replay jit on 8 devices"]) == 6  # 5 fields + count
    for key, diffs in runs.items():
        assert diffs.pop("same count"), key
        # Per-device batches change XLA's summation order only; the guidance (a difference of noise
        # estimates, scaled) carries that rounding noise amplified, hence the looser bound on it.
        guidance = diffs.pop("sem_guidance")
        assert guidance <= 1e-4 and max(diffs.values()) <= 1e-5, (key, guidance, diffs)
    # Weights were replicated once per device set (8 devices, then 3), not once per call.
    assert report["replications"] == 2
    # One program per (entry point, per-device batch, recording estimates or not).
    assert report["traces"] == {"pmap": 1, "jit": 3}
    # The strength sweeps (and the single settings) reuse the 8-device program (1 image per device)
    # whatever the values.
    assert report["sweep traces"] == 0
    assert report["sweep shape"] == [3, 2, 8, 8, 4]  # settings, images, h, w, c
    assert max(report["sweep vs one setting at a time"]) <= 1e-6, report["sweep vs one setting at a time"]
    assert report["settings differ"] > 1e-4


def test_null_text_inversion_under_pmap_and_sharded_jit_stops_each_image_on_its_own(model_folder):
    report = run_with_devices(NULL_TEXT_TWO_DEVICES, str(model_folder), devices=4)
    iterations = np.asarray(report["iterations"])
    assert len(set(iterations[0])) > 1  # the threshold splits the photos at the first step
    for mode in ("pmap", "jit"):
        got = report.pop(mode)
        print(mode, got)
        assert got.pop("iterations") == report["iterations"], mode  # the same early stops, per image
        # The embeddings themselves are not comparable at fp32 noise: Adam divides each gradient by its
        # running RMS, so the rounding noise of a near-zero gradient becomes a full-size step. Measured
        # against one device with the whole batch: 5.3e-5 (pmap) / 7.2e-5 (jit) relative on jax 0.10.2,
        # 1.2e-4 (pmap) on jax 0.12, and 7.1e-5 to 1.1e-4 even against one device running the same batch
        # (another compilation). What the embeddings are for is checked at fp32 noise instead: the guided
        # trajectory they were fitted to, the losses, and SEGA run from them. The 1e-3 bound only catches
        # mix-ups (an image paired with another's embeddings differs by O(1)).
        assert got.pop("uncond") <= 1e-3, (mode, got)
        assert got.pop("edited") <= 1e-4 and max(got.values()) <= 1e-5, (mode, got)
    assert report["traces"] == {"ddim pmap": 1, "null_text pmap": 1, "ddim jit": 1, "null_text jit": 1}


def test_each_process_generates_its_share_with_jax_distributed(model_folder):
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    results = []
    with reserved_port() as port:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", TWO_HOSTS, str(model_folder), f"localhost:{port}", str(i)],
                cwd=ROOT,
                env={**env, "JAX_PLATFORMS": "cpu"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-4000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [r["share"] for r in results] == [[0, 1], [2]]
    union = np.concatenate([np.asarray(r["images"]) for r in results])
    reference = np.asarray(results[0]["reference"])
    assert union.shape == reference.shape == (3, 16, 16, 3)
    assert np.abs(union - reference).max() <= 1e-5 * np.abs(reference).max()


def test_reserved_port_is_kept_from_other_programs():
    with reserved_port() as port:
        with socket.socket() as other, pytest.raises(OSError):  # as another program binding it would
            other.bind(("localhost", port))


def test_process_share_splits_a_batch_without_overlap():
    shares = [parallel.process_share(10, i, 3) for i in range(3)]
    assert [list(s) for s in shares] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert list(parallel.process_share(2, 2, 3)) == []
    assert list(parallel.process_share(4)) == [0, 1, 2, 3]  # this process alone takes everything


def test_stack_settings_overrides_only_the_given_fields():
    base = EditParams.create(2, guidance_scale=6.0, edit_guidance_scale=[1.0, 2.0], edit_warmup_steps=3)
    stacked = parallel.stack_settings(
        base, [{}, dict(edit_guidance_scale=7), dict(edit_threshold=[0.5, 0.6])]
    )
    assert stacked.edit_guidance_scale.shape == (3, 2)
    np.testing.assert_allclose(stacked.edit_guidance_scale, [[1, 2], [7, 7], [1, 2]])
    np.testing.assert_allclose(stacked.edit_threshold, [[0.9, 0.9], [0.9, 0.9], [0.5, 0.6]])
    np.testing.assert_array_equal(stacked.edit_warmup_steps, [[3, 3]] * 3)
    np.testing.assert_allclose(stacked.guidance_scale, [6, 6, 6])


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(edit_scale=3), "unknown edit setting"),
        (dict(edit_threshold=1.5), "edit_threshold"),
        (dict(edit_guidance_scale=[1, 2, 3]), "3 entries but there are 2"),
        (dict(reverse_editing_direction="yes"), "reverse_editing_direction"),
    ],
)
def test_bad_edit_settings_are_clear_errors(setting, message):
    with pytest.raises(ValueError, match=message):
        parallel.stack_settings(EditParams.create(2), [setting])


def test_devices_argument_is_checked():
    assert parallel.resolve_devices() == tuple(jax.local_devices())
    assert parallel.resolve_devices(1) == tuple(jax.local_devices()[:1])
    with pytest.raises(ValueError, match="local device"):
        parallel.resolve_devices(len(jax.local_devices()) + 1)
    with pytest.raises(ValueError, match="empty"):
        parallel.resolve_devices([])
