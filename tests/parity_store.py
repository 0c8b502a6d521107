"""Parity references that cross Python versions: computed with torch where it is installed, read back where
it is not.

CI's Python 3.11 leg has torch and diffusers: each case builds its tiny diffusers model, saves the folder,
runs diffusers and, when `SEGA_JAX_PARITY_STORE` names a folder, writes both there. The Python 3.12 leg (the
newest jax/flax, no torch) finds the same case in that folder and compares ours against it. The same test
code runs on both sides; a case that can neither compute nor load its reference fails, it never skips.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

STORE_ENV = "SEGA_JAX_PARITY_STORE"


def has_torch() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers"))


def store_root() -> Path | None:
    root = os.environ.get(STORE_ENV)
    return Path(root) if root else None


def reference_case(name: str, build: Callable[[Path], dict[str, np.ndarray]]) -> tuple[Path, dict]:
    """(model folder, expected arrays) for case `name`.

    With torch: `build(folder)` saves the diffusers model into `folder` and returns diffusers' outputs;
    both are kept in the store when one is configured (else in a temporary folder). Without torch: both
    are read from the store, and a missing store or case is a test failure.
    """
    root = store_root()
    if has_torch():
        case = (root or Path(tempfile.mkdtemp(prefix="sega_jax_parity_"))) / name
        if case.exists():
            shutil.rmtree(case)
        (case / "model").mkdir(parents=True)
        expected = build(case / "model")
        np.savez(case / "expected.npz", **expected)
        return case / "model", expected
    if root is None:
        pytest.fail(f"parity case {name!r}: torch/diffusers are not installed and ${STORE_ENV} names no "
                    f"store of references (run the Python 3.11 leg first with the same ${STORE_ENV})")
    case = root / name
    if not (case / "expected.npz").is_file() or not (case / "model").is_dir():
        pytest.fail(f"parity case {name!r}: no reference in {case} (the torch leg did not write it)")
    with np.load(case / "expected.npz") as data:
        return case / "model", {key: data[key] for key in data.files}
