"""DiffPure's ODE runner (``diffusion_type="ode"``): time, peak memory and gradient error of our gradients against
torchdiffeq's, the official code's solver.

Same 2.47M-parameter NCSN++ as bench_purify.py (random weights), batch 4 of 3x32x32, t* = 0.1, step_size = 1e-3
(100 Euler steps), float32, one forward noise for every mode. Loss: <w, purify(x)> for a fixed random w, gradient
with respect to x (through the forward diffusion). Each mode runs in a fresh process; its peak memory is the peak RSS
above the RSS just before the measured call.

    (a) dpf none       dpf.purify(diffusion_type="ode"), no graph
    (b) dpf full       the exact gradient of the Euler steps (stored states, recomputed network calls)
    (c) dpf adjoint    torchdiffeq's odeint_adjoint, re-implemented (grad_mode="adjoint")
    (d) torchdiffeq odeint_adjoint as shipped (the score network's parameters require grad, as in DiffPure's
        runner, so the adjoint carries their VJPs too) / frozen (adjoint_params=())
    (e) autograd through torchdiffeq.odeint (the exact gradient of the same Euler steps; the reference of (b))

Errors: relative L2 against (e) and against (d) as shipped (the official gradient).

    python benchmarks/bench_ode.py [--repeats 1] [--batch 4]     # writes benchmarks/results/ode_cpu.md
    python benchmarks/bench_ode.py --quick                       # the digits model, t* = 0.02: out/bench_quick/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffpure_fast as dpf
from benchmarks._common import header, measure, network_call_seconds, run_workers, worker_parser, write_results
from benchmarks.bench_purify import bench_model
from diffpure_fast.chain import forward_diffuse
from diffpure_fast.schedule import DIFFPURE_SCHEDULE
from diffpure_fast.testing.torchdiffeq_reference import torchdiffeq_purify

MODES = {
    "none": "(a) dpf.purify(diffusion_type='ode'), grad_mode='none'",
    "full": "(b) dpf grad_mode='full' (exact)",
    "adjoint": "(c) dpf grad_mode='adjoint' (torchdiffeq's adjoint)",
    "odeint_adjoint_shipped": "(d) torchdiffeq odeint_adjoint, as shipped",
    "odeint_adjoint_frozen": "(d) torchdiffeq odeint_adjoint, adjoint_params=()",
    "odeint_autograd": "(e) autograd through torchdiffeq.odeint",
}


def problem(batch: int, quick: bool):
    if quick:
        model, shape = dpf.load_score_model("digits"), (1, 16, 16)
    else:
        model, shape = bench_model(torch.device("cpu")), (3, 32, 32)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=g) * 2 - 1
    return model, x, torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)


def run_mode(mode: str, batch: int, t_star: float, step_size: float, repeats: int, quick: bool) -> dict:
    model, x, z, w = problem(batch, quick)
    for p in model.parameters():  # as shipped: DiffPure's ODE runner leaves them requiring grad
        p.requires_grad_(mode == "odeint_adjoint_shipped")

    def ours(grad_mode):
        xg = x.clone().requires_grad_(grad_mode != "none")
        out = dpf.purify(xg, model, diffusion_type="ode", t_star=t_star, step_size=step_size, forward_noise=z,
                         value_range=(-1, 1), grad_mode=grad_mode)
        return None if grad_mode == "none" else torch.autograd.grad((out * w).sum(), xg)[0]

    def reference(adjoint, adjoint_params=None):
        xg = x.clone().requires_grad_(True)
        x_t = forward_diffuse(xg, z, t_star, DIFFPURE_SCHEDULE)
        out = torchdiffeq_purify(x_t, model, t_star, step_size=step_size, adjoint=adjoint,
                                 adjoint_params=adjoint_params)
        return torch.autograd.grad((out * w).sum(), xg)[0]

    fn = {
        "none": lambda: ours("none"),
        "full": lambda: ours("full"),
        "adjoint": lambda: ours("adjoint"),
        "odeint_adjoint_shipped": lambda: reference(True),
        "odeint_adjoint_frozen": lambda: reference(True, adjoint_params=()),
        "odeint_autograd": lambda: reference(False),
    }[mode]
    res, grad = measure(fn, repeats)
    res["call_seconds"] = network_call_seconds(model, x)
    return {**res, "grad": None if grad is None else grad.tolist()}


def _errors(g, ref):
    if ref is None or g is None:
        return "-", "-"
    g = torch.tensor(g)
    cos = torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0).item()
    return f"{((g - ref).norm() / ref.norm()).item():.2e}", f"{cos:.6f}"


def main() -> None:
    p = worker_parser(__doc__, MODES)
    p.add_argument("--t-star", type=float, default=None, help="diffusion time t* (default 0.1; --quick 0.02)")
    p.add_argument("--step-size", type=float, default=1e-3, help="the ODE's Euler step (default 1e-3)")
    p.add_argument("--quick", action="store_true", help="the digits model, t* 0.02, results to out/bench_quick/")
    args = p.parse_args()
    t_star = args.t_star if args.t_star is not None else (0.02 if args.quick else 0.1)
    if args.worker:
        print(json.dumps(run_mode(args.worker, args.batch, t_star, args.step_size, args.repeats, args.quick)))
        return

    worker_args = ["--batch", str(args.batch), "--t-star", str(t_star), "--step-size", str(args.step_size),
                   "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    results = run_workers(Path(__file__), args.modes.split(","), worker_args, MODES.get)
    refs = {k: (None if results.get(k, {}).get("grad") is None else torch.tensor(results[k]["grad"]))
            for k in ("odeint_autograd", "odeint_adjoint_shipped")}
    calls = [r["call_seconds"] for r in results.values()]
    net = "the digits NCSN++ (317k parameters), 1x16x16" if args.quick else "NCSN++ 2.47M parameters (random " \
                                                                           "weights), 3x32x32"
    steps = len(dpf.PurifyConfig.build(diffusion_type="ode", t_star=t_star, step_size=args.step_size).plan())
    lines = ["# DiffPure's ODE runner: gradients against torchdiffeq (cpu)", "",
             header("python benchmarks/bench_ode.py " + " ".join(sys.argv[1:])),
             f"{net}, batch {args.batch}, float32, t*={t_star}, step_size={args.step_size} ({steps} Euler steps), "
             "loss <w, purify(x)>, gradient with respect to x. Network calls: the mode's time over one no-grad "
             "network call timed in the same process right after it (median of 10; "
             f"{min(calls) * 1e3:.1f}-{max(calls) * 1e3:.1f} ms across the modes' processes). Peak memory: RSS "
             "high-water mark above the RSS before the call, fresh process per mode.", "",
             "| mode | time (s) | network calls | peak extra memory (MiB) | rel. error vs (e) | cosine vs (e) | "
             "rel. error vs (d) shipped | cosine vs (d) shipped |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, r in results.items():
        e_err, e_cos = _errors(r["grad"], refs["odeint_autograd"])
        d_err, d_cos = _errors(r["grad"], refs["odeint_adjoint_shipped"])
        lines.append(f"| {MODES[mode]} | {r['seconds']:.2f} | {r['seconds'] / r['call_seconds']:.0f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {e_err} | {e_cos} | {d_err} | {d_cos} |")
    lines.append("")
    write_results("ode_cpu.md", lines, quick=args.quick)


if __name__ == "__main__":
    main()
