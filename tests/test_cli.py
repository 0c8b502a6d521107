"""The `sega-jax` command: flags, inline edits, PNG metadata, reproduction, errors, no torch at run time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sega_jax.builtin.demo import demo_folder
from sega_jax.cli import generate as cli
from sega_jax.cli.generate import Edit, build_parser, main, output_paths, parse_edit
from sega_jax.settings import default_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of the face of a woman"
EDITS = ["smiling, smile@scale=4,threshold=0.99,warmup=1", "glasses@scale=3,reverse,cooldown=2,weight=0.5"]
# Imported by every Python started with this folder on PYTHONPATH: torch and diffusers become
# uninstalled (not found, no metadata), and what was loaded anyway is written to $BLOCK_REPORT at exit.
BLOCKER = textwrap.dedent("""
    import atexit, os, sys
    BLOCKED = ("torch", "diffusers", "torchvision", "open_clip")

    def _blocked(name):
        return bool(name) and name.split(".")[0].replace("-", "_").lower() in BLOCKED

    class _Hide:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

        def find_spec(self, name, path=None, target=None):
            find = getattr(self.inner, "find_spec", None)
            return None if _blocked(name) or find is None else find(name, path, target)

        def find_distributions(self, context=None, **kwargs):
            find = getattr(self.inner, "find_distributions", None)
            if find is None:
                return iter(())
            found = find(context, **kwargs) if context is not None else find(**kwargs)
            return (d for d in found if not _blocked(d.metadata["Name"]))

    sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]

    @atexit.register
    def _report():
        with open(os.environ["BLOCK_REPORT"], "w") as f:
            f.write(" ".join(sorted(m for m in sys.modules if _blocked(m))))
""")


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    full_env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "sega_jax.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# -- the parser (in-process) -------------------------------------------------------------------------------


def test_every_generate_flag_parses():
    argv = ["generate", "--model", "tiny", "--prompt", PROMPT, "--negative-prompt", "blurry",
            "--edit", EDITS[0], "--edit", EDITS[1], "--steps", "20", "--guidance", "6.5",
            "--scheduler", "euler-a", "--height", "128", "--width", "96", "--seed", "42", "--n", "3",
            "--dtype", "bf16", "--eta", "0.5", "--momentum-scale", "0.3", "--mom-beta", "0.6",
            "--no-safety-checker", "--out", "x/{seed}-{index}.png", "--from-png", "a.png", "--no-cache",
            "--progress"]
    args = build_parser().parse_args(argv)
    expected = dict(command="generate", model="tiny", prompt=PROMPT, negative_prompt="blurry", edit=EDITS,
                    steps=20, guidance=6.5, scheduler="euler-a", height=128, width=96, seed=42, n=3,
                    dtype="bfloat16", eta=0.5, momentum_scale=0.3, mom_beta=0.6, safety_checker=False,
                    out="x/{seed}-{index}.png", from_png="a.png", no_cache=True, progress=True)
    assert {k: v for k, v in vars(args).items() if k != "version"} == expected


def test_defaults_and_model_from_env(monkeypatch):
    monkeypatch.delenv(cli.MODEL_ENV, raising=False)
    settings, index = cli.resolve_settings(build_parser().parse_args(["generate", "--prompt", PROMPT]))
    assert index is None
    assert settings == {**cli.DEFAULTS, "model": default_model(), "prompt": PROMPT}
    assert default_model() == ("demo" if (demo_folder() / "model_index.json").is_file() else "tiny")
    assert (settings["steps"], settings["guidance"], settings["n"]) == (50, 7.5, 1)  # diffusers' defaults
    monkeypatch.setenv(cli.MODEL_ENV, "/models/sd15")
    settings, _ = cli.resolve_settings(build_parser().parse_args(["generate", "--prompt", PROMPT]))
    assert settings["model"] == "/models/sd15"


def test_inline_edit_syntax():
    assert parse_edit("smiling, smile") == Edit("smiling, smile")
    assert parse_edit("glasses@scale=5,threshold=0.975,warmup=10,cooldown=40,weight=1,reverse") == Edit(
        "glasses", scale=5.0, threshold=0.975, warmup=10, cooldown=40, weight=1.0, reverse=True)
    assert parse_edit("beard@ reverse=false , cooldown=none") == Edit("beard")
    assert parse_edit("me@home@scale=3") == Edit("me@home", scale=3.0)
    assert parse_edit("me@home@") == Edit("me@home")
    for edit in (Edit("a, b", 5.4, 0.96, 3, None, 1.0, False), Edit("x@y", -2.5, 0.0, 0, 7, 0.25, True),
                 Edit("z", 1e-7, 1.0, 12, 0, 3.0, False)):
        assert parse_edit(edit.inline()) == edit


def test_edit_kwargs_use_diffusers_names():
    kwargs = cli.edit_kwargs([parse_edit(e) for e in EDITS])
    assert kwargs == dict(editing_prompt=["smiling, smile", "glasses"], edit_guidance_scale=[4.0, 3.0],
                          edit_threshold=[0.99, 0.9], edit_warmup_steps=[1, 10],
                          edit_cooldown_steps=[cli.NEVER, 2], edit_weights=[1.0, 0.5],
                          reverse_editing_direction=[False, True])
    assert cli.edit_kwargs([Edit("a")])["edit_cooldown_steps"] is None
    assert cli.edit_kwargs([]) == {}


def test_output_paths(tmp_path):
    assert output_paths(str(tmp_path / "a.png"), 3, [0]) == [tmp_path / "a.png"]
    assert output_paths(str(tmp_path / "a.png"), 3, [0, 1]) == [tmp_path / "a_0.png", tmp_path / "a_1.png"]
    assert output_paths(str(tmp_path / "{seed}/{index}.png"), 3, [1]) == [tmp_path / "3" / "1.png"]
    (tmp_path / "sega_3_0.png").touch()
    assert output_paths(str(tmp_path), 3, [0, 1]) == [tmp_path / "sega_3_0_1.png", tmp_path / "sega_3_1.png"]


def test_parameters_text_in_the_usual_style():
    settings = {**cli.DEFAULTS, "model": "tiny", "prompt": PROMPT, "negative_prompt": "blurry, dark",
                "edit": EDITS, "seed": 7, "height": 64, "width": 96, "n": 2}
    text = cli.parameters_text(settings, "DDIM", 1)
    lines = text.split("\n")
    assert lines[0] == PROMPT and lines[1] == "Negative prompt: blurry, dark"
    assert lines[2].startswith("Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 7, Size: 96x64, Model: tiny")
    assert "Batch size: 2, Batch pos: 1" in lines[2]
    assert f"SEGA: {json.dumps(' | '.join(EDITS))}" in lines[2]


@pytest.mark.parametrize("config, name", [
    ({"_class_name": "DDIMScheduler"}, "DDIM"),
    ({"_class_name": "EulerAncestralDiscreteScheduler"}, "Euler a"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "Euler Karras"),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": True}, "PLMS"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2,
      "use_karras_sigmas": True}, "DPM++ 2M Karras"),
])
def test_sampler_names(config, name):
    assert cli.sampler_name(config) == name


BAD = {
    "unknown flag": ["generate", "--prompt", "x", "--bogus"],
    "unknown command": ["frobnicate"],
    "no prompt": ["generate"],
    "unknown scheduler": ["generate", "--prompt", "x", "--scheduler", "nope"],
    "edit without text": ["generate", "--prompt", "x", "--edit", "@scale=3"],
    "edit unknown option": ["generate", "--prompt", "x", "--edit", "glasses@size=3"],
    "edit bad number": ["generate", "--prompt", "x", "--edit", "glasses@scale=big"],
    "edit option twice": ["generate", "--prompt", "x", "--edit", "glasses@scale=1,scale=2"],
    "threshold out of range": ["generate", "--prompt", "x", "--edit", "glasses@threshold=1.5"],
    "warmup negative": ["generate", "--prompt", "x", "--edit", "glasses@warmup=-1"],
    "missing model folder": ["generate", "--prompt", "x", "--model", "/nonexistent/sd15"],
    "steps zero": ["generate", "--prompt", "x", "--steps", "0"],
    "steps not int": ["generate", "--prompt", "x", "--steps", "ten"],
    "size not multiple of 8": ["generate", "--prompt", "x", "--height", "100"],
    "negative seed": ["generate", "--prompt", "x", "--seed", "-3"],
    "guidance nan": ["generate", "--prompt", "x", "--guidance", "nan"],
    "bad dtype": ["generate", "--prompt", "x", "--dtype", "int8"],
    "bad out pattern": ["generate", "--prompt", "x", "--out", "{name}.png"],
    "from-png missing": ["generate", "--from-png", "/nonexistent.png"],
}


@pytest.mark.parametrize("argv", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("sega-jax: error: ") and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""


def test_from_png_without_settings(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["generate", "--from-png", str(tmp_path / "plain.png")]) == 2
    assert "no 'sega_jax' settings" in capsys.readouterr().err


def test_no_cache_switches_the_pipeline_cache_off(monkeypatch):
    monkeypatch.setenv("SEGA_JAX_CACHE_DIR", "/somewhere")
    cli.configure_cache(no_cache=True)
    assert os.environ["SEGA_JAX_CACHE_DIR"] == "off"


def test_sweep_and_bench_dispatch(capsys):
    for command in ("sweep", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: sega-jax {command}" in capsys.readouterr().out


# -- end to end (subprocesses) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    """`sega-jax generate` on the tiny model ($SEGA_JAX_MODEL=tiny), in a Python where torch and diffusers
    are absent."""
    root = tmp_path_factory.mktemp("cli")
    (root / "block").mkdir()
    (root / "block" / "sitecustomize.py").write_text(BLOCKER)
    cache = root / "xla-cache"
    env = {"PYTHONPATH": f"{root / 'block'}{os.pathsep}{ROOT}", "BLOCK_REPORT": str(root / "blocked.txt"),
           "SEGA_JAX_CACHE_DIR": str(cache)}
    env = {**env, cli.MODEL_ENV: "tiny"}
    out = root / "out" / "{seed}-{index}.png"
    proc = run_cli("generate", "--prompt", PROMPT, "--negative-prompt", "blurry", "--edit", EDITS[0],
                   "--edit", EDITS[1], "--steps", "3", "--n", "2", "--seed", "5", "--out", str(out), env=env)
    return dict(root=root, proc=proc, cache=cache, blocked=(root / "blocked.txt"))


def test_generate_writes_pngs_without_torch(generated):
    proc = generated["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert generated["blocked"].read_text() == ""  # neither torch nor diffusers was imported
    assert "random weights" in proc.stdout and "--model" in proc.stdout
    assert "Traceback" not in proc.stderr
    files = sorted((generated["root"] / "out").glob("*.png"))
    assert [f.name for f in files] == ["5-0.png", "5-1.png"]
    assert any(generated["cache"].iterdir())  # the persistent compilation cache was written


def test_png_metadata(generated):
    image = Image.open(generated["root"] / "out" / "5-1.png")
    assert image.size == (64, 64)
    lines = image.text["parameters"].split("\n")
    assert lines[:2] == [PROMPT, "Negative prompt: blurry"]
    assert "Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64, Model: tiny" in lines[2]
    data = json.loads(image.text[cli.METADATA_KEY])
    assert data["index"] == 1 and data["format"] == cli.FORMAT
    assert data["settings"] == {**cli.DEFAULTS, "model": "tiny", "prompt": PROMPT,
                                "negative_prompt": "blurry", "edit": EDITS, "steps": 3, "n": 2, "seed": 5,
                                "height": 64, "width": 64}
    assert data["call"]["editing_prompt"] == ["smiling, smile", "glasses"]
    assert data["scheduler_config"]["_class_name"] == "DDIMScheduler"


def test_from_png_reproduces_the_pixels(generated):
    source = generated["root"] / "out" / "5-1.png"
    target = generated["root"] / "again.png"
    proc = run_cli("generate", "--from-png", str(source), "--out", str(target),
                   env={"SEGA_JAX_CACHE_DIR": str(generated["cache"])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"identical to {source}" in proc.stdout
    assert np.array_equal(np.asarray(Image.open(source)), np.asarray(Image.open(target)))
    assert json.loads(Image.open(target).text[cli.METADATA_KEY])["settings"] == json.loads(
        Image.open(source).text[cli.METADATA_KEY])["settings"]


def test_from_png_with_a_seed_override_makes_the_same_edit_on_other_noise(generated):
    """The README's `--from-png out.png --seed 1`: the file's settings with seed 1, i.e. the image that the
    same command line with `--seed 1` makes, which differs from the file's."""
    cache = {"SEGA_JAX_CACHE_DIR": str(generated["cache"]), cli.MODEL_ENV: "tiny"}
    source = generated["root"] / "out" / "5-1.png"
    target = generated["root"] / "seed1.png"
    proc = run_cli("generate", "--from-png", str(source), "--seed", "1", "--out", str(target), env=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"differs from {source}" in proc.stdout
    settings = json.loads(Image.open(target).text[cli.METADATA_KEY])["settings"]
    assert settings == {**json.loads(Image.open(source).text[cli.METADATA_KEY])["settings"], "seed": 1}
    direct = generated["root"] / "direct" / "{seed}-{index}.png"
    proc = run_cli("generate", "--prompt", PROMPT, "--negative-prompt", "blurry", "--edit", EDITS[0],
                   "--edit", EDITS[1], "--steps", "3", "--n", "2", "--seed", "1", "--out", str(direct),
                   env=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = np.asarray(Image.open(generated["root"] / "direct" / "1-1.png"))
    assert np.array_equal(np.asarray(Image.open(target)), expected)
    assert not np.array_equal(np.asarray(Image.open(source)), expected)


def test_non_square_generate_with_progress_bar(tmp_path):
    proc = run_cli("generate", "--prompt", PROMPT, "--edit", EDITS[0], "--steps", "2", "--height", "32",
                   "--width", "48", "--seed", "0", "--progress", "--out", str(tmp_path),
                   env={"SEGA_JAX_CACHE_DIR": "off", cli.MODEL_ENV: "tiny"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (png,) = tmp_path.glob("*.png")
    image = Image.open(png)
    assert image.size == (48, 32)  # (width, height)
    assert "Size: 48x32" in image.text["parameters"]
    assert "image(s) 48x32" in proc.stdout
    assert "2/2 [" in proc.stderr  # the per-step bar reached the last step


def test_no_progress_bar_by_default(generated):
    assert "/3 [" not in generated["proc"].stderr and "it/s" not in generated["proc"].stderr


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    for argv, status in ((["generate", "--prompt", "x", "--model", str(tmp_path / "empty")], 1),
                         (["generate", "--prompt", "x", "--edit", "a@threshold=2"], 2)):
        proc = run_cli(*argv, env={"SEGA_JAX_CACHE_DIR": "off"})
        assert proc.returncode == status, proc.stderr
        assert proc.stderr.startswith("sega-jax: error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_compilation_cache_settings(tmp_path):
    code = textwrap.dedent(f"""
        import os, jax
        from sega_jax.runtime import cache
        os.environ["SEGA_JAX_CACHE_DIR"] = "off"
        assert cache.default_cache_dir() is None and cache.enable_compilation_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
        folder = cache.enable_compilation_cache({str(tmp_path / 'c')!r})
        assert jax.config.jax_compilation_cache_dir == str(folder) and folder.is_dir()
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        del os.environ["SEGA_JAX_CACHE_DIR"]
        os.environ["XDG_CACHE_HOME"] = "/xdg"
        assert str(cache.default_cache_dir()) == "/xdg/sega-jax/xla"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "JAX_PERSISTENT"))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
