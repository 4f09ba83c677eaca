"""No-grad purification time of each DiffPure runner (``diffusion_type``) against the official runner's loop, in one
interleaved run (repeat r times: for each type, ours then the official), medians.

The official side, re-created over the same network (``diffpure_fast.testing``): sde ``torchsde.sdeint_adjoint``
on DiffPure's RevVPSDE (torchsde's BrownianInterval); ode ``torchdiffeq.odeint_adjoint`` on VPODE; ldsde
``torchsde.sdeint_adjoint`` on LDSDE; ddpm guided-diffusion's ``p_sample`` loop; celebahq-ddpm SDEdit's step loop
(``torch.randn_like`` noise). Both sides start from the same input and run the forward diffusion the same way.

Networks (random weights, batch 4 of 3x32x32, float32): the 2.47M-parameter NCSN++ of bench_purify.py for sde, ode
and ldsde; a learned-variance ADM UNet (num_channels 64, channel_mult 1,2,2, 2 res blocks, attention at 16) for ddpm;
SDEdit's DDPM UNet (ch 64, ch_mult 1,2,2, 2 res blocks, attention at 16) for celebahq-ddpm. t* = 0.1 (``--t-star``):
100 steps for sde, ode, ddpm and celebahq-ddpm, 10 for ldsde (dt = 1e-2).

    python benchmarks/bench_runners.py [--repeats 3]     # writes benchmarks/results/runners_cpu.md
    python benchmarks/bench_runners.py --quick           # tiny networks, t* = 0.02, 1 repeat: out/bench_quick/
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
from benchmarks._common import header, write_results
from benchmarks.bench_purify import bench_model
from diffpure_fast.chain import forward_diffuse
from diffpure_fast.methods import DIFFUSION_TYPES
from diffpure_fast.models import create_adm_model
from diffpure_fast.models.ddpm_unet import DDPMUNet
from diffpure_fast.schedule import DIFFPURE_SCHEDULE
from diffpure_fast.testing.runner_reference import guided_p_sample_loop, sdedit_loop, torchsde_ldsde
from diffpure_fast.testing.torchdiffeq_reference import torchdiffeq_purify
from diffpure_fast.testing.torchsde_reference import torchsde_purify


def networks(quick: bool) -> dict[str, dpf.EpsModel]:
    """The network of each type (see the module docstring); --quick: a few thousand parameters each."""
    torch.manual_seed(0)
    width = 8 if quick else 64
    adm = create_adm_model({"image_size": 32, "num_channels": 32 if quick else width, "num_res_blocks": 1 if quick
                            else 2, "channel_mult": "1,2,2", "attention_resolutions": "16", "num_head_channels": 16,
                            "learn_sigma": True, "use_scale_shift_norm": True, "resblock_updown": True}).eval()
    unet = DDPMUNet(ch=32 if quick else width, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=1 if quick else 2,
                    attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=32).eval()
    ncsnpp = dpf.load_score_model("digits") if quick else bench_model(torch.device("cpu"))
    for net in (adm, unet, ncsnpp):
        net.requires_grad_(False)
    return {"sde": ncsnpp, "ode": ncsnpp, "ldsde": ncsnpp,
            "ddpm": dpf.EpsModel(adm, time_input="discrete", learned_sigma=True),
            "celebahq-ddpm": dpf.EpsModel(unet, time_input="discrete")}


def runs(kind: str, model, x: torch.Tensor, t_star: float):
    """(ours, official): two no-grad callables purifying x (B, C, H, W) in [-1, 1]."""
    level = DIFFPURE_SCHEDULE.level_of(t_star)

    def ours():
        return dpf.purify(x, model, diffusion_type=kind, t_star=t_star, value_range=(-1, 1))

    def x_t():
        return forward_diffuse(x, torch.randn_like(x), t_star, DIFFPURE_SCHEDULE)

    def randn(k, like):
        return torch.randn_like(like)

    official = {
        "sde": lambda: torchsde_purify(x_t(), model, t_star, adjoint=True),
        "ode": lambda: torchdiffeq_purify(x_t(), model, t_star, adjoint=True),
        "ldsde": lambda: torchsde_ldsde(x, model, t_star),
        "ddpm": lambda: guided_p_sample_loop(x_t(), model, level, randn),
        "celebahq-ddpm": lambda: sdedit_loop(x_t(), model, level, randn),
    }[kind]
    return ours, official


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median; default 3)")
    p.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    p.add_argument("--types", default=",".join(DIFFUSION_TYPES), help="comma-separated diffusion types")
    p.add_argument("--t-star", type=float, default=None, help="diffusion time t* (default 0.1; --quick 0.02)")
    p.add_argument("--quick", action="store_true", help="tiny networks, t* 0.02, 1 repeat, out/bench_quick/")
    args = p.parse_args()
    t_star = args.t_star if args.t_star is not None else (0.02 if args.quick else 0.1)
    repeats = 1 if args.quick else args.repeats
    kinds = args.types.split(",")
    nets = networks(args.quick)
    g = torch.Generator().manual_seed(0)
    shapes = {k: (1, 16, 16) if args.quick and k in ("sde", "ode", "ldsde") else (3, 32, 32) for k in kinds}
    xs = {k: torch.rand(args.batch, *shapes[k], generator=g) * 2 - 1 for k in kinds}
    fns = {k: runs(k, nets[k], xs[k], t_star) for k in kinds}
    times = {k: ([], []) for k in kinds}
    with torch.no_grad():
        for k in kinds:                      # warm-up: one call of each
            for fn in fns[k]:
                fn()
        for r in range(repeats):
            for k in kinds:
                for side, fn in enumerate(fns[k]):
                    t0 = time.perf_counter()
                    fn()
                    times[k][side].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{repeats} done", flush=True)

    def params(m):
        return sum(p.numel() for p in m.parameters()) / 1e6

    lines = ["# DiffPure's runners: no-grad purification, ours against the official loop (cpu)", "",
             header("python benchmarks/bench_runners.py " + " ".join(sys.argv[1:])),
             f"Batch {args.batch}, float32, t*={t_star}, random weights, medians of {repeats} interleaved rounds "
             "(each round: every type, ours then the official loop).", "",
             "| diffusion_type | network (M parameters) | input | steps | ours (s) | official (s) | official / ours |",
             "|---|---|---|---:|---:|---:|---:|"]
    for k in kinds:
        ours, official = (statistics.median(v) for v in times[k])
        steps = len(dpf.PurifyConfig.build(diffusion_type=k, t_star=t_star).chain())
        net = nets[k].net if hasattr(nets[k], "net") else nets[k]
        lines.append(f"| {k} | {type(net).__name__} ({params(net):.2f}) | {'x'.join(map(str, shapes[k]))} | "
                     f"{steps} | {ours:.2f} | {official:.2f} | {official / ours:.2f}x |")
    lines.append("")
    write_results("runners_cpu.md", lines, quick=args.quick)


if __name__ == "__main__":
    main()
