"""Shared by the benchmark scripts: the machine/version header of a results file, timing, peak-memory probes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffpure_fast.info import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(command: str) -> str:
    """Markdown lines naming the command, machine, versions and commit of a results file."""
    sha = _sh(["git", "rev-parse", "--short", "HEAD"])
    dirty = _sh(["git", "status", "--porcelain", "--untracked-files=no"])
    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return "\n".join([
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; {dev}",
        f"Versions: torch {torch.__version__}, Python {platform.python_version()}; git {sha}"
        + (" (+uncommitted changes)" if dirty not in ("", "unknown") else ""),
        f"Load average (1, 5, 15 min) when written: {load}",
        "",
    ])


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds (CUDA synchronised around each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def network_call_seconds(model, x: torch.Tensor) -> float:
    """Median time of one no-grad ``model.eps(x, t)`` (10 calls after 2 warm-ups): the unit of a "network calls"
    column. Time it in the process that timed the mode, right after: this VM's speed drifts by 20% between
    processes, so a call timed elsewhere misstates the count (a parent process's 73 ms against a worker's 57 ms once
    gave a 100-call purification as 79 calls)."""
    t = torch.full((x.shape[0],), 0.05, device=x.device)
    with torch.no_grad():
        return median_time(lambda: model.eps(x, t), repeats=10, warmup=2)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs); returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_since_reset() -> int:
    return _status_kib("VmHWM") * 1024


def run_isolated(script: Path, args: list[str]) -> str:
    """Run one measurement in a fresh interpreter (so peak memory is its own); returns its stdout."""
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def write_results(filename: str, lines: list[str], *, quick: bool = False) -> None:
    """Write a results file under benchmarks/results/ (a ``--quick`` smoke run's under out/bench_quick/) and echo
    it."""
    out = (ROOT / "out" / "bench_quick" if quick else RESULTS) / filename
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def run_workers(script: Path, modes: list[str], args: list[str], describe) -> dict[str, dict]:
    """Run ``script --worker MODE *args`` for each mode in a fresh process; each prints one JSON line."""
    results = {}
    for mode in modes:
        out = run_isolated(script, ["--worker", mode, *args])
        results[mode] = json.loads(out.strip().splitlines()[-1])
        print(f"{describe(mode)}: {results[mode]['seconds']:.2f} s, {results[mode]['peak_bytes'] / 2**20:.0f} MiB",
              flush=True)
    return results


def worker_parser(doc: str, modes) -> argparse.ArgumentParser:
    """The options every per-mode benchmark takes: --repeats, --batch, --modes, and the hidden --worker."""

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode (median); the first gives memory")
    p.add_argument("--batch", type=int, default=4, help="images per batch")
    p.add_argument("--modes", default=",".join(modes), help="comma-separated subset of " + ",".join(modes))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def measure(fn, repeats: int) -> tuple[dict, object]:
    """Time and peak memory of fn(): the first call gives the peak RSS above the RSS before it (and the time when
    repeats <= 1); otherwise the time is the median of ``repeats`` further calls. Returns ({seconds, peak_bytes},
    the first call's result)."""
    base = reset_peak_rss()
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    peak = peak_rss_since_reset() - base
    sec = first if repeats <= 1 else median_time(fn, repeats, warmup=0)
    return {"seconds": sec, "peak_bytes": peak}, result
