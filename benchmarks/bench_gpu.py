"""GPU benchmark: purification latency and throughput per variant, the exact gradient's cost, and the fused step's
DRAM bandwidth against the GPU's peak. Needs a CUDA GPU; without one it exits with a message and measures nothing
(``--machine`` still prints what it would run on). ``scripts/gpu_check.sh`` runs it, sized for one H200 call.

Networks, at their real sizes with random weights (as bench_networks.py builds them):

  ncsnpp   NCSN++ "deep continuous" CIFAR-10 (106.6M parameters, 37 GFLOP per image), 3x32x32, t* = 0.1: 100
           Euler–Maruyama steps
  adm      ADM 256x256 unconditional (552.8M parameters, 2240 GFLOP per image), 3x256x256, t* = 0.15: 150 steps
           (DiffPure's ImageNet setting)

Variants (rows), each at every batch size of --batches:

  eager       dpf.purify, float32 (torch's default TF32 settings: cuDNN convolutions may use TF32)
  compiled    dpf.purify around torch.compile(network) (inductor, dynamic=False: one compile per batch size)
  cuda_graph  dpf.purify(cuda_graph=True): the whole chain captured once, replayed
  bf16        dpf.purify(autocast="bf16"): the network in bfloat16, the state in float32
  bf16_graph  autocast="bf16" and cuda_graph=True
  official    DiffPure's RevVPSDE over torchsde.sdeint_adjoint (the call bench_purify.py times), same network and
              GPU; a row marked "skipped" when torchsde is not installed
  full        the exact gradient an attack takes: dpf.purify(grad_mode="full") and the backward pass of <w, out>
  full_graph  the same with cuda_graph=True (captured forward chain and per-step VJP)

Time: the first call (compilation, graph capture, cuDNN autotuning) is timed apart as "first call"; then the median of
--repeats calls (torch.cuda.synchronize around each). --steps replaces dt = 1e-3 by fewer Euler steps over
[1e-5, t*] (every variant alike; the official call gets dt = (t* - 1e-5) / steps), per batch size if given as
"1:20,64:2": time is linear in the step count (README, CPU scaling sweep), so each row also gives ms per step and
the time and images/s extrapolated to the full 100 / 150 steps. "x official" and "x eager" divide the official and
eager no-grad times per step (same network and batch) by the row's.
Memory (torch.cuda memory counters; the weights, allocated before the row, excluded): "peak" is the largest
allocation during the timed calls, after the counter is reset past the first call (compilation and capture
excluded); a graph replay allocates nothing, so a captured variant's memory shows in "reserved" (the allocator's
reserved memory after the timed calls minus before the row: its graph pools and cached blocks).

Fused step: every implementation available on the GPU (bench_sde_step.py's providers; the CUDA op checks no sample
ids on the host, so every row times kernels alone) on float32 tensors sized beyond L2 (default: each tensor 4x and
16x the L2, rounded up to a power of two: 64M and 256M elements on an H200 with 60 MB of L2), GB/s = bytes a fused
kernel moves / median time (triton.testing.do_bench), as % of the datasheet peak (bench_sde_step.PEAK_GBPS, else
2 x memory clock x bus width) and of a device-to-device copy measured the same way (the practical ceiling).

    python benchmarks/bench_gpu.py                              # everything -> benchmarks/results/gpu.md (+ CSVs)
    python benchmarks/bench_gpu.py --nets ncsnpp --batches 1,64 --steps 1:100,64:20 --variants eager,cuda_graph
    python benchmarks/bench_gpu.py --machine                    # the GPU, driver and versions, as markdown

Results are written after every row (a run stopped by a time limit keeps what it measured); --append adds to the
CSVs of an earlier run instead of starting them anew, and --budget-s skips (and reports as skipped) the rows that
would start too close to that many seconds after the process started.
"""

from __future__ import annotations

import argparse
import csv
import functools
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diffpure_fast as dpf
from benchmarks._common import RESULTS, header
from diffpure_fast.cuda_graphs import clear_cuda_graphs

NETS = {
    "ncsnpp": {"bench": "ncsnpp_cifar10_deep", "t_star": 0.1, "time_input": "continuous", "size": 32},
    "adm": {"bench": "adm_imagenet256_uncond", "t_star": 0.15, "time_input": "discrete", "size": 256},
}
VARIANTS = ("eager", "cuda_graph", "bf16", "bf16_graph", "official", "full", "full_graph", "compiled")
NO_GPU = ("bench_gpu.py: no CUDA GPU is visible (torch.cuda.is_available() is False), so nothing was measured; "
          "run it on a machine with a GPU (the README's GPU numbers stay 'not measured yet' until then)")
# Seconds a row needs left in --budget-s to start: a compile of NCSN++/ADM takes about a minute (a guess until
# measured on the GPU machine), any other row seconds.
RESERVE_S = {"compiled": 90.0}
ROW_RESERVE_S = 10.0
PURIFY_COLUMNS = ["net", "variant", "batch", "steps", "full_steps", "ms_per_purification", "ms_per_step",
                  "ms_full", "images_per_s", "first_s", "peak_mib", "reserved_mib", "status"]
STEP_COLUMNS = ["provider", "elements", "mib_per_tensor", "beyond_l2", "ms_median", "ms_p20", "ms_p80", "GB/s",
                "% peak", "% copy"]
_START = time.monotonic()


def machine_lines() -> list[str]:
    """The GPU, driver, CUDA/cuDNN/Triton/torch versions and host, as markdown list items."""
    lines = [f"- Host: {platform.node()}, Python {platform.python_version()}, torch {torch.__version__}, "
             f"CUDA (torch) {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"]
    try:
        import triton

        lines.append(f"- Triton {triton.__version__}")
    except ImportError:
        lines.append("- Triton: not installed")
    try:
        import torchsde

        lines.append(f"- torchsde {torchsde.__version__}")
    except ImportError:
        lines.append("- torchsde: not installed (official rows skip)")
    if not torch.cuda.is_available():
        return [*lines, "- GPU: none visible"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"- GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                     f"{p.total_memory / 2 ** 30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2 ** 20:.0f} MiB")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        lines.append(f"- nvidia-smi (driver, SM clock, memory clock, power limit): {smi}")
    except (OSError, subprocess.SubprocessError):
        lines.append("- nvidia-smi: not available")
    return lines


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
        with torch.no_grad():
            x_t = (x * 2 - 1) * abar ** 0.5 + torch.randn_like(x) * (1 - abar) ** 0.5
            return torchsde.sdeint_adjoint(sde, x_t.flatten(1), ts, method="euler", dt=dt)

    return run


def variant_fn(variant: str, model, x: torch.Tensor, opts: dict):
    """The callable one row times (None: the variant cannot run here, e.g. official without torchsde)."""
    if variant == "official":
        return official_fn(model, x, opts["t_star"], opts.get("steps"))
    graph = variant.endswith("graph")
    autocast = "bf16" if variant.startswith("bf16") else None
    if variant.startswith("full"):
        w = torch.randn(x.shape, device=x.device, generator=torch.Generator(x.device).manual_seed(1))

        def exact_gradient():
            xg = x.clone().requires_grad_(True)
            out = dpf.purify(xg, model, **opts, grad_mode="full", cuda_graph=graph)
            return torch.autograd.grad(out, xg, w)[0]

        return exact_gradient

    def no_grad():
        with torch.no_grad():
            return dpf.purify(x, model, **opts, cuda_graph=graph, autocast=autocast)

    return no_grad


def measure(fn, repeats: int) -> dict:
    """First call and median of ``repeats`` timed calls (seconds); memory over what was allocated before the row.

    The peak counter is reset after the first call, so that compilation, capture and autotuning do not count."""
    torch.cuda.synchronize()
    base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times),
            "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2 ** 20,
            "reserved_mib": (torch.cuda.memory_reserved() - base_reserved) / 2 ** 20}


def parse_steps(text: str | None, batches: list[int]) -> dict[int, int | None]:
    """--steps: None (dt = 1e-3), "N" for every batch, or "B:N,B:N" per batch size (each of --batches named)."""
    if text is None or not text.strip():
        return dict.fromkeys(batches)
    if ":" not in text:
        return dict.fromkeys(batches, int(text))
    per = {}
    for item in text.split(","):
        b, _, n = item.partition(":")
        per[int(b)] = int(n)
    missing = [b for b in batches if b not in per]
    if missing:
        raise SystemExit(f"--steps: names no step count for batch sizes {missing} (expected N or B:N,B:N,...)")
    return per


def row_plan(nets: list[str], batches: list[int], variants: list[str]) -> list[tuple[str, int, str]]:
    """(net, batch, variant) in run order: per network, every batch's rows, the compiled ones last (a compile
    costs the most and is the row a time budget gives up first)."""
    plan = []
    for name in nets:
        rows = [(name, b, v) for b in batches for v in variants]
        plan += [r for r in rows if r[2] != "compiled"] + [r for r in rows if r[2] == "compiled"]
    return plan


def purify_rows(args, device: torch.device, on_row=None) -> list[dict]:
    batches = [int(b) for b in args.batches.split(",")]
    steps_for = parse_steps(args.steps, batches)
    budget = getattr(args, "budget_s", None)
    rows, models = [], {}
    for name, batch, variant in row_plan(args.nets.split(","), batches, args.variants.split(",")):
        if any(net != name for net, _ in models):
            models.clear()  # the previous network's weights
        spec = NETS[name]
        opts = dict(t_star=spec["t_star"], seed=0) | ({} if steps_for[batch] is None else {"steps": steps_for[batch]})
        steps = len(dpf.PurifyConfig.build(**{k: v for k, v in opts.items() if k != "seed"}).plan())
        full_steps = len(dpf.PurifyConfig.build(t_star=spec["t_star"]).plan())
        row = {"net": name, "variant": variant, "batch": batch, "steps": steps, "full_steps": full_steps}
        left = None if budget is None else budget - (time.monotonic() - _START)
        if left is not None and left < RESERVE_S.get(variant, ROW_RESERVE_S):
            row["status"] = f"skipped: {left:.0f} s left of --budget-s {budget:.0f}"
        else:
            compiled = variant == "compiled"
            if (name, compiled) not in models:
                models[(name, compiled)] = score_model(name, device, compiled=compiled)
            model = models[(name, compiled)]
            size = spec["size"]
            x = torch.rand(batch, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
            fn = variant_fn(variant, model, x, opts)
            if fn is None:
                row["status"] = "skipped: torchsde is not installed"
            else:
                try:
                    res = measure(fn, args.repeats)
                    ms = res["median_s"] * 1e3
                    row |= {**res, "ms_per_purification": ms, "ms_per_step": ms / steps,
                            "ms_full": ms / steps * full_steps,
                            "images_per_s": batch / (ms / steps * full_steps / 1e3), "status": "ok"}
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "out of memory"
                finally:
                    clear_cuda_graphs(model)  # each graph holds its memory pool
                    torch.cuda.empty_cache()
        rows.append(row)
        print({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        if on_row is not None:
            on_row(row)
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


def step_rows(sizes: list[int], device: torch.device, on_row=None) -> list[dict]:
    """The fused-step providers and a device-to-device copy (the practical ceiling) at each size, in order."""
    from benchmarks.bench_sde_step import l2_bytes

    peak, l2 = device_peak_gbps(device), l2_bytes(device)
    rows = []
    for n in sizes:
        for row in _size_rows(n, device):
            row |= {"beyond_l2": None if l2 is None else n * 4 > l2,
                    "% peak": None if peak is None else 100 * row["GB/s"] / peak}
            rows.append(row)
            print(row, flush=True)
            if on_row is not None:
                on_row(row)
        torch.cuda.empty_cache()  # this size's tensors
    return rows


def _size_rows(n: int, device: torch.device) -> list[dict]:
    """One row per provider on n float32 elements, the copy first; GB/s also as % of the copy's."""
    from benchmarks.bench_sde_step import providers, time_ms

    g = torch.Generator(device).manual_seed(0)
    x, eps, z = (torch.randn(n // 4096, 4096, device=device, generator=g) for _ in range(3))
    ids = torch.arange(x.shape[0], device=device)
    dst = torch.empty_like(x)
    timed = {"copy": (lambda: dst.copy_(x), 2)} | providers(x, eps, z, ids, with_reference=False)
    rows = []
    for name, (fn, tensors) in timed.items():
        ms, lo, hi = time_ms(fn, device, 20, 3.0)
        gbps = tensors * n * 4 / (ms * 1e-3) / 1e9
        copy_gbps = rows[0]["GB/s"] if rows else gbps
        rows.append({"provider": name, "elements": n, "mib_per_tensor": n * 4 / 2 ** 20, "ms_median": ms,
                     "ms_p20": lo, "ms_p80": hi, "GB/s": gbps, "% copy": 100 * gbps / copy_gbps})
    return rows


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _append_csv(path: Path, columns: list[str], row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def _num(row: dict, key: str) -> float | None:
    v = row.get(key)
    return None if v in (None, "", "None") else float(v)


def render(output: Path, command: str) -> str:
    """gpu.md from the two CSVs beside it (every row written so far, also by earlier --append runs)."""
    purify = _read_csv(output.with_suffix(".csv"))
    steps = _read_csv(output.with_name(output.stem + "_step.csv"))
    device = torch.device("cuda") if torch.cuda.is_available() else None
    peak = device_peak_gbps(device) if device is not None else None
    lines = ["# Purification on the GPU", "", header(command), *machine_lines(),
             "- Peak DRAM bandwidth (datasheet): " + (f"{peak:.0f} GB/s" if peak else "unknown"), ""]
    per_step = {(r["net"], r["batch"], r["variant"]): _num(r, "ms_per_step") for r in purify}
    if purify:
        lines += ["Times per purification at the steps run; per step; and extrapolated to the full step count "
                  "(linear in steps). x official / x eager: the official / eager no-grad time per step over the "
                  "row's (same network and batch). full*: forward and exact backward.", "",
                  "| network | variant | batch | steps | ms | ms / step | ms at full steps | images/s (full) | "
                  "x official | x eager | first call (s) | peak (MiB) | reserved (MiB) | status |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in purify:
            ms_step = _num(r, "ms_per_step")
            if ms_step is None:
                lines.append(f"| {r['net']} | {r['variant']} | {r['batch']} | {r['steps']} | - | - | - | - | - | - "
                             f"| - | - | - | {r['status']} |")
                continue
            ratios = []
            for ref in ("official", "eager"):
                base = per_step.get((r["net"], r["batch"], ref))
                ratios.append("-" if base is None else f"{base / ms_step:.2f}")
            lines.append(f"| {r['net']} | {r['variant']} | {r['batch']} | {r['steps']} | "
                         f"{float(r['ms_per_purification']):.1f} | {ms_step:.2f} | {float(r['ms_full']):.0f} | "
                         f"{float(r['images_per_s']):.2f} | {ratios[0]} | {ratios[1]} | {float(r['first_s']):.1f} "
                         f"| {float(r['peak_mib']):.0f} | {float(r['reserved_mib']):.0f} | {r['status']} |")
    if steps:
        lines += ["", "Fused step, float32 (GB/s: bytes a fused kernel moves, 3 tensors, 4 for *_z and torch_z; 2 "
                  "for copy); % copy: of the device-to-device copy at the same size", "",
                  "| provider | elements | MiB / tensor | beyond L2 | ms (median) | ms p20-p80 | GB/s | % peak | "
                  "% copy |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in steps:
            pct = "-" if _num(r, "% peak") is None else f"{float(r['% peak']):.1f}"
            lines.append(f"| {r['provider']} | {int(r['elements']):,} | {float(r['mib_per_tensor']):.0f} | "
                         f"{r['beyond_l2']} | {float(r['ms_median']):.3f} | {float(r['ms_p20']):.3f}-"
                         f"{float(r['ms_p80']):.3f} | {float(r['GB/s']):.0f} | {pct} | {float(r['% copy']):.1f} |")
    text = "\n".join(lines) + "\n"
    output.write_text(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="ncsnpp,adm", help="comma-separated subset of " + ",".join(NETS))
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--steps", default=None,
                   help="Euler steps per purification: N, or B:N,B:N per batch size (default: dt = 1e-3)")
    p.add_argument("--repeats", type=int, default=3, help="timed purifications per row (median)")
    p.add_argument("--step-sizes", default="auto",
                   help="fused-step sizes in float32 elements (K/M suffixes), 'auto' (4x and 16x the L2 per tensor) "
                        "or 'none'")
    p.add_argument("--parts", default="step,purify", help="what to run: step, purify, or both")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip (and report) the rows that would start this close to this many seconds after start")
    p.add_argument("--append", action="store_true", help="add to the CSVs beside --output instead of starting anew")
    p.add_argument("--output", default=str(RESULTS / "gpu.md"),
                   help="markdown results; gpu.csv and gpu_step.csv (same stem) go beside it")
    p.add_argument("--machine", action="store_true", help="print the machine and versions (markdown) and exit")
    args = p.parse_args(argv)
    if args.machine:
        print("\n".join(machine_lines()))
        return
    if not torch.cuda.is_available():
        raise SystemExit(NO_GPU)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r}; expected a subset of {','.join(VARIANTS)}")
    for n in args.nets.split(","):
        if n not in NETS:
            raise SystemExit(f"--nets: unknown network {n!r}; expected a subset of {','.join(NETS)}")
    parts = set(args.parts.split(","))
    if not parts or parts - {"step", "purify"}:
        raise SystemExit(f"--parts: expected step, purify or step,purify, got {args.parts!r}")
    device = torch.device("cuda")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    purify_csv, step_csv = output.with_suffix(".csv"), output.with_name(output.stem + "_step.csv")
    if not args.append:
        purify_csv.unlink(missing_ok=True)
        step_csv.unlink(missing_ok=True)
    command = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if "step" in parts and args.step_sizes != "none":
        from benchmarks.bench_sde_step import beyond_l2_sizes, parse_sizes

        sizes = beyond_l2_sizes(device, 4) if args.step_sizes == "auto" else parse_sizes(args.step_sizes)
        step_rows(sizes, device, on_row=functools.partial(_written, step_csv, STEP_COLUMNS, output, command))
    if "purify" in parts:
        purify_rows(args, device, on_row=functools.partial(_written, purify_csv, PURIFY_COLUMNS, output, command))
    print(render(output, command))
    print(f"wrote {output}, {purify_csv.name} and {step_csv.name} beside it")


def _written(path: Path, columns: list[str], output: Path, command: str, row: dict) -> None:
    """Appends a finished row to its CSV and re-renders the markdown: a stopped run keeps every row so far."""
    _append_csv(path, columns, row)
    render(output, command)


if __name__ == "__main__":
    main()
