"""Shared by the benchmark scripts: the results-file header (the package's ``machine_header`` plus the git commit),
worker processes, results files. Timing, peak memory and network calls are the package's (``diffpure_fast.bench``,
also behind ``diffpure-fast bench``): one implementation, re-exported here for the scripts."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from diffpure_fast.bench import (  # noqa: F401  (re-exported for the scripts)
    count_network_calls,
    machine_header,
    measure_call,
    median_time,
    network_call_seconds,
    peak_rss_since_reset,
    reset_peak_rss,
)
from diffpure_fast.info import cpu_model  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(command: str, *, threads: int | None = None) -> str:
    """Markdown lines naming the command, machine, versions and commit of a results file. threads: the torch CPU
    threads the measurements ran with, when they ran elsewhere (worker processes); default this process's."""
    h = machine_header(command, threads=threads, devices=("cuda",) if torch.cuda.is_available() else ())
    sha = _sh(["git", "rev-parse", "--short", "HEAD"])
    dirty = _sh(["git", "status", "--porcelain", "--untracked-files=no"])
    return "\n".join([
        f"Command: `{command}`",
        "",
        f"Machine: {h['cpu']}, {h['logical_cpus']} logical CPUs, torch threads {h['torch_threads']}; "
        + (h["gpu"] if h["gpu"] != "none used" else "no GPU"),
        f"Versions: torch {h['torch']}, Python {h['python']}; git {sha}"
        + (" (+uncommitted changes)" if dirty not in ("", "unknown") else ""),
        f"Load average (1, 5, 15 min) when written: {', '.join(f'{v:.2f}' for v in h['load_average_1_5_15'])}",
        "",
    ])


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
    """Time and peak memory of fn() (``diffpure_fast.bench.measure_call``): the first call gives the peak RSS above
    the RSS before it (and the time when repeats <= 1); otherwise the time is the median of ``repeats`` further
    calls. Returns ({seconds, peak_bytes}, the first call's result)."""
    first, _, extra, result = measure_call(fn, torch.device("cpu"))
    sec = first if repeats <= 1 else median_time(fn, repeats, warmup=0)
    return {"seconds": sec, "peak_bytes": extra}, result
