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


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Record the load average and torch's threads in the saved JSON (timings on a shared machine are noisy, and the
    file should say so), and keep the summary statistics only: --benchmark-json writes every round's time, 600 KB
    for this suite, which the committed results do not need (DPF_BENCH_KEEP_DATA=1 keeps them)."""
    if not os.environ.get("DPF_BENCH_KEEP_DATA"):
        for bench in output_json["benchmarks"]:
            bench["stats"].pop("data", None)
    output_json["load_average_1_5_15_min"] = list(os.getloadavg())
    output_json["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
