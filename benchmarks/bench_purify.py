"""Purification latency: ``dpf.purify`` against DiffPure's reverse SDE over torchsde, same network, same batch.

The network is a 2.47M-parameter NCSN++ (nf 32, 2 res blocks per level, CIFAR-10 layout, random weights),
batch 4 of 3x32x32, t* = 0.1, dt = 1e-3 (100 Euler–Maruyama steps), float32 on CPU. Reported:

* one network call (median), the unit;
* ``purify`` time and its overhead beyond pure network time: purify / (steps x one call) - 1;
* the torchsde reference: DiffPure's RevVPSDE over ``torchsde.sdeint_adjoint`` (as the official code calls it,
  forward only, under no_grad) and over ``torchsde.sdeint``, with torchsde's default BrownianInterval.

    python benchmarks/bench_purify.py [--repeats 5] [--batch 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import diffpure_fast as dpf
from benchmarks._common import RESULTS, header, median_time
from diffpure_fast.models.ncsnpp import NCSNpp
from diffpure_fast.testing.torchsde_reference import RevVPSDE, torchsde_ts


def bench_model(device) -> dpf.EpsModel:
    torch.manual_seed(0)
    net = NCSNpp(nf=32, num_res_blocks=2).to(device).eval()
    return dpf.EpsModel(net, time_input="continuous")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
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
    steps = len(dpf.PurifyConfig(t_star=args.t_star).plan())
    t = torch.full((args.batch,), 0.05, device=dev)

    with torch.no_grad():
        t_net = median_time(lambda: model.eps(x * 2 - 1, t), repeats=max(20, 4 * args.repeats), warmup=3)
        t_purify = median_time(lambda: dpf.purify(x, model, t_star=args.t_star, seed=0), args.repeats)
        sde = RevVPSDE(model, x.shape[1:])
        ts = torchsde_ts(args.t_star, dev)
        y0 = (x * 2 - 1).flatten(1)
        t_adj = median_time(lambda: torchsde.sdeint_adjoint(sde, y0, ts, method="euler", dt=1e-3), args.repeats)
        t_sde = median_time(lambda: torchsde.sdeint(sde, y0, ts, method="euler", dt=1e-3), args.repeats)

    impl = dpf.ops.default_impl_name(dev)
    rows = [
        ("one network call (unit)", t_net, 1.0),
        (f"dpf.purify (fused step: {impl})", t_purify, t_purify / t_net),
        ("torchsde.sdeint_adjoint, forward (official call)", t_adj, t_adj / t_net),
        ("torchsde.sdeint", t_sde, t_sde / t_net),
    ]
    lines = [f"# Purification latency ({dev.type})", "",
             header("python benchmarks/bench_purify.py " + " ".join(sys.argv[1:])),
             f"Network: NCSN++ nf=32, num_res_blocks=2, {n_params / 1e6:.2f}M parameters, random weights; batch "
             f"{args.batch}x3x32x32 float32; t*={args.t_star}: {steps} Euler–Maruyama steps; median of "
             f"{args.repeats} runs.", "",
             "| what | time (s) | network calls |", "|---|---:|---:|"]
    lines += [f"| {name} | {sec:.4f} | {units:.1f} |" for name, sec, units in rows]
    lines += ["",
              f"- engine overhead beyond the network: purify / ({steps} x one call) - 1 = "
              f"{t_purify / (steps * t_net) - 1:+.1%}",
              f"- torchsde reference (sdeint_adjoint forward) overhead: {t_adj / (steps * t_net) - 1:+.1%}",
              f"- speed-up of purify over the official call: {t_adj / t_purify:.2f}x", ""]
    out = RESULTS / f"purify_{dev.type}.md" if args.output is None else __import__("pathlib").Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
