import ctypes
import gc
import os
import re
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compile fresh; the cache's own tests turn it on in a subprocess with their own folder.
os.environ.setdefault("SEGA_JAX_CACHE_DIR", "off")

# In CI (`CI=true`, set by .ci/run) a reference dependency that `pytest.importorskip` cannot import is a
# failure: a skipped parity module would otherwise count as a pass.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _fail_missing_dependency(report) -> None:
    if IN_CI and report.skipped and "could not import" in str(report.longrepr):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test dependency is missing (install the test extra): {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_missing_dependency(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_missing_dependency(report)
    return report


# CI's torch-free leg (Python 3.12, the newest jax/flax): modules that need torch or diffusers are not
# collected there; their parity is covered by tests/test_cross_version_parity.py against stored references.
TORCH_FREE_LEG = os.environ.get("SEGA_JAX_TORCH_FREE") == "1"
_NEEDS_TORCH = re.compile(
    r"^\s*(import|from)\s+(torch|diffusers)\b|importorskip\(\s*[\"'](torch|diffusers)"
    r"|sega_jax\.(testing\.)?reference|tests\.tiny_pipeline|tests\.(scheduler|clip|sega|lora)_cases"
    r"|^from tests\.test_\w+ import",
    re.MULTILINE,
)
_RUNS_DIFFUSERS = {"test_benchmark.py"}  # times diffusers beside ours in a subprocess


def needs_torch(path: Path) -> bool:
    source = path.read_text(encoding="utf-8")
    if "tests.parity_store" in source:
        return False
    return path.name in _RUNS_DIFFUSERS or bool(_NEEDS_TORCH.search(source))


def pytest_ignore_collect(collection_path: Path, config):
    if TORCH_FREE_LEG and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return True if needs_torch(collection_path) else None
    return None


def pytest_report_header(config):
    if TORCH_FREE_LEG:
        skipped = sorted(p.name for p in Path(__file__).parent.glob("test_*.py") if needs_torch(p))
        return f"torch-free leg: not collecting {len(skipped)} torch modules: {', '.join(skipped)}"
    return None


@pytest.fixture(autouse=True, scope="module")
def release_memory_after_module():
    """One pytest process runs the whole suite (with the 10 GB SDXL UNet near the end): after each module,
    drop the compiled programs and torch/jax objects it left and hand glibc's freed heap back."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
