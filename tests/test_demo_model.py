"""The demo model's groundwork (issue 18): the pixel classifier of `sega_jax.builtin.demo` reads drawn scenes,
and scripts/train_demo.py is reproducible from its seed. No torch: this runs in both CI legs. What the shipped
model's edits do: tests/test_demo_semantics.py and, on drawn images after inversion,
tests/test_demo_inversion.py.
"""

from __future__ import annotations

import json

import numpy as np

from sega_jax.builtin import demo


def test_classifier_reads_drawn_scenes():
    images, scenes = demo.dataset(200, seed=7)
    found = [demo.classify(image) for image in images]
    assert [f["colour"] for f in found] == [s.colour for s in scenes]
    assert [f["shape"] for f in found] == [s.shape for s in scenes]
    assert [f["background"] for f in found] == [s.background for s in scenes]
    # an empty background has no shape
    assert demo.classify(np.full((32, 32, 3), 245, np.uint8))["colour"] is None


def test_training_is_reproducible(tmp_path):
    from safetensors.numpy import load_file

    from scripts import train_demo

    smoke = ["--images", "64", "--vae-steps", "2", "--vae-batch", "4", "--unet-steps", "2",
             "--unet-batch", "4"]
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(runs, (0, 0, 1), strict=True):
        train_demo.main([*smoke, "--out", str(out), "--seed", str(seed)])
    files = sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*.safetensors"))
    assert len(files) == 3
    for name in files:
        a, b, c = (load_file(str(run / name)) for run in runs)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
        assert any(not np.array_equal(a[key], c[key]) for key in a), f"{name}: seed 1 gave seed 0's weights"
    info = json.loads((runs[0] / "training.json").read_text())
    assert info["seed"] == 0 and info["unet_steps"] == 2
