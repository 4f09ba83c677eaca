"""Shared test setup: Triton's interpreter on machines without a CUDA GPU, marker-based skips, hypothesis profiles.

A test marked ``cuda`` skips on a machine without a GPU. On a machine with one, such a skip is a failure when the
CUDA kernels of diffpure_fast._C are not built (an extension built CPU-only would otherwise hide every CUDA test),
unless ``DIFFPURE_FAST_NO_CUDA=1`` says that the CPU-only build was asked for.

TRITON_INTERPRET must be in the environment before triton is imported (triton.jit reads it when a kernel is
defined), so it is set here, at conftest import, before any test module imports diffpure_fast.ops.triton_sde.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HAS_TRITON = importlib.util.find_spec("triton") is not None

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    # "ci": the same examples on every run (derandomized, no example database) so CI cannot flake; "dev": fresh
    # random examples each run, to keep exploring. HYPOTHESIS_PROFILE overrides the choice.
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                   print_blob=True)
    settings.register_profile("ci", derandomize=True, database=None, **_common)
    settings.register_profile("dev", **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="needs triton")
    for item in items:
        if item.get_closest_marker("cuda") and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if item.get_closest_marker("triton") and not HAS_TRITON:
            item.add_marker(skip_triton)


def _cuda_kernels_missing() -> str | None:
    """Why a cuda-marked skip on this machine is a failure, or None when it may skip."""
    if not torch.cuda.is_available() or os.environ.get("DIFFPURE_FAST_NO_CUDA", "0").strip().lower() in (
            "1", "true", "yes", "on"):
        return None
    from diffpure_fast.ops import _ext

    if _ext.cuda_impl() is not None:
        return None
    why = _ext.load_error() or "built without CUDA"
    # `make install` alone would do nothing: its stamp is newer than every source, and a new GPU changes no file.
    return (f"a GPU is visible but the CUDA kernels of diffpure_fast._C are not built ({why}): rebuild with "
            "`rm .venv/.installed && make install` (or FORCE_CUDA=1 pip install --no-build-isolation -e .), or set "
            "DIFFPURE_FAST_NO_CUDA=1 to run CPU-only")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("cuda"):
        why = _cuda_kernels_missing()
        if why is not None:
            report.outcome = "failed"
            report.longrepr = f"cuda-marked test skipped on a machine with a GPU: {why}"


@pytest.fixture
def torchsde_ref():
    """diffpure_fast.testing.torchsde_reference (DiffPure's pipeline over torchsde); the test skips where torchsde is
    not installed (a GPU machine without its carried wheel), so no test module imports torchsde at collection."""
    pytest.importorskip("torchsde")
    from diffpure_fast.testing import torchsde_reference

    return torchsde_reference


@pytest.fixture(scope="module")
def one_thread():
    """Small networks run fastest on one thread (and keep a shared machine responsive)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
