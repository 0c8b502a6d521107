"""The Colab TPU notebook runs headless, cell by cell, on the CPU in its offline mode (the shipped demo model,
2 fake devices)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "sega_colab_tpu.ipynb"


@pytest.fixture
def notebook_env(tmp_path, monkeypatch):
    """The kernel inherits this process's environment: the offline default (demo), CPU, two devices for the
    pmap path."""
    monkeypatch.delenv("SEGA_NOTEBOOK_MODEL", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("SEGA_JAX_CACHE_DIR", os.environ.get("SEGA_JAX_CACHE_DIR") or str(tmp_path / "xla"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_notebook_executes(notebook_env):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError on any error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # the example, the sweep grid, the sem_guidance replay, the LEDITS++ strength grid, null-text + SEGA
    assert len(images) == 5
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "2 cpu device(s)" in text and "inner Adam iterations per step:" in text
