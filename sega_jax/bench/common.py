"""What the SEGA and LEDITS++ benchmarks share: the concepts, the peak-memory sampler, the reference model
builder and how a difference is described. Needs the test extra (torch, diffusers) through `testing`."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from sega_jax.testing.reference import save_reference

CONCEPTS = [
    "smiling, smile",
    "glasses, wearing glasses",
    "curls, wavy hair, curly hair",
    "beard, full beard, mustache",
    "hat",
    "sunglasses",
    "red hair",
    "freckles",
]


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms from /proc."""

    def __init__(self):
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base, self.peak, self._stop = self.rss(), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss() - self.base)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def build_reference(model: str, folder: Path):
    """Build and save diffusers' pipeline with random weights (tiny, or the SD 1.5 architecture with
    diffusers' own random initialisation)."""
    return save_reference(folder, model, randomized=model == "tiny")


def describe_difference(ours: np.ndarray, reference: np.ndarray) -> str:
    """Max difference relative to the reference's max, and how many elements exceed 1e-4 of it: SEGA's
    per-concept threshold is a step function, so fp32 noise can move an element that sits at the quantile
    across it, which shows as a handful of large differences among elements that agree to ~1e-6."""
    diff = np.abs(ours - reference) / max(float(np.abs(reference).max()), 1e-12)
    above = int((diff > 1e-4).sum())
    return (f"max relative difference of the outputs: {diff.max():.2e} ({above} of {diff.size} elements "
            f"above 1e-4; median {np.median(diff):.1e})")
