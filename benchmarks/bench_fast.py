"""The CPU fast path (``dpf.fast_score_model``: inductor-compiled, channels-last score network) against the eager
network and DiffPure's official torchsde pipeline, and what compiling it costs.

Same problem as bench_purify.py / bench_grad.py: a 2.47M-parameter NCSN++ (nf 32, 2 res blocks per level, random
weights), batch 4 of 3x32x32 float32, t* = 0.1, dt = 1e-3 (100 Euler–Maruyama steps), on the CPU.

1. Compile time: a fresh process builds the fast model on an empty cache folder and times its first no-grad call
   and its first call with grad plus backward (the two graphs purification and ``grad_mode="full"`` need); a second
   fresh process does the same on the now-filled folder (what every later run pays).
2. Steady state, in this process, on that warm folder, every engine built and warmed up first, then run
   interleaved (A B C ... A B C ...) so that machine drift hits them alike; medians, and per-run ratios:
     * DiffPure's RevVPSDE over ``torchsde.sdeint_adjoint`` (the official call; forward only, no_grad), eager net;
     * ``dpf.purify`` no-grad, eager network and fast network;
     * ``grad_mode="full"`` (loss <w, purify(x)>, d/dx), eager and fast; optionally (``--cache-steps``) the fast
       one keeping every step's graph from the forward pass (``grad_cache_steps``: more memory, no recompute).
   Targets (issue 12): official / fast no-grad >= 1.5; fast "full" / fast no-grad <= 2.5.

    python benchmarks/bench_fast.py [--repeats 5] [--batch 4] [--threads N] [--cache-steps]
    python benchmarks/bench_fast.py --quick        # smoke check: the tiny test network, one repeat
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffpure_fast as dpf
from benchmarks._common import header, peak_rss_since_reset, reset_peak_rss, run_isolated, write_results
from diffpure_fast.models.ncsnpp import NCSNpp
from diffpure_fast.testing.nets import TinyEpsNet


def build(net: str) -> dpf.EpsModel:
    """A fresh eager model with the benchmark's weights (the same every call: the fast one converts its own)."""
    torch.manual_seed(0)
    module = NCSNpp(nf=32, num_res_blocks=2) if net == "ncsnpp" else TinyEpsNet()
    return dpf.EpsModel(module.eval(), time_input="continuous")


def problem(batch: int, net: str):
    size = 32 if net == "ncsnpp" else 8
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    w = torch.randn(x.shape, generator=g)
    return x, w


def compile_worker(net: str, batch: int, cache: str) -> dict:
    """First calls of a fast model in this (fresh) process: seconds to the no-grad graph, then to the grad one."""
    from torch._dynamo.utils import counters

    model = dpf.fast_score_model(build(net), cache_dir=cache)
    x, w = problem(batch, net)
    t = torch.full((batch,), 0.05)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.eps(x, t)
    t1 = time.perf_counter()
    xg = x.clone().requires_grad_(True)
    torch.autograd.grad(model.eps(xg, t), xg, w)
    t2 = time.perf_counter()
    ind = counters["inductor"]
    return {"no_grad": t1 - t0, "grad": t2 - t1, "fx_hits": ind["fxgraph_cache_hit"],
            "fx_misses": ind["fxgraph_cache_miss"]}


def main() -> None:
    # torchsde is a dev dependency: imported here, so that importing this module (the tests do) needs none.
    from diffpure_fast.testing.torchsde_reference import torchsde_purify

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per engine (medians reported)")
    p.add_argument("--batch", type=int, default=4, help="images per batch")
    p.add_argument("--t-star", type=float, default=0.1, help="diffusion time t*")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cache-steps", action="store_true",
                   help="also time fast 'full' with grad_cache_steps = every step (memory: one step's graph each)")
    p.add_argument("--skip-eager-full", action="store_true", help="leave out the eager 'full' engine (saves time)")
    p.add_argument("--note", default="", help="a line written under the header (e.g. the machine's load)")
    p.add_argument("--quick", action="store_true", help="smoke check: tiny network, t*=0.02, one repeat")
    p.add_argument("--output", default=None, help="results file name under benchmarks/results/ (default fast_cpu.md; "
                   "--quick prints only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    net = "tiny" if args.quick else "ncsnpp"
    if args.quick:
        args.repeats, args.t_star = 1, 0.02
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(compile_worker(net, args.batch, args.worker)))
        return
    cache = tempfile.mkdtemp(prefix="dpf-bench-fast-")
    worker_args = ["--batch", str(args.batch), "--worker", cache] + (["--quick"] if args.quick else []) + (
        ["--threads", str(args.threads)] if args.threads else [])
    compiles = []
    for label in ("first process, empty cache", "second process, warm cache"):
        compiles.append(json.loads(run_isolated(Path(__file__), worker_args).strip().splitlines()[-1]))
        print(f"compile, {label}: {compiles[-1]}", flush=True)

    eager, fast = build(net), dpf.fast_score_model(build(net), cache_dir=cache)
    x, w = problem(args.batch, net)
    steps = len(dpf.PurifyConfig.build(t_star=args.t_star).plan())

    def no_grad(model):
        def run():
            with torch.no_grad():
                dpf.purify(x, model, t_star=args.t_star, seed=0)
        return run

    def full(model, **kw):
        def run():
            xg = x.clone().requires_grad_(True)
            out = dpf.purify(xg, model, t_star=args.t_star, seed=0, grad_mode="full", **kw)
            torch.autograd.grad((out * w).sum(), xg)
        return run

    def official():
        with torch.no_grad():
            torchsde_purify(x * 2 - 1, eager, args.t_star, adjoint=True)

    engines = {"official": ("DiffPure official: torchsde.sdeint_adjoint forward, eager net", official),
               "eager_none": ("dpf.purify, eager net, no grad", no_grad(eager)),
               "fast_none": ("dpf.purify, fast net, no grad", no_grad(fast)),
               "fast_full": ("dpf.purify, fast net, grad_mode='full'", full(fast))}
    if not args.skip_eager_full:
        engines["eager_full"] = ("dpf.purify, eager net, grad_mode='full'", full(eager))
    if args.cache_steps:
        engines["fast_full_cache"] = (f"dpf.purify, fast net, 'full', grad_cache_steps={steps}",
                                      full(fast, grad_cache_steps=steps))
    peak = {}
    for key, (_, fn) in engines.items():  # warm-up (compiles nothing new: the folder is warm) and peak memory
        base = reset_peak_rss()
        fn()
        peak[key] = peak_rss_since_reset() - base
    runs: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.repeats):
        for key, (_, fn) in engines.items():
            t0 = time.perf_counter()
            fn()
            runs[key].append(time.perf_counter() - t0)
            print(f"{key}: {runs[key][-1]:.3f} s", flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(p / q for p, q in zip(runs[a], runs[b]))

    what = ("NCSN++ nf=32, num_res_blocks=2, 2.47M parameters, random weights" if net == "ncsnpp"
            else "the tiny test network (--quick)")
    lines = ["# CPU fast path: compiled, channels-last score network", "",
             header("python benchmarks/bench_fast.py " + shlex.join(sys.argv[1:])),
             *([args.note, ""] if args.note else []),
             f"Network: {what}; batch {tuple(x.shape)} float32; t*={args.t_star}: {steps} Euler–Maruyama steps. "
             f"{args.repeats} interleaved runs per engine after a warm-up, medians. Peak memory: RSS high-water "
             "mark above the RSS before the warm-up call, in this process.", "",
             "## Compile time (fresh processes, one new cache folder)", "",
             "| process | first no-grad call (s) | first grad call + backward (s) | FX-graph cache hits / misses |",
             "|---|---:|---:|---:|"]
    for label, c in zip(("first (empty cache)", "second (warm cache)"), compiles):
        lines.append(f"| {label} | {c['no_grad']:.1f} | {c['grad']:.1f} | {c['fx_hits']} / {c['fx_misses']} |")
    lines += ["", "## Steady state", "", "| engine | time (s) | peak extra memory (MiB) | time / fast no-grad |",
              "|---|---:|---:|---:|"]
    for key, (label, _) in engines.items():
        lines.append(f"| {label} | {statistics.median(runs[key]):.3f} | {peak[key] / 2**20:.0f} | "
                     f"{ratio(key, 'fast_none'):.3f} |")
    official_ratio, full_ratio = ratio("official", "fast_none"), ratio("fast_full", "fast_none")
    lines += ["", "Targets (run-by-run ratios, medians):", "",
              f"- official / fast no-grad: {official_ratio:.3f}x (target >= 1.5: "
              f"{'met' if official_ratio >= 1.5 else 'not met'}); official / eager no-grad: "
              f"{ratio('official', 'eager_none'):.3f}x; eager / fast no-grad: {ratio('eager_none', 'fast_none'):.3f}x",
              f"- fast 'full' / fast no-grad: {full_ratio:.3f}x (target <= 2.5: "
              f"{'met' if full_ratio <= 2.5 else 'not met'})"]
    if "eager_full" in runs:
        lines.append(f"- eager 'full' / eager no-grad: {ratio('eager_full', 'eager_none'):.3f}x; eager 'full' / "
                     f"fast 'full': {ratio('eager_full', 'fast_full'):.3f}x")
    if "fast_full_cache" in runs:
        lines.append(f"- fast 'full' with grad_cache_steps={steps} / fast no-grad: "
                     f"{ratio('fast_full_cache', 'fast_none'):.3f}x")
    lines.append("")
    if args.output or not args.quick:
        write_results(args.output or "fast_cpu.md", lines)
    else:
        print("\n".join(lines))
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
