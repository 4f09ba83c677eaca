"""pytest set-up for the benchmark suite (``pytest benchmarks --benchmark-only``): the repository root on sys.path
(the suite imports ``benchmarks.*`` helpers) and the device fixture. Plain ``pytest`` never collects this folder
(pyproject's testpaths is ``tests``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """DPF_BENCH_DEVICE (cpu | cuda), default cuda when a GPU is visible."""
    return torch.device(os.environ.get("DPF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="session", autouse=True)
def threads():
    """DPF_BENCH_THREADS sets torch's CPU threads (default torch's: all cores); 1 is steadier on a shared machine,
    where OpenMP threads wait on each other (10x slower runs were seen on the 2-core VM under a load of 8)."""
    n = os.environ.get("DPF_BENCH_THREADS")
    if n:
        torch.set_num_threads(int(n))
    yield torch.get_num_threads()
