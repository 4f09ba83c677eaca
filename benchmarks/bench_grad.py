"""Time and peak memory of gradients through purification, and each gradient's error against autograd through
``torchsde.sdeint`` (the exact gradient of the computation torchsde runs).

Same 2.47M-parameter NCSN++ as bench_purify.py (random weights), batch 4 of 3x32x32, t* = 0.1, dt = 1e-3 (100
steps), float32, one torchsde BrownianInterval shared by every mode (ours replay its increments on the forward grid
and, for "adjoint", query it on the backward grid). Loss: <w, purify(x)> for a fixed random w. Each mode runs in a
fresh process; its peak memory is the peak RSS above the RSS just before the measured call (Linux VmHWM after
resetting it through /proc/self/clear_refs).

    (a) dpf none       dpf.purify, no graph
    (b) dpf full       exact discrete adjoint (stored states, recomputed network calls)
    (b') dpf full+cache  the same, keeping every step's graph (grad_cache_steps = steps: a large memory budget)
    (c) dpf adjoint    torchsde-style continuous adjoint
    (d) torchsde sdeint_adjoint as shipped (score-net parameters require grad) / frozen (adjoint_params=())
    (e) autograd through torchsde.sdeint

    python benchmarks/bench_grad.py [--repeats 1] [--batch 4]
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
from diffpure_fast.engine import Noise, PurifyConfig, forward_diffuse
from diffpure_fast.grad import differentiable_reverse_solve
from diffpure_fast.schedule import DIFFPURE_SCHEDULE
from diffpure_fast.solvers import reverse_time_grid
from diffpure_fast.testing.torchsde_reference import (
    TorchsdeBrownianWalker,
    forward_increments,
    torchsde_purify,
    torchsde_ts,
)

MODES = {
    "none": "(a) dpf.purify, grad_mode='none'",
    "full": "(b) dpf grad_mode='full'",
    "full_cache": "(b') dpf 'full', grad_cache_steps=all",
    "adjoint": "(c) dpf grad_mode='adjoint'",
    "torchsde_adjoint_shipped": "(d) torchsde sdeint_adjoint, as shipped",
    "torchsde_adjoint_frozen": "(d) torchsde sdeint_adjoint, adjoint_params=()",
    "torchsde_autograd": "(e) autograd through torchsde.sdeint",
}


def problem(batch: int, t_star: float):
    import torchsde

    model = bench_model(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(x.shape, generator=g)
    w = torch.randn(x.shape, generator=g)
    ts = torchsde_ts(t_star)
    bm = torchsde.BrownianInterval(t0=ts[0], t1=ts[-1], size=(batch, x[0].numel()), entropy=7)
    dw = forward_increments(bm, reverse_time_grid(t_star, 1e-3), x)
    return model, x, z, w, bm, dw


def run_mode(mode: str, batch: int, t_star: float, repeats: int) -> dict:
    model, x, z, w, bm, dw = problem(batch, t_star)
    for p in model.parameters():  # torchsde as shipped: DiffPure's SDE runner leaves them requiring grad
        p.requires_grad_(mode == "torchsde_adjoint_shipped")
    steps = dw.shape[0]

    def ours(grad_mode, **kw):
        xg = x.clone().requires_grad_(grad_mode != "none")
        out = dpf.purify(xg, model, t_star=t_star, forward_noise=z, increments=dw, value_range=(-1, 1),
                         grad_mode=grad_mode, **kw)
        if grad_mode == "none":
            return None
        return torch.autograd.grad((out * w).sum(), xg)[0]

    def adjoint():
        xg = x.clone().requires_grad_(True)
        cfg = PurifyConfig.build(t_star=t_star, grad_mode="adjoint")
        x_t = forward_diffuse(xg, z, t_star, DIFFPURE_SCHEDULE)
        out = differentiable_reverse_solve(x_t, model, cfg.plan(), Noise(increments=dw), cfg, x_in=xg,
                                           brownian_factory=lambda grid, noise, like: TorchsdeBrownianWalker(bm, like))
        return torch.autograd.grad((out * w).sum(), xg)[0]

    def reference(adjoint, adjoint_params=None):
        xg = x.clone().requires_grad_(True)
        x_t = forward_diffuse(xg, z, t_star, DIFFPURE_SCHEDULE)
        out = torchsde_purify(x_t, model, t_star, bm=bm, adjoint=adjoint, adjoint_params=adjoint_params)
        return torch.autograd.grad((out * w).sum(), xg)[0]

    fn = {
        "none": lambda: ours("none"),
        "full": lambda: ours("full"),
        "full_cache": lambda: ours("full", grad_cache_steps=steps),
        "adjoint": adjoint,
        "torchsde_adjoint_shipped": lambda: reference(True),
        "torchsde_adjoint_frozen": lambda: reference(True, adjoint_params=()),
        "torchsde_autograd": lambda: reference(False),
    }[mode]
    res, grad = measure(fn, repeats)
    res["call_seconds"] = network_call_seconds(model, x)
    return {**res, "grad": None if grad is None else grad.tolist()}


def main() -> None:
    p = worker_parser(__doc__, MODES)
    p.add_argument("--t-star", type=float, default=0.1, help="diffusion time t*")
    args = p.parse_args()
    if args.worker:
        res = run_mode(args.worker, args.batch, args.t_star, args.repeats)
        print(json.dumps(res))
        return

    results = run_workers(Path(__file__), args.modes.split(","), ["--batch", str(args.batch), "--t-star",
                                                                   str(args.t_star), "--repeats", str(args.repeats)],
                          MODES.get)
    ref = results.get("torchsde_autograd", {}).get("grad")
    ref = None if ref is None else torch.tensor(ref)
    calls = [r["call_seconds"] for r in results.values()]
    lines = ["# Gradients through purification (cpu)", "",
             header("python benchmarks/bench_grad.py " + " ".join(sys.argv[1:])),
             f"NCSN++ 2.47M parameters (random weights), batch {args.batch}x3x32x32 float32, t*={args.t_star} "
             f"(100 Euler steps), loss <w, purify(x)>. Network calls: the mode's time over one no-grad network call "
             "timed in the same process right after it (median of 10; "
             f"{min(calls) * 1e3:.1f}-{max(calls) * 1e3:.1f} ms across the modes' processes). "
             "Peak memory: RSS high-water mark above the RSS before the call, fresh process per mode.", "",
             "| mode | time (s) | network calls | peak extra memory (MiB) | grad rel. error vs (e) | cosine vs (e) |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode, r in results.items():
        err = cos = "-"
        if ref is not None and r["grad"] is not None:
            g = torch.tensor(r["grad"])
            err = f"{((g - ref).norm() / ref.norm()).item():.2e}"
            cos = f"{torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0).item():.6f}"
        lines.append(f"| {MODES[mode]} | {r['seconds']:.2f} | {r['seconds'] / r['call_seconds']:.0f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {err} | {cos} |")
    lines.append("")
    write_results("grad_cpu.md", lines)


if __name__ == "__main__":
    main()
