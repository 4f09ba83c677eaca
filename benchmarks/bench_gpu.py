"""GPU benchmark: purification latency and throughput per variant, and the fused step's bandwidth against the
GPU's peak. Needs a CUDA GPU; without one it exits with a message and measures nothing.

Networks, at their real sizes with random weights (as bench_networks.py builds them):

  ncsnpp   NCSN++ "deep continuous" CIFAR-10 (106.6M parameters), 3x32x32, t* = 0.1: 100 Euler–Maruyama steps
  adm      ADM 256x256 unconditional (552.8M parameters), 3x256x256, t* = 0.15: 150 steps (DiffPure's ImageNet)

Variants (rows), each at every batch size of --batches:

  eager       dpf.purify, float32 (torch's default TF32 settings: cuDNN convolutions may use TF32)
  compiled    dpf.purify around torch.compile(network) (inductor, dynamic=False: one compile per batch size)
  cuda_graph  dpf.purify(cuda_graph=True): the whole chain captured once, replayed
  bf16        dpf.purify(autocast="bf16"): the network in bfloat16, the state in float32
  bf16_graph  autocast="bf16" and cuda_graph=True
  official    DiffPure's RevVPSDE over torchsde.sdeint_adjoint (the call bench_purify.py times), same network and
              GPU; skipped with a message when torchsde is not installed

Time: median of --repeats purifications after one warm-up call (torch.cuda.synchronize around each); the warm-up
call's own time (compilation, graph capture) is reported apart as "first call". Images/s = batch / median. Peak:
torch.cuda.max_memory_allocated during the calls minus what was allocated before them (weights excluded).
--steps N replaces dt = 1e-3 by N Euler steps over [1e-5, t*] (every variant alike; the official call gets
dt = (t* - 1e-5) / N): a shorter run to fit the 10-minute budget of a device call, whose time per step is that
of the full run.

Fused step: every implementation available on the GPU (bench_sde_step.py's providers) on --step-elements float32
elements, GB/s = bytes a fused kernel moves / median time (triton.testing.do_bench), and % of the GPU's peak DRAM
bandwidth (bench_sde_step.PEAK_GBPS by name, else 2 x memory clock x bus width from the device properties).

    python benchmarks/bench_gpu.py                                    # everything -> results/gpu.md, gpu.csv
    python benchmarks/bench_gpu.py --nets ncsnpp --batches 1,8 --variants eager,cuda_graph --steps 20
"""

from __future__ import annotations

import argparse
import csv
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diffpure_fast as dpf
from benchmarks._common import RESULTS, header

NETS = {
    "ncsnpp": {"bench": "ncsnpp_cifar10_deep", "t_star": 0.1, "time_input": "continuous", "size": 32},
    "adm": {"bench": "adm_imagenet256_uncond", "t_star": 0.15, "time_input": "discrete", "size": 256},
}
VARIANTS = ("eager", "compiled", "cuda_graph", "bf16", "bf16_graph", "official")
NO_GPU = ("bench_gpu.py: no CUDA GPU is visible (torch.cuda.is_available() is False), so nothing was measured; "
          "run it on a machine with a GPU (the README's GPU numbers stay 'not measured yet' until then)")


def score_model(name: str, device: torch.device, compiled: bool) -> dpf.EpsModel:
    from benchmarks.bench_networks import build

    net = build(NETS[name]["bench"]).to(device)
    learned = getattr(net, "out_channels", 3) == 6  # ADM's learned variance: eps is the first 3 of 6 channels
    # dynamic=False: one specialised graph per batch size (torch's default would turn the batch dimension dynamic
    # at the second size and give up the static shapes that make the compiled kernels fast).
    model = dpf.EpsModel(torch.compile(net, dynamic=False) if compiled else net,
                         time_input=NETS[name]["time_input"], learned_sigma=learned)
    model.in_channels, model.image_size = 3, NETS[name]["size"]
    return model.eval()


def official_fn(model, x: torch.Tensor, t_star: float, steps: int | None):
    """DiffPure's reverse SDE over torchsde (forward diffusion included), or None without torchsde."""
    try:
        import torchsde

        from diffpure_fast.testing.torchsde_reference import RevVPSDE, torchsde_ts
    except ImportError:
        return None
    sde = RevVPSDE(model, x.shape[1:])
    ts = torchsde_ts(t_star, x.device)
    dt = 1e-3 if steps is None else (t_star - 1e-5) / steps
    abar = dpf.DIFFPURE_SCHEDULE.discrete_alpha_bar()[dpf.DIFFPURE_SCHEDULE.level_of(t_star) - 1].item()

    def run():
        x_t = (x * 2 - 1) * abar ** 0.5 + torch.randn_like(x) * (1 - abar) ** 0.5
        return torchsde.sdeint_adjoint(sde, x_t.flatten(1), ts, method="euler", dt=dt)

    return run


def measure(fn, repeats: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times),
            "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2 ** 20}


def purify_rows(args, device: torch.device) -> list[dict]:
    rows = []
    for name in args.nets.split(","):
        spec = NETS[name]
        eager_model = compiled_model = None
        for batch in (int(b) for b in args.batches.split(",")):
            size = spec["size"]
            x = torch.rand(batch, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
            opts = dict(t_star=spec["t_star"], seed=0) | ({} if args.steps is None else {"steps": args.steps})
            for variant in args.variants.split(","):
                if variant == "compiled":
                    compiled_model = compiled_model or score_model(name, device, compiled=True)
                    model = compiled_model
                else:
                    eager_model = eager_model or score_model(name, device, compiled=False)
                    model = eager_model
                if variant == "official":
                    fn = official_fn(model, x, spec["t_star"], args.steps)
                    if fn is None:
                        print(f"{name} official: skipped, torchsde is not installed on this machine", flush=True)
                        continue
                else:
                    fn = functools.partial(dpf.purify, x, model, **opts, cuda_graph=variant.endswith("graph"),
                                           autocast="bf16" if "bf16" in variant else None)
                try:
                    res = measure(fn, args.repeats)
                except torch.cuda.OutOfMemoryError:
                    print(f"{name} {variant} batch {batch}: out of memory", flush=True)
                    res = None
                torch.cuda.empty_cache()
                steps = len(dpf.PurifyConfig.build(**{k: v for k, v in opts.items() if k != "seed"}).plan())
                row = {"net": name, "variant": variant, "batch": batch, "steps": steps}
                if res is not None:
                    row |= {**res, "ms_per_purification": res["median_s"] * 1e3,
                            "images_per_s": batch / res["median_s"]}
                rows.append(row)
                print(row, flush=True)
    return rows


def device_peak_gbps(device: torch.device) -> float | None:
    from benchmarks.bench_sde_step import peak_gbps

    peak = peak_gbps(device)
    if peak is None:
        props = torch.cuda.get_device_properties(device)
        clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        if clock_khz and bus_bits:
            peak = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    return peak


def step_rows(args, device: torch.device) -> list[dict]:
    from benchmarks.bench_sde_step import providers, time_ms

    n = args.step_elements
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(n // 4096, 4096, generator=g).to(device) for _ in range(3))
    ids = torch.arange(x.shape[0], device=device)
    peak = device_peak_gbps(device)
    rows = []
    for name, (fn, tensors) in providers(x, eps, z, ids, with_reference=False).items():
        ms, lo, hi = time_ms(fn, device, 20, 3.0)
        gbps = tensors * n * 4 / (ms * 1e-3) / 1e9
        rows.append({"provider": name, "elements": n, "ms_median": ms, "ms_p20": lo, "ms_p80": hi, "GB/s": gbps,
                     "% peak": None if peak is None else 100 * gbps / peak})
        print(rows[-1], flush=True)
    return rows


def write(args, purify: list[dict], steps: list[dict], device: torch.device) -> None:
    cols = ["net", "variant", "batch", "steps", "ms_per_purification", "images_per_s", "first_s", "peak_mib"]
    out_csv = Path(args.output).with_suffix(".csv")
    with out_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(purify)
    peak = device_peak_gbps(device)
    lines = ["# Purification on the GPU", "", header("python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:])),
             f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, peak DRAM bandwidth "
             + (f"{peak:.0f} GB/s" if peak else "unknown"), "",
             "| network | variant | batch | steps | ms / purification | images/s | first call (s) | peak (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in purify:
        if "median_s" not in r:
            lines.append(f"| {r['net']} | {r['variant']} | {r['batch']} | {r['steps']} | OOM | - | - | - |")
            continue
        lines.append(f"| {r['net']} | {r['variant']} | {r['batch']} | {r['steps']} | {r['ms_per_purification']:.1f} "
                     f"| {r['images_per_s']:.2f} | {r['first_s']:.1f} | {r['peak_mib']:.0f} |")
    if steps:
        lines += ["", f"Fused step, float32, {args.step_elements:,} elements (GB/s: 3 tensors moved, 4 for *_z)", "",
                  "| provider | ms (median) | ms p20-p80 | GB/s | % peak |", "|---|---:|---:|---:|---:|"]
        for r in steps:
            pct = "-" if r["% peak"] is None else f"{r['% peak']:.1f}"
            lines.append(f"| {r['provider']} | {r['ms_median']:.3f} | {r['ms_p20']:.3f}-{r['ms_p80']:.3f} | "
                         f"{r['GB/s']:.0f} | {pct} |")
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.output} and {out_csv}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="ncsnpp,adm", help="comma-separated subset of " + ",".join(NETS))
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="Euler steps per purification (default: dt = 1e-3)")
    p.add_argument("--repeats", type=int, default=3, help="timed purifications per row (median)")
    p.add_argument("--step-elements", type=int, default=1 << 26,
                   help="elements of the fused-step bandwidth test (0 skips it); default 64M: 256 MiB per tensor, "
                        "far beyond any L2 cache")
    p.add_argument("--output", default=str(RESULTS / "gpu.md"), help="markdown results (the CSV goes beside it)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(NO_GPU)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; expected a subset of {','.join(VARIANTS)}")
    for n in args.nets.split(","):
        if n not in NETS:
            raise SystemExit(f"--nets: unknown network {n!r}; expected a subset of {','.join(NETS)}")
    device = torch.device("cuda")
    steps = step_rows(args, device) if args.step_elements else []
    purify = purify_rows(args, device)
    write(args, purify, steps, device)


if __name__ == "__main__":
    main()
