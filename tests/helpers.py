"""Shared test utilities: the parity measure every reference test uses."""

from __future__ import annotations

import numpy as np


def max_rel_diff(ours, reference) -> float:
    """max |ours - reference| / max |reference| (the project's parity measure)."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, f"shape {ours.shape} != reference {reference.shape}"
    scale = np.abs(reference).max()
    return float(np.abs(ours - reference).max() / (scale if scale > 0 else 1.0))


def nchw_to_nhwc(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))
