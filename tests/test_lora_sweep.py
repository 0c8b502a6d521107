"""LoRA in sweeps: `--lora` / the `lora` spec key, a `lora_scale` grid axis run by one compiled program,
each PNG reproduced pixel for pixel by `generate --from-png`, the LoRAs part of the spec's identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from sega_jax import load_pipeline
from sega_jax.cli import generate as cli
from sega_jax.pipelines import parallel
from sega_jax.sweep import command as sweep
from sega_jax.sweep.spec import Item, groups
from sega_jax.testing.reference import save_reference
from tests.test_lora import TE_CFG, UNET_CFG, random_lora


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """A tiny SD folder and one LoRA for its UNet and text encoder."""
    root = tmp_path_factory.mktemp("lora-sweep")
    reference = save_reference(root / "model")
    StableDiffusionPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=random_lora(reference.unet, UNET_CFG, 1),
        text_encoder_lora_layers=random_lora(reference.text_encoder, TE_CFG, 3),
        unet_lora_adapter_metadata=UNET_CFG.to_dict(), text_encoder_lora_adapter_metadata=TE_CFG.to_dict())
    pipe = load_pipeline(root / "model", requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return dict(root=root, model=root / "model", lora=root / "lora" / "pytorch_lora_weights.safetensors",
                pipe=pipe)


def make_spec(lora_model, out: str, **overrides) -> dict:
    spec = dict(model=str(lora_model["model"]), prompts=["a cat"], seeds=[3], height=16, width=16,
                num_inference_steps=2, editing_prompt=["smiling"],
                edit=dict(edit_warmup_steps=0, edit_guidance_scale=4), lora=[f"{lora_model['lora']}@0.5"],
                output=str(lora_model["root"] / out))
    return {**spec, **overrides}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_lora_scale_grid_runs_one_program_and_generate_from_png_reproduces_its_png(lora_model, capsys):
    pipe, root = lora_model["pipe"], lora_model["root"]
    parallel._compiled.cache_clear()  # so the sweep must compile once: the counter is live
    before = parallel.TRACE_COUNT["jit"]
    spec = sweep.load_spec(make_spec(lora_model, "grid", grid=dict(lora_scale=[0, 0.5, 1.0])))
    assert sweep.run_sweep(spec, pipe=pipe, progress=False).written == 3
    assert parallel.TRACE_COUNT["jit"] == before + 1  # three LoRA scales, one compile
    assert pipe.get_active_adapters() == []  # the sweep's LoRAs are unloaded afterwards

    lora = str(lora_model["lora"].resolve())
    records = sweep.read_manifest(root / "grid")
    assert [r["lora"] for r in records] == [[f"{lora}@0.0"], [f"{lora}@0.5"], [f"{lora}@1.0"]]
    files = [root / "grid" / r["file"] for r in records]
    assert np.abs(pixels(files[0]).astype(int) - pixels(files[2])).max() > 20  # the scale matters
    png = Image.open(files[2])
    assert json.loads(png.text[cli.METADATA_KEY])["settings"]["lora"] == [f"{lora}@1.0"]
    assert f"LoRA: {lora}@1.0" in png.text["parameters"]
    assert 'SEGA: "smiling@scale=4' in png.text["parameters"]
    assert cli.main(["generate", "--from-png", str(files[2]), "--out", str(root / "again.png")]) == 0
    assert f"identical to {files[2]}" in capsys.readouterr().out
    np.testing.assert_array_equal(pixels(root / "again.png"), pixels(files[2]))


def test_lora_flag_builds_the_spec_key(tmp_path):
    args = sweep.build_parser().parse_args(["--lora", "a.safetensors@0.5", "--lora", "b.safetensors",
                                            "--grid", "lora_scale=[0,[1,2]]"])
    spec = sweep.spec_from_args(args)
    assert spec["lora"] == ["a.safetensors@0.5", "b.safetensors"]
    assert spec["grid"] == dict(lora_scale=[0, [1, 2]])


def test_changed_loras_under_an_existing_output_folder_are_refused(lora_model, monkeypatch):
    monkeypatch.setattr(sweep, "load_pipeline", lambda spec: pytest.fail("loaded the model"))
    base = make_spec(lora_model, "identity")
    sweep.prepare_output(sweep.load_spec(base))
    again = {**base, "lora": [f"{lora_model['lora']}@0.5"]}
    sweep.prepare_output(sweep.load_spec(again))  # the same LoRA, written the same way
    for changed in ({**base, "lora": [f"{lora_model['lora']}@0.7"]}, {**base, "lora": []}):
        with pytest.raises(sweep.SpecError, match=r"different spec \(changed: \['lora'\]"):
            sweep.prepare_output(sweep.load_spec(changed))
    plain = {**base, "lora": [], "output": str(lora_model["root"] / "plain")}
    sweep.prepare_output(sweep.load_spec(plain))
    stored = json.loads((lora_model["root"] / "plain" / "spec.json").read_text())
    assert "lora" not in stored  # a sweep stored before the key existed resumes


@pytest.mark.parametrize("overrides, message", [
    (dict(lora=["/no/such/lora.safetensors"]), "lora: /no/such/lora.safetensors: no such file"),
    (dict(lora=5), "lora: expected a list of 'FILE"),
    (dict(lora=[], grid=dict(lora_scale=[1])), "lora_scale: the spec has no `lora` to scale"),
    (dict(grid=dict(lora_scale=[[1, 2]])), r"lora_scale: 2 scale\(s\) for 1 LoRA\(s\)"),
    (dict(grid=dict(lora_scale=["high"])), "lora_scale: expected finite numbers"),
    (dict(edit=dict(lora_scale=1)), r"unknown edit setting\(s\) \['lora_scale'\]"),
])
def test_bad_lora_specs_are_clear_errors(lora_model, overrides, message):
    with pytest.raises(sweep.SpecError, match=message):
        sweep.load_spec({**make_spec(lora_model, "bad"), **overrides})


def test_work_groups_never_mix_lora_scales():
    settings = [dict(lora_scale=0), dict(lora_scale=1), dict(lora_scale=0)]
    all_items = [Item(0, seed, 0, s) for seed in range(2) for s in range(3)]
    by_class = groups(all_items, 3, settings)
    assert [[(i.seed, i.setting) for i in g] for g in by_class] == [
        [(0, 0), (0, 2), (1, 0)], [(1, 2)], [(0, 1), (1, 1)]]
    assert groups(all_items, 4, [{}] * 3) == [all_items[:4], all_items[4:]]  # no lora_scale: in order
