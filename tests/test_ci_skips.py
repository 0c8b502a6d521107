"""With CI=true a missing reference dependency fails the run; without it, it is a skip (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MISSING = '''
import pytest

pytest.importorskip("sega_jax_no_such_reference_module")


def test_needs_the_reference():
    pass
'''
MISSING_INSIDE_A_TEST = '''
import pytest


def test_needs_the_reference():
    pytest.importorskip("sega_jax_no_such_reference_module")


def test_skipped_for_another_reason():
    pytest.skip("not on this platform")
'''


def _run(tmp_path: Path, source: str, ci: str | None) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_reference.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    "source,status,summary",
    [(MISSING, 2, "1 error"), (MISSING_INSIDE_A_TEST, 1, "1 failed")],
    ids=["module-level-is-a-collection-error", "in-a-test-is-a-failure"],
)
def test_missing_reference_dependency_fails_in_ci(tmp_path, source, status, summary):
    result = _run(tmp_path, source, ci="true")
    assert result.returncode == status, result.stdout
    assert summary in result.stdout and "CI=true: a test dependency is missing" in result.stdout
    assert "sega_jax_no_such_reference_module" in result.stdout


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_reference_dependency_is_a_skip_outside_ci(tmp_path, ci):
    result = _run(tmp_path, MISSING_INSIDE_A_TEST, ci=ci)
    assert result.returncode == 0, result.stdout
    assert "2 skipped" in result.stdout


def test_other_skips_stay_skips_in_ci(tmp_path):
    result = _run(tmp_path, MISSING_INSIDE_A_TEST, ci="true")
    assert "1 failed, 1 skipped" in result.stdout, result.stdout
