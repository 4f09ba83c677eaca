"""Where one score-network call's time goes, eager and fast (``dpf.fast_score_model``), and what that bounds.

bench_fast.py measures the fast path against issue 12's CPU targets (official / fast no-grad >= 1.5, fast "full" /
fast no-grad <= 2.5). This script says why a target is or is not within reach on the machine at hand: it profiles
(``torch.profiler``, self CPU time per operator) the network calls a purification makes,

* one no-grad call (what ``grad_mode="none"`` makes per step), eager and fast;
* one call with grad plus its input-VJP (what ``grad_mode="full"`` adds per step, after the no-grad forward
  pass: it recomputes each step's call with a graph, then back-propagates through it), fast;

and sorts the time into convolutions, attention, matrix products, the compiled region's own code (inductor's
fused C++ kernels: the pointwise and GroupNorm work between the convolutions), dynamo's guard check, and the rest.
It also times DiffPure's official pipeline per step (torchsde, eager network) and counts the convolutions' FLOPs,
so that the results file can state two bounds:

* official / fast no-grad, if every kernel but the convolutions, attention and matrix products cost nothing;
* fast "full" / fast no-grad with no activation cache = 1 + (call with grad + input-VJP) / (no-grad call).

Same problem as bench_fast.py (2.47M NCSN++, batch 4 of 3x32x32 float32, t* = 0.1). The fast model compiles on
first use (about 2 minutes on 2 cores, once per cache folder: ``--cache-dir``).

    python benchmarks/profile_network.py [--calls 10] [--threads N] [--cache-dir DIR]
    python benchmarks/profile_network.py --quick      # the tiny test network, printed only
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffpure_fast as dpf
from benchmarks._common import header, write_results
from benchmarks.bench_fast import build, problem

# Operator names (profiler keys) per category; the first category whose test matches takes the operator. Only
# self times are summed, so a parent (aten::conv2d) never counts its child (aten::mkldnn_convolution) twice.
CATEGORIES = (
    ("convolutions", lambda k: "convolution" in k),
    ("attention", lambda k: "scaled_dot_product" in k or "flash_attention" in k),
    ("matrix products", lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("compiled region's own code (inductor's fused kernels)", lambda k: "CompiledFxGraph" in k),
    ("dynamo guard check", lambda k: "Cache Lookup" in k),
    ("everything else (other aten ops, autograd, Python)", lambda k: True),
)


def breakdown(fn, calls: int) -> dict[str, float]:
    """Self CPU time per category per call of fn, in ms, from torch.profiler over ``calls`` calls."""
    with profile() as prof:
        for _ in range(calls):
            fn()
    ms = dict.fromkeys((name for name, _ in CATEGORIES), 0.0)
    for ev in prof.key_averages():
        name = next(n for n, test in CATEGORIES if test(ev.key))
        ms[name] += ev.self_cpu_time_total / 1e3 / calls
    return ms


def main() -> None:
    # torchsde is a dev dependency: imported here, so that importing this module (the tests do) needs none.
    from diffpure_fast.testing.torchsde_reference import torchsde_purify

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20, help="network calls per engine per timing round, and profiled")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (medians over rounds)")
    p.add_argument("--batch", type=int, default=4, help="images per batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=None, help="inductor cache folder (default: the fast path's own)")
    p.add_argument("--quick", action="store_true", help="smoke check: the tiny test network, printed only")
    args = p.parse_args()
    for name in ("calls", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    net = "tiny" if args.quick else "ncsnpp"
    eager = build(net)
    fast = dpf.fast_score_model(build(net), cache_dir=args.cache_dir)
    x, w = problem(args.batch, net)
    t = torch.full((args.batch,), 0.05)

    def call(model):
        def run():
            with torch.no_grad():
                model.eps(x, t)
        return run

    def call_vjp(model):
        def run():
            xg = x.clone().requires_grad_(True)
            torch.autograd.grad(model.eps(xg, t), xg, w)
        return run

    t0 = time.perf_counter()
    call(fast)()
    call_vjp(fast)()
    compile_s = time.perf_counter() - t0

    t_star = 0.02 if args.quick else 0.1
    steps = round(t_star / 1e-3)

    def official():  # DiffPure's call: sdeint_adjoint, Euler, dt = 1e-3, forward only
        with torch.no_grad():
            torchsde_purify(x * 2 - 1, eager, t_star, adjoint=True)

    # Timings in rounds, each: `calls` calls of every engine in turn (A B C A B C ...), then one official run; a
    # round's per-call medians and ratios, then medians over rounds (this VM's neighbours move single runs by 20%).
    engines = {"eager": call(eager), "fast": call(fast), "fast_vjp": call_vjp(fast)}
    for fn in (*engines.values(), official):
        fn()
    rounds: list[dict[str, float]] = []
    for _ in range(args.rounds):
        times: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(args.calls):
            for key, fn in engines.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        official()
        rounds.append({"official": (time.perf_counter() - t0) / steps * 1e3,
                       **{k: statistics.median(v) * 1e3 for k, v in times.items()}})
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}

    def ratio(a: str, b: str) -> float:
        return statistics.median(r[a] / r[b] for r in rounds)

    parts = {"eager": breakdown(call(eager), args.calls), "fast": breakdown(call(fast), args.calls),
             "fast_vjp": breakdown(call_vjp(fast), args.calls)}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        eager.eps(x, t)
    conv_gflop = sum(v for op, v in fc.get_flop_counts()["Global"].items() if "convolution" in str(op)) / 1e9

    cols = ("eager", "fast", "fast_vjp")
    titles = ("eager, no grad", "fast, no grad", "fast, with grad + input-VJP")
    lines = ["# Where a score-network call's time goes (CPU)", "",
             header("python benchmarks/profile_network.py " + shlex.join(sys.argv[1:])),
             f"Network: {'NCSN++ nf=32, num_res_blocks=2, 2.47M parameters' if net == 'ncsnpp' else 'tiny test net'}"
             f", random weights; batch {tuple(x.shape)} float32, t = 0.05. Times: {args.rounds} rounds, each "
             f"{args.calls} calls of every engine in turn then one official run; medians of calls within a round, "
             "then over rounds (ratios: per round, then the median). Rows below it: self CPU time per operator "
             f"(torch.profiler over {args.calls} more calls, per call; a separate run, so their sum need not match "
             "the wall time). First fast calls "
             f"(compile or cache load, no grad then grad): {compile_s:.1f} s.", "",
             "| per call (ms) | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(cols),
             "| wall time, unprofiled | " + " | ".join(f"{med[c]:.1f}" for c in cols) + " |"]
    for name, _ in CATEGORIES:
        lines.append(f"| {name} | " + " | ".join(f"{parts[c][name]:.1f}" for c in cols) + " |")
    lines.append("| sum of self times, profiled | " + " | ".join(f"{sum(parts[c].values()):.1f}" for c in cols)
                 + " |")
    core = {c: sum(parts[c][n] for n in ("convolutions", "attention", "matrix products")) for c in cols}
    full_bound = 1 + ratio("fast_vjp", "fast")
    lines += ["", f"DiffPure official (torchsde.sdeint_adjoint, eager net, no grad): {med['official']:.1f} ms per "
              f"step ({steps} steps).", "",
              f"- Convolutions: {conv_gflop:.2f} GFLOP per call (FlopCounterMode, 2 per multiply-add), "
              f"{conv_gflop / parts['fast']['convolutions'] * 1e3:.0f} GFLOP/s in the fast call "
              f"({conv_gflop / parts['eager']['convolutions'] * 1e3:.0f} eager; times in ms).",
              f"- official per step / fast no-grad call: {ratio('official', 'fast'):.2f}x (eager call: "
              f"{ratio('official', 'eager'):.2f}x). Upper bound if everything but convolutions, attention and matrix "
              f"products cost nothing: {med['official'] / core['fast']:.2f}x "
              "(the issue's target: 1.5).",
              f"- fast 'full' / fast no-grad without an activation cache: at least 1 + "
              f"{med['fast_vjp']:.1f} / {med['fast']:.1f} = {full_bound:.2f}x from the network calls alone (the "
              "forward pass, then per step a recompute with grad and its input-VJP; the target: 2.5). Only "
              "`grad_cache_steps` skips the recompute, for memory.", ""]
    if args.quick:
        print("\n".join(lines))
    else:
        write_results("network_profile_cpu.md", lines)


if __name__ == "__main__":
    main()
