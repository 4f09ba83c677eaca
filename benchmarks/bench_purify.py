"""Purification latency: ``dpf.purify`` against DiffPure's reverse SDE over torchsde, same network, same batch.

The network is a 2.47M-parameter NCSN++ (nf 32, 2 res blocks per level, CIFAR-10 layout, random weights),
batch 4 of 3x32x32, t* = 0.1, dt = 1e-3 (100 Euler–Maruyama steps), float32 on CPU. Three engines run
interleaved (A B C A B C ...) so that machine drift hits them alike:

* ``dpf.purify`` (fused step, counter noise);
* DiffPure's RevVPSDE over ``torchsde.sdeint_adjoint`` (as the official code calls it; forward only, no_grad);
* the same over ``torchsde.sdeint``; both with torchsde's default BrownianInterval.

Overhead is measured inside each run: the network calls are counted and timed (``diffpure_fast.bench.
count_network_calls(timed=True)``, the counter behind ``diffpure-fast bench``), so ``overhead = total / (time inside
the network's calls) - 1`` needs no separately timed "one call" (on a shared VM, separate timings drift by 10-15%
from run to run, more than the overhead itself).

    python benchmarks/bench_purify.py [--repeats 7] [--batch 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffpure_fast as dpf
from benchmarks._common import RESULTS, count_network_calls, header
from diffpure_fast.models.ncsnpp import NCSNpp


def bench_model(device) -> dpf.EpsModel:
    torch.manual_seed(0)
    net = NCSNpp(nf=32, num_res_blocks=2).to(device).eval()
    return dpf.EpsModel(net, time_input="continuous")


def main() -> None:
    # torchsde is a dev dependency: imported here, so that importing this module (the tests do) needs none.
    from diffpure_fast.testing.torchsde_reference import RevVPSDE, torchsde_ts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="interleaved runs per engine (median reported)")
    p.add_argument("--batch", type=int, default=4, help="images per batch")
    p.add_argument("--t-star", type=float, default=0.1, help="diffusion time t*")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--output", default=None, help="results markdown (default benchmarks/results/purify_<dev>.md)")
    args = p.parse_args()
    import torchsde

    dev = torch.device(args.device)
    model = bench_model(dev)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.rand(args.batch, 3, 32, 32, device=dev)
    steps = len(dpf.PurifyConfig.build(t_star=args.t_star).plan())
    sde = RevVPSDE(model, x.shape[1:])
    ts = torchsde_ts(args.t_star, dev)
    y0 = (x * 2 - 1).flatten(1)
    engines = {
        f"dpf.purify (fused step: {dpf.ops.default_impl_name(dev)})": lambda: dpf.purify(x, model, t_star=args.t_star,
                                                                                        seed=0),
        "torchsde.sdeint_adjoint, forward (the official call)":
            lambda: torchsde.sdeint_adjoint(sde, y0, ts, method="euler", dt=1e-3),
        "torchsde.sdeint": lambda: torchsde.sdeint(sde, y0, ts, method="euler", dt=1e-3),
    }
    runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in engines}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad(), count_network_calls(model, timed=True) as counter:
        for fn in engines.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in engines.items():
                counter.reset()
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                runs[name].append((time.perf_counter() - t0, counter.seconds, counter.calls))

    def med(name, i):
        return statistics.median(r[i] for r in runs[name])

    def overhead(name):
        return statistics.median(total / net - 1 for total, net, _ in runs[name])

    names = list(engines)
    lines = [f"# Purification latency ({dev.type})", "",
             header("python benchmarks/bench_purify.py " + " ".join(sys.argv[1:])),
             f"Network: NCSN++ nf=32, num_res_blocks=2, {n_params / 1e6:.2f}M parameters, random weights; batch "
             f"{args.batch}x3x32x32 float32; t*={args.t_star}: {steps} Euler–Maruyama steps. {args.repeats} "
             "interleaved runs per engine, medians. Overhead = total / (time inside the network's calls) - 1, "
             "per run.", "",
             "| engine | total (s) | inside the network (s) | network calls | overhead beyond the network |",
             "|---|---:|---:|---:|---:|"]
    for name in names:
        lines.append(f"| {name} | {med(name, 0):.3f} | {med(name, 1):.3f} | {runs[name][0][2]} | "
                     f"{overhead(name):+.2%} |")
    ratio = statistics.median(a[0] / b[0] for a, b in zip(runs[names[1]], runs[names[0]]))
    lines += ["", f"- run-by-run time ratio, official call / dpf.purify: {ratio:.3f}x (median)",
              f"- run-to-run spread of dpf.purify totals: {min(r[0] for r in runs[names[0]]):.3f} to "
              f"{max(r[0] for r in runs[names[0]]):.3f} s", ""]
    out = RESULTS / f"purify_{dev.type}.md" if args.output is None else Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
