"""How purification time and memory scale: time per purification against batch size, and time and peak memory per
``grad_mode`` against the number of solver steps. Writes a CSV (for benchmarks/plot_results.py) and a table.

Network: the 2.47M-parameter NCSN++ of bench_purify.py (random weights, 3x32x32), or ``--net digits`` (the shipped
1x16x16 digits model: a quick check). DiffPure's Euler–Maruyama solve at t* = 0.1 with dt = t* / steps (so
"adjoint" runs too: it needs dt), counter noise, float32. Gradients: of <w, purify(x)> with respect to x.

Modes: none | bpda | full | full_cache (grad_cache_steps = all steps: the memory-for-time end) | adjoint |
surrogate (10 DDPM steps). Every (sweep point, mode) runs in a fresh process, so that its peak memory is its own:
CPU: the RSS high-water mark above the RSS before the first call (Linux clear_refs/VmHWM, as bench_grad.py);
CUDA: max_memory_allocated above the memory allocated before; both after a warm-up call on one image (imports and
lazy initialisation excluded). Time: the median of --repeats calls, the first of which gives the memory and the
counted network calls. Each point is ``diffpure_fast.bench.purify_row``, the code behind ``diffpure-fast bench``.

    python benchmarks/bench_scaling.py                      # -> benchmarks/results/scaling_cpu.{csv,md}
    python benchmarks/bench_scaling.py --quick              # digits, tiny sweeps -> out/bench_quick/ (a smoke run)
    python benchmarks/bench_scaling.py --batches 1,2,4,8,16 --steps 10,25,50,100,200 --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diffpure_fast as dpf
from benchmarks._common import RESULTS, cpu_model, header, run_isolated
from diffpure_fast.bench import purify_row

MODES = ("none", "bpda", "full", "full_cache", "adjoint", "surrogate")
T_STAR = 0.1
COLUMNS = ["sweep", "net", "device", "grad_mode", "batch", "steps", "seconds", "seconds_per_image", "peak_mib",
           "network_calls", "threads", "machine", "load_1min"]


def build(net: str, device: torch.device):
    if net == "digits":
        return dpf.load_score_model("digits", device=device), (1, 16, 16)
    from benchmarks.bench_purify import bench_model

    return bench_model(device), (3, 32, 32)


def run_point(net: str, device: str, mode: str, batch: int, steps: int, repeats: int, threads: int | None) -> dict:
    """One measurement (in this process): ``diffpure_fast.bench.purify_row``, the code behind ``diffpure-fast
    bench``, after a cheap warm-up, with the torch threads that ran."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    model, shape = build(net, dev)
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)).to(dev)
    # Warm-up on one image and two steps first: the first call of a process imports and initialises (torch's
    # custom-op machinery alone took 1 s and ~100 MiB on the 2-core VM), which would swamp small points; a full
    # warm-up call (purify_row's warmup) would double the sweep's time.
    xw = x[:1].clone().requires_grad_(mode != "none")
    out = dpf.purify(xw, model, t_star=T_STAR, dt=T_STAR / 2, seed=0,
                     grad_mode="full" if mode == "full_cache" else mode)
    if mode != "none":
        out.sum().backward()
    del xw, out
    row = purify_row(model, x, t_star=T_STAR, dt=T_STAR / steps, grad_mode=mode, repeats=repeats, warmup=0)
    return {**row, "threads": torch.get_num_threads()}


def sweep_points(args) -> list[tuple[str, str, int, int]]:
    """(sweep, mode, batch, steps) for every measurement."""
    points = [("batch", "none", b, args.batch_steps) for b in args.batches]
    points += [("steps", m, args.batch, s) for m in args.modes for s in args.steps]
    return points


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", default="ncsnpp", choices=["ncsnpp", "digits"], help="score network")
    p.add_argument("--device", default="cpu", help="torch device (cpu or cuda)")
    p.add_argument("--batches", default="1,2,4,8", help="batch sizes of the batch sweep (grad_mode none)")
    p.add_argument("--batch-steps", type=int, default=100, help="solver steps in the batch sweep")
    p.add_argument("--steps", default="10,25,50,100", help="step counts of the steps sweep")
    p.add_argument("--batch", type=int, default=4, help="batch size of the steps sweep")
    p.add_argument("--modes", default=",".join(MODES), help="grad modes of the steps sweep: subset of "
                   + ",".join(MODES))
    p.add_argument("--repeats", type=int, default=1, help="timed calls per point (median; 1: the first call)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's: all cores; 1 is steadier on a machine shared with "
                        "other jobs, where OpenMP threads wait on each other)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: digits net, batches 1,2, steps 5,10, written under out/bench_quick/")
    p.add_argument("--output", default=None,
                   help="CSV path (the .md goes beside it); default benchmarks/results/scaling_<device>.csv")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_point(**spec)))
        return
    if args.quick:
        args.net, args.batches, args.batch_steps, args.steps, args.batch = "digits", "1,2", 10, "5,10", 2
    args.batches = [int(b) for b in args.batches.split(",")]
    args.steps = [int(s) for s in args.steps.split(",")]
    args.modes = args.modes.split(",")
    for m in args.modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; expected a subset of {','.join(MODES)}")
    dev = torch.device(args.device)
    default_dir = ROOT / "out" / "bench_quick" if args.quick else RESULTS
    out_csv = Path(args.output) if args.output else default_dir / f"scaling_{dev.type}.csv"
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{cpu_model()}, {os.cpu_count()} CPUs"

    rows = []
    for sweep, mode, batch, steps in sweep_points(args):
        spec = dict(net=args.net, device=args.device, mode=mode, batch=batch, steps=steps, repeats=args.repeats,
                    threads=args.threads)
        res = json.loads(run_isolated(Path(__file__), ["--worker", json.dumps(spec)]).strip().splitlines()[-1])
        rows.append({"sweep": sweep, "net": args.net, "device": dev.type, "grad_mode": mode, "batch": batch,
                     "steps": res["steps"], "seconds": f"{res['median_s']:.4g}",
                     "seconds_per_image": f"{res['median_s'] / batch:.4g}",
                     "peak_mib": f"{res['peak_extra_mib']:.1f}", "network_calls": res["network_calls"],
                     "threads": res["threads"], "machine": machine, "load_1min": f"{os.getloadavg()[0]:.2f}"})
        print(f"{sweep:5s} {mode:10s} batch {batch:3d} steps {res['steps']:4d}: {res['median_s']:.3f} s, "
              f"{res['peak_extra_mib']:.0f} MiB, {res['network_calls']} network calls", flush=True)

    with out_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    loads = [float(r["load_1min"]) for r in rows]
    command = "python benchmarks/bench_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    threads = sorted({r["threads"] for r in rows})
    lines = [f"# Purification scaling ({dev.type})", "", header(command, threads=threads[0] if len(threads) == 1
                                                              else threads),
             f"Network: {args.net}; t* = {T_STAR}, dt = t* / steps (Euler–Maruyama), float32; the measuring "
             f"processes ran {', '.join(map(str, threads))} torch thread(s) "
             f"({'--threads' if args.threads else 'torch default'}); load average (1 min) "
             f"during the runs {min(loads):.2f}-{max(loads):.2f} (timings on a loaded machine are noisy). Plots: "
             "`python benchmarks/plot_results.py`.", "",
             "| sweep | grad_mode | batch | steps | s / purification | s / image | peak extra (MiB) | network calls |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['sweep']} | {r['grad_mode']} | {r['batch']} | {r['steps']} | {r['seconds']} | "
              f"{r['seconds_per_image']} | {r['peak_mib']} | {r['network_calls']} |" for r in rows]
    out_csv.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out_csv} and {out_csv.with_suffix('.md')}")


if __name__ == "__main__":
    main()
