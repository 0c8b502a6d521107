"""scripts/benchmark.py runs both pipelines side by side and their outputs agree."""

from __future__ import annotations

import re

import numpy as np

from sega_jax.bench import sega as benchmark


def test_benchmark_prints_both_timings_the_ratio_and_matching_outputs(capsys):
    assert benchmark.main(["--model", "tiny", "--steps", "2", "--concepts", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    ours = re.search(r"^sega-jax : +([0-9.]+) ms/step .* compile ([0-9.]+) s .*peak \+\d+ MB", out, re.M)
    theirs = re.search(r"^diffusers: +([0-9.]+) ms/step .*peak \+\d+ MB.*\(cpu, float32\)", out, re.M)
    ratio = re.search(r"^ratio diffusers/sega-jax per step: ([0-9.]+)x", out, re.M)
    diff = re.search(r"^max relative difference of the outputs: ([0-9.e+-]+)", out, re.M)
    assert ours and theirs and ratio and diff, out
    assert abs(float(ratio.group(1)) - float(theirs.group(1)) / float(ours.group(1))) < 0.02
    assert float(diff.group(1)) < 1e-4  # the same latents from the same weights and noise


def test_unet_flops_scale_with_batch_and_area():
    args = benchmark.parse(["--model", "sd15", "--concepts", "4"])
    assert benchmark.unet_flops_per_step(args) == 0.80e12 * 6  # 512x512: (uncond, text, 4 concepts)
    args = benchmark.parse(["--model", "sd15", "--concepts", "0", "--size", "256"])
    assert benchmark.unet_flops_per_step(args) == 0.80e12 * 2 / 4


def test_difference_report_counts_elements_beyond_fp32_noise():
    reference = np.linspace(-2.0, 2.0, 1000, dtype=np.float32)
    ours = reference * np.float32(1 + 1e-6)
    ours[[3, 500]] += 0.5  # two elements moved across a guidance threshold
    text = benchmark.describe_difference(ours, reference)
    assert text.startswith("max relative difference of the outputs: 2.50e-01 (2 of 1000 elements above 1e-4;")


def test_ledits_benchmark_times_invert_and_edit_on_both_sides_with_matching_outputs(capsys):
    argv = ["--model", "tiny", "--ledits", "--steps", "3", "--concepts", "2", "--repeats", "1"]
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    line = r"invert ([0-9.]+) s  edit ([0-9.]+) s  total ([0-9.]+) s  peak \+\d+ MB"
    ours = re.search(rf"^sega-jax : {line}  compile [0-9.]+ s", out, re.M)
    theirs = re.search(rf"^diffusers: {line}  \(cpu, float32\)", out, re.M)
    ratio = re.search(r"^ratio diffusers/sega-jax \(invert \+ edit\): ([0-9.]+)x", out, re.M)
    diff = re.search(r"^max relative difference of the outputs: ([0-9.e+-]+)", out, re.M)
    assert ours and theirs and ratio and diff, out
    expected = float(theirs.group(3)) / float(ours.group(3))  # totals printed to 10 ms: a relative check
    assert abs(float(ratio.group(1)) / expected - 1) < 0.05, (ratio.group(1), expected)
    assert float(diff.group(1)) < 1e-4  # the same edit from the same weights and inversion draws
