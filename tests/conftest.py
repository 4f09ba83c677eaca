"""Shared test setup: Triton's interpreter on machines without a CUDA GPU, marker-based skips, hypothesis profiles.

TRITON_INTERPRET must be in the environment before triton is imported (triton.jit reads it when a kernel is
defined), so it is set here, at conftest import, before any test module imports diffpure_fast.ops.triton_sde.
"""

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


@pytest.fixture(scope="module")
def one_thread():
    """Small networks run fastest on one thread (and keep a shared machine responsive)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
