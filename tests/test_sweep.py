"""Sweeps: resumable after SIGKILL, multi-host union equals one process, bad specs fail before compute."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sega_jax import SemanticStableDiffusionPipeline
from sega_jax.sweep import command as sweep
from sega_jax.sweep import files as sweep_files
from tests.helpers import reserved_port
from tests.tiny_pipeline import save_reference

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 2 * 3 * 6  # prompts x seeds x settings
# Runs the CLI and reports how often the sampling program was traced.
WITH_TRACES = (
    "import json, sys; from sega_jax import parallel, sweep; rc = sweep.main(sys.argv[1:]); "
    "print('TRACES', json.dumps(parallel.TRACE_COUNT)); sys.exit(rc)"
)


def make_spec(model: Path, **overrides) -> dict:
    spec = dict(
        model=str(model),
        prompts=["a photo of a woman", "a cat"],
        seeds="0:3",
        height=16,
        width=16,
        num_inference_steps=2,
        editing_prompt=["smiling", "glasses"],
        edit=dict(edit_warmup_steps=1),
        grid=dict(edit_guidance_scale=[0, 3, [3, 6]], reverse_editing_direction=[False, True]),
        batch_per_device=2,
    )
    return {**spec, **overrides}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    save_reference(root / "model")
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(make_spec(root / "model")))
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    # A shared persistent compilation cache: the restarted processes skip XLA compilation.
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return dict(root=root, spec=spec_file, env=env)


# Prepended to WITH_TRACES by `kill_after`: the sweep stops itself (SIGSTOP) while writing the first image
# after its manifest has STOP_AFTER lines, with that image's temporary file written but not yet renamed.
STOP_HOOK = """
import os, signal, sys
from pathlib import Path

_after = int(os.environ["STOP_AFTER"])
_manifest = Path(sys.argv[sys.argv.index("--out") + 1]) / "manifest.jsonl"
_replace = os.replace


def _stop_mid_write(src, dst, **kwargs):
    name = os.path.basename(dst)
    if name.startswith("p") and name.endswith(".png") and _manifest.read_bytes().count(b"\\n") >= _after:
        os.kill(os.getpid(), signal.SIGSTOP)
    _replace(src, dst, **kwargs)


os.replace = _stop_mid_write
"""


def command(setup: dict, out: Path, *extra: str, script: str = WITH_TRACES) -> list[str]:
    return [sys.executable, "-c", script, str(setup["spec"]), "--out", str(out), "--no-progress", *extra]


def run(setup: dict, out: Path, *extra: str) -> str:
    proc = subprocess.run(
        command(setup, out, *extra), cwd=ROOT, env=setup["env"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def full_run(setup) -> tuple[Path, str]:
    out = setup["root"] / "uninterrupted"
    return out, run(setup, out)


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_after(setup: dict, out: Path, count: int) -> None:
    """Run the sweep until it stops itself mid-write of the image after its manifest's `count`-th line
    (STOP_HOOK), then SIGKILL it there: the kill lands on that event however loaded the machine is."""
    proc = subprocess.Popen(
        command(setup, out, script=STOP_HOOK + WITH_TRACES),
        cwd=ROOT,
        env={**setup["env"], "STOP_AFTER": str(count)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        status, deadline = 0, time.monotonic() + 600  # a guard against a hung sweep, not the kill's timing
        while time.monotonic() < deadline:
            pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
        assert os.WIFSTOPPED(status), f"the sweep did not stop after {count} images (wait status {status})"
        assert len(list(out.glob(".p*.png.*.tmp"))) == 1  # stopped mid-write: the next image's temporary file
    finally:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert lines(out / "manifest.jsonl") == count < TOTAL  # killed mid-run, at the chosen image


def snapshot(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


def check_consistent(out: Path) -> None:
    """Every PNG is whole and every manifest record names a PNG with its hash."""
    for png in out.glob("*.png"):
        Image.open(png).verify()
    for record in sweep.read_manifest(out):
        assert hashlib.sha256((out / record["file"]).read_bytes()).hexdigest() == record["sha256"]


def test_uninterrupted_sweep_writes_images_manifest_and_contact_sheets_compiling_once(full_run):
    out, stdout = full_run
    records = sweep.read_manifest(out)
    assert len(records) == TOTAL == len(list(out.glob("p*.png")))
    assert len({r["file"] for r in records}) == TOTAL
    check_consistent(out)
    first = records[0]
    assert first["file"] == "p000-s0-i00-e000.png" and first["prompt"] == "a photo of a woman"
    assert first["edit_guidance_scale"] == [0.0, 0.0] and first["edit_warmup_steps"] == [1, 1]
    assert records[5]["setting"] == {"edit_guidance_scale": [3, 6], "reverse_editing_direction": True}
    sheet = Image.open(out / "contact-p001.png")
    assert sheet.width > 6 * 96 and sheet.height > 3 * 96  # 6 settings x 3 seeds, with labels
    # One program for all chunks and settings: edit values are traced inputs.
    assert json.loads(stdout.split("TRACES", 1)[1]) == {"jit": 1, "pmap": 0}


def test_sweep_killed_twice_then_restarted_equals_uninterrupted(setup, full_run):
    out = setup["root"] / "killed"
    kill_after(setup, out, 3)
    check_consistent(out)
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b'{"file": "p000-s2-i0')  # a torn last line, as a kill mid-append could leave
    kill_after(setup, out, 20)
    check_consistent(out)
    run(setup, out)
    assert not list(out.glob(".*"))  # no temporary files left
    assert snapshot(out) == snapshot(full_run[0])  # same PNGs, contact sheets, spec and manifest bytes


def test_rerunning_a_finished_sweep_computes_nothing(setup, full_run, monkeypatch):
    monkeypatch.setattr(sweep, "load_pipeline", lambda spec: pytest.fail("loaded the model"))
    spec = sweep.load_spec({**make_spec(setup["root"] / "model"), "output": str(full_run[0])})
    summary = sweep.run_sweep(spec, progress=False)
    assert (summary.total, summary.skipped, summary.written) == (TOTAL, TOTAL, 0)


def test_two_processes_with_jax_distributed_equal_one_process(setup, full_run):
    out = setup["root"] / "two-hosts"
    with reserved_port() as port:
        hosts = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id"]
        procs = [
            subprocess.Popen(
                command(setup, out, *hosts, str(i)),
                cwd=ROOT,
                env=setup["env"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        for proc in procs:
            _, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-4000:]
    parts = [sweep.read_manifest_part(out / f"manifest.{i}-of-2.jsonl") for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == TOTAL // 2
    assert not {r["file"] for r in parts[0]} & {r["file"] for r in parts[1]}
    assert sweep.read_manifest(out) == sweep.read_manifest(full_run[0])
    single = snapshot(full_run[0])
    assert {k: v for k, v in snapshot(out).items() if "manifest" not in k} == {
        k: v for k, v in single.items() if "manifest" not in k
    }


def test_non_square_sweep_images_are_the_pipelines_images(setup, tmp_path):
    """16 high, 24 wide: the PNGs have the pipeline's size and pixels (a height/width swap would not)."""
    model = setup["root"] / "model"
    pipe = SemanticStableDiffusionPipeline.from_pretrained(model, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    spec = sweep.load_spec({
        **make_spec(model), "prompts": ["a cat"], "seeds": [4], "width": 24,
        "grid": dict(edit_guidance_scale=[3]), "batch_per_device": 1, "output": str(tmp_path / "out"),
    })
    assert sweep.run_sweep(spec, pipe=pipe, progress=False).written == 1
    (record,) = sweep.read_manifest(tmp_path / "out")
    png = np.asarray(Image.open(tmp_path / "out" / record["file"]).convert("RGB"), np.int16)
    expected = pipe("a cat", seed=4, height=16, width=24, num_inference_steps=2,
                    editing_prompt=["smiling", "glasses"], edit_warmup_steps=1, edit_guidance_scale=3,
                    output_type="np").images[0]
    assert png.shape == expected.shape == (16, 24, 3)
    assert np.abs(png - np.round(expected * 255)).max() <= 1  # batch composition may flip a rounding


# -- bad specs: clear errors before any compute -----------------------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
    monkeypatch.setattr(sweep, "load_pipeline", lambda spec: pytest.fail("loaded the model"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(prompt="a cat"), r"unknown spec key\(s\) \['prompt'\]"),
        (dict(grid=dict(edit_guidance_scale=[])), "grid.edit_guidance_scale: needs a non-empty list"),
        (dict(seeds=[]), "seeds"),
        (dict(prompts=[]), "prompts"),
        (dict(seeds="3:x"), "seeds: cannot parse"),
        (dict(seeds=[1, 1]), "repeated seeds"),
        (dict(grid=dict(edit_threshold=[0.5, 2])), "edit setting 1 .* `edit_threshold` must lie in"),
        (dict(grid=dict(edit_warmup_steps=[[1, 2, 3]])), "3 entries but there are 2"),
        (dict(settings=[dict(edit_strength=2)]), "unknown edit setting"),
        (dict(guidance_scale=1.0), "needs classifier-free guidance"),
        (dict(height=20), "`height` must be a multiple of 8"),
        (dict(model="/no/such/folder"), "not a diffusers pipeline folder"),
        (dict(model=None), r"missing spec key\(s\) \['model'\]"),
    ],
)
def test_bad_specs_are_clear_errors_before_any_compute(tmp_path, no_compute, capsys, overrides, message):
    spec = {**make_spec(tmp_path / "model"), "output": str(tmp_path / "out"), **overrides}
    (tmp_path / "model").mkdir()
    with pytest.raises(sweep.SpecError, match=message):
        sweep.load_spec(spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert sweep.main([str(tmp_path / "spec.json"), "--no-progress"]) == 2
    assert "sega-jax sweep: error:" in capsys.readouterr().err


def test_unwritable_output_folder_is_a_clear_error(tmp_path, no_compute):
    (tmp_path / "model").mkdir()
    (tmp_path / "file").write_text("")
    spec = sweep.load_spec({**make_spec(tmp_path / "model"), "output": str(tmp_path / "file" / "out")})
    with pytest.raises(sweep.SpecError, match="not writable"):
        sweep.run_sweep(spec, progress=False)


def test_changed_spec_under_an_existing_output_folder_is_refused(tmp_path, no_compute):
    (tmp_path / "model").mkdir()
    base = {**make_spec(tmp_path / "model"), "output": str(tmp_path / "out")}
    sweep.prepare_output(sweep.load_spec(base))
    sweep.prepare_output(sweep.load_spec({**base, "batch_per_device": 4, "mode": "pmap"}))  # runtime only
    changed = sweep.load_spec({**base, "num_inference_steps": 3, "seeds": [0, 1]})
    with pytest.raises(
        sweep.SpecError, match=r"different spec \(changed: \['num_inference_steps', 'seeds'\]"
    ):
        sweep.prepare_output(changed)


def test_flags_build_a_spec_and_override_the_file(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(dict(model="m", prompts=["x"], seeds=[5], grid={"a": [1]})))
    args = sweep.build_parser().parse_args(
        [
            str(tmp_path / "s.json"),
            "--out",
            "o",
            "--seeds",
            "0:2",
            "--grid",
            "edit_threshold=[0.5,0.9]",
            "--set",
            "num_inference_steps=4",
            "--set",
            "negative_prompt=blurry",
            "--editing-prompt",
            "hat",
        ]
    )
    spec = sweep.spec_from_args(args)
    assert spec == dict(
        model="m",
        prompts=["x"],
        seeds="0:2",
        output="o",
        editing_prompt=["hat"],
        grid={"a": [1], "edit_threshold": [0.5, 0.9]},
        num_inference_steps=4,
        negative_prompt="blurry",
    )


def test_setting_labels_show_what_varies():
    labels = sweep_files.setting_labels(
        [
            dict(edit_guidance_scale=3, edit_threshold=0.9),
            dict(edit_guidance_scale=[3, 6], edit_threshold=0.9),
        ]
    )
    assert labels == [["scale 3"], ["scale 3/6"]]
    assert sweep_files.setting_labels([{}]) == [["setting 0"]]
